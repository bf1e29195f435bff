//! Builds the configured engine(s).

use ditfleet_common::config::EngineChoice;
use ditfleet_engine::simulated::{SimulatedConfig, SimulatedEngine};
use ditfleet_engine::{Engine, EngineError};

/// Engines for the worker's slots: one per slot for the simulated engine; one shared pipeline for
/// a real model (its weights are resident once; extra slots queue behind it).
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
        EngineChoice::Flux { model_dir } => {
            let _ = (model_dir, devices);
            Err(EngineError::Load(
                "this build has no Flux pipeline yet; run the worker with DITFLEET_ENGINE=simulated".into(),
            ))
        }
    }
}
