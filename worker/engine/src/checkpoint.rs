//! Step checkpoints: the denoising state after some step, so an interrupted generation can resume
//! there (on any worker with the same plan) and produce the same image as an uninterrupted run.

/// The state after `step` denoising steps, serialised by the engine that made it (safetensors
/// for Flux: the packed latents; the sampler's other state, the schedule, is a pure function of the
/// request, so the step index is all it needs besides).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepCheckpoint {
    /// Steps already taken (1-based index of the last finished step).
    pub step: u32,
    pub bytes: Vec<u8>,
}
