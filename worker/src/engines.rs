//! Builds the configured engine(s).

use ditfleet_common::config::EngineChoice;
use ditfleet_engine::flux::{Pipeline, PipelineOptions};
use ditfleet_engine::simulated::{SimulatedConfig, SimulatedEngine};
use ditfleet_engine::{Engine, EngineError};
use tch::{Device, Kind};

/// Parses `cpu` / `cuda:N` (already validated by the config loader).
fn device(name: &str) -> Result<Device, EngineError> {
    match name {
        "cpu" => Ok(Device::Cpu),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Device::Cuda)
            .ok_or_else(|| EngineError::InvalidRequest(format!("unknown device {other:?}"))),
    }
}

/// The device for the pipeline: the first configured one, else the first GPU, else the CPU.
fn pick_device(devices: Option<&[String]>) -> Result<Device, EngineError> {
    match devices.and_then(|d| d.first()) {
        Some(d) => device(d),
        None if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        None => Ok(Device::Cpu),
    }
}

/// Engines for the worker's slots: one per slot for the simulated engine; one pipeline for a real
/// model (its weights are resident once; extra slots queue behind it).
pub fn build(
    choice: &EngineChoice,
    slots: u16,
    devices: Option<&[String]>,
) -> Result<Vec<Box<dyn Engine>>, EngineError> {
    match choice {
        EngineChoice::Simulated { step_ms } => Ok((0..slots.max(1))
            .map(|_| {
                Box::new(SimulatedEngine::new(SimulatedConfig {
                    step_ms: *step_ms,
                    ..Default::default()
                })) as Box<dyn Engine>
            })
            .collect()),
        EngineChoice::Flux { model_dir: None, .. } => {
            tracing::warn!(
                "FLUX_MODEL_DIR is unset: serving the TINY RANDOM-WEIGHT Flux config (not a trained model; images are noise)"
            );
            Ok(vec![Box::new(Pipeline::tiny_random(0)?)])
        }
        EngineChoice::Flux {
            model_dir: Some(dir),
            low_memory,
        } => {
            let dev = pick_device(devices)?;
            let kind = if dev.is_cuda() {
                Kind::BFloat16
            } else {
                Kind::Float
            };
            let mut options = PipelineOptions::new(dev, kind);
            // A second configured device takes the text encoders.
            if let Some(second) = devices.and_then(|d| d.get(1)) {
                options.devices.text_encoders = device(second)?;
            }
            options.free_text_encoders = *low_memory;
            Ok(vec![Box::new(Pipeline::load(dir, options)?)])
        }
    }
}
