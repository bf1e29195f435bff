//! Flux on many GPUs: what each rank of a plan holds and runs (sequence parallel: Ulysses, Ring,
//! USP; CFG parallel for true CFG; PipeFusion), behind [`crate::parallel`]'s model-free rank
//! machinery ([`ParallelLeader`], [`RankWork`]).
//!
//! - [`runner`]: the per-rank denoising loop of sequence and CFG parallel plans;
//! - [`pipefusion`]: PipeFusion (stages of blocks, patches of the image, one-step-stale K/V;
//!   approximate after its warm-up steps).

pub mod pipefusion;
pub mod runner;

use std::sync::Mutex;
use std::time::Instant;

use tch::{Device, Kind};

use self::runner::{Conditioning, RankCtx, decode_bands, denoise_gathered};
use super::Pipeline;
use super::sampling::{self, SchedulerConfig};
use super::transformer::{Flux, Part};
use super::vae::Decoder;
use crate::device::sync_on;
use crate::lora::LoraSlot;
use crate::lora::flux::weights;
use crate::parallel::Plan;
use crate::parallel::plan::Splits;
use crate::parallel::rank::{ParallelLeader, RankJob, RankOutput, RankWork};
use crate::{Engine, EngineError, EngineInfo, GeneratedImage, StageTimings};

/// What a rank thread holds: the group leader holds the whole pipeline (text encoders, VAE,
/// its transformer replica), the others a transformer replica (under PipeFusion, each rank's
/// transformer is only its stage's part, the leader's included) and, for a patch-parallel decode
/// on the first CFG branch, a VAE decoder replica.
pub enum RankModel {
    Leader(Box<Pipeline>),
    Follower {
        flux: Box<Flux>,
        vae: Option<Box<Decoder>>,
        device: Device,
    },
}

/// Static facts every rank of a group needs.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    plan: Plan,
    scheduler: SchedulerConfig,
    vae_scale: i64,
    txt_shape: Vec<i64>,
    pooled_shape: Vec<i64>,
    kind: Kind,
}

impl ParallelLeader for Pipeline {
    type Rank = FluxRank;

    fn splits(&self) -> Splits {
        Splits::Tokens {
            heads: self.transformer.config.num_heads,
        }
    }

    fn info(&self) -> EngineInfo {
        Engine::info(self)
    }

    fn device(&self) -> Device {
        self.options().devices.transformer
    }

    fn lora_hub(&self) -> Option<std::sync::Arc<crate::lora::LoraHub>> {
        Some(self.lora().hub().clone())
    }

    fn set_lora_hub(&mut self, hub: std::sync::Arc<crate::lora::LoraHub>) {
        self.lora_mut().set_hub(hub);
    }

    /// The transformer is replicated onto the group's other devices (under PipeFusion each rank
    /// gets only its stage's part and the leader's own is cut down to stage 0's); ranks of CFG
    /// branch 0 get a VAE replica for the patch-parallel decode.
    fn split(mut self, plan: &Plan, devices: &[Device]) -> Result<Vec<FluxRank>, EngineError> {
        // The replicas are copies of the base weights; each rank merges stacks into its own.
        self.lora_mut().reset()?;
        let config = self.transformer.config.clone();
        let parts = if plan.pipefusion > 1 {
            Some(pipefusion::stage_parts(&config, plan.pipefusion)?)
        } else {
            None
        };
        let sp = plan.mesh().sp();
        let part_of = |i: usize| match &parts {
            Some(p) => p[i % sp].clone(),
            None => Part::full(&config),
        };
        let spec = GroupSpec {
            plan: *plan,
            scheduler: self.scheduler.clone(),
            vae_scale: self.vae.config.scale_factor(),
            txt_shape: vec![
                1,
                self.t5_tokenizer.max_len as i64,
                self.transformer.config.context_in_dim,
            ],
            pooled_shape: vec![1, self.transformer.config.vec_in_dim],
            kind: self.options().kind,
        };
        let mut ranks = Vec::with_capacity(devices.len());
        for (i, &device) in devices.iter().enumerate().skip(1) {
            let flux = self.transformer.copy_part(&part_of(i), device)?;
            // Ranks `0..sp` of the group are CFG branch 0, the ones that decode.
            let vae = if plan.vae_split() && i < sp {
                Some(Box::new(self.vae.replicate(device)?))
            } else {
                None
            };
            ranks.push(FluxRank {
                model: RankModel::Follower {
                    flux: Box::new(flux),
                    vae,
                    device,
                },
                spec: spec.clone(),
                lora: Mutex::new(self.lora().follower()),
            });
        }
        if parts.is_some() {
            // Frees the other stages' blocks on the leader's device.
            let dev = self.options().devices.transformer;
            self.transformer = self.transformer.copy_part(&part_of(0), dev)?;
        }
        let lora = Mutex::new(self.lora().another(true));
        ranks.insert(
            0,
            FluxRank {
                model: RankModel::Leader(Box::new(self)),
                spec,
                lora,
            },
        );
        Ok(ranks)
    }
}

/// A Flux rank thread's model and its group's facts.
pub struct FluxRank {
    pub model: RankModel,
    spec: GroupSpec,
    /// The LoRA stack merged into the weights this rank holds (its stage's blocks under
    /// PipeFusion; the CLIP encoder on the leader).
    lora: Mutex<LoraSlot>,
}

impl RankWork for FluxRank {
    type Leader = Pipeline;

    fn device(&self) -> Device {
        self.model.device()
    }

    fn parameters(&self) -> usize {
        match &self.model {
            RankModel::Leader(p) => p.transformer.parameters(),
            RankModel::Follower { flux, .. } => flux.parameters(),
        }
    }

    fn run(&self, job: &RankJob<'_>) -> Result<RankOutput, EngineError> {
        {
            let flux = match &self.model {
                RankModel::Leader(p) => &p.transformer,
                RankModel::Follower { flux, .. } => flux,
            };
            crate::flux::fp8::refuse_loras(&job.request.loras, flux)?;
            let mut slot = self.lora.lock().unwrap_or_else(|p| p.into_inner());
            slot.prepare(&job.request.loras, || match &self.model {
                RankModel::Leader(p) => weights(&p.transformer, p.resident_clip()),
                RankModel::Follower { flux, .. } => weights(flux, None),
            })?;
        }
        run_rank(&self.model, &self.spec, job)
    }

    /// A PipeFusion leader holds one stage only: not reusable for another plan. The leader
    /// goes back with its base weights.
    fn into_leader(self) -> Option<Pipeline> {
        let mut slot = self.lora.into_inner().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = slot.reset() {
            tracing::error!(error = %e, "could not restore the base weights of a rank's LoRA stack");
            return None;
        }
        match self.model {
            RankModel::Leader(p) if self.spec.plan.pipefusion <= 1 => Some(*p),
            _ => None,
        }
    }
}

impl RankModel {
    /// The device the rank's transformer computes on.
    pub fn device(&self) -> Device {
        match self {
            RankModel::Leader(p) => p.options().devices.transformer,
            RankModel::Follower { device, .. } => *device,
        }
    }
}

/// One rank's part of one job: the leader encodes and broadcasts the conditioning, every rank
/// denoises its share, and the result is decoded on the leader or in bands.
fn run_rank(model: &RankModel, spec: &GroupSpec, job: &RankJob<'_>) -> Result<RankOutput, EngineError> {
    let RankJob {
        comms,
        request,
        gate,
        events,
        fault_at,
        graphs,
        resume,
        checkpoints,
        ..
    } = *job;
    let with_neg = request.true_cfg();
    let t0 = Instant::now();
    let (flux, device, mine) = match model {
        RankModel::Leader(p) => {
            p.check(request)?;
            let (txt, pooled) = p.encode_prompt(&request.prompt)?;
            let neg = match (&request.negative_prompt, with_neg) {
                (Some(n), true) => Some(p.encode_prompt(n)?),
                _ => None,
            };
            let c = Conditioning { txt, pooled, neg };
            (&p.transformer, p.options().devices.transformer, Some(c))
        }
        RankModel::Follower { flux, device, .. } => (flux.as_ref(), *device, None),
    };
    let cond = Conditioning::broadcast(
        comms.world.as_ref(),
        mine,
        &spec.txt_shape,
        &spec.pooled_shape,
        with_neg,
        spec.kind,
    )?;
    sync_on(&cond.pooled)?;
    let encode_ms = t0.elapsed().as_secs_f64() * 1e3;
    let ctx = RankCtx {
        flux,
        comms,
        plan: &spec.plan,
        scheduler: &spec.scheduler,
        vae_scale: spec.vae_scale,
        device,
        kind: spec.kind,
        fault_at,
        graphs: Some(graphs),
        resume,
        checkpoints,
    };
    let t1 = Instant::now();
    let latents = denoise_gathered(&ctx, request, &cond, gate, events)?;
    let denoise_ms = t1.elapsed().as_secs_f64() * 1e3;
    let hw = sampling::latent_size(request.height, request.width, spec.vae_scale);
    let t2 = Instant::now();
    let rgb = if spec.plan.vae_split() {
        if comms.mesh.coords(comms.rank).0 != 0 {
            return Ok(None);
        }
        let vae = match model {
            RankModel::Leader(p) => {
                p.check_finite(&latents)?;
                &p.vae
            }
            RankModel::Follower { vae: Some(v), .. } => v.as_ref(),
            RankModel::Follower { vae: None, .. } => {
                return Err(EngineError::Load(format!(
                    "rank {} of plan {} has no VAE replica",
                    comms.rank, spec.plan
                )));
            }
        };
        let Some(rgb) = decode_bands(vae, &latents, hw, comms.sp.as_ref())? else {
            return Ok(None);
        };
        let rgb = rgb.f_to_device(Device::Cpu)?;
        let mut bytes = vec![0u8; rgb.numel()];
        rgb.f_copy_data_u8(&mut bytes, rgb.numel())?;
        bytes
    } else {
        let RankModel::Leader(p) = model else {
            return Ok(None);
        };
        if comms.rank != 0 {
            return Ok(None);
        }
        p.check_finite(&latents)?;
        p.decode(&latents, hw)?
    };
    let decode_ms = t2.elapsed().as_secs_f64() * 1e3;
    let image = GeneratedImage {
        width: request.width,
        height: request.height,
        rgb,
        timings: StageTimings {
            encode_ms,
            denoise_ms,
            decode_ms,
            plan: Some(spec.plan.to_string()),
            ..Default::default()
        },
    };
    Ok(Some((image, latents)))
}
