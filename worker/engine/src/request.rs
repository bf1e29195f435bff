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
    /// "True" classifier-free guidance (diffusers' `true_cfg_scale`): with a `negative_prompt`
    /// and a scale above 1, every step also runs the model on the negative prompt and uses
    /// `neg + scale * (pos - neg)`. 1 (the default) = off, as for guidance-distilled Flux.
    #[serde(default = "one")]
    pub true_cfg_scale: f32,
    pub seed: u64,
    /// Parallel plan for this request (e.g. `ulysses=2`, see `parallel::Plan`), overriding the
    /// engine's configured or autotuned choice. Engines that cannot run it fail the request with
    /// [`crate::EngineError::InvalidRequest`]; `None` = the engine's choice.
    #[serde(default)]
    pub plan: Option<String>,
}

fn one() -> f32 {
    1.0
}

impl GenerateRequest {
    /// Whether this request runs true CFG (a negative prompt and a scale above 1).
    pub fn true_cfg(&self) -> bool {
        self.true_cfg_scale > 1.0 && self.negative_prompt.is_some()
    }
}

/// Emitted after each denoising step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepEvent {
    /// 1-based index of the step just finished.
    pub step: u32,
    pub total: u32,
    /// Time since the denoising loop started.
    pub elapsed: Duration,
    /// Host time spent issuing this step's work (until the device sync that ends the step):
    /// when it approaches the step time, the step is bound by kernel launches, not the GPU.
    pub host: Duration,
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
    /// Peak device memory during the generation, bytes, where the device reports it (libtorch's
    /// allocated bytes on the transformer's CUDA device, as `torch.cuda.max_memory_allocated`).
    pub peak_memory_bytes: Option<u64>,
    /// The same peak per stage: text encoding, denoising loop, VAE decode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_encode_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_denoise_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_memory_decode_bytes: Option<u64>,
    /// The parallel plan the image was generated with (`single`, `ulysses=2`, ...); recorded in
    /// the job's status with the timings. `None` for engines without plans (simulated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}
