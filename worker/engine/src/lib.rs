//! ditfleet inference engine.
//!
//! A library with no async runtime and no queue: the worker service drives it from a blocking
//! thread, and `ditfleet-worker generate` drives it from the command line. Every engine implements
//! [`Engine`]; today that is the [`simulated::SimulatedEngine`] (for fleet load and chaos tests)
//! and the Flux.1 pipeline.

pub mod error;
pub mod flux;
pub mod image;
pub mod request;
pub mod simulated;

pub use error::EngineError;
pub use image::GeneratedImage;
pub use request::{Control, GenerateRequest, StageTimings, StepEvent};

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
    /// Human-readable note shown by `ditfleetctl workers` (e.g. "tiny random-weight Flux config").
    pub note: String,
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
}
