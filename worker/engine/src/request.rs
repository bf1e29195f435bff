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
    /// Sampler: `euler`, `euler_a`, `dpmpp_2m`, `dpmpp_2m_karras` (SDXL) or `flow_euler` (Flux);
    /// `None` = the model's default (`euler` for SDXL, `flow_euler` for Flux).
    #[serde(default)]
    pub scheduler: Option<String>,
    /// LoRA adapters applied for this request, in stack order (empty = the base model).
    #[serde(default)]
    pub loras: Vec<LoraRef>,
}

/// One LoRA adapter of a request's stack, as the job names it (the worker resolves the files).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraRef {
    pub name: String,
    pub version: String,
    #[serde(serialize_with = "f32_as_written")]
    pub scale: f32,
    /// Where the worker put the adapter's verified file (safetensors) on this machine; engines
    /// read the adapter from there. `None` until the worker has resolved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<std::path::PathBuf>,
    /// The SHA-256 (hex) of that file as the registry's manifest gives it: part of the engine's
    /// cache key, so a version pushed again with other bytes is never served from a stale entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// An `f32` as the shortest decimal that reads back as it (`0.8`, not `0.800000011920929`, which
/// is what widening it to `f64` gives in a `serde_json::Value`), so reported stacks show the
/// scales the job gave.
fn f32_as_written<S: serde::Serializer>(v: &f32, s: S) -> Result<S::Ok, S::Error> {
    let shortest: f64 = v.to_string().parse().unwrap_or(f64::from(*v));
    s.serialize_f64(shortest)
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
    /// the job's status with the timings (the simulated engine reports the plan it was asked
    /// for, or `single`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// The sampler the image was generated with, where the engine reports it (the simulated
    /// engine does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    /// The LoRA stack applied, where the engine reports it (the simulated engine does).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loras: Vec<LoraRef>,
}
