//! Diffusion schedulers behind one [`Scheduler`] trait, so that one denoising loop drives every
//! model family (Flux.1's flow matching, SDXL's discrete-time schedulers).
//!
//! Each scheduler reproduces a diffusers 0.42.1 class: its sigmas and timesteps bit for bit (they
//! are built in numpy float64/float32 there; [`numpy`] reproduces those routines) and its step in
//! the same float32 operation order (the tensor math goes through libtorch exactly as diffusers
//! calls it, and the 0-d sigma arithmetic is IEEE float32 as in torch). Verified against goldens
//! written by `tests/fixtures/gen_scheduler_goldens.py` (tests/scheduler_goldens.rs).
//!
//! The loop that drives a scheduler:
//! ```text
//! sched.set_timesteps(steps, image_seq_len)?;
//! latents = noise * sched.init_noise_sigma();
//! for i in start..sched.num_steps() {
//!     let x = sched.scale_model_input(&latents, i)?;
//!     let out = model(x, sched.timesteps()[i]);              // guidance combines outputs here
//!     let noise = sched.needs_noise(i).then(|| step_noise(step_noise_seed(seed, i), ...));
//!     latents = sched.step(&out, i, &latents, noise.as_ref())?;
//!     checkpoint: (latents, sched.state_bytes()?)            // resume: sched.restore_state(..)
//! }
//! ```

pub mod config;
pub mod discrete;
pub mod dpm;
pub mod euler;
pub mod flow;
pub mod numpy;
pub mod state;

use std::path::Path;

use tch::{Device, Kind, Tensor};

pub use config::SchedulerKind;
pub use dpm::{DpmSolverMultistepConfig, DpmSolverMultistepScheduler};
pub use euler::{
    EulerAncestralDiscreteConfig, EulerAncestralDiscreteScheduler, EulerDiscreteConfig,
    EulerDiscreteScheduler,
};
pub use flow::FlowMatchEulerDiscreteScheduler;

use crate::EngineError;

/// A diffusers-compatible sampler the denoising loop drives step by step.
///
/// Steps are addressed by index (`0..num_steps()`), never by timestep value: diffusers'
/// `index_for_timestep` picks the second match when a timestep repeats, the pipelines that matter
/// call `set_begin_index(0)` to avoid that, and so does this trait.
///
/// Noise: only ancestral schedulers ([`EulerAncestralDiscreteScheduler`], every step) take noise
/// in [`Scheduler::step`]; [`Scheduler::needs_noise`] says which steps do. The loop draws it with
/// [`step_noise`] from a seed derived with [`step_noise_seed`] from (job seed, step index), so a
/// run resumed at step k draws the same noise as an uninterrupted one.
///
/// State: [`Scheduler::state_bytes`] after step k and [`Scheduler::restore_state`] on a scheduler
/// given the same config and [`Scheduler::set_timesteps`] make the remaining steps bit-identical
/// to an uninterrupted run (multistep solvers keep previous model outputs; the others keep only
/// a header so a mismatched checkpoint is refused).
pub trait Scheduler: Send {
    /// Which diffusers class (and thereby options) this reproduces.
    fn kind(&self) -> SchedulerKind;

    /// Computes the schedule for `steps` denoising steps and resets the solver state.
    /// `image_seq_len` (packed latent tokens) is needed by flow-matching schedulers with dynamic
    /// shifting (Flux.1-dev); the others ignore it.
    fn set_timesteps(&mut self, steps: usize, image_seq_len: Option<i64>) -> Result<(), EngineError>;

    /// What the model is called with at each step (`num_steps()` entries; integers for the
    /// discrete schedulers, `sigma * 1000` for flow matching).
    fn timesteps(&self) -> &[f32];

    /// The noise levels: `num_steps() + 1` entries, the last the final one (0, or the smallest
    /// train sigma with `final_sigmas_type = "sigma_min"`). (Euler's `log_linear` interpolation
    /// has one more, never reached, as in diffusers.)
    fn sigmas(&self) -> &[f32];

    /// Steps in the current schedule.
    fn num_steps(&self) -> usize {
        self.timesteps().len()
    }

    /// The factor the initial unit Gaussian latents are multiplied by.
    fn init_noise_sigma(&self) -> f32;

    /// The model's input at `step_index` (the Euler schedulers divide by `sqrt(sigma^2 + 1)`).
    fn scale_model_input(&self, sample: &Tensor, step_index: usize) -> Result<Tensor, EngineError>;

    /// Whether [`Scheduler::step`] at `step_index` needs a noise tensor (shaped like the sample).
    fn needs_noise(&self, step_index: usize) -> bool {
        let _ = step_index;
        false
    }

    /// One denoising step from `sample` at `step_index` to the next noise level, given the
    /// (guided) model output. Returns the new sample in `model_output`'s dtype, as diffusers does.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor, EngineError>;

    /// Whether the state holds tensors shaped like the sample (a multistep solver's previous
    /// model outputs). A rank of a parallel plan that holds a slice of the sample then keeps
    /// state for that slice only, so a checkpoint's state resumes only on the same split.
    fn carries_tensors(&self) -> bool {
        false
    }

    /// The solver state to keep with a step checkpoint (version byte first).
    fn state_bytes(&self) -> Result<Vec<u8>, EngineError>;

    /// Restores [`Scheduler::state_bytes`] after [`Scheduler::set_timesteps`] with the same steps;
    /// errors with [`EngineError::BadCheckpoint`] when the bytes belong to another scheduler,
    /// schedule or format.
    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), EngineError>;
}

/// Builds the scheduler a diffusers `scheduler_config.json` describes (by its `_class_name`, or
/// `class` when given: diffusers' `OtherScheduler.from_config(config)` pattern, e.g. DPM++ 2M
/// from SDXL's Euler config). Keys the class does not take are ignored as diffusers ignores them;
/// known keys with unsupported values are errors naming the key and value.
pub fn from_config_json(
    text: &str,
    class: Option<SchedulerKind>,
    source: &str,
) -> Result<Box<dyn Scheduler>, EngineError> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| EngineError::Load(format!("{source}: {e}")))?;
    let r = config::Reader::new(&v, source)?;
    let kind = match class {
        Some(k) => k,
        None => r.class_name()?,
    };
    Ok(match kind {
        SchedulerKind::EulerDiscrete => Box::new(EulerDiscreteScheduler::new(
            EulerDiscreteConfig::from_reader(&r)?,
        )?),
        SchedulerKind::EulerAncestralDiscrete => Box::new(EulerAncestralDiscreteScheduler::new(
            EulerAncestralDiscreteConfig::from_reader(&r)?,
        )?),
        SchedulerKind::DpmSolverMultistep => Box::new(DpmSolverMultistepScheduler::new(
            DpmSolverMultistepConfig::from_reader(&r)?,
        )?),
        SchedulerKind::FlowMatchEulerDiscrete => Box::new(FlowMatchEulerDiscreteScheduler::new(
            flow::config_from_reader(&r)?,
        )),
    })
}

/// [`from_config_json`] of a file (`<pipeline>/scheduler/scheduler_config.json`).
pub fn from_config_file(
    path: &Path,
    class: Option<SchedulerKind>,
) -> Result<Box<dyn Scheduler>, EngineError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EngineError::Load(format!("cannot read {}: {e}", path.display())))?;
    from_config_json(&text, class, &path.display().to_string())
}

/// The seed of the ancestral noise at `step_index` of a job seeded with `job_seed`: a SplitMix64
/// mix of both, so it depends on nothing but (job seed, step) and differs from the job seed
/// itself (which draws the initial latents).
pub fn step_noise_seed(job_seed: u64, step_index: usize) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    mix(job_seed ^ mix(step_index as u64 + 1))
}

/// Gaussian noise of `shape` drawn like [`crate::flux::sampling::noise`]: libtorch's CPU
/// generator seeded with `seed` under [`crate::flux::rng_lock`] (equal to diffusers' `randn_tensor`
/// with `torch.Generator("cpu").manual_seed(seed)`), then moved to `device`, so every device
/// gets the same noise.
pub fn step_noise(seed: u64, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor, EngineError> {
    let cpu = {
        let _lock = crate::flux::rng_lock();
        tch::manual_seed(seed as i64);
        Tensor::f_randn(shape, (kind, Device::Cpu))?
    };
    Ok(cpu.f_to_device(device)?)
}

/// A float32 CPU scalar tensor: diffusers' sigmas are 0-d float32 CPU tensors, and using one
/// keeps libtorch's type promotion (a 0-d operand never widens a bf16 sample) as it is there.
pub(crate) fn scalar(x: f32) -> Tensor {
    Tensor::from(x)
}

/// `(x ** 2 + 1) ** 0.5` of a 0-d float32 tensor, as diffusers computes the Euler schedulers'
/// `init_noise_sigma` and input scale: torch's `pow(0.5)` is not a correctly rounded square root
/// on every CPU (an AVX2-only build is a bit off `sqrt` where an AVX-512 one is not), so the
/// engine takes torch's result rather than `f32::sqrt`'s.
pub(crate) fn torch_sqrt_sq_plus_one(x: f32) -> f32 {
    scalar(x)
        .f_pow_tensor_scalar(2)
        .and_then(|t| t.f_add_scalar(1))
        .and_then(|t| t.f_pow_tensor_scalar(0.5))
        .and_then(|t| t.f_double_value(&[]))
        .map_or_else(|_| (x * x + 1.0).sqrt(), |v| v as f32)
}

/// `torch.log` of a 0-d float32 tensor, as diffusers computes the DPM-Solver lambdas.
pub(crate) fn torch_log(x: f32) -> Result<f32, EngineError> {
    Ok(scalar(x).f_log()?.f_double_value(&[])? as f32)
}

/// `torch.exp` of a 0-d float32 tensor.
pub(crate) fn torch_exp(x: f32) -> Result<f32, EngineError> {
    Ok(scalar(x).f_exp()?.f_double_value(&[])? as f32)
}

/// Checks `step_index < steps` (with a schedule set).
pub(crate) fn check_step(step_index: usize, steps: usize) -> Result<(), EngineError> {
    if steps == 0 {
        return Err(EngineError::InvalidRequest(
            "scheduler: set_timesteps must be called before stepping".into(),
        ));
    }
    if step_index >= steps {
        return Err(EngineError::InvalidRequest(format!(
            "scheduler: step index {step_index} is out of range for {steps} steps"
        )));
    }
    Ok(())
}

/// Checks that a noise tensor was given where the step needs one, shaped like the sample.
pub(crate) fn check_noise<'a>(noise: Option<&'a Tensor>, sample: &Tensor) -> Result<&'a Tensor, EngineError> {
    let noise = noise.ok_or_else(|| {
        EngineError::InvalidRequest("scheduler: this step needs ancestral noise and none was given".into())
    })?;
    if noise.size() != sample.size() {
        return Err(EngineError::InvalidRequest(format!(
            "scheduler: noise shape {:?} differs from sample shape {:?}",
            noise.size(),
            sample.size()
        )));
    }
    Ok(noise)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_noise_seed_depends_on_step_and_seed_and_differs_from_the_job_seed() {
        let s = step_noise_seed(42, 0);
        assert_ne!(s, 42);
        assert_ne!(s, step_noise_seed(42, 1));
        assert_ne!(s, step_noise_seed(43, 0));
        assert_eq!(s, step_noise_seed(42, 0));
    }

    #[test]
    fn step_noise_is_reproducible_from_its_seed_and_differs_between_seeds() {
        let a = step_noise(7, &[1, 4, 8, 8], Kind::Float, Device::Cpu).unwrap();
        let b = step_noise(7, &[1, 4, 8, 8], Kind::Float, Device::Cpu).unwrap();
        let c = step_noise(8, &[1, 4, 8, 8], Kind::Float, Device::Cpu).unwrap();
        assert!(a.equal(&b));
        assert!(!a.equal(&c));
    }

    #[test]
    fn a_config_names_its_class_or_the_caller_must() {
        let err = from_config_json("{}", None, "cfg.json")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("_class_name"), "{err}");
        let err = from_config_json(r#"{"_class_name": "LMSDiscreteScheduler"}"#, None, "cfg.json")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("LMSDiscreteScheduler"), "{err}");
        let s = from_config_json("{}", Some(SchedulerKind::EulerDiscrete), "cfg.json").unwrap();
        assert_eq!(s.kind(), SchedulerKind::EulerDiscrete);
    }
}
