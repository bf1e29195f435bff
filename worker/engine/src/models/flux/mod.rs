//! Flux.1 text-to-image (dev and schnell) on libtorch: the transformer, T5-XXL and CLIP-L text
//! encoders, the VAE decoder, the flow-matching Euler sampler and the [`Pipeline`] that ties them
//! together behind [`crate::Engine`].

pub mod blocks;
pub mod clip;
pub mod embed;
pub mod fp8;
pub mod joint;
pub mod layers;
pub mod parallel;
pub mod part;
pub mod pipeline;
pub mod sampling;
pub mod t5;
pub mod transformer;
pub mod transformer_keys;
pub mod vae;

/// The shared checkpoint loading and tokenizers, under their old Flux paths.
pub use crate::nn::{tokenizer, weights};
pub use pipeline::{Devices, Pipeline, PipelineOptions};

use std::path::Path;
use std::sync::Mutex;

use crate::EngineError;

/// Serialises "seed libtorch's global CPU generator, then draw" sequences (noise, tiny random
/// weights) so concurrent generations in one process stay deterministic.
pub static TORCH_RNG: Mutex<()> = Mutex::new(());

/// Locks [`TORCH_RNG`] (a poisoned lock is still usable: it guards no data). Code in the same
/// process that draws from libtorch's global RNG should hold it too.
pub fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    TORCH_RNG.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads a JSON config file.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value, EngineError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EngineError::Load(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))
}

/// A required integer field of a JSON config.
pub(crate) fn json_i64(v: &serde_json::Value, key: &str, path: &Path) -> Result<i64, EngineError> {
    v.get(key)
        .and_then(|x| x.as_i64())
        .ok_or_else(|| EngineError::Load(format!("{}: missing integer field {key:?}", path.display())))
}
