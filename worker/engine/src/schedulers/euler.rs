//! diffusers' `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`.

use tch::Tensor;

use super::config::{Reader, SchedulerKind};
use super::discrete::{self, FinalSigmas, PredictionType, TimestepSpacing, Train, TrainConfig};
use super::state::{StateReader, StateWriter};
use super::{Scheduler, check_noise, check_step, numpy, scalar};
use crate::EngineError;

/// `interpolation_type`: how the inference sigmas are read off the train sigmas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interpolation {
    /// `np.interp` at the (fractional) inference timesteps.
    Linear,
    /// `torch.linspace(log(sigma_max), log(sigma_min), steps + 1).exp()`; as in diffusers this
    /// yields `steps + 1` sigmas before the final one is appended, so the last step ends at the
    /// smallest train sigma.
    LogLinear,
}

/// `timestep_type`: what the model is called with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepType {
    Discrete,
    /// `0.25 * log(sigma)` (only with `prediction_type = "v_prediction"`, as in diffusers).
    Continuous,
}

/// The options of diffusers' `EulerDiscreteScheduler` this implementation takes.
#[derive(Debug, Clone, PartialEq)]
pub struct EulerDiscreteConfig {
    pub train: TrainConfig,
    pub prediction_type: PredictionType,
    pub interpolation_type: Interpolation,
    pub use_karras_sigmas: bool,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub timestep_spacing: TimestepSpacing,
    pub timestep_type: TimestepType,
    pub steps_offset: i64,
    pub final_sigmas_type: FinalSigmas,
}

impl EulerDiscreteConfig {
    /// SDXL base 1.0's `scheduler/scheduler_config.json`.
    pub fn sdxl() -> Self {
        Self {
            train: TrainConfig::sdxl(),
            prediction_type: PredictionType::Epsilon,
            interpolation_type: Interpolation::Linear,
            use_karras_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            timestep_spacing: TimestepSpacing::Leading,
            timestep_type: TimestepType::Discrete,
            steps_offset: 1,
            final_sigmas_type: FinalSigmas::Zero,
        }
    }

    pub fn from_reader(r: &Reader<'_>) -> Result<Self, EngineError> {
        const CLASS: &str = "EulerDiscreteScheduler";
        r.must_be_false("use_exponential_sigmas", CLASS)?;
        r.must_be_false("use_beta_sigmas", CLASS)?;
        let c = Self {
            train: TrainConfig::from_reader(r)?,
            prediction_type: discrete::prediction_from_reader(
                r,
                &["epsilon", "v_prediction", "sample", "original_sample"],
            )?,
            interpolation_type: match r.choice("interpolation_type", "linear", &["linear", "log_linear"])? {
                "log_linear" => Interpolation::LogLinear,
                _ => Interpolation::Linear,
            },
            use_karras_sigmas: r.bool("use_karras_sigmas", false)?,
            sigma_min: r.opt_f64("sigma_min")?,
            sigma_max: r.opt_f64("sigma_max")?,
            timestep_spacing: discrete::spacing_from_reader(r)?,
            timestep_type: match r.choice("timestep_type", "discrete", &["discrete", "continuous"])? {
                "continuous" => TimestepType::Continuous,
                _ => TimestepType::Discrete,
            },
            steps_offset: r.i64("steps_offset", 0)?,
            final_sigmas_type: discrete::final_sigmas_from_reader(r)?,
        };
        Ok(c)
    }
}

/// diffusers' `EulerDiscreteScheduler` (Karras et al.'s Euler method for the probability-flow
/// ODE): every `timestep_spacing`, `steps_offset`, `interpolation_type` linear and log_linear,
/// `use_karras_sigmas` (with `sigma_min`/`sigma_max`), `final_sigmas_type`, `timestep_type`
/// discrete/continuous, prediction types epsilon, v_prediction and sample, every
/// `beta_schedule`, `trained_betas` and `rescale_betas_zero_snr`. Not taken: `s_churn` (its
/// stochastic variant; pipelines leave it 0), exponential and beta sigmas. Stateless.
pub struct EulerDiscreteScheduler {
    config: EulerDiscreteConfig,
    train: Train,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
}

impl EulerDiscreteScheduler {
    pub fn new(config: EulerDiscreteConfig) -> Result<Self, EngineError> {
        let train = Train::new(&config.train)?;
        Ok(Self {
            config,
            train,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    /// SDXL base 1.0's scheduler.
    pub fn sdxl() -> Result<Self, EngineError> {
        Self::new(EulerDiscreteConfig::sdxl())
    }

    pub fn config(&self) -> &EulerDiscreteConfig {
        &self.config
    }

    fn schedule(&self, steps: usize) -> Result<(Vec<f32>, Vec<f32>), EngineError> {
        let c = &self.config;
        let ntt = c.train.num_train_timesteps;
        let timesteps = discrete::spaced_timesteps(c.timestep_spacing, ntt, steps, c.steps_offset);
        let t64: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        let mut sigmas: Vec<f64> = match c.interpolation_type {
            Interpolation::Linear => self.train.interp_sigmas(&t64),
            Interpolation::LogLinear => {
                let hi = numpy::logf(self.train.sigmas[ntt - 1]) as f64;
                let lo = numpy::logf(self.train.sigmas[0]) as f64;
                let s = Tensor::f_linspace(hi, lo, steps as i64 + 1, (tch::Kind::Float, tch::Device::Cpu))?
                    .f_exp()?;
                Vec::<f32>::try_from(&s)?.into_iter().map(f64::from).collect()
            }
        };
        let mut timesteps64: Option<Vec<f64>> = None;
        if c.use_karras_sigmas {
            let lo = c.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let hi = c.sigma_max.unwrap_or(sigmas[0]);
            sigmas = numpy::karras(lo, hi, steps);
            timesteps64 = Some(
                sigmas
                    .iter()
                    .map(|&s| numpy::sigma_to_t(s, &self.train.log_sigmas))
                    .collect(),
            );
        }
        let mut sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).collect();
        sigmas.push(self.train.final_sigma(c.final_sigmas_type));
        let timesteps = if c.timestep_type == TimestepType::Continuous
            && c.prediction_type == PredictionType::VPrediction
        {
            // torch.Tensor([0.25 * sigma.log() for sigma in sigmas[:-1]])
            sigmas[..sigmas.len() - 1]
                .iter()
                .map(|&s| super::torch_log(s).map(|l| 0.25f32 * l))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            match timesteps64 {
                Some(t) => t.into_iter().map(|t| t as f32).collect(),
                None => timesteps,
            }
        };
        Ok((timesteps, sigmas))
    }
}

/// `max(sigmas)`, or `sqrt(max^2 + 1)` for `leading` spacing (diffusers' `init_noise_sigma`).
fn init_noise_sigma(sigmas: &[f32], spacing: TimestepSpacing) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
        TimestepSpacing::Leading => super::torch_sqrt_sq_plus_one(max),
    }
}

/// `sample / sqrt(sigma^2 + 1)`.
fn scale_input(sample: &Tensor, sigma: f32) -> Result<Tensor, EngineError> {
    Ok(sample.f_div(&scalar(super::torch_sqrt_sq_plus_one(sigma)))?)
}

/// The denoised estimate from the model output (`sample` already float32).
fn pred_original(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor, EngineError> {
    Ok(match prediction {
        PredictionType::Epsilon => sample.f_sub(&model_output.f_mul(&scalar(sigma))?)?,
        // model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        PredictionType::VPrediction => {
            let c_out = -sigma / (sigma * sigma + 1.0).sqrt();
            model_output
                .f_mul(&scalar(c_out))?
                .f_add(&sample.f_div(&scalar(sigma * sigma + 1.0))?)?
        }
        PredictionType::Sample => model_output.shallow_clone(),
    })
}

/// The stateless schedulers' state: a header that ties a checkpoint to a kind and schedule.
fn header_state(kind: SchedulerKind, steps: usize) -> Vec<u8> {
    StateWriter::new(kind, steps).finish()
}

fn restore_header(kind: SchedulerKind, steps: usize, bytes: &[u8]) -> Result<(), EngineError> {
    StateReader::new(bytes, kind, steps)?.finish()
}

impl Scheduler for EulerDiscreteScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerDiscrete
    }

    fn set_timesteps(&mut self, steps: usize, _image_seq_len: Option<i64>) -> Result<(), EngineError> {
        if steps == 0 {
            return Err(EngineError::InvalidRequest(
                "scheduler: steps must be at least 1".into(),
            ));
        }
        (self.timesteps, self.sigmas) = self.schedule(steps)?;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn init_noise_sigma(&self) -> f32 {
        init_noise_sigma(&self.sigmas, self.config.timestep_spacing)
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor, EngineError> {
        check_step(step_index, self.num_steps())?;
        scale_input(sample, self.sigmas[step_index])
    }

    /// `pred = f(model_output)`, `prev = sample + (sample - pred) / sigma * (sigma_next - sigma)`.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: Option<&Tensor>,
    ) -> Result<Tensor, EngineError> {
        check_step(step_index, self.num_steps())?;
        let sample = sample.f_to_kind(tch::Kind::Float)?;
        // s_churn = 0: gamma = 0 and sigma_hat = sigma * (0 + 1) = sigma.
        let sigma = self.sigmas[step_index];
        let pred = pred_original(self.config.prediction_type, model_output, &sample, sigma)?;
        let derivative = sample.f_sub(&pred)?.f_div(&scalar(sigma))?;
        let dt = self.sigmas[step_index + 1] - sigma;
        let prev = sample.f_add(&derivative.f_mul(&scalar(dt))?)?;
        Ok(prev.f_to_kind(model_output.kind())?)
    }

    fn state_bytes(&self) -> Result<Vec<u8>, EngineError> {
        Ok(header_state(self.kind(), self.num_steps()))
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        restore_header(self.kind(), self.num_steps(), bytes)
    }
}

/// The options of diffusers' `EulerAncestralDiscreteScheduler`.
#[derive(Debug, Clone, PartialEq)]
pub struct EulerAncestralDiscreteConfig {
    pub train: TrainConfig,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: i64,
}

impl EulerAncestralDiscreteConfig {
    /// SDXL's betas and spacing (what `EulerAncestralDiscreteScheduler.from_config` makes of SDXL
    /// base 1.0's scheduler config).
    pub fn sdxl() -> Self {
        Self {
            train: TrainConfig::sdxl(),
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 1,
        }
    }

    pub fn from_reader(r: &Reader<'_>) -> Result<Self, EngineError> {
        Ok(Self {
            train: TrainConfig::from_reader(r)?,
            // diffusers raises NotImplementedError for "sample".
            prediction_type: discrete::prediction_from_reader(r, &["epsilon", "v_prediction"])?,
            timestep_spacing: discrete::spacing_from_reader(r)?,
            steps_offset: r.i64("steps_offset", 0)?,
        })
    }
}

/// diffusers' `EulerAncestralDiscreteScheduler`: the Euler step to `sigma_down` plus fresh noise
/// scaled by `sigma_up` at every step (so every step needs noise; pass it from
/// [`super::step_noise`]). Every `timestep_spacing`, `steps_offset`, `beta_schedule`,
/// `rescale_betas_zero_snr`, prediction types epsilon and v_prediction. Stateless.
pub struct EulerAncestralDiscreteScheduler {
    config: EulerAncestralDiscreteConfig,
    train: Train,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
}

impl EulerAncestralDiscreteScheduler {
    pub fn new(config: EulerAncestralDiscreteConfig) -> Result<Self, EngineError> {
        let train = Train::new(&config.train)?;
        Ok(Self {
            config,
            train,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    pub fn sdxl() -> Result<Self, EngineError> {
        Self::new(EulerAncestralDiscreteConfig::sdxl())
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestralDiscrete
    }

    fn set_timesteps(&mut self, steps: usize, _image_seq_len: Option<i64>) -> Result<(), EngineError> {
        if steps == 0 {
            return Err(EngineError::InvalidRequest(
                "scheduler: steps must be at least 1".into(),
            ));
        }
        let c = &self.config;
        let timesteps = discrete::spaced_timesteps(
            c.timestep_spacing,
            c.train.num_train_timesteps,
            steps,
            c.steps_offset,
        );
        let t64: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        let mut sigmas: Vec<f32> = self
            .train
            .interp_sigmas(&t64)
            .into_iter()
            .map(|s| s as f32)
            .collect();
        sigmas.push(0.0);
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn init_noise_sigma(&self) -> f32 {
        init_noise_sigma(&self.sigmas, self.config.timestep_spacing)
    }

    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor, EngineError> {
        check_step(step_index, self.num_steps())?;
        scale_input(sample, self.sigmas[step_index])
    }

    fn needs_noise(&self, step_index: usize) -> bool {
        step_index < self.num_steps()
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor, EngineError> {
        check_step(step_index, self.num_steps())?;
        let noise = check_noise(noise, sample)?;
        let sigma = self.sigmas[step_index];
        let sample = sample.f_to_kind(tch::Kind::Float)?;
        let pred = pred_original(self.config.prediction_type, model_output, &sample, sigma)?;
        let (from, to) = (sigma, self.sigmas[step_index + 1]);
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let derivative = sample.f_sub(&pred)?.f_div(&scalar(sigma))?;
        let dt = sigma_down - sigma;
        let prev = sample.f_add(&derivative.f_mul(&scalar(dt))?)?;
        let prev = prev.f_add(&noise.f_mul(&scalar(sigma_up))?)?;
        Ok(prev.f_to_kind(model_output.kind())?)
    }

    fn state_bytes(&self) -> Result<Vec<u8>, EngineError> {
        Ok(header_state(self.kind(), self.num_steps()))
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), EngineError> {
        restore_header(self.kind(), self.num_steps(), bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdxl_euler_starts_at_the_offset_leading_timesteps() {
        let mut s = EulerDiscreteScheduler::sdxl().unwrap();
        s.set_timesteps(4, None).unwrap();
        assert_eq!(s.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
        assert_eq!(s.sigmas().len(), 5);
        assert_eq!(*s.sigmas().last().unwrap(), 0.0);
        // leading spacing: sqrt(sigma_max^2 + 1)
        let m = s.sigmas()[0];
        assert_eq!(s.init_noise_sigma(), crate::schedulers::torch_sqrt_sq_plus_one(m));
        assert!((s.init_noise_sigma() - (m * m + 1.0).sqrt()).abs() <= 2.0 * f32::EPSILON * m);
    }

    #[test]
    fn euler_ancestral_refuses_a_step_without_noise() {
        let mut s = EulerAncestralDiscreteScheduler::sdxl().unwrap();
        s.set_timesteps(3, None).unwrap();
        assert!(s.needs_noise(0) && s.needs_noise(2));
        let x = Tensor::zeros([1, 4, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
        let e = s.step(&x, 0, &x, None).unwrap_err().to_string();
        assert!(e.contains("needs ancestral noise"), "{e}");
    }

    #[test]
    fn stepping_past_the_schedule_is_an_error() {
        let mut s = EulerDiscreteScheduler::sdxl().unwrap();
        let x = Tensor::zeros([1, 4, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
        assert!(
            s.step(&x, 0, &x, None)
                .unwrap_err()
                .to_string()
                .contains("set_timesteps")
        );
        s.set_timesteps(2, None).unwrap();
        assert!(
            s.step(&x, 2, &x, None)
                .unwrap_err()
                .to_string()
                .contains("out of range")
        );
    }
}
