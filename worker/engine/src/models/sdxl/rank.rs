//! SDXL on the multi-GPU engine's rank threads ([`crate::parallel::ParallelPipeline`]): what
//! each rank of a `cfg × patch` plan holds and runs for one job.
//!
//! The group leader (rank 0) encodes the prompts and broadcasts the conditioning; every rank
//! draws the same seeded noise, keeps its band of latent rows ([`super::parallel::unet_rows`])
//! and runs the one denoising loop ([`crate::denoise`]) on it, the guided prediction coming from
//! [`super::parallel::guided_noise`] (patch-parallel UNet, CFG branches on a CFG pair); the
//! schedulers step a band exactly as they would step the whole latent. The ranks of CFG branch 0
//! decode their bands ([`super::parallel::decode_band`]) and send the image rows to rank 0.

use std::sync::Mutex;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::parallel::{TextConditioning, decode_band, guided_noise, unet_rows};
use super::pipeline::{SdxlPipeline, build_scheduler};
use super::unet::{Config, Unet};
use super::vae::Vae;
use crate::checkpoint::Slice;
use crate::denoise::{self, Hooks, Resume};
use crate::device::sync_on;
use crate::flux::pipeline::to_rgb8;
use crate::guidance::Guidance;
use crate::lora::LoraSlot;
use crate::models::{check_finite, initial_sample};
use crate::parallel::Plan;
use crate::parallel::comm::Communicator;
use crate::parallel::plan::Splits;
use crate::parallel::rank::{
    ParallelLeader, RankJob, RankOutput, RankWork, finish, inject_fault, report_and_check,
};
use crate::{Engine, EngineError, EngineInfo, GeneratedImage, StageTimings};

/// What every rank of a group knows about the model without holding the leader.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    plan: Plan,
    scheduler_config: String,
    scheduler_source: String,
    unet: Config,
    vae_scale: i64,
    kind: Kind,
    /// `(77, cross_attention_dim)` of the text conditioning.
    context: [i64; 2],
    text_embeds_dim: i64,
    guidance_rescale: f32,
}

/// A rank's model: the leader holds the whole pipeline, the others a UNet replica and, on CFG
/// branch 0 (the ranks that decode), a VAE decoder replica.
pub enum SdxlRankModel {
    Leader(Box<SdxlPipeline>),
    Follower {
        unet: Box<Unet>,
        vae: Option<Box<Vae>>,
        device: Device,
    },
}

/// One SDXL rank thread's model and its group's facts.
pub struct SdxlRank {
    pub model: SdxlRankModel,
    spec: GroupSpec,
    /// The LoRA stack merged into this rank's copy of the UNet (and the leader's encoders).
    lora: Mutex<LoraSlot>,
}

impl ParallelLeader for SdxlPipeline {
    type Rank = SdxlRank;

    fn splits(&self) -> Splits {
        Splits::Rows
    }

    fn info(&self) -> EngineInfo {
        Engine::info(self)
    }

    fn device(&self) -> Device {
        self.options().devices.unet
    }

    fn lora_hub(&self) -> Option<std::sync::Arc<crate::lora::LoraHub>> {
        Some(self.lora().hub().clone())
    }

    fn set_lora_hub(&mut self, hub: std::sync::Arc<crate::lora::LoraHub>) {
        self.lora_mut().set_hub(hub);
    }

    fn split(mut self, plan: &Plan, devices: &[Device]) -> Result<Vec<SdxlRank>, EngineError> {
        // The replicas are copies of the base weights; each rank merges stacks into its own.
        self.lora_mut().reset()?;
        let (config, source) = self.scheduler_config();
        let spec = GroupSpec {
            plan: *plan,
            scheduler_config: config.to_string(),
            scheduler_source: source.to_string(),
            unet: self.unet.config.clone(),
            vae_scale: self.vae_scale_factor(),
            kind: self.options().kind,
            context: [77, self.unet.config.cross_attention_dim],
            text_embeds_dim: self.unet.config.text_embeds_dim(),
            guidance_rescale: self.options().guidance_rescale,
        };
        let sp = plan.mesh().sp();
        let mut ranks = Vec::with_capacity(devices.len());
        for (i, &device) in devices.iter().enumerate().skip(1) {
            let vae = if i < sp {
                Some(Box::new(self.vae.replicate(device)?))
            } else {
                None
            };
            ranks.push(SdxlRank {
                model: SdxlRankModel::Follower {
                    unet: Box::new(self.unet.replicate(device)?),
                    vae,
                    device,
                },
                spec: spec.clone(),
                lora: Mutex::new(self.lora().follower()),
            });
        }
        let lora = Mutex::new(self.lora().another(true));
        ranks.insert(
            0,
            SdxlRank {
                model: SdxlRankModel::Leader(Box::new(self)),
                spec,
                lora,
            },
        );
        Ok(ranks)
    }
}

impl RankWork for SdxlRank {
    type Leader = SdxlPipeline;

    fn device(&self) -> Device {
        match &self.model {
            SdxlRankModel::Leader(p) => p.options().devices.unet,
            SdxlRankModel::Follower { device, .. } => *device,
        }
    }

    fn parameters(&self) -> usize {
        let unet = match &self.model {
            SdxlRankModel::Leader(p) => &p.unet,
            SdxlRankModel::Follower { unet, .. } => unet,
        };
        unet.num_parameters() as usize
    }

    fn run(&self, job: &RankJob<'_>) -> Result<RankOutput, EngineError> {
        {
            let mut slot = self.lora.lock().unwrap_or_else(|p| p.into_inner());
            slot.prepare(&job.request.loras, || match &self.model {
                SdxlRankModel::Leader(p) => p.lora_weights(),
                SdxlRankModel::Follower { unet, .. } => crate::lora::sdxl::weights(unet, None),
            })?;
        }
        run_rank(self, job)
    }

    /// The leader goes back with its base weights.
    fn into_leader(self) -> Option<SdxlPipeline> {
        let mut slot = self.lora.into_inner().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = slot.reset() {
            tracing::error!(error = %e, "could not restore the base weights of a rank's LoRA stack");
            return None;
        }
        match self.model {
            SdxlRankModel::Leader(p) => Some(*p),
            SdxlRankModel::Follower { .. } => None,
        }
    }
}

/// The leader's conditioning `[negative, positive]` (or the positive prompt alone) broadcast to
/// every rank of the world: `(context, text_embeds, time_ids)` with `rows` rows.
fn broadcast_conditioning(
    world: &dyn Communicator,
    mine: Option<(Tensor, Tensor, Tensor)>,
    spec: &GroupSpec,
    rows: i64,
) -> Result<(Tensor, Tensor, Tensor), EngineError> {
    let dev = world.device();
    let shapes = [
        vec![rows, spec.context[0], spec.context[1]],
        vec![rows, spec.text_embeds_dim],
        vec![rows, 6],
    ];
    let parts = match mine {
        Some((c, t, i)) => [c, t, i],
        None => [
            Tensor::f_zeros(&shapes[0], (spec.kind, dev))?,
            Tensor::f_zeros(&shapes[1], (spec.kind, dev))?,
            Tensor::f_zeros(&shapes[2], (spec.kind, dev))?,
        ],
    };
    let mut out = Vec::with_capacity(3);
    for p in parts {
        out.push(
            world
                .broadcast(&p.f_contiguous()?, 0)
                .map_err(tch::TchError::from)?,
        );
    }
    let mut it = out.into_iter();
    let next = |it: &mut std::vec::IntoIter<Tensor>| it.next().expect("three parts");
    Ok((next(&mut it), next(&mut it), next(&mut it)))
}

fn row(t: &Tensor, i: i64) -> Result<Tensor, EngineError> {
    Ok(t.f_narrow(0, i, 1)?)
}

fn run_rank(rank: &SdxlRank, job: &RankJob<'_>) -> Result<RankOutput, EngineError> {
    let RankJob {
        comms,
        request,
        gate,
        events,
        fault_at,
        resume,
        checkpoints,
        ..
    } = *job;
    let spec = &rank.spec;
    let t0 = Instant::now();
    let guidance = Guidance::classifier_free(request.guidance, spec.guidance_rescale);
    let rows = if guidance.needs_negative() { 2 } else { 1 };
    let (unet, vae, device, mine) = match &rank.model {
        SdxlRankModel::Leader(p) => {
            p.check_request(request)?;
            let c = p.conditioning(request, guidance)?;
            let dev = p.options().devices.unet;
            (
                &p.unet,
                Some(&p.vae),
                dev,
                Some((c.context, c.text_embeds, c.time_ids)),
            )
        }
        SdxlRankModel::Follower { unet, vae, device } => (unet.as_ref(), vae.as_deref(), *device, None),
    };
    let (context, text_embeds, time_ids) = broadcast_conditioning(comms.world.as_ref(), mine, spec, rows)?;
    sync_on(&context)?;
    let branch = |i: i64| -> Result<TextConditioning, EngineError> {
        Ok(TextConditioning {
            encoder_hidden_states: row(&context, i)?,
            text_embeds: row(&text_embeds, i)?,
            time_ids: row(&time_ids, i)?,
        })
    };
    // diffusers' CFG batch is `[negative, positive]`.
    let cond = branch(rows - 1)?;
    let uncond = if rows == 2 { Some(branch(0)?) } else { None };
    let encode_ms = t0.elapsed().as_secs_f64() * 1e3;

    let t1 = Instant::now();
    let name = request.scheduler.as_deref().unwrap_or("euler");
    let mut scheduler = build_scheduler(&spec.scheduler_config, &spec.scheduler_source, name)?;
    scheduler.set_timesteps(request.steps as usize, None)?;
    let (lh, lw) = (
        i64::from(request.height) / spec.vae_scale,
        i64::from(request.width) / spec.vae_scale,
    );
    let channels = spec.unet.in_channels;
    // Every rank draws the whole seeded noise and keeps its band.
    let noise = crate::flux::sampling::noise(request.seed, channels, lh, lw, spec.kind, device)?;
    let full = initial_sample(noise, scheduler.as_ref())?; // (1, 4, lh, lw)
    let patch = comms.sp.as_ref();
    let bands = unet_rows(&spec.unet, lh, patch.size());
    let (start, len) = bands[patch.rank()];
    let slice = Slice { dim: 2, start, len };
    let x = full.f_narrow(2, start, len)?; // (1, 4, len, lw)
    let steps = scheduler.num_steps();
    let resume = resume
        .map(|state| Resume::from_state(state, &full.size(), Some(slice), &x, scheduler.as_ref(), steps))
        .transpose()?;
    let mut denoiser = |x: &Tensor, _i: usize, t: f32| -> Result<Tensor, EngineError> {
        let timestep = Tensor::from(t).f_to_device(device)?;
        guided_noise(
            unet,
            comms,
            &bands,
            x,
            &timestep,
            &cond,
            uncond.as_ref(),
            &guidance,
        )
    };
    let (seed, full_shape) = (request.seed, full.size());
    let noise = |i: usize| -> Result<Tensor, EngineError> {
        let n = crate::schedulers::step_noise(
            crate::schedulers::step_noise_seed(seed, i),
            &full_shape,
            spec.kind,
            device,
        )?;
        Ok(n.f_narrow(2, start, len)?)
    };
    let total = steps as u32;
    // Both CFG branches hold the same latents after each step: branch 0 sends the checkpoint.
    let cfg_idx = comms.rank / comms.mesh.sp();
    let sink = checkpoints.filter(|_| cfg_idx == 0);
    let x = denoise::run(
        scheduler.as_mut(),
        &mut denoiser,
        x,
        resume,
        Hooks {
            every: sink.map_or(0, |s| s.every),
            on_step: &mut |d, x| {
                inject_fault(fault_at, device, comms, d.step)?;
                report_and_check(d.step, total, x, (d.loop_start, d.step_start), gate, events)
            },
            on_checkpoint: &mut |step, x, state| match sink {
                Some(s) => s.send(step, Some(slice), x, state),
                None => Ok(()),
            },
            noise: &noise,
        },
    )?;
    finish(gate, total)?;
    let denoise_ms = t1.elapsed().as_secs_f64() * 1e3;
    if cfg_idx != 0 {
        return Ok(None);
    }

    // Branch 0 decodes its bands; rank 0 collects the image rows and the latents.
    let t2 = Instant::now();
    let vae = vae.ok_or_else(|| {
        EngineError::Load(format!(
            "rank {} of plan {} has no VAE replica",
            comms.rank, spec.plan
        ))
    })?;
    let img = decode_band(vae, &x, patch, &bands)?; // (1, 3, len * f, lw * f)
    let rgb = to_rgb8(&img)?.f_to_device(patch.device())?; // (len * f, lw * f, 3)
    let f = spec.vae_scale;
    let me = patch.rank();
    if me != 0 {
        if len > 0 {
            patch.send(&rgb, 0).map_err(tch::TchError::from)?;
            patch.send(&x.f_contiguous()?, 0).map_err(tch::TchError::from)?;
        }
        return Ok(None);
    }
    let (mut images, mut latents) = (vec![rgb], vec![x.shallow_clone()]);
    for (src, &(_, l)) in bands.iter().enumerate().skip(1) {
        if l > 0 {
            let recv = |shape: &[i64], kind: Kind| patch.recv(shape, kind, src).map_err(tch::TchError::from);
            images.push(recv(&[l * f, lw * f, 3], Kind::Uint8)?);
            latents.push(recv(&[1, channels, l, lw], spec.kind)?);
        }
    }
    let latents = Tensor::f_cat(&latents, 2)?; // (1, 4, lh, lw)
    check_finite(&latents)?;
    let rgb = Tensor::f_cat(&images, 0)?.f_to_device(Device::Cpu)?; // (H, W, 3)
    let mut bytes = vec![0u8; rgb.numel()];
    rgb.f_copy_data_u8(&mut bytes, rgb.numel())?;
    let decode_ms = t2.elapsed().as_secs_f64() * 1e3;
    Ok(Some((
        GeneratedImage {
            width: request.width,
            height: request.height,
            rgb: bytes,
            timings: StageTimings {
                encode_ms,
                denoise_ms,
                decode_ms,
                plan: Some(spec.plan.to_string()),
                ..Default::default()
            },
        },
        latents,
    )))
}
