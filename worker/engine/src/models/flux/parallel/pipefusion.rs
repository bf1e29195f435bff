//! PipeFusion (after xDiT's): the transformer's 57 blocks are split into `pipe` contiguous
//! stages (one per rank of the `sp` group, each holding only its blocks' weights), the image
//! tokens into `patches` contiguous patches, and the patches flow through the stages one after
//! another, so every stage works on a different patch at the same time.
//!
//! **Approximate.** A patch's attention needs keys/values of the whole sequence. Each stage keeps,
//! per block it owns, a K/V buffer of the full joint sequence (text then image, RoPE applied); a
//! patch writes its fresh K/V into the buffer and attends over all of it: fresh K/V for the
//! patches already done this step (and the text, see below), ONE STEP STALE K/V for the patches
//! after it. The first `warmup_steps` steps run the full sequence as one unit (no staleness; the
//! buffers are filled exactly), so with `warmup_steps >= steps` the result is the single-GPU one.
//!
//! **Text.** The text tokens travel with patch 0 (and with the full sequence in warm-up steps):
//! patch 0 carries `[txt; img_0]`, the other patches image tokens only. The text K/V live in the
//! buffer beside the image's; since patch 0 is first at every stage, every later patch sees
//! fresh text K/V, and only the text's own queries (in patch 0) see stale image K/V.
//!
//! **Schedule.** Work is done in lockstep ticks: at tick `t` stage `s` runs the unit (a patch of
//! a step, or a whole warm-up step) that stage 0 ran at tick `t - s`, then every stage passes its
//! output on in ONE exchange (a grouped send + receive around the ring of stages, so no order of
//! blocking sends can deadlock): hidden states `(branches, tokens, h)` to the next stage, and from
//! the last stage (which runs the final layer, CFG and the Euler step for its patch) the updated
//! latent patch back to stage 0 for the next step. Stage 0 starts a unit once the previous step's
//! latent for its tokens is back (`patches >= stages` keeps the pipeline full in patched steps).
//!
//! Steps are reported (and cancel decisions honoured) at the tick where the step's last patch
//! reaches stage 0, on every rank at once, with [`super::runner`]'s protocol.

use std::cell::{Cell, RefCell};
use std::sync::mpsc::Sender;
use std::time::Instant;

use tch::{Kind, TchError, Tensor};

use super::runner::{Conditioning, RankBranch, RankCtx, rank_branch};
use crate::denoise::Resume;
use crate::flux::layers::{Res, sdpa};
use crate::flux::pipeline::true_cfg;
use crate::flux::transformer::{
    Conds, Config, Ctx, DoubleBlock, Flux, Hidden, JointAttention, Part, Rope, SingleBlock,
    modulation_table_of,
};
use crate::parallel::comm::{CommResult, Communicator, balanced_split};
use crate::parallel::rank::{StepGate, finish, report_and_check};
use crate::schedulers::{FlowMatchEulerDiscreteScheduler, Scheduler};
use crate::{Control, EngineError, GenerateRequest, StepEvent};

/// Time of a double-stream block relative to a single-stream block, for balancing the stages.
/// Per token both do 12·h² multiply-adds in their linear layers (double: qkv 3h², proj h², MLP 8h²
/// in the token's own stream; single: linear1 7h², linear2 5h²) and the same joint attention, so
/// their FLOPs are equal; a double block also runs the text stream as separate, small GEMMs, reads
/// twice the weights and runs twice the modulation/norm/residual passes. Measured on one H100
/// (bf16, Flux.1-dev widths, the blocks' ops in PyTorch replayed from a CUDA graph; ratio of
/// double to single): 1.06 for 512 text + 4096 image tokens, 1.03 for 512 + 16384, 1.08 for a
/// 512 + 2048 patch, 1.15 for 1024-token patches with or without the text. Patched steps
/// dominate, hence 1.1.
pub const DOUBLE_BLOCK_COST: f64 = 1.1;

/// The blocks (double then single, in forward order) of each of `stages` stages: contiguous, at
/// least one block each, the costliest stage as cheap as possible ([`DOUBLE_BLOCK_COST`]). The first stage holds the
/// input embedders, the last the final layer.
pub fn stage_parts(c: &Config, stages: usize) -> Result<Vec<Part>, EngineError> {
    let nd = c.depth as usize;
    let n = nd + c.depth_single_blocks as usize;
    if stages == 0 || stages > n {
        return Err(EngineError::InvalidRequest(format!(
            "PipeFusion with {stages} stages needs at least one block per stage; the model has {n}"
        )));
    }
    let cost = |i: usize| if i < nd { DOUBLE_BLOCK_COST } else { 1.0 };
    let mut prefix = vec![0.0];
    for i in 0..n {
        prefix.push(prefix[i] + cost(i));
    }
    // best[s][k]: the least possible cost of the costliest stage when blocks 0..k form s stages
    // (each of at least one block); cut[s][k]: where the last of them starts.
    let mut best = vec![vec![f64::INFINITY; n + 1]; stages + 1];
    let mut cut = vec![vec![0; n + 1]; stages + 1];
    best[0][0] = 0.0;
    for s in 1..=stages {
        for k in s..=n {
            for j in s - 1..k {
                let c = best[s - 1][j].max(prefix[k] - prefix[j]);
                if c < best[s][k] - 1e-9 {
                    best[s][k] = c;
                    cut[s][k] = j;
                }
            }
        }
    }
    let mut bounds = vec![n];
    for s in (1..=stages).rev() {
        bounds.push(cut[s][bounds[bounds.len() - 1]]);
    }
    bounds.reverse(); // 0 = bounds[0] < bounds[1] < ... < bounds[stages] = n
    Ok((0..stages)
        .map(|s| {
            let (a, b) = (bounds[s], bounds[s + 1]);
            Part {
                double: a.min(nd)..b.min(nd),
                single: a.max(nd) - nd..b.max(nd) - nd,
                input: s == 0,
                output: s == stages - 1,
            }
        })
        .collect())
}

/// One unit of work: a whole warm-up step or one patch of a patched step.
#[derive(Debug, Clone, PartialEq)]
pub struct Unit {
    /// 0-based denoising step.
    pub step: usize,
    /// `None` = the whole sequence (warm-up), else the patch index.
    pub patch: Option<usize>,
    /// Image tokens `(start, len)`.
    pub img: (i64, i64),
    /// Whether the text tokens travel with this unit (warm-up units and patch 0).
    pub txt: bool,
    /// Tick at which stage 0 runs it; stage `s` runs it at `start + s`.
    pub start: usize,
}

impl Unit {
    /// The unit's tokens in the joint `[txt; img]` sequence: `(start, len)`.
    pub fn joint(&self, txt_len: i64) -> (i64, i64) {
        if self.txt {
            (self.img.0, txt_len + self.img.1) // patch 0 or the whole sequence: img.0 == 0
        } else {
            (txt_len + self.img.0, self.img.1)
        }
    }

    fn txt_len(&self, txt_len: i64) -> i64 {
        if self.txt { txt_len } else { 0 }
    }
}

/// The units of a generation in the order every stage runs them, with their start ticks.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub stages: usize,
    pub units: Vec<Unit>,
}

impl Schedule {
    /// `steps` steps, the first `warmup` of them whole, the others in `patches` patches of the
    /// `img_len` image tokens, over `stages` stages.
    pub fn new(steps: usize, warmup: usize, img_len: i64, patches: usize, stages: usize) -> Self {
        Self::resumed(0, steps, warmup, img_len, patches, stages)
    }

    /// [`Schedule::new`] for a run resumed after `from` steps: steps `from..steps`, the first
    /// `warmup` of them whole again (the K/V buffers are filled anew).
    pub fn resumed(
        from: usize,
        steps: usize,
        warmup: usize,
        img_len: i64,
        patches: usize,
        stages: usize,
    ) -> Self {
        let split = balanced_split(img_len, patches);
        let mut units: Vec<Unit> = Vec::new();
        for step in from..steps {
            let first = units.len();
            let prev: Vec<Unit> = units.iter().filter(|u| u.step + 1 == step).cloned().collect();
            let parts: Vec<(Option<usize>, (i64, i64))> = if step < from + warmup {
                vec![(None, (0, img_len))]
            } else {
                split.iter().enumerate().map(|(p, &r)| (Some(p), r)).collect()
            };
            for (i, (patch, img)) in parts.into_iter().enumerate() {
                // After the previous unit, and once the previous step's latent for these tokens
                // is back on stage 0 (the last stage sends it at `start + stages - 1`).
                let after_prev = if first + i == 0 {
                    0
                } else {
                    units[first + i - 1].start + 1
                };
                let ready = prev
                    .iter()
                    .filter(|d| d.img.0 < img.0 + img.1 && img.0 < d.img.0 + d.img.1)
                    .map(|d| d.start + stages)
                    .max()
                    .unwrap_or(0);
                units.push(Unit {
                    step,
                    patch,
                    img,
                    txt: patch.is_none_or(|p| p == 0),
                    start: after_prev.max(ready),
                });
            }
        }
        Self { stages, units }
    }

    /// Ticks in all: the last unit's latent is back on stage 0 after tick `start + stages - 1`.
    pub fn ticks(&self) -> usize {
        self.units.last().map_or(0, |u| u.start + self.stages)
    }

    /// The unit stage `stage` runs at `tick`.
    pub fn at(&self, tick: usize, stage: usize) -> Option<&Unit> {
        let start = tick.checked_sub(stage)?;
        let i = self.units.binary_search_by_key(&start, |u| u.start).ok()?;
        Some(&self.units[i])
    }

    /// The step (0-based) whose last unit reaches stage 0 in the exchange of `tick`.
    pub fn step_done_at(&self, tick: usize) -> Option<usize> {
        let u = self.at(tick, self.stages - 1)?;
        let last_of_step = self.units.iter().rfind(|x| x.step == u.step)?;
        (last_of_step == u).then_some(u.step)
    }
}

/// The joint attention of one stage's blocks with a full-sequence K/V buffer per block (see the
/// module docs). [`KvBuffers::begin`] before each unit's forward; each block calls
/// [`JointAttention::attend`] exactly once, in order.
struct KvBuffers {
    /// Per block of the stage: K and V `(b, heads, txt + img, d)`, RoPE applied to K.
    kv: RefCell<Vec<Option<(Tensor, Tensor)>>>,
    next: Cell<usize>,
    /// The unit's tokens in the joint sequence, and whether they are all of it.
    range: Cell<(i64, i64)>,
    whole: Cell<bool>,
}

impl KvBuffers {
    fn new(blocks: usize) -> Self {
        Self {
            kv: RefCell::new((0..blocks).map(|_| None).collect()),
            next: Cell::new(0),
            range: Cell::new((0, 0)),
            whole: Cell::new(false),
        }
    }

    fn begin(&self, range: (i64, i64), whole: bool) {
        self.next.set(0);
        self.range.set(range);
        self.whole.set(whole);
    }
}

/// A contiguous copy in its own storage (`t` may be a view into a larger buffer).
fn owned(t: &Tensor) -> Res<Tensor> {
    let mut o = Tensor::f_empty(t.size(), (t.kind(), t.device()))?;
    o.f_copy_(t)?;
    Ok(o)
}

impl JointAttention for KvBuffers {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        let i = self.next.get();
        self.next.set(i + 1);
        let mut kv = self.kv.borrow_mut();
        let slot = kv.get_mut(i).ok_or_else(|| {
            TchError::Torch(format!(
                "PipeFusion: attention call {i} beyond the stage's blocks"
            ))
        })?;
        if self.whole.get() {
            // The whole sequence: exactly the one-device attention; keep K/V for the patches.
            *slot = Some((owned(k)?, owned(v)?));
            return sdpa(q, k, v, None, false, None);
        }
        let (kb, vb) = slot.as_ref().ok_or_else(|| {
            TchError::Torch(format!(
                "PipeFusion: block {i}'s K/V buffer is empty (a patched step before any warm-up step)"
            ))
        })?;
        let (start, len) = self.range.get();
        kb.f_narrow(2, start, len)?.f_copy_(k)?;
        vb.f_narrow(2, start, len)?.f_copy_(v)?;
        sdpa(q, kb, vb, None, false, None) // (b, heads, len, d)
    }
}

/// One prompt's state on a stage: positive, or negative for true CFG.
struct Branch {
    /// `txt_in(txt)` `(1, T, h)` (stage 0 only).
    txt: Option<Tensor>,
    /// Conditioning vectors `(steps, h)`.
    vecs: Tensor,
    /// The stage's modulation for every step ([`StageRun::table`]), computed once per job.
    mods: Option<Tensor>,
    kv: KvBuffers,
}

/// The blocks of `part` within `flux` (which holds `part`'s blocks, or more of them).
fn stage_blocks<'a>(
    flux: &'a Flux,
    part: &Part,
) -> Result<(&'a [DoubleBlock], &'a [SingleBlock]), EngineError> {
    let held = &flux.part;
    let inside = |a: &std::ops::Range<usize>, b: &std::ops::Range<usize>| {
        a.is_empty() || (b.start <= a.start && a.end <= b.end)
    };
    if !inside(&part.double, &held.double)
        || !inside(&part.single, &held.single)
        || (part.input && !held.input)
        || (part.output && !held.output)
    {
        return Err(EngineError::InvalidRequest(format!(
            "this rank's transformer holds {held:?}, its PipeFusion stage needs {part:?}"
        )));
    }
    let d = if part.double.is_empty() {
        &flux.double_blocks[..0]
    } else {
        &flux.double_blocks[part.double.start - held.double.start..part.double.end - held.double.start]
    };
    let s = if part.single.is_empty() {
        &flux.single_blocks[..0]
    } else {
        &flux.single_blocks[part.single.start - held.single.start..part.single.end - held.single.start]
    };
    Ok((d, s))
}

/// RoPE tables of the joint tokens `(start, len)`.
fn rope_slice(pe: &Rope, (start, len): (i64, i64)) -> Res<Rope> {
    Ok(Rope {
        cos: pe.cos.f_narrow(2, start, len)?,
        sin: pe.sin.f_narrow(2, start, len)?,
        freqs: pe.freqs.f_narrow(2, start, len)?,
    })
}

/// Step `step`'s row of a branch's stage modulation (its conditioning vector where the table is
/// not there).
fn row(br: &Branch, step: usize) -> Res<Tensor> {
    br.mods.as_ref().unwrap_or(&br.vecs).f_narrow(0, step as i64, 1)
}

/// What a stage's blocks run on.
struct StageRun<'a> {
    double: &'a [DoubleBlock],
    single: &'a [SingleBlock],
    txt_len: i64,
    hidden: i64,
}

impl StageRun<'_> {
    /// Every step's adaLN modulation of this stage's blocks (and of `last`, the final layer, on
    /// the last stage), as [`Flux::modulation_table`] computes it for the whole model: `vecs`
    /// `(steps, h)` -> `(steps, 12h per double + 3h per single block [+ 2h])`. One matmul per
    /// layer per job instead of each block's matrix-vector product for every patch of every step.
    fn table(&self, vecs: &Tensor, last: Option<&crate::flux::transformer::LastLayer>) -> Res<Tensor> {
        modulation_table_of(self.double, self.single, last, vecs)
    }

    /// The final layer's conditioning from `vec`: the vector, or the last 2h of a table row.
    fn last_cond(&self, vec: &Tensor) -> Res<Tensor> {
        let h = self.hidden;
        let w = vec.size()[1];
        if w == h {
            return Ok(vec.shallow_clone());
        }
        vec.f_narrow(1, w - 2 * h, 2 * h)
    }

    /// One branch of `unit` through this stage's blocks. `img` is the image hidden state
    /// `(1, L, h)` and `txt` the text's `(1, T_u, h)` (stage 0), or `joint` = `[txt; img]` from the
    /// previous stage. Returns `[txt; img]` `(1, T_u + L, h)`.
    fn forward(
        &self,
        input: StageInput,
        unit: &Unit,
        vec: &Tensor,
        pe: &Rope,
        kv: &KvBuffers,
    ) -> Res<Tensor> {
        let t_u = unit.txt_len(self.txt_len);
        kv.begin(unit.joint(self.txt_len), unit.patch.is_none());
        let ctx = Ctx::new(pe, kv);
        let h = self.hidden;
        let mut conds = Conds::new(vec, h);
        let (img, txt) = match input {
            StageInput::Streams { img, txt } => (img, txt),
            StageInput::Joint(x) if !self.double.is_empty() => {
                let n = x.size()[1];
                (x.f_narrow(1, t_u, n - t_u)?, x.f_narrow(1, 0, t_u)?)
            }
            StageInput::Joint(x) => return self.singles(x, &mut conds, ctx),
        };
        // Each block's closing residual is added by the next block's first kernel (`Hidden`).
        let (mut img, mut txt) = (Hidden::Ready(img), Hidden::Ready(txt));
        for block in self.double {
            (img, txt) = block.forward_chained(img, txt, &conds.next(12 * h)?, ctx)?;
        }
        let joint = Tensor::f_cat(&[txt.materialize()?, img.materialize()?], 1)?;
        self.singles(joint, &mut conds, ctx) // (1, T_u + L, h)
    }

    fn singles(&self, x: Tensor, conds: &mut Conds<'_>, ctx: Ctx<'_>) -> Res<Tensor> {
        let mut x = Hidden::Ready(x);
        for block in self.single {
            x = block.forward_chained(x, &conds.next(3 * self.hidden)?, ctx)?;
        }
        x.materialize()
    }
}

enum StageInput {
    Streams { img: Tensor, txt: Tensor },
    Joint(Tensor),
}

/// One grouped exchange: optionally send to `dst` and receive `(shape, src)`.
fn exchange(
    comm: &dyn Communicator,
    send: Option<(&Tensor, usize)>,
    recv: Option<(Vec<i64>, usize)>,
    kind: Kind,
) -> CommResult<Option<Tensor>> {
    Ok(match (send, recv) {
        (Some((t, dst)), Some((shape, src))) => {
            Some(comm.send_recv(&t.f_contiguous()?, dst, &shape, kind, src)?)
        }
        (Some((t, dst)), None) => {
            comm.send(&t.f_contiguous()?, dst)?;
            None
        }
        (None, Some((shape, src))) => Some(comm.recv(&shape, kind, src)?),
        (None, None) => None,
    })
}

/// [`super::runner::denoise_rank`] for a PipeFusion plan (`mesh.pipe > 1`): this rank is stage
/// `comms.sp.rank()` of CFG branch `rank / sp`. Returns the full packed latents
/// `(1, img_seq, 64)` on world rank 0 (stage 0 of branch 0, which receives every final patch).
pub fn denoise_rank(
    ctx: &RankCtx<'_>,
    request: &GenerateRequest,
    cond: &Conditioning,
    gate: &StepGate,
    events: Option<&Sender<StepEvent>>,
) -> Result<Option<Tensor>, EngineError> {
    let _guard = tch::no_grad_guard();
    let comms = ctx.comms;
    let mesh = comms.mesh;
    let sp = comms.sp.as_ref();
    let (stages, stage) = (sp.size(), sp.rank());
    let cfg_idx = comms.rank / mesh.sp();
    if ctx.plan.warmup_steps == 0 {
        return Err(EngineError::InvalidRequest(format!(
            "plan {}: PipeFusion needs at least one warm-up step (it fills the K/V buffers)",
            ctx.plan
        )));
    }
    let part = stage_parts(&ctx.flux.config, stages)?.swap_remove(stage);
    let (double, single) = stage_blocks(ctx.flux, &part)?;
    let RankBranch {
        txt: txt_full,
        seq_neg_txt,
        inputs,
    } = rank_branch(ctx, request, cond, cfg_idx)?;
    let txt_len = txt_full.size()[1];
    let img_len = inputs.x.size()[1];
    if (img_len as usize) < ctx.plan.patches {
        return Err(EngineError::InvalidRequest(format!(
            "plan {}: {} patches of {img_len} image tokens",
            ctx.plan, ctx.plan.patches
        )));
    }
    let blocks = double.len() + single.len();
    let embed = |t: &Tensor| -> Result<Option<Tensor>, EngineError> {
        Ok(if part.input {
            Some(ctx.flux.embed_txt(t)?)
        } else {
            None
        })
    };
    let mut branches = vec![Branch {
        txt: embed(txt_full)?,
        vecs: inputs.vecs.shallow_clone(),
        mods: None,
        kv: KvBuffers::new(blocks),
    }];
    if let (Some(nt), Some(nv)) = (seq_neg_txt, &inputs.neg_vecs) {
        branches.push(Branch {
            txt: embed(nt)?,
            vecs: nv.shallow_clone(),
            mods: None,
            kv: KvBuffers::new(blocks),
        });
    }
    let nb = branches.len() as i64;
    let hidden = ctx.flux.config.hidden_size;
    let (lh, lw) = inputs.latent_hw;
    let pe = ctx.flux.rope(&Flux::position_ids(txt_len, lh, lw, ctx.device)?)?;
    let mut scheduler = FlowMatchEulerDiscreteScheduler::new(ctx.scheduler.clone());
    scheduler.set_timesteps(inputs.steps, Some(img_len))?;
    // Stage 0 and the last stage hold the whole sample, so every rank resumes from all of it.
    let resume = ctx
        .resume
        .map(|state| Resume::from_state(state, &inputs.x.size(), None, &inputs.x, &scheduler, inputs.steps))
        .transpose()?;
    let first = resume.as_ref().map_or(0, |r| r.step);
    let sched = Schedule::resumed(
        first,
        inputs.steps,
        ctx.plan.warmup_steps,
        img_len,
        ctx.plan.patches,
        stages,
    );
    let run = StageRun {
        double,
        single,
        txt_len,
        hidden,
    };
    let last = if part.output {
        ctx.flux.final_layer.as_ref()
    } else {
        None
    };
    for br in &mut branches {
        br.mods = Some(run.table(&br.vecs, last)?);
    }
    // Stage 0 and the last stage keep the whole latent (the last one updates it, stage 0 receives
    // the updates); `x` is the step's input for the patches not yet updated.
    let mut x = match resume {
        Some(r) => owned(&r.x)?,
        None => owned(&inputs.x)?,
    }; // (1, img_seq, 64)
    // World rank 0 (stage 0 of branch 0) holds the whole sample when a step is done.
    let sink = ctx.checkpoints.filter(|_| comms.rank == 0);
    let every = sink.map_or(0, |s| s.every);
    let mut pending: Option<Tensor> = None; // input from the previous stage for the next tick
    let (next, prev) = ((stage + 1) % stages, (stage + stages - 1) % stages);
    let total = inputs.steps as u32;
    let start = Instant::now();
    // Host time of a step is counted from the end of the previous one (ticks interleave steps).
    let mut step_start = start;
    for tick in 0..sched.ticks() {
        let out = match sched.at(tick, stage) {
            Some(unit) => Some(run_unit(
                ctx,
                &run,
                &part,
                &branches,
                unit,
                &pe,
                &mut x,
                pending.take(),
                &mut scheduler,
                request.true_cfg_scale,
            )?),
            None => None,
        };
        let recv = sched.at(tick, prev).map(|u| {
            if stage == 0 {
                (vec![1, u.img.1, x.size()[2]], prev)
            } else {
                (vec![nb, u.txt_len(txt_len) + u.img.1, hidden], prev)
            }
        });
        let got = exchange(sp, out.as_ref().map(|o| (o, next)), recv, ctx.kind).map_err(TchError::from)?;
        if let Some(t) = got {
            if stage == 0 {
                // What arrived is the latent patch of the unit the last stage ran this tick.
                let (s, l) = sched.at(tick, prev).map_or((0, 0), |u| u.img);
                x.f_narrow(1, s, l)?.f_copy_(&t)?;
            } else {
                pending = Some(t);
            }
        }
        if let Some(step) = sched.step_done_at(tick) {
            let step = step as u32 + 1;
            let control = report_and_check(step, total, &x, (start, step_start), gate, events)?;
            if let Some(s) = sink
                && every > 0
                && step < total
                && (step.is_multiple_of(every) || control == Control::Cancel)
            {
                s.send(step, None, &x, scheduler.state_bytes()?)?;
            }
            if control == Control::Cancel {
                return Err(EngineError::Cancelled { step });
            }
            step_start = Instant::now();
        }
    }
    finish(gate, total)?;
    Ok(if comms.rank == 0 { Some(x) } else { None })
}

/// Runs `unit` through this stage for every branch. Returns what the stage passes on: hidden
/// states `(branches, T_u + L, h)`, or from the last stage the updated latent patch `(1, L, 64)`
/// (also written into `x`).
#[allow(clippy::too_many_arguments)]
fn run_unit(
    ctx: &RankCtx<'_>,
    run: &StageRun<'_>,
    part: &Part,
    branches: &[Branch],
    unit: &Unit,
    pe: &Rope,
    x: &mut Tensor,
    pending: Option<Tensor>,
    scheduler: &mut dyn Scheduler,
    cfg_scale: f32,
) -> Result<Tensor, EngineError> {
    let pe_u = rope_slice(pe, unit.joint(run.txt_len))?;
    let x_u = x.f_narrow(1, unit.img.0, unit.img.1)?; // (1, L, 64)
    let t_u = unit.txt_len(run.txt_len);
    let mut outs = Vec::with_capacity(branches.len());
    for (b, br) in branches.iter().enumerate() {
        let vec = row(br, unit.step)?; // (1, stage modulation width)
        let input = if part.input {
            let img_in = part.input_layer(&ctx.flux.img_in, "img_in")?;
            let txt = match (&br.txt, unit.txt) {
                (Some(t), true) => t.shallow_clone(),
                _ => Tensor::f_zeros([1, 0, run.hidden], (ctx.kind, ctx.device))?,
            };
            StageInput::Streams {
                img: img_in.forward(&x_u)?, // (1, L, h)
                txt,
            }
        } else {
            let h = pending
                .as_ref()
                .ok_or_else(|| TchError::Torch("PipeFusion: no input from the previous stage".into()))?;
            StageInput::Joint(h.f_narrow(0, b as i64, 1)?)
        };
        outs.push(run.forward(input, unit, &vec, &pe_u, &br.kv)?);
    }
    if !part.output {
        return Ok(Tensor::f_cat(&outs, 0)?); // (branches, T_u + L, h)
    }
    let last = ctx
        .flux
        .final_layer
        .as_ref()
        .ok_or_else(|| part.missing("final_layer"))?;
    let mut vs = Vec::with_capacity(outs.len());
    for (o, br) in outs.iter().zip(branches) {
        let vec = run.last_cond(&row(br, unit.step)?)?;
        vs.push(last.forward(&o.f_narrow(1, t_u, unit.img.1)?, &vec)?); // (1, L, 64)
    }
    let mut v = vs[0].shallow_clone();
    if vs.len() == 2 {
        v = true_cfg(&vs[0], &vs[1], cfg_scale)?;
    }
    if ctx.comms.mesh.cfg == 2 {
        // Both branches' last stages hold the same guided prediction (branch 0 = positive).
        let both = ctx
            .comms
            .cfg
            .all_gather(&v.f_contiguous()?)
            .map_err(TchError::from)?;
        v = true_cfg(&both[0], &both[1], cfg_scale)?;
    }
    // Flow matching steps token-wise and keeps no state: each patch steps on its own.
    let new = scheduler.step(&v, unit.step, &x_u, None)?;
    x.f_narrow(1, unit.img.0, unit.img.1)?.f_copy_(&new)?;
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_contiguous_cover_every_block_and_balance_cost() {
        let c = Config::dev(); // 19 double + 38 single
        for stages in [2, 3, 4, 8] {
            let parts = stage_parts(&c, stages).unwrap();
            let mut next = 0;
            let mut costs = Vec::new();
            for (s, p) in parts.iter().enumerate() {
                let first = if p.double.is_empty() {
                    19 + p.single.start
                } else {
                    p.double.start
                };
                assert_eq!(
                    first, next,
                    "{stages} stages: stage {s} starts where the last ended"
                );
                assert!(p.blocks() >= 1);
                assert!(p.double.is_empty() || p.single.is_empty() || p.double.end == 19);
                next = first + p.blocks();
                assert_eq!((p.input, p.output), (s == 0, s == stages - 1));
                costs.push(p.double.len() as f64 * DOUBLE_BLOCK_COST + p.single.len() as f64);
            }
            assert_eq!(next, 57);
            // No stage costs more than an even share plus one block.
            let hi = costs.iter().cloned().fold(0.0, f64::max);
            let share = (19.0 * DOUBLE_BLOCK_COST + 38.0) / stages as f64;
            assert!(
                hi <= share + DOUBLE_BLOCK_COST,
                "{stages} stages: costs {costs:?}"
            );
        }
        let two = stage_parts(&c, 2).unwrap();
        assert_eq!((two[0].double.clone(), two[0].single.clone()), (0..19, 0..9));
        // 4 stages: the optimum (13 d = 14.3 | 6 d + 8 s = 14.6 | 15 s | 15 s), not the greedy
        // cut nearest each quarter (13 d | 6 d + 9 s = 15.6 | 14 s | 15 s).
        let four: Vec<(usize, usize)> = stage_parts(&c, 4)
            .unwrap()
            .iter()
            .map(|p| (p.double.len(), p.single.len()))
            .collect();
        assert_eq!(four, vec![(13, 0), (6, 8), (0, 15), (0, 15)]);
        assert!(stage_parts(&Config::tiny(), 4).is_err()); // 3 blocks
    }

    #[test]
    fn schedule_waits_for_the_previous_step_and_keeps_stages_in_order() {
        for (steps, warmup, patches, stages) in [(4, 1, 2, 2), (5, 2, 4, 4), (3, 1, 8, 4), (3, 3, 2, 2)] {
            let s = Schedule::new(steps, warmup, 20, patches, stages);
            assert_eq!(
                s.units.len(),
                warmup.min(steps) + (steps - warmup.min(steps)) * patches
            );
            for w in s.units.windows(2) {
                assert!(w[0].start < w[1].start, "ticks strictly increase");
            }
            for u in &s.units {
                for d in s.units.iter().filter(|d| d.step + 1 == u.step) {
                    if d.img.0 < u.img.0 + u.img.1 && u.img.0 < d.img.0 + d.img.1 {
                        assert!(d.start + stages <= u.start, "{u:?} starts before {d:?} is back");
                    }
                }
            }
            let done: Vec<usize> = (0..s.ticks()).filter_map(|t| s.step_done_at(t)).collect();
            assert_eq!(done, (0..steps).collect::<Vec<_>>());
        }
        // Patched steps with patches == stages keep every stage busy: P ticks per step.
        let s = Schedule::new(4, 1, 20, 2, 2);
        let starts: Vec<usize> = s.units.iter().map(|u| u.start).collect();
        assert_eq!(starts, vec![0, 2, 3, 4, 5, 6, 7]);
    }

    /// With the buffers holding the current step's K/V (nothing stale), running the patches one
    /// by one through all blocks gives exactly the whole sequence's output: the patch ranges,
    /// the text riding with patch 0, the RoPE slices and the buffer updates are right.
    #[test]
    fn patches_over_fresh_buffers_reproduce_the_whole_sequence() -> Result<(), EngineError> {
        let _guard = tch::no_grad_guard();
        let dev = tch::Device::Cpu;
        let c = Config {
            num_heads: 4,
            axes_dim: vec![4, 6, 6],
            depth: 2,
            depth_single_blocks: 2,
            ..Config::tiny()
        };
        let flux = {
            let _lock = crate::flux::rng_lock();
            tch::manual_seed(3);
            Flux::new(&c, dev, Kind::Float)?
        };
        let (txt_len, lh, lw) = (5, 6, 8); // 5 text + 12 image tokens
        let img_len = (lh / 2) * (lw / 2);
        let x = Tensor::f_randn([1, img_len, 64], (Kind::Float, dev))?;
        let txt = flux.embed_txt(&Tensor::f_randn(
            [1, txt_len, c.context_in_dim],
            (Kind::Float, dev),
        )?)?;
        let vec = Tensor::f_randn([1, c.hidden_size], (Kind::Float, dev))?;
        let pe = flux.rope(&Flux::position_ids(txt_len, lh, lw, dev)?)?;
        let part = Part::full(&c);
        let (double, single) = stage_blocks(&flux, &part)?;
        let run = StageRun {
            double,
            single,
            txt_len,
            hidden: c.hidden_size,
        };
        let kv = KvBuffers::new(4);
        let img_in = flux.img_in.as_ref().expect("full model");
        let streams = |img: (i64, i64), with_txt: bool| -> Res<StageInput> {
            Ok(StageInput::Streams {
                img: img_in.forward(&x.f_narrow(1, img.0, img.1)?)?,
                txt: if with_txt {
                    txt.shallow_clone()
                } else {
                    Tensor::f_zeros([1, 0, c.hidden_size], (Kind::Float, dev))?
                },
            })
        };
        let whole = Unit {
            step: 0,
            patch: None,
            img: (0, img_len),
            txt: true,
            start: 0,
        };
        let want = run.forward(streams(whole.img, true)?, &whole, &vec, &pe, &kv)?;
        let reference = flux.forward_with(&x, &txt, &vec, &pe, &crate::flux::transformer::LocalAttention)?;
        let head = flux.final_layer.as_ref().expect("full model");
        let got_v = head.forward(&want.f_narrow(1, txt_len, img_len)?, &vec)?;
        assert!(f64::try_from(got_v.f_sub(&reference)?.f_abs()?.f_max()?)? < 1e-5);
        // The stage's modulation table (what the ranks feed) gives the same forward.
        let table = run.table(&vec, Some(head))?; // (1, 12h * 2 + 3h * 2 + 2h)
        assert_eq!(table.size()[1], (2 * 12 + 2 * 3 + 2) * c.hidden_size);
        let kv2 = KvBuffers::new(4);
        let from_table = run.forward(streams(whole.img, true)?, &whole, &table, &pe, &kv2)?;
        let v_table = head.forward(
            &from_table.f_narrow(1, txt_len, img_len)?,
            &run.last_cond(&table)?,
        )?;
        assert!(f64::try_from(v_table.f_sub(&reference)?.f_abs()?.f_max()?)? < 1e-5);
        for (p, &img) in balanced_split(img_len, 3).iter().enumerate() {
            let unit = Unit {
                step: 1,
                patch: Some(p),
                img,
                txt: p == 0,
                start: 0,
            };
            let joint = unit.joint(txt_len);
            let got = run.forward(streams(img, p == 0)?, &unit, &vec, &rope_slice(&pe, joint)?, &kv)?;
            let d = f64::try_from(
                got.f_sub(&want.f_narrow(1, joint.0, joint.1)?)?
                    .f_abs()?
                    .f_max()?,
            )?;
            assert!(d < 1e-5, "patch {p}: max abs diff {d:e}");
        }
        Ok(())
    }
}
