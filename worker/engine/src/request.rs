//! What the engine is asked to do and what it reports while doing it.

use std::time::Duration;

/// One image to generate. The fleet validates the public job before it gets here; engines still
/// check what they depend on (see [`crate::EngineError::InvalidRequest`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerateRequest {
    /// Model name, e.g. `flux-dev`, `flux-schnell`.
    pub model: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f32,
    pub seed: u64,
}

/// Emitted after each denoising step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepEvent {
    /// 1-based index of the step just finished.
    pub step: u32,
    pub total: u32,
    /// Time since the denoising loop started.
    pub elapsed: Duration,
}

/// Returned by the step callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    Cancel,
}

/// Wall time of each pipeline stage of one generation.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageTimings {
    pub encode_ms: f64,
    pub denoise_ms: f64,
    pub decode_ms: f64,
    /// Peak device memory during the generation, bytes, where the device reports it.
    pub peak_memory_bytes: Option<u64>,
}
