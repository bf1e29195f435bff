//! diffusers' `FlowMatchEulerDiscreteScheduler` as FluxPipeline configures it, behind the
//! [`Scheduler`] trait: a thin wrapper over [`crate::flux::sampling`]'s `schedule` and
//! `euler_step`, which the Flux pipeline also calls directly.

use tch::Tensor;

use super::config::{Reader, SchedulerKind};
use super::state::{StateReader, StateWriter};
use super::{Scheduler, check_step};
use crate::EngineError;
use crate::flux::sampling::{self, SchedulerConfig};

/// Reads the options FluxPipeline's scheduler takes, refusing the ones
/// [`crate::flux::sampling::schedule`] does not implement (the same checks as
/// [`SchedulerConfig::from_json`], with the key and value in the message).
pub fn config_from_reader(r: &Reader<'_>) -> Result<SchedulerConfig, EngineError> {
    const CLASS: &str = "FlowMatchEulerDiscreteScheduler";
    for key in [
        "use_karras_sigmas",
        "use_exponential_sigmas",
        "use_beta_sigmas",
        "invert_sigmas",
        "stochastic_sampling",
    ] {
        r.must_be_false(key, CLASS)?;
    }
    if let Some(v) = r.get("shift_terminal") {
        return Err(r.err(&format!("shift_terminal = {v} is not supported (only null)")));
    }
    r.choice("time_shift_type", "exponential", &["exponential"])?;
    let d = SchedulerConfig::dev();
    Ok(SchedulerConfig {
        num_train_timesteps: r.count("num_train_timesteps", 1000)? as f64,
        shift: r.f64("shift", 1.0)?,
        use_dynamic_shifting: r.bool("use_dynamic_shifting", false)?,
        base_image_seq_len: r.f64("base_image_seq_len", d.base_image_seq_len)?,
        max_image_seq_len: r.f64("max_image_seq_len", d.max_image_seq_len)?,
        base_shift: r.f64("base_shift", d.base_shift)?,
        max_shift: r.f64("max_shift", d.max_shift)?,
    })
}

/// diffusers' `FlowMatchEulerDiscreteScheduler` with the options FluxPipeline uses: the sigmas
/// `linspace(1, 1/steps, steps)`, shifted by a fixed `shift` or, with `use_dynamic_shifting`,
/// by `exp(mu)` with `mu` linear in the packed image sequence length (Flux.1-dev); timesteps
/// `sigma * num_train_timesteps`; the step `sample + (sigma_next - sigma) * model_output` (the
/// model predicts the velocity). Stateless.
pub struct FlowMatchEulerDiscreteScheduler {
    config: SchedulerConfig,
    schedule: sampling::Schedule,
}

impl FlowMatchEulerDiscreteScheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            schedule: sampling::Schedule {
                sigmas: Vec::new(),
                timesteps: Vec::new(),
            },
        }
    }

    /// FLUX.1-dev (dynamic shifting: give `image_seq_len` to `set_timesteps`).
    pub fn flux_dev() -> Self {
        Self::new(SchedulerConfig::dev())
    }

    /// FLUX.1-schnell (no shift).
    pub fn flux_schnell() -> Self {
        Self::new(SchedulerConfig::schnell())
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }
}

impl Scheduler for FlowMatchEulerDiscreteScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::FlowMatchEulerDiscrete
    }

    fn set_timesteps(&mut self, steps: usize, image_seq_len: Option<i64>) -> Result<(), EngineError> {
        if steps == 0 {
            return Err(EngineError::InvalidRequest(
                "scheduler: steps must be at least 1".into(),
            ));
        }
        let seq = match (self.config.use_dynamic_shifting, image_seq_len) {
            (true, None) => {
                return Err(EngineError::InvalidRequest(
                    "scheduler: FlowMatchEulerDiscreteScheduler with use_dynamic_shifting needs the \
                     image sequence length"
                        .into(),
                ));
            }
            (_, s) => s.unwrap_or(0),
        };
        self.schedule = sampling::schedule(&self.config, steps, seq);
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.schedule.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor, EngineError> {
        check_step(step_index, self.num_steps())?;
        Ok(sample.shallow_clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor, EngineError> {
        check_step(step_index, self.num_steps())?;
        let s = &self.schedule.sigmas;
        Ok(sampling::euler_step(
            sample,
            model_output,
            s[step_index],
            s[step_index + 1],
        )?)
    }

    fn state_bytes(&self) -> Result<Vec<u8>, EngineError> {
        Ok(StateWriter::new(self.kind(), self.num_steps()).finish())
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        StateReader::new(bytes, self.kind(), self.num_steps())?.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_match_schedule_is_the_flux_sampling_schedule() {
        let mut s = FlowMatchEulerDiscreteScheduler::flux_dev();
        assert!(s.set_timesteps(4, None).is_err());
        s.set_timesteps(4, Some(1024)).unwrap();
        let want = sampling::schedule(&SchedulerConfig::dev(), 4, 1024);
        assert_eq!(s.sigmas(), &want.sigmas[..]);
        assert_eq!(s.timesteps(), &want.timesteps[..]);
    }

    #[test]
    fn shift_terminal_and_stochastic_sampling_are_refused() {
        let v: serde_json::Value = serde_json::from_str(r#"{"shift_terminal": 0.1}"#).unwrap();
        let e = config_from_reader(&Reader::new(&v, "f.json").unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("shift_terminal = 0.1"), "{e}");
        let v: serde_json::Value = serde_json::from_str(r#"{"stochastic_sampling": true}"#).unwrap();
        let e = config_from_reader(&Reader::new(&v, "f.json").unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("stochastic_sampling = true"), "{e}");
    }
}
