//! ditfleet inference engine.
//!
//! A library with no async runtime and no queue: the worker service drives it from a blocking
//! thread, and `ditfleet-worker generate` drives it from the command line. Every engine implements
//! [`Engine`]; today that is the [`simulated::SimulatedEngine`] (for fleet load and chaos tests),
//! the Flux.1 pipeline ([`flux`]) and the SDXL pipeline ([`models::sdxl`]), both behind the model
//! seam ([`models::DiffusionModel`]) and the one denoising loop ([`denoise`]).

pub mod aten;
pub mod checkpoint;
pub mod denoise;
pub mod device;
pub mod error;
pub mod guidance;
pub mod image;
pub mod lora;
pub mod models;
/// Flux.1 (`models::flux`), at the crate root too: its paths predate the model seam.
pub use models::flux;
pub mod nn;
pub mod parallel;
pub mod precision;
pub mod request;
pub mod schedulers;
pub mod settings;
pub mod simulated;

pub use checkpoint::StepCheckpoint;
pub use error::EngineError;
pub use image::GeneratedImage;
pub use precision::Precision;
pub use request::{Control, GenerateRequest, LoraRef, StageTimings, StepEvent};

/// What an engine tells the fleet about itself (advertised in the worker's registration).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EngineInfo {
    /// Engine kind, e.g. `simulated` or `flux`.
    pub kind: String,
    /// Models this engine can serve, e.g. `flux-dev`.
    pub models: Vec<String>,
    /// Loaded model version per model (`flux-dev@<version>`).
    pub model_versions: Vec<String>,
    /// Devices the engine computes on, e.g. `cpu` or `cuda:0`.
    pub devices: Vec<String>,
    /// How many GPUs/ranks one image is split across.
    pub parallel_degree: u32,
    /// The transformer's numeric format ([`Precision`]); engines advertised before the field
    /// existed read as bf16.
    #[serde(default)]
    pub precision: Precision,
    /// Human-readable note shown by `ditfleetctl workers` (e.g. "tiny random-weight Flux config").
    pub note: String,
}

/// What an engine holds of the fleet's LoRA adapters: the stack merged into its weights now (the
/// one a job naming the same stack finds hot and pays nothing for), the adapters kept in its cache,
/// and counters the worker turns into metrics and advertises for the scheduler's affinity.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoraStatus {
    /// The stack applied now, in job order (`path` is `None` here).
    pub applied: Vec<LoraRef>,
    /// `name@version` of every adapter held in the engine's cache (host or GPU memory).
    pub cached: Vec<String>,
    /// Adapters a job found in the cache / had to read from its file (a job whose stack was
    /// already applied counts neither; the ranks of a multi-GPU plan count once).
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Bytes the cache holds, and its bound.
    pub cache_bytes: u64,
    pub cache_capacity_bytes: u64,
    /// Milliseconds the last stack switch took to apply (0 when the stack was already hot).
    pub last_apply_ms: f64,
}

/// An image generator. Implementations keep their weights resident between calls.
pub trait Engine: Send {
    /// Static description for registration and logs.
    fn info(&self) -> EngineInfo;

    /// Generates one image. `on_step` is called after every denoising step; returning
    /// [`Control::Cancel`] stops the generation at that step with [`EngineError::Cancelled`].
    fn generate(
        &mut self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<GeneratedImage, EngineError>;

    /// [`Engine::generate`] with step checkpoints: starts after `resume.step` from its state when
    /// given, and hands a checkpoint to `on_checkpoint` every `every` steps (0 = never) and at the
    /// step where `on_step` cancels, so the work done survives. Resuming gives the same image as an
    /// uninterrupted run. Engines that cannot checkpoint run from the start and reject `resume`.
    fn generate_resumable(
        &mut self,
        request: &GenerateRequest,
        resume: Option<&StepCheckpoint>,
        every: u32,
        on_checkpoint: &mut dyn FnMut(StepCheckpoint),
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<GeneratedImage, EngineError> {
        if resume.is_some() {
            return Err(EngineError::BadCheckpoint(
                "this engine cannot resume from a checkpoint".into(),
            ));
        }
        let _ = (every, on_checkpoint);
        self.generate(request, on_step)
    }

    /// Gives cached device memory back after an out-of-memory failure, before a retry. (libtorch's
    /// CUDA caching allocator already frees its cached blocks and retries once before reporting
    /// out of memory, so engines built on it have nothing more to free; the retry's back-off gives
    /// other processes on the GPU time to release theirs.)
    fn release_memory(&mut self) {}

    /// `Some(reason)` once the engine runs with reduced capacity (e.g. a GPU was quarantined and
    /// the parallel groups rebuilt on the others); the worker advertises it as `degraded`.
    fn degraded(&self) -> Option<String> {
        None
    }

    /// The LoRA adapters this engine holds (see [`LoraStatus`]); engines without LoRA support
    /// report an empty status.
    fn lora_status(&self) -> LoraStatus {
        LoraStatus::default()
    }
}
