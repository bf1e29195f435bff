//! Model families behind one seam.
//!
//! A family (Flux.1, SDXL) implements [`DiffusionModel`]: check a request, build its scheduler,
//! encode the prompt(s), draw the initial noise, give a [`Denoiser`] for the job (one guided
//! prediction per step, whatever guidance and how many model calls that takes) and decode. The
//! one denoising loop ([`crate::denoise`]) and the one-device engine ([`generate`]) are written
//! against the trait; the families differ only in their modules (`crate::flux`, [`sdxl`]).

pub mod flux;
pub mod sdxl;

use std::path::Path;
use std::time::Instant;

use tch::{Device, Tensor};

use crate::checkpoint::LoopState;
use crate::denoise::{self, Denoiser, Hooks, Resume};
use crate::schedulers::{self, Scheduler};
use crate::{Control, EngineError, GenerateRequest, GeneratedImage, StageTimings, StepCheckpoint, StepEvent};

/// The model families the engine serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Flux.1 dev and schnell (`flux-dev`, `flux-schnell`): a DiT with flow matching.
    Flux,
    /// Stable Diffusion XL base (`sdxl-base`): a UNet with classic CFG.
    Sdxl,
}

impl Family {
    /// The family serving a public model name, e.g. `flux-dev`, `sdxl-base`.
    pub fn of(model: &str) -> Option<Family> {
        match model {
            "flux-dev" | "flux-schnell" => Some(Family::Flux),
            "sdxl-base" => Some(Family::Sdxl),
            _ => None,
        }
    }

    /// The family of a diffusers pipeline folder, from its `model_index.json`'s `_class_name`
    /// (`FluxPipeline`, `StableDiffusionXLPipeline`).
    pub fn of_dir(dir: &Path) -> Result<Family, EngineError> {
        let index = dir.join("model_index.json");
        if !index.exists() {
            return Err(EngineError::Load(format!(
                "{} has no model_index.json (a diffusers pipeline folder is expected)",
                dir.display()
            )));
        }
        let v = crate::flux::read_json(&index)?;
        match v.get("_class_name").and_then(|c| c.as_str()) {
            Some("FluxPipeline") => Ok(Family::Flux),
            Some("StableDiffusionXLPipeline") => Ok(Family::Sdxl),
            other => Err(EngineError::Load(format!(
                "{}: _class_name {other:?} is not a pipeline this engine serves \
                 (FluxPipeline, StableDiffusionXLPipeline)",
                index.display()
            ))),
        }
    }
}

/// One model family's pipeline pieces for one loaded model.
pub trait DiffusionModel {
    /// The encoded prompt(s) of one request.
    type Cond;

    /// The public model name served, e.g. `flux-dev`.
    fn model_name(&self) -> &str;

    /// Checks the request against what this model and a single device can do (size, steps,
    /// scheduler, plan): an [`EngineError::InvalidRequest`] names what is wrong.
    fn check(&self, request: &GenerateRequest) -> Result<(), EngineError>;

    /// The request's scheduler with its timesteps set for `request.steps`.
    fn scheduler(&self, request: &GenerateRequest) -> Result<Box<dyn Scheduler>, EngineError>;

    /// Encodes the prompt (and what guidance needs of the negative prompt).
    fn encode(&self, request: &GenerateRequest) -> Result<Self::Cond, EngineError>;

    /// The seeded unit Gaussian the loop starts from, in the model's latent layout, on its
    /// compute device and in its dtype (before `init_noise_sigma`).
    fn noise(&self, request: &GenerateRequest) -> Result<Tensor, EngineError>;

    /// The job's denoiser: one guided prediction per step.
    fn denoiser<'a>(
        &'a self,
        request: &GenerateRequest,
        cond: &'a Self::Cond,
        scheduler: &dyn Scheduler,
    ) -> Result<Box<dyn Denoiser + 'a>, EngineError>;

    /// Final latents → RGB bytes `(h, w, 3)` row-major.
    fn decode(&self, latents: &Tensor, request: &GenerateRequest) -> Result<Vec<u8>, EngineError>;

    /// Where the denoiser computes (peak memory is read there).
    fn compute_device(&self) -> Device;
}

/// Scales the unit noise by the scheduler's `init_noise_sigma` (a no-op at 1, as for flow
/// matching, so the sample stays bit-identical to the noise).
pub fn initial_sample(noise: Tensor, scheduler: &dyn Scheduler) -> Result<Tensor, EngineError> {
    let s = scheduler.init_noise_sigma();
    Ok(if s == 1.0 {
        noise
    } else {
        noise.f_mul(&Tensor::from(s))?
    })
}

/// The ancestral noise of step `i` for a job seeded `seed`, shaped like `like`: drawn for the
/// step alone (not from one generator running through the job), so a resumed run draws what the
/// uninterrupted one drew.
pub fn step_noise(seed: u64, i: usize, like: &Tensor) -> Result<Tensor, EngineError> {
    schedulers::step_noise(
        schedulers::step_noise_seed(seed, i),
        &like.size(),
        like.kind(),
        like.device(),
    )
}

/// NaN/Inf in denoised latents means a failing device (or broken weights).
pub fn check_finite(latents: &Tensor) -> Result<(), EngineError> {
    let finite = latents.f_isfinite()?.f_all()?.f_to_device(Device::Cpu)?;
    if !bool::try_from(&finite).map_err(EngineError::from)? {
        return Err(EngineError::Device {
            device: crate::flux::pipeline::device_name(latents.device()),
            message: "denoised latents contain NaN or Inf".into(),
        });
    }
    Ok(())
}

/// The loop's output with what the stages took.
pub struct Denoised {
    pub latents: Tensor,
    pub timings: StageTimings,
}

/// Encodes, denoises (resuming from `resume`, writing a checkpoint every `every` steps) and
/// returns the final latents with the encode/denoise timings and peaks: everything of a one-device
/// generation but the decode.
pub fn denoise_request<M: DiffusionModel>(
    model: &M,
    request: &GenerateRequest,
    resume: Option<&StepCheckpoint>,
    every: u32,
    on_checkpoint: &mut dyn FnMut(StepCheckpoint),
    on_step: &mut dyn FnMut(StepEvent) -> Control,
) -> Result<Denoised, EngineError> {
    let _guard = tch::no_grad_guard();
    model.check(request)?;
    let state = resume.map(LoopState::from_checkpoint).transpose()?;
    if let Some(s) = &state {
        s.check_lora(&request.loras)?;
    }
    let lora = crate::lora::stack_id(&request.loras);
    let ordinal = match model.compute_device() {
        Device::Cuda(i) => Some(i),
        _ => None,
    };
    let peak = |reset: bool| ordinal.and_then(|i| crate::aten::memory_peak(i, reset).ok());
    peak(true);
    let t0 = Instant::now();
    let cond = model.encode(request)?;
    let mut scheduler = model.scheduler(request)?;
    let x0 = initial_sample(model.noise(request)?, scheduler.as_ref())?;
    crate::flux::pipeline::sync_on(&x0)?;
    let encode_ms = t0.elapsed().as_secs_f64() * 1e3;
    let encode_peak = peak(true);
    let t1 = Instant::now();
    let steps = scheduler.num_steps();
    let resume = state
        .as_ref()
        .map(|s| Resume::from_state(s, &x0.size(), None, &x0, scheduler.as_ref(), steps))
        .transpose()?;
    let mut denoiser = model.denoiser(request, &cond, scheduler.as_ref())?;
    let (seed, shape, kind, device) = (request.seed, x0.size(), x0.kind(), x0.device());
    let noise = |i: usize| schedulers::step_noise(schedulers::step_noise_seed(seed, i), &shape, kind, device);
    let latents = denoise::run(
        scheduler.as_mut(),
        denoiser.as_mut(),
        x0,
        resume,
        Hooks {
            every,
            on_step: &mut |d, x| {
                crate::flux::pipeline::sync_on(x)?;
                Ok(on_step(StepEvent {
                    step: d.step,
                    total: d.total,
                    elapsed: d.loop_start.elapsed(),
                    host: d.host,
                }))
            },
            on_checkpoint: &mut |step, x, state| {
                on_checkpoint(StepCheckpoint {
                    step,
                    bytes: denoise::whole_checkpoint(step, x, state, &lora)?,
                });
                Ok(())
            },
            noise: &noise,
        },
    )?;
    drop(denoiser);
    let denoise_ms = t1.elapsed().as_secs_f64() * 1e3;
    check_finite(&latents)?;
    let denoise_peak = peak(true);
    Ok(Denoised {
        latents,
        timings: StageTimings {
            encode_ms,
            denoise_ms,
            peak_memory_encode_bytes: encode_peak,
            peak_memory_denoise_bytes: denoise_peak,
            plan: Some("single".into()),
            ..Default::default()
        },
    })
}

/// A whole one-device generation: [`denoise_request`], then the decode, with every stage's time
/// and peak memory.
pub fn generate<M: DiffusionModel>(
    model: &M,
    request: &GenerateRequest,
    resume: Option<&StepCheckpoint>,
    every: u32,
    on_checkpoint: &mut dyn FnMut(StepCheckpoint),
    on_step: &mut dyn FnMut(StepEvent) -> Control,
) -> Result<GeneratedImage, EngineError> {
    let Denoised { latents, mut timings } =
        denoise_request(model, request, resume, every, on_checkpoint, on_step)?;
    let ordinal = match model.compute_device() {
        Device::Cuda(i) => Some(i),
        _ => None,
    };
    let t2 = Instant::now();
    let rgb = model.decode(&latents, request)?;
    timings.decode_ms = t2.elapsed().as_secs_f64() * 1e3;
    timings.peak_memory_decode_bytes = ordinal.and_then(|i| crate::aten::memory_peak(i, false).ok());
    timings.peak_memory_bytes = [
        timings.peak_memory_encode_bytes,
        timings.peak_memory_denoise_bytes,
        timings.peak_memory_decode_bytes,
    ]
    .into_iter()
    .flatten()
    .max();
    Ok(GeneratedImage {
        width: request.width,
        height: request.height,
        rgb,
        timings,
    })
}
