//! One Flux image on many GPUs: the SPMD denoising loop each rank of a sequence- or CFG-parallel
//! plan runs (the one loop of [`crate::denoise`] on the rank's slice of the image tokens).
//!
//! Every rank derives the same noise, schedule and conditioning vectors from the request, keeps
//! only its slice of the image tokens (the Euler step is token-wise, so the latent stays sliced
//! for the whole loop), and gathers the slices once at the end. The text encoders run once, on
//! the group leader, and their outputs are broadcast. The VAE decode runs on the leader alone or,
//! with a patch-parallel plan (the default when a sequence spans several ranks), as bands of
//! rows on every rank of the first CFG branch ([`decode_bands`]).

use std::cell::RefCell;
use std::sync::mpsc::Sender;

use tch::{Device, Kind, Tensor};

use crate::checkpoint::{LoopState, Slice};
use crate::denoise::{self, Hooks, Resume};

use crate::flux::layers::Res;
use crate::flux::pipeline::{LoopInputs, to_rgb8, true_cfg};
use crate::flux::sampling::{self, SchedulerConfig};
use crate::flux::transformer::Flux;
use crate::flux::vae::Decoder;
use crate::parallel::attention::{SeqLayout, UspAttention};
use crate::parallel::comm::{CommError, Communicator, RankComms, balanced_split};
use crate::parallel::graphs::{self, GraphCache, StepKey};
use crate::parallel::plan::Plan;
use crate::parallel::rank::{CheckpointSink, StepGate, finish, gather_seq, inject_fault, report_and_check};
use crate::parallel::vae::decode_patch_parallel;
use crate::schedulers::{FlowMatchEulerDiscreteScheduler, Scheduler};
use crate::{EngineError, GenerateRequest, StepEvent};

/// The encoded prompts every rank needs: T5 tokens `(1, T, 4096)` and pooled CLIP `(1, 768)`,
/// and the negative prompt's for true CFG.
#[derive(Debug)]
pub struct Conditioning {
    pub txt: Tensor,
    pub pooled: Tensor,
    pub neg: Option<(Tensor, Tensor)>,
}

impl Conditioning {
    /// Broadcasts the leader's (`Some` on world rank 0) to every rank of `world`; the others
    /// pass the shapes `(txt, pooled)`.
    pub fn broadcast(
        world: &dyn Communicator,
        mine: Option<Conditioning>,
        txt_shape: &[i64],
        pooled_shape: &[i64],
        with_neg: bool,
        kind: Kind,
    ) -> Res<Conditioning> {
        let dev = world.device();
        let empty = |s: &[i64]| Tensor::f_zeros(s, (kind, dev));
        let (t, p, n) = match mine {
            Some(c) => (c.txt, c.pooled, c.neg),
            None => (
                empty(txt_shape)?,
                empty(pooled_shape)?,
                if with_neg {
                    Some((empty(txt_shape)?, empty(pooled_shape)?))
                } else {
                    None
                },
            ),
        };
        let b = |x: &Tensor| -> Res<Tensor> { Ok(world.broadcast(&x.f_contiguous()?, 0)?) };
        Ok(Conditioning {
            txt: b(&t)?,
            pooled: b(&p)?,
            neg: n
                .map(|(a, c)| Ok::<_, tch::TchError>((b(&a)?, b(&c)?)))
                .transpose()?,
        })
    }
}

/// What one rank computes with.
pub struct RankCtx<'a> {
    pub flux: &'a Flux,
    pub comms: &'a RankComms,
    pub plan: &'a Plan,
    pub scheduler: &'a SchedulerConfig,
    pub vae_scale: i64,
    pub device: Device,
    pub kind: Kind,
    /// Fault injection (tests, drills): this rank fails with a device error at this step, or
    /// with `.1` stops there without an error (a hung device) until its groups are aborted.
    pub fault_at: Option<(u32, bool)>,
    /// This rank's CUDA graphs of the step (sequence/CFG-parallel plans on CUDA devices).
    pub graphs: Option<&'a RefCell<GraphCache>>,
    /// Where the job resumes from (every rank takes its slice of the sample and its state).
    pub resume: Option<&'a LoopState>,
    /// Where this rank sends its part of each step checkpoint (ranks that hold the result's
    /// slices; the driver assembles the whole checkpoint).
    pub checkpoints: Option<&'a CheckpointSink>,
}

/// One rank's denoising loop. Returns the full packed latents `(1, img_seq, 64)` on world rank
/// 0 (`None` elsewhere). World rank 0 reports each step on `events` and every rank honours the
/// driver's cancel decisions from `gate` (one step late, so ranks need not wait for the host
/// callback before launching the next step).
pub fn denoise_rank(
    ctx: &RankCtx<'_>,
    request: &GenerateRequest,
    cond: &Conditioning,
    gate: &StepGate,
    events: Option<&Sender<StepEvent>>,
) -> Result<Option<Tensor>, EngineError> {
    let full = denoise_gathered(ctx, request, cond, gate, events)?;
    Ok(if ctx.comms.rank == 0 { Some(full) } else { None })
}

/// [`denoise_rank`], returning the full packed latents on every rank (each sequence-parallel
/// group all-gathers its slices).
pub(crate) fn denoise_gathered(
    ctx: &RankCtx<'_>,
    request: &GenerateRequest,
    cond: &Conditioning,
    gate: &StepGate,
    events: Option<&Sender<StepEvent>>,
) -> Result<Tensor, EngineError> {
    if ctx.comms.mesh.pipe > 1 {
        // PipeFusion leaves the latents on world rank 0; share them within the group.
        let mine = super::pipefusion::denoise_rank(ctx, request, cond, gate, events)?;
        let (lh, lw) = sampling::latent_size(request.height, request.width, ctx.vae_scale);
        let shape = [1, (lh / 2) * (lw / 2), ctx.flux.config.in_channels];
        let t = match mine {
            Some(t) => t,
            None => Tensor::f_zeros(shape, (ctx.kind, ctx.device))?,
        };
        return Ok(ctx.comms.sp.broadcast(&t, 0).map_err(tch::TchError::from)?);
    }
    let _guard = tch::no_grad_guard();
    let mesh = ctx.comms.mesh;
    let (cfg_idx, ring_idx, uly_idx) = mesh.coords(ctx.comms.rank);
    let sp_rank = ring_idx * mesh.ulysses + uly_idx;
    let RankBranch {
        txt: txt_full,
        seq_neg_txt,
        inputs,
    } = rank_branch(ctx, request, cond, cfg_idx)?;
    let txt_len = txt_full.size()[1];
    let img_len = inputs.x.size()[1];
    let layout = SeqLayout::new(mesh.sp(), txt_len, img_len, ctx.plan.text);
    let (ts, tl) = layout.txt[sp_rank];
    let (is, il) = layout.img[sp_rank];
    let mut x = inputs.x.f_narrow(1, is, il)?; // (1, img_local, 64)
    let (lh, lw) = inputs.latent_hw;
    let ids = Flux::position_ids(txt_len, lh, lw, ctx.device)?;
    let ids = Tensor::f_cat(&[ids.f_narrow(0, ts, tl)?, ids.f_narrow(0, txt_len + is, il)?], 0)?;
    let pe = ctx.flux.rope(&ids)?;
    let txt = ctx.flux.embed_txt(&txt_full.f_narrow(1, ts, tl)?)?;
    let neg_txt = seq_neg_txt
        .map(|n| ctx.flux.embed_txt(&n.f_narrow(1, ts, tl)?))
        .transpose()?;
    let op = UspAttention {
        ulysses: ctx.comms.ulysses.as_ref(),
        ring: ctx.comms.ring.as_ref(),
        layout: &layout,
    };
    let eager = |t: &[Tensor]| ctx.flux.forward_with(&t[0], &t[1], &t[2], &pe, &op);
    let graph = match (ctx.graphs, ctx.device) {
        (Some(cache), Device::Cuda(ordinal))
            if graphs::enabled(ctx.device, mesh.ring) && ctx.comms.is_capturable() =>
        {
            Some((cache, ordinal))
        }
        _ => None,
    };
    // What the captured forward bakes in: this rank's token slices and the RoPE positions.
    let key = StepKey(vec![ts, tl, is, il, txt_len, lh, lw]);
    let forward = |x: &Tensor, txt: &Tensor, vec: &Tensor| -> Result<Tensor, EngineError> {
        Ok(match graph {
            Some((cache, ordinal)) => {
                // A replay does not pass through the communicators: stop here once a peer's
                // failure aborted them (its captured collectives would use released state).
                if ctx.comms.is_aborted() {
                    return Err(tch::TchError::from(CommError::Aborted { backend: "NCCL" }).into());
                }
                cache.borrow_mut().step(
                    ordinal,
                    &key,
                    &[x, txt, vec],
                    &[&pe.cos, &pe.sin, &pe.freqs],
                    &eager,
                )?
            }
            None => eager(&[x.shallow_clone(), txt.shallow_clone(), vec.shallow_clone()])?,
        })
    };
    let mut scheduler = FlowMatchEulerDiscreteScheduler::new(ctx.scheduler.clone());
    scheduler.set_timesteps(inputs.steps, Some(img_len))?;
    let slice = Slice {
        dim: 1,
        start: is,
        len: il,
    };
    let resume = ctx
        .resume
        .map(|state| Resume::from_state(state, &inputs.x.size(), Some(slice), &x, &scheduler, inputs.steps))
        .transpose()?;
    let mut denoiser = |x: &Tensor, i: usize, _t: f32| -> Result<Tensor, EngineError> {
        let mut v = forward(x, &txt, &inputs.cond(i)?)?;
        if let (Some(nt), Some(nv)) = (&neg_txt, inputs.neg_cond(i)?) {
            let vn = forward(x, nt, &nv)?;
            v = true_cfg(&v, &vn, request.true_cfg_scale)?;
        }
        if mesh.cfg == 2 {
            // Both branches end with the same guided prediction (branch 0 = positive).
            let both = ctx
                .comms
                .cfg
                .all_gather(&v.f_contiguous()?)
                .map_err(tch::TchError::from)?;
            v = true_cfg(&both[0], &both[1], request.true_cfg_scale)?;
        }
        Ok(v)
    };
    let total = inputs.steps as u32;
    // Branch 0's ranks hold the result's slices: they send the checkpoint parts.
    let sink = ctx.checkpoints.filter(|_| cfg_idx == 0);
    x = denoise::run(
        &mut scheduler,
        &mut denoiser,
        x,
        resume,
        Hooks {
            every: sink.map_or(0, |s| s.every),
            on_step: &mut |d, x| {
                inject_fault(ctx.fault_at, ctx.device, ctx.comms, d.step)?;
                report_and_check(d.step, total, x, (d.loop_start, d.step_start), gate, events)
            },
            on_checkpoint: &mut |step, x, state| match sink {
                Some(s) => s.send(step, Some(slice), x, state),
                None => Ok(()),
            },
            noise: &|_| Err(EngineError::Torch("flow matching draws no step noise".into())),
        },
    )?;
    finish(gate, inputs.steps as u32)?;
    // Every rank of the branch gets all image slices (branch 0's are the result).
    gather_seq(ctx.comms.sp.as_ref(), &x, &layout.img)
}

/// Patch-parallel decode of the full packed latents `(1, lh/2 * lw/2, 64)` (held by every rank
/// of `comm`) for latent size `hw`: rank `r` unpacks and decodes a band of packed rows (2 latent
/// rows each, split with [`balanced_split`]), converts its image rows to RGB bytes, and the bands
/// are sent to rank 0. Returns the `(H, W, 3)` bytes on rank 0, `None` elsewhere.
pub fn decode_bands(
    vae: &Decoder,
    latents: &Tensor,
    hw: (i64, i64),
    comm: &dyn Communicator,
) -> Result<Option<Tensor>, EngineError> {
    let _guard = tch::no_grad_guard();
    let (lh, lw) = hw;
    let (n, me) = (comm.size(), comm.rank());
    let packed = balanced_split(lh / 2, n);
    let rows: Vec<(i64, i64)> = packed.iter().map(|&(s, l)| (2 * s, 2 * l)).collect();
    let (ps, pl) = packed[me];
    let vae_dev = vae.conv_in.weight.device();
    let tokens = latents.f_narrow(1, ps * (lw / 2), pl * (lw / 2))?; // (1, pl * lw/2, 64)
    let z = sampling::unpack(&tokens.f_contiguous()?, 2 * pl, lw)?.f_to_device(vae_dev)?; // (1, 16, 2pl, lw)
    let img = decode_patch_parallel(vae, &z, comm, &rows)?; // (1, 3, 2pl * f, lw * f)
    let rgb = to_rgb8(&img)?.f_to_device(comm.device())?; // (2pl * f, lw * f, 3)
    let f = vae.config.scale_factor();
    let width = lw * f;
    if me != 0 {
        if pl > 0 {
            comm.send(&rgb, 0).map_err(tch::TchError::from)?;
        }
        return Ok(None);
    }
    let mut bands = vec![rgb];
    for (src, &(_, len)) in rows.iter().enumerate().skip(1) {
        if len > 0 {
            let shape = [len * f, width, 3];
            bands.push(comm.recv(&shape, Kind::Uint8, src).map_err(tch::TchError::from)?);
        }
    }
    Ok(Some(Tensor::f_cat(&bands, 0)?))
}

/// The prompt branch one rank runs and its loop inputs.
pub(crate) struct RankBranch<'a> {
    /// T5 tokens of this rank's prompt `(1, T, 4096)`: the negative one on CFG branch 1.
    pub txt: &'a Tensor,
    /// The negative prompt's T5 tokens when true CFG runs both prompts on these ranks.
    pub seq_neg_txt: Option<&'a Tensor>,
    pub inputs: LoopInputs,
}

/// Picks this rank's branch: CFG-parallel groups run the negative prompt on branch `cfg_idx` 1;
/// without CFG parallel, true CFG runs both prompts in turn. Refuses a CFG-parallel plan for a
/// request without true CFG.
pub(crate) fn rank_branch<'a>(
    ctx: &RankCtx<'_>,
    request: &GenerateRequest,
    cond: &'a Conditioning,
    cfg_idx: usize,
) -> Result<RankBranch<'a>, EngineError> {
    let cfg = ctx.comms.mesh.cfg;
    let true_cfg_on = request.true_cfg();
    if cfg == 2 && !true_cfg_on {
        return Err(EngineError::InvalidRequest(format!(
            "plan {} runs the negative prompt on half of the GPUs: it needs true CFG \
             (a negative_prompt and true_cfg_scale > 1)",
            ctx.plan
        )));
    }
    let neg = || {
        cond.neg
            .as_ref()
            .ok_or_else(|| EngineError::InvalidRequest("true CFG without a negative prompt".into()))
    };
    let (txt, pooled) = if cfg == 2 && cfg_idx == 1 {
        let n = neg()?;
        (&n.0, &n.1)
    } else {
        (&cond.txt, &cond.pooled)
    };
    let seq_neg = if cfg == 1 && true_cfg_on {
        Some(neg()?)
    } else {
        None
    };
    let inputs = LoopInputs::new(
        ctx.flux,
        ctx.scheduler,
        ctx.vae_scale,
        request,
        pooled,
        seq_neg.map(|n| &n.1),
        ctx.device,
        ctx.kind,
    )?;
    Ok(RankBranch {
        txt,
        seq_neg_txt: seq_neg.map(|n| &n.0),
        inputs,
    })
}
