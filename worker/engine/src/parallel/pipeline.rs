//! [`ParallelPipeline`]: the multi-GPU [`Engine`] that owns one thread per rank, builds the
//! communicators of its [`Plan`], runs each request's SPMD loop ([`super::runner`]) on every rank,
//! and rebuilds the groups on the healthy GPUs when one fails.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};

use super::comm::{AbortHandle, CommFactory, Mesh, RankComms};
use super::graphs::{self, GraphCache};
use super::plan::Plan;
use super::runner::{Conditioning, RankCtx, StepGate, decode_bands, denoise_gathered};
use crate::flux::Pipeline;
use crate::flux::pipeline::{device_name, sync_on};
use crate::flux::sampling::{self, SchedulerConfig};
use crate::flux::transformer::{Flux, Part};
use crate::flux::vae::Decoder;
use crate::{
    Control, Engine, EngineError, EngineInfo, GenerateRequest, GeneratedImage, StageTimings, StepEvent,
};

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
struct GroupSpec {
    plan: Plan,
    scheduler: SchedulerConfig,
    vae_scale: i64,
    txt_shape: Vec<i64>,
    pooled_shape: Vec<i64>,
    kind: Kind,
}

enum Cmd {
    Generate {
        request: Box<GenerateRequest>,
        gate: Arc<StepGate>,
        events: Option<Sender<StepEvent>>,
        done: Sender<(usize, Result<RankOutput, EngineError>)>,
        fault_at: Option<(u32, bool)>,
    },
    SetComms(Box<RankComms>),
    /// Stop and hand the model back.
    Stop(Sender<RankModel>),
}

/// A finished image and its final packed latents.
type Finished = (GeneratedImage, Tensor);

/// What a rank reports when a job ends: the image and final latents on world rank 0.
type RankOutput = Option<Finished>;

struct RankThread {
    tx: Sender<Cmd>,
    handle: Option<JoinHandle<()>>,
}

/// The multi-GPU Flux engine: `plan.world()` rank threads, one per device, in `plan.dp` groups.
pub struct ParallelPipeline {
    plan: Plan,
    group_size: usize,
    ranks: Vec<RankThread>,
    factory: Box<dyn CommFactory + Send>,
    /// Set when a group was aborted: rebuilt before the next job.
    broken: bool,
    info: EngineInfo,
    /// Final packed latents `(1, img_seq, 64)` of the last round's images (for verification).
    last_latents: Vec<Tensor>,
    /// Transformer weight elements each rank holds.
    rank_parameters: Vec<usize>,
    /// Injected fault: (node rank, step, hang instead of failing).
    fault: Option<(usize, u32, bool)>,
    /// Node rank whose device error failed the last round (not the peers' aborts).
    last_failed_rank: Option<usize>,
    /// Abort handles of every group of every rank (the step watchdog's way to release ranks).
    aborters: Vec<AbortHandle>,
    /// How long a round may go without any step or result before the watchdog aborts it.
    step_timeout: Duration,
    /// Set when the last round timed out (no progress within `step_timeout`).
    last_timed_out: bool,
    /// Rank threads that did not come back after a watchdog abort: never joined again.
    wedged: bool,
}

/// `DITFLEET_STEP_TIMEOUT_S` (default 300): how long a multi-GPU job may go without finishing a
/// step before the watchdog aborts its groups (a GPU that stopped answering leaves its peers
/// waiting in collectives forever otherwise). The first step of a new image size includes
/// loading kernels and capturing its CUDA graph; a 2048² step takes 0.78 s on one H200
/// (docs/parallel.md; 4096² was not measured).
pub fn default_step_timeout() -> Duration {
    let s = std::env::var("DITFLEET_STEP_TIMEOUT_S")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(300.0);
    Duration::from_secs_f64(s)
}

/// How long the watchdog waits for the ranks to return after it aborted their groups.
const WEDGE_WAIT: Duration = Duration::from_secs(60);

impl std::fmt::Debug for ParallelPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ParallelPipeline({})", self.plan)
    }
}

impl ParallelPipeline {
    /// `leaders[g]` serves data-parallel group `g` (its transformer is replicated onto
    /// `devices[g * group_size + i]` for the group's other ranks; the leader computes on its own
    /// transformer's device). Under PipeFusion each rank gets only its stage's part of the
    /// transformer and the leader's own is cut down to stage 0's. `factory` builds the groups'
    /// communicators (threads or NCCL).
    pub fn new(
        leaders: Vec<Pipeline>,
        devices: &[Device],
        plan: Plan,
        factory: Box<dyn CommFactory + Send>,
    ) -> Result<Self, EngineError> {
        let first = leaders
            .first()
            .ok_or_else(|| EngineError::Load("a parallel pipeline needs a leader".into()))?;
        plan.validate(first.transformer.config.num_heads, devices.len())
            .map_err(EngineError::InvalidRequest)?;
        if leaders.len() != plan.dp {
            return Err(EngineError::Load(format!(
                "plan {plan} has {} data-parallel groups, got {} leaders",
                plan.dp,
                leaders.len()
            )));
        }
        let group_size = plan.group_size();
        let mut info = first.info();
        info.parallel_degree = group_size as u32;
        info.devices = devices[..plan.world()].iter().map(|d| device_name(*d)).collect();
        info.note = format!("{} | plan {plan}", info.note);
        let config = first.transformer.config.clone();
        let parts = if plan.pipefusion > 1 {
            Some(super::pipefusion::stage_parts(&config, plan.pipefusion)?)
        } else {
            None
        };
        let sp = plan.mesh().sp();
        let part_of = |i: usize| match &parts {
            Some(p) => p[i % sp].clone(),
            None => Part::full(&config),
        };
        let mut ranks = Vec::new();
        let mut rank_parameters = Vec::new();
        for (g, mut leader) in leaders.into_iter().enumerate() {
            let spec = GroupSpec {
                plan,
                scheduler: leader.scheduler.clone(),
                vae_scale: leader.vae.config.scale_factor(),
                txt_shape: vec![
                    1,
                    leader.t5_tokenizer.max_len as i64,
                    leader.transformer.config.context_in_dim,
                ],
                pooled_shape: vec![1, leader.transformer.config.vec_in_dim],
                kind: leader.options().kind,
            };
            let mut models = Vec::with_capacity(group_size);
            for i in 1..group_size {
                let device = devices[g * group_size + i];
                let flux = leader.transformer.copy_part(&part_of(i), device)?;
                rank_parameters.push(flux.parameters());
                // Ranks `0..sp` of the group are CFG branch 0, the ones that decode.
                let vae = if plan.vae_split() && i < plan.mesh().sp() {
                    Some(Box::new(leader.vae.replicate(device)?))
                } else {
                    None
                };
                models.push(RankModel::Follower {
                    flux: Box::new(flux),
                    vae,
                    device,
                });
            }
            if parts.is_some() {
                // Frees the other stages' blocks on the leader's device.
                let dev = leader.options().devices.transformer;
                leader.transformer = leader.transformer.copy_part(&part_of(0), dev)?;
            }
            rank_parameters.insert(g * group_size, leader.transformer.parameters());
            models.insert(0, RankModel::Leader(Box::new(leader)));
            for (i, model) in models.into_iter().enumerate() {
                ranks.push(spawn_rank(g * group_size + i, model, spec.clone())?);
            }
        }
        let mut me = Self {
            plan,
            group_size,
            ranks,
            factory,
            broken: true,
            info,
            last_latents: Vec::new(),
            rank_parameters,
            fault: None,
            aborters: Vec::new(),
            step_timeout: default_step_timeout(),
            last_timed_out: false,
            wedged: false,
            last_failed_rank: None,
        };
        me.rebuild_comms()?;
        Ok(me)
    }

    pub fn plan(&self) -> Plan {
        self.plan
    }

    /// Fault injection: node rank `.0` fails with a device error at step `.1` of every job, or,
    /// with `.2`, stops there without an error (a hung device) until its groups are aborted.
    pub fn set_fault(&mut self, fault: Option<(usize, u32, bool)>) {
        self.fault = fault;
    }

    /// See [`default_step_timeout`].
    pub fn set_step_timeout(&mut self, t: Duration) {
        self.step_timeout = t;
    }

    /// Whether rank threads did not come back after a watchdog abort (the pipeline cannot run
    /// again; build another).
    pub fn is_wedged(&self) -> bool {
        self.wedged
    }

    /// Whether the last round was aborted by the step watchdog.
    pub fn last_timed_out(&self) -> bool {
        self.last_timed_out
    }

    /// The node rank whose device error failed the last job, if one did (see
    /// [`super::resilient::ResilientParallel`]).
    pub fn last_failed_rank(&self) -> Option<usize> {
        self.last_failed_rank
    }

    /// The final packed latents of the last round's images, in request order.
    pub fn last_latents(&self) -> &[Tensor] {
        &self.last_latents
    }

    /// Stops the rank threads and returns the group leaders' pipelines (e.g. to build another
    /// plan on the same weights, or on fewer GPUs after one failed). Under PipeFusion a leader
    /// holds only stage 0's blocks: reload the checkpoint before building another plan from it.
    pub fn into_leaders(mut self) -> Vec<Pipeline> {
        let mut leaders = Vec::new();
        for r in std::mem::take(&mut self.ranks) {
            let (tx, rx) = channel();
            if r.tx.send(Cmd::Stop(tx)).is_ok()
                && let Ok(RankModel::Leader(p)) = rx.recv()
            {
                leaders.push(*p);
            }
            if let Some(h) = r.handle {
                let _ = h.join();
            }
        }
        leaders
    }

    /// Transformer weight elements each rank holds, in global rank order (PipeFusion: each
    /// stage's part only).
    pub fn rank_parameters(&self) -> &[usize] {
        &self.rank_parameters
    }

    /// (Re)creates every group's communicators and hands them to the rank threads.
    fn rebuild_comms(&mut self) -> Result<(), EngineError> {
        let mesh: Mesh = self.plan.mesh();
        for g in 0..self.plan.dp {
            let base = g * self.group_size;
            let comms = RankComms::build(mesh, self.factory.as_ref(), base).map_err(tch::TchError::from)?;
            if g == 0 {
                self.aborters.clear();
            }
            for c in &comms {
                self.aborters.extend(c.abort_handles());
            }
            for (i, c) in comms.into_iter().enumerate() {
                self.ranks[base + i]
                    .tx
                    .send(Cmd::SetComms(Box::new(c)))
                    .map_err(|_| rank_gone(base + i))?;
            }
        }
        self.broken = false;
        Ok(())
    }

    /// Generates one image per request, the data-parallel groups taking requests in turn.
    /// `on_step` sees the steps of the first request of each round.
    pub fn generate_batch(
        &mut self,
        requests: &[GenerateRequest],
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<Vec<GeneratedImage>, EngineError> {
        let mut out = Vec::with_capacity(requests.len());
        for round in requests.chunks(self.plan.dp) {
            match self.run_round(round, on_step) {
                Ok(images) => out.extend(images),
                // A CUDA graph capture failed (before the first step was reported): graphs are
                // off now; run the round again eagerly on rebuilt communicators.
                Err(e) if graphs::take_capture_failure() => {
                    tracing::warn!(error = %e, plan = %self.plan, "rerunning the job without CUDA graphs");
                    out.extend(self.run_round(round, on_step)?);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn run_round(
        &mut self,
        requests: &[GenerateRequest],
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<Vec<GeneratedImage>, EngineError> {
        if self.broken {
            self.rebuild_comms()?;
        }
        let (done_tx, done_rx) = channel();
        let (ev_tx, ev_rx) = channel();
        let gates: Vec<Arc<StepGate>> = requests.iter().map(|_| Arc::new(StepGate::default())).collect();
        let mut expected = 0;
        for (g, request) in requests.iter().enumerate() {
            for i in 0..self.group_size {
                let rank = g * self.group_size + i;
                let events = (i == 0).then(|| ev_tx.clone());
                self.ranks[rank]
                    .tx
                    .send(Cmd::Generate {
                        request: Box::new(request.clone()),
                        gate: gates[g].clone(),
                        events: if g == 0 { events } else { None },
                        done: done_tx.clone(),
                        fault_at: self.fault.filter(|f| f.0 == rank).map(|f| (f.1, f.2)),
                    })
                    .map_err(|_| rank_gone(rank))?;
                expected += 1;
            }
        }
        drop(ev_tx);
        // Other groups follow group 0's decisions on their own gates.
        self.last_failed_rank = None;
        let result = self.drive(&ev_rx, &done_rx, expected, &gates, on_step);
        if result.is_err() {
            self.broken = true;
        }
        let mut images = result?;
        images.sort_by_key(|(rank, _)| *rank);
        self.last_latents = images.iter().map(|(_, (_, l))| l.shallow_clone()).collect();
        Ok(images.into_iter().map(|(_, (im, _))| im).collect())
    }

    /// Runs the step callback for each reported step and collects every rank's result.
    fn drive(
        &mut self,
        events: &Receiver<StepEvent>,
        done: &Receiver<(usize, Result<RankOutput, EngineError>)>,
        expected: usize,
        gates: &[Arc<StepGate>],
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<Vec<(usize, Finished)>, EngineError> {
        let mut images = Vec::new();
        let mut first_err: Option<EngineError> = None;
        let mut received = 0;
        let mut events_open = true;
        // Step watchdog: a round that reports no step and no result for `step_timeout` has a
        // device that stopped answering; abort every group so the ranks come back.
        let mut last_progress = Instant::now();
        let mut last_step = 0;
        let mut aborted_at: Option<Instant> = None;
        self.last_timed_out = false;
        while received < expected {
            if aborted_at.is_none() && last_progress.elapsed() > self.step_timeout {
                tracing::error!(
                    plan = %self.plan,
                    last_step,
                    timeout_s = self.step_timeout.as_secs_f64(),
                    "no step finished within the step timeout: aborting the groups"
                );
                for a in &self.aborters {
                    a();
                }
                for g in gates {
                    g.abort();
                }
                aborted_at = Some(Instant::now());
                self.last_timed_out = true;
                first_err = Some(EngineError::Device {
                    device: format!("group of plan {}", self.plan),
                    message: format!(
                        "no step finished within {:.0} s after step {last_step} (a device stopped \
                         answering); the groups were aborted",
                        self.step_timeout.as_secs_f64()
                    ),
                });
            }
            if aborted_at.is_some_and(|t| t.elapsed() > WEDGE_WAIT) {
                tracing::error!(plan = %self.plan, "ranks did not return after the abort: giving them up");
                self.wedged = true;
                break;
            }
            if events_open {
                match events.recv_timeout(std::time::Duration::from_millis(5)) {
                    Ok(ev) => {
                        last_progress = Instant::now();
                        last_step = ev.step;
                        let cancel = on_step(ev) == Control::Cancel;
                        for g in gates {
                            g.publish(ev.step, cancel);
                        }
                        continue;
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => events_open = false,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                }
            }
            let next = if events_open {
                done.try_recv().ok()
            } else {
                match done.recv_timeout(std::time::Duration::from_millis(50)) {
                    Ok(x) => Some(x),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => None,
                }
            };
            let Some((rank, r)) = next else {
                if !events_open {
                    break;
                }
                continue;
            };
            last_progress = Instant::now();
            received += 1;
            match r {
                Ok(Some(out)) => images.push((rank, out)),
                Ok(None) => {}
                Err(e) => {
                    // The first real failure wins over the aborts it caused in the peers.
                    for g in gates {
                        g.abort();
                    }
                    let is_abort = e.to_string().contains("aborted");
                    if first_err
                        .as_ref()
                        .is_none_or(|f| f.to_string().contains("aborted") && !is_abort)
                    {
                        self.last_failed_rank =
                            (matches!(e, EngineError::Device { .. }) && !is_abort).then_some(rank);
                        first_err = Some(e);
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(images),
        }
    }
}

fn rank_gone(rank: usize) -> EngineError {
    EngineError::Device {
        device: format!("rank {rank}"),
        message: "the rank's thread is gone".into(),
    }
}

fn spawn_rank(rank: usize, model: RankModel, spec: GroupSpec) -> Result<RankThread, EngineError> {
    let (tx, rx) = channel::<Cmd>();
    let handle = std::thread::Builder::new()
        .name(format!("ditfleet-rank-{rank}"))
        .spawn(move || rank_loop(rank, model, spec, rx))
        .map_err(EngineError::Io)?;
    Ok(RankThread {
        tx,
        handle: Some(handle),
    })
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

/// `node_rank`: the thread's index over all groups (results are ordered by it: the group rank
/// `RankComms::rank` restarts at 0 in every data-parallel group).
fn rank_loop(node_rank: usize, model: RankModel, spec: GroupSpec, rx: Receiver<Cmd>) {
    let mut comms: Option<Box<RankComms>> = None;
    // Captured steps use the communicators: emptied before those change or go.
    let graphs = RefCell::new(GraphCache::default());
    if let Device::Cuda(i) = model.device()
        && let Err(e) = super::nccl::bind_thread_to_device(i)
    {
        tracing::warn!(device = i, error = %e, "could not make the rank's GPU current on its thread");
    }
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Cmd::SetComms(c) => {
                graphs.borrow_mut().clear();
                comms = Some(c);
            }
            Cmd::Stop(back) => {
                // Graphs, then communicators (NCCL handles before the model's memory).
                graphs.borrow_mut().clear();
                drop(comms.take());
                let _ = back.send(model);
                return;
            }
            Cmd::Generate {
                request,
                gate,
                events,
                done,
                fault_at,
            } => {
                let Some(c) = comms.as_deref() else {
                    let _ = done.send((node_rank, Err(rank_gone(node_rank))));
                    continue;
                };
                let r = run_rank(
                    &model,
                    &spec,
                    c,
                    &request,
                    &gate,
                    events.as_ref(),
                    fault_at,
                    &graphs,
                );
                if r.is_err() {
                    // Release the peers blocked in collectives and the gate; the graphs captured
                    // collectives of the communicators being aborted.
                    graphs.borrow_mut().clear();
                    c.abort();
                    gate.abort();
                }
                let _ = done.send((node_rank, r));
            }
        }
    }
}

#[allow(clippy::too_many_arguments)] // one rank's whole job: its model, group, request and per-thread state
fn run_rank(
    model: &RankModel,
    spec: &GroupSpec,
    comms: &RankComms,
    request: &GenerateRequest,
    gate: &StepGate,
    events: Option<&Sender<StepEvent>>,
    fault_at: Option<(u32, bool)>,
    graphs: &RefCell<GraphCache>,
) -> Result<RankOutput, EngineError> {
    let _guard = tch::no_grad_guard();
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

impl Drop for ParallelPipeline {
    fn drop(&mut self) {
        for r in &mut self.ranks {
            // Closing the channel ends the rank loop.
            let (tx, _) = channel();
            drop(std::mem::replace(&mut r.tx, tx));
        }
        if self.wedged {
            // Threads stuck on a dead device would block this forever: leave them.
            tracing::error!(plan = %self.plan, "leaving wedged rank threads behind");
            return;
        }
        for r in &mut self.ranks {
            if let Some(h) = r.handle.take() {
                let _ = h.join();
            }
        }
    }
}

impl Engine for ParallelPipeline {
    fn info(&self) -> EngineInfo {
        self.info.clone()
    }

    fn generate(
        &mut self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<GeneratedImage, EngineError> {
        if let Some(want) = &request.plan {
            let want: Plan = want
                .parse()
                .map_err(|e| EngineError::InvalidRequest(format!("plan: {e}")))?;
            if want != self.plan {
                return Err(EngineError::InvalidRequest(format!(
                    "plan {want} requested, this engine runs {} (a ResilientParallel engine switches plans)",
                    self.plan
                )));
            }
        }
        let mut images = self.generate_batch(std::slice::from_ref(request), on_step)?;
        images
            .pop()
            .ok_or_else(|| EngineError::Torch("the parallel group returned no image".into()))
    }
}
