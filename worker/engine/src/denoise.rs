//! The one denoising loop, for every model family and every plan.
//!
//! A step is: the scheduler scales the sample for the model, the model family's [`Denoiser`]
//! returns the guided model output (however many model calls and whatever parallel exchange that
//! takes), the scheduler steps the sample (with the step's ancestral noise where it needs some),
//! then the loop reports progress (which may cancel) and writes a step checkpoint every `every`
//! steps and at a cancel. A multi-GPU rank runs this same loop on its slice of the sample: every
//! scheduler here updates the sample elementwise, so a slice steps exactly as the whole would.
//!
//! Resuming: with [`Resume`] the loop continues after step `k` from the checkpoint's sample and
//! scheduler state, and gives the same result as an uninterrupted run.

use std::time::{Duration, Instant};

use tch::Tensor;

use crate::checkpoint::{LoopState, SchedulerPart, Slice};
use crate::schedulers::Scheduler;
use crate::{Control, EngineError};

/// One model family's prediction for one step, for one job (its conditioning prepared).
pub trait Denoiser {
    /// The guided model output for the scheduler-scaled sample `x` at step `i` (0-based), whose
    /// timestep is `timestep` (the scheduler's, e.g. 999.0 for SDXL's first, `sigma * 1000` for
    /// flow matching). Shaped like `x`.
    fn predict(&mut self, x: &Tensor, i: usize, timestep: f32) -> Result<Tensor, EngineError>;
}

impl<F> Denoiser for F
where
    F: FnMut(&Tensor, usize, f32) -> Result<Tensor, EngineError>,
{
    fn predict(&mut self, x: &Tensor, i: usize, timestep: f32) -> Result<Tensor, EngineError> {
        self(x, i, timestep)
    }
}

/// Where a run starts: after step `step`, from `x` (this rank's part of the checkpoint's sample),
/// with the scheduler state the checkpoint holds for it.
pub struct Resume<'a> {
    pub step: usize,
    pub x: Tensor,
    pub scheduler_state: Option<&'a [u8]>,
}

impl<'a> Resume<'a> {
    /// This rank's resume point from a checkpoint: the sample's part `slice` (`None` = whole)
    /// checked against the request's sample shape `want`, and the matching scheduler state.
    pub fn from_state(
        state: &'a LoopState,
        want: &[i64],
        slice: Option<Slice>,
        like: &Tensor,
        scheduler: &dyn Scheduler,
        steps: usize,
    ) -> Result<Self, EngineError> {
        let k = state.step as usize;
        if k == 0 || k >= steps {
            return Err(EngineError::BadCheckpoint(format!(
                "a checkpoint after step {k} does not fit a {steps}-step job"
            )));
        }
        Ok(Self {
            step: k,
            x: state.latents_for(want, slice, like.device(), like.kind())?,
            scheduler_state: state.scheduler_state_for(slice, scheduler.carries_tensors())?,
        })
    }
}

/// What the loop reports after each step.
#[derive(Debug, Clone, Copy)]
pub struct StepDone {
    /// 1-based index of the step just finished.
    pub step: u32,
    pub total: u32,
    /// When the loop started (this run; a resumed run starts its clock at the resume).
    pub loop_start: Instant,
    /// When this step started.
    pub step_start: Instant,
    /// Host time spent issuing the step's work (before any device sync).
    pub host: Duration,
}

/// A checkpoint's sink: (step, this rank's sample, this rank's scheduler state bytes).
pub type CheckpointFn<'a> = &'a mut dyn FnMut(u32, &Tensor, Vec<u8>) -> Result<(), EngineError>;

/// The loop's side effects.
pub struct Hooks<'a> {
    /// Checkpoint every `every` steps (0 = never) and at the step a cancel stops at.
    pub every: u32,
    /// After each step, with the new sample: whether to go on. Progress events, device syncs and
    /// a multi-GPU plan's shared cancel decision live here.
    pub on_step: &'a mut dyn FnMut(StepDone, &Tensor) -> Result<Control, EngineError>,
    /// A checkpoint: (step, this rank's sample, this rank's scheduler state bytes).
    pub on_checkpoint: CheckpointFn<'a>,
    /// The ancestral noise of step `i`, shaped like this rank's sample (a slice of the whole
    /// sample's noise on a multi-GPU rank), for schedulers that need it.
    pub noise: &'a dyn Fn(usize) -> Result<Tensor, EngineError>,
}

/// Runs the steps of `scheduler` (already `set_timesteps`) from `x` (the initial noise scaled by
/// the scheduler's `init_noise_sigma`, or the resume point's sample) and returns the final sample.
pub fn run(
    scheduler: &mut dyn Scheduler,
    denoiser: &mut dyn Denoiser,
    x: Tensor,
    resume: Option<Resume<'_>>,
    hooks: Hooks<'_>,
) -> Result<Tensor, EngineError> {
    let _guard = tch::no_grad_guard();
    let total = scheduler.num_steps();
    let (first, mut x) = match resume {
        None => (0, x),
        Some(r) => {
            if r.x.size() != x.size() {
                return Err(EngineError::BadCheckpoint(format!(
                    "checkpoint sample {:?} does not fit this job's {:?}",
                    r.x.size(),
                    x.size()
                )));
            }
            if let Some(state) = r.scheduler_state {
                scheduler.restore_state(state)?;
            }
            (r.step, r.x)
        }
    };
    let timesteps = scheduler.timesteps().to_vec();
    let loop_start = Instant::now();
    for (i, &t) in timesteps.iter().enumerate().skip(first) {
        let step_start = Instant::now();
        let input = scheduler.scale_model_input(&x, i)?;
        let out = denoiser.predict(&input, i, t)?;
        let noise = if scheduler.needs_noise(i) {
            Some((hooks.noise)(i)?)
        } else {
            None
        };
        x = scheduler.step(&out, i, &x, noise.as_ref())?;
        let host = step_start.elapsed();
        let step = i as u32 + 1;
        let control = (hooks.on_step)(
            StepDone {
                step,
                total: total as u32,
                loop_start,
                step_start,
                host,
            },
            &x,
        )?;
        if hooks.every > 0
            && (step as usize) < total
            && (step.is_multiple_of(hooks.every) || control == Control::Cancel)
        {
            (hooks.on_checkpoint)(step, &x, scheduler.state_bytes()?)?;
        }
        if control == Control::Cancel {
            return Err(EngineError::Cancelled { step });
        }
    }
    Ok(x)
}

/// A checkpoint of a sample stepped whole: the bytes of a [`LoopState`] with one scheduler part.
pub fn whole_checkpoint(
    step: u32,
    x: &Tensor,
    scheduler_state: Vec<u8>,
    lora: &str,
) -> Result<Vec<u8>, EngineError> {
    LoopState {
        lora: lora.to_string(),
        step,
        latents: x.shallow_clone(),
        scheduler: vec![SchedulerPart {
            slice: None,
            state: scheduler_state,
        }],
    }
    .to_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::{self, EulerAncestralDiscreteScheduler};
    use tch::{Device, Kind};

    /// A deterministic stand-in for a model: its output depends on the sample and the step.
    fn toy(x: &Tensor, i: usize, t: f32) -> Result<Tensor, EngineError> {
        Ok(x.f_sin()?
            .f_mul_scalar(0.3)?
            .f_add_scalar(f64::from(t) * 1e-4 + i as f64 * 0.01)?)
    }

    fn sched(kind: &str) -> Box<dyn Scheduler> {
        let mut s: Box<dyn Scheduler> = match kind {
            "euler_a" => Box::new(EulerAncestralDiscreteScheduler::sdxl().unwrap()),
            "dpm" => Box::new(schedulers::DpmSolverMultistepScheduler::sdxl(true).unwrap()),
            _ => Box::new(schedulers::EulerDiscreteScheduler::sdxl().unwrap()),
        };
        s.set_timesteps(8, None).unwrap();
        s
    }

    fn start(s: &dyn Scheduler) -> Tensor {
        Tensor::f_randn([1, 4, 6, 5], (Kind::Float, Device::Cpu))
            .unwrap()
            .f_mul_scalar(f64::from(s.init_noise_sigma()))
            .unwrap()
    }

    fn noise(i: usize) -> Result<Tensor, EngineError> {
        schedulers::step_noise(
            schedulers::step_noise_seed(7, i),
            &[1, 4, 6, 5],
            Kind::Float,
            Device::Cpu,
        )
    }

    #[test]
    fn a_run_resumed_from_each_checkpoint_ends_where_the_uninterrupted_run_does() {
        for kind in ["euler", "euler_a", "dpm"] {
            let mut s = sched(kind);
            let x0 = start(s.as_ref());
            let mut saved = Vec::new();
            let full = run(
                s.as_mut(),
                &mut toy,
                x0.shallow_clone(),
                None,
                Hooks {
                    every: 3,
                    on_step: &mut |_, _| Ok(Control::Continue),
                    on_checkpoint: &mut |step, x, state| {
                        saved.push(whole_checkpoint(step, x, state, "")?);
                        Ok(())
                    },
                    noise: &noise,
                },
            )
            .unwrap();
            assert_eq!(saved.len(), 2, "{kind}: checkpoints after steps 3 and 6");
            for bytes in &saved {
                let state = LoopState::from_bytes(bytes).unwrap();
                let mut s2 = sched(kind);
                let resume = Resume::from_state(&state, &x0.size(), None, &x0, s2.as_ref(), 8).unwrap();
                let resumed = run(
                    s2.as_mut(),
                    &mut toy,
                    x0.shallow_clone(),
                    Some(resume),
                    Hooks {
                        every: 0,
                        on_step: &mut |_, _| Ok(Control::Continue),
                        on_checkpoint: &mut |_, _, _| Ok(()),
                        noise: &noise,
                    },
                )
                .unwrap();
                assert!(resumed.equal(&full), "{kind}: resumed after step {}", state.step);
            }
        }
    }

    #[test]
    fn a_cancel_stops_at_its_step_with_a_checkpoint_there() {
        let mut s = sched("euler");
        let x0 = start(s.as_ref());
        let mut at = Vec::new();
        let mut calls = 0;
        let r = run(
            s.as_mut(),
            &mut |x: &Tensor, i: usize, t: f32| {
                calls += 1;
                toy(x, i, t)
            },
            x0,
            None,
            Hooks {
                every: 100,
                on_step: &mut |d, _| {
                    Ok(if d.step == 5 {
                        Control::Cancel
                    } else {
                        Control::Continue
                    })
                },
                on_checkpoint: &mut |step, _, _| {
                    at.push(step);
                    Ok(())
                },
                noise: &noise,
            },
        );
        assert!(matches!(r, Err(EngineError::Cancelled { step: 5 })));
        assert_eq!(at, vec![5]);
        assert_eq!(calls, 5);
    }

    #[test]
    fn a_slice_stepped_on_its_own_equals_the_same_rows_of_the_whole_sample() {
        // What a multi-GPU rank relies on: schedulers update the sample elementwise.
        for kind in ["euler", "euler_a", "dpm"] {
            let mut whole = sched(kind);
            let x0 = start(whole.as_ref());
            let full = run(
                whole.as_mut(),
                &mut toy,
                x0.shallow_clone(),
                None,
                Hooks {
                    every: 0,
                    on_step: &mut |_, _| Ok(Control::Continue),
                    on_checkpoint: &mut |_, _, _| Ok(()),
                    noise: &noise,
                },
            )
            .unwrap();
            let mut part = sched(kind);
            let rows = x0.narrow(2, 2, 3);
            let slice_noise = |i: usize| Ok(noise(i)?.f_narrow(2, 2, 3)?);
            let got = run(
                part.as_mut(),
                &mut toy,
                rows,
                None,
                Hooks {
                    every: 0,
                    on_step: &mut |_, _| Ok(Control::Continue),
                    on_checkpoint: &mut |_, _, _| Ok(()),
                    noise: &slice_noise,
                },
            )
            .unwrap();
            assert!(got.equal(&full.narrow(2, 2, 3)), "{kind}");
        }
    }
}
