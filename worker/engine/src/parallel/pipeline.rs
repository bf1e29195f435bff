//! [`ParallelPipeline`]: the multi-GPU [`Engine`] that owns one thread per rank, builds the
//! communicators of its [`Plan`], runs each request's SPMD loop (the model family's
//! [`RankWork`]) on every rank, watches for a device that stops answering, and assembles step
//! checkpoints from the ranks' parts.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tch::{Device, Tensor};

use super::comm::{AbortHandle, CommFactory, Mesh, RankComms};
use super::graphs::{self, GraphCache};
use super::plan::Plan;
use super::rank::{
    CheckpointAssembler, CheckpointPart, CheckpointSink, ParallelLeader, RankJob, RankOutput, RankWork,
    StepGate,
};
use crate::checkpoint::LoopState;
use crate::device::device_name;
use crate::{Control, Engine, EngineError, EngineInfo, GenerateRequest, GeneratedImage, StepEvent};

enum Cmd<R> {
    Generate {
        request: Box<GenerateRequest>,
        gate: Arc<StepGate>,
        events: Option<Sender<StepEvent>>,
        done: Sender<(usize, Result<RankOutput, EngineError>)>,
        fault_at: Option<(u32, bool)>,
        resume: Option<Box<LoopState>>,
        checkpoints: Option<CheckpointSink>,
    },
    SetComms(Box<RankComms>),
    /// Stop and hand the model back.
    Stop(Sender<R>),
}

/// A finished image and its final latents.
type Finished = (GeneratedImage, Tensor);

struct RankThread<R> {
    tx: Sender<Cmd<R>>,
    handle: Option<JoinHandle<()>>,
}

/// The multi-GPU engine of a model family (`L`, its group leader): `plan.world()` rank threads,
/// one per device, in `plan.dp` groups.
pub struct ParallelPipeline<L: ParallelLeader> {
    plan: Plan,
    group_size: usize,
    ranks: Vec<RankThread<L::Rank>>,
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
    /// The LoRA adapters every rank reads through, and what the engine reports of them.
    lora: Option<Arc<crate::lora::LoraHub>>,
}

/// How long a multi-GPU job may go without finishing a step before the watchdog aborts its
/// groups: [`crate::settings::EngineSettings::step_timeout`].
pub fn default_step_timeout() -> Duration {
    crate::settings::get().step_timeout
}

/// How long the watchdog waits for the ranks to return after it aborted their groups.
const WEDGE_WAIT: Duration = Duration::from_secs(60);

impl<L: ParallelLeader> std::fmt::Debug for ParallelPipeline<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ParallelPipeline({})", self.plan)
    }
}

impl<L: ParallelLeader> ParallelPipeline<L> {
    /// `leaders[g]` serves data-parallel group `g` (its transformer is replicated onto
    /// `devices[g * group_size + i]` for the group's other ranks; the leader computes on its own
    /// transformer's device). Under PipeFusion each rank gets only its stage's part of the
    /// transformer and the leader's own is cut down to stage 0's. `factory` builds the groups'
    /// communicators (threads or NCCL).
    pub fn new(
        leaders: Vec<L>,
        devices: &[Device],
        plan: Plan,
        factory: Box<dyn CommFactory + Send>,
    ) -> Result<Self, EngineError> {
        let first = leaders
            .first()
            .ok_or_else(|| EngineError::Load("a parallel pipeline needs a leader".into()))?;
        first
            .splits()
            .validate(&plan, devices.len())
            .map_err(EngineError::InvalidRequest)?;
        if leaders.len() != plan.dp {
            return Err(EngineError::Load(format!(
                "plan {plan} has {} data-parallel groups, got {} leaders",
                plan.dp,
                leaders.len()
            )));
        }
        let group_size = plan.group_size();
        let lora = first.lora_hub();
        let mut leaders = leaders;
        if let Some(hub) = &lora {
            for l in leaders.iter_mut().skip(1) {
                l.set_lora_hub(hub.clone());
            }
        }
        let first = &leaders[0];
        let mut info = first.info();
        info.parallel_degree = group_size as u32;
        info.devices = devices[..plan.world()].iter().map(|d| device_name(*d)).collect();
        info.note = format!("{} | plan {plan}", info.note);
        let mut ranks = Vec::new();
        let mut rank_parameters = Vec::new();
        for (g, leader) in leaders.into_iter().enumerate() {
            let group = &devices[g * group_size..(g + 1) * group_size];
            for (i, rank) in leader.split(&plan, group)?.into_iter().enumerate() {
                rank_parameters.push(rank.parameters());
                ranks.push(spawn_rank(g * group_size + i, rank, plan)?);
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
            lora,
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
    pub fn into_leaders(mut self) -> Vec<L> {
        let mut leaders = Vec::new();
        for r in std::mem::take(&mut self.ranks) {
            let (tx, rx) = channel();
            if r.tx.send(Cmd::Stop(tx)).is_ok()
                && let Ok(rank) = rx.recv()
                && let Some(p) = rank.into_leader()
            {
                leaders.push(p);
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
            out.extend(self.run_round_once(round, None, 0, &mut |_| {}, on_step)?);
        }
        Ok(out)
    }

    /// One request with step checkpoints: resumes from `resume` (a checkpoint of any plan whose
    /// scheduler state fits this one's split; every rank takes its slice), and hands a checkpoint
    /// to `on_checkpoint` every `every` steps and at a cancel (assembled from the slices of the
    /// ranks that hold the result).
    pub fn generate_checkpointed(
        &mut self,
        request: &GenerateRequest,
        resume: Option<&crate::StepCheckpoint>,
        every: u32,
        on_checkpoint: &mut dyn FnMut(crate::StepCheckpoint),
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<GeneratedImage, EngineError> {
        let state = resume.map(LoopState::from_checkpoint).transpose()?;
        if let Some(s) = &state {
            s.check_lora(&request.loras)?;
        }
        let mut images = self.run_round_once(
            std::slice::from_ref(request),
            state,
            every,
            on_checkpoint,
            on_step,
        )?;
        images
            .pop()
            .ok_or_else(|| EngineError::Torch("the parallel group returned no image".into()))
    }

    fn run_round_once(
        &mut self,
        round: &[GenerateRequest],
        resume: Option<LoopState>,
        every: u32,
        on_checkpoint: &mut dyn FnMut(crate::StepCheckpoint),
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<Vec<GeneratedImage>, EngineError> {
        match self.run_round(round, resume.as_ref(), every, on_checkpoint, on_step) {
            Ok(images) => Ok(images),
            // A CUDA graph capture failed (before the first step was reported): graphs are off
            // now; run the round again eagerly on rebuilt communicators.
            Err(e) if graphs::take_capture_failure() => {
                tracing::warn!(error = %e, plan = %self.plan, "rerunning the job without CUDA graphs");
                self.run_round(round, resume.as_ref(), every, on_checkpoint, on_step)
            }
            Err(e) => Err(e),
        }
    }

    /// How many ranks send a part of each checkpoint: branch 0's sequence-parallel ranks (each
    /// holds a slice of the sample), or world rank 0 alone under PipeFusion (it holds it whole).
    fn checkpoint_parts(&self) -> usize {
        let mesh = self.plan.mesh();
        if mesh.pipe > 1 { 1 } else { mesh.sp() }
    }

    fn run_round(
        &mut self,
        requests: &[GenerateRequest],
        resume: Option<&LoopState>,
        every: u32,
        on_checkpoint: &mut dyn FnMut(crate::StepCheckpoint),
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<Vec<GeneratedImage>, EngineError> {
        if self.broken {
            self.rebuild_comms()?;
        }
        let (done_tx, done_rx) = channel();
        let (ev_tx, ev_rx) = channel();
        let gates: Vec<Arc<StepGate>> = requests.iter().map(|_| Arc::new(StepGate::default())).collect();
        if let Some(r) = &resume {
            // The steps before the resume point were decided in the earlier run.
            for g in &gates {
                g.publish(r.step, false);
            }
        }
        if let Some(hub) = &self.lora {
            for r in requests {
                if let Err(e) = hub.prefetch(&r.loras) {
                    tracing::debug!(error = %e, "lora prefetch failed; the ranks report it");
                }
            }
        }
        let (ck_tx, ck_rx) = channel();
        let sink = (every > 0).then(|| CheckpointSink { every, tx: ck_tx });
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
                        resume: if g == 0 {
                            resume.map(|r| Box::new(r.share()))
                        } else {
                            None
                        },
                        checkpoints: if g == 0 { sink.clone() } else { None },
                    })
                    .map_err(|_| rank_gone(rank))?;
                expected += 1;
            }
        }
        drop(ev_tx);
        drop(sink);
        // Other groups follow group 0's decisions on their own gates.
        self.last_failed_rank = None;
        let parts = self.checkpoint_parts();
        let mut assembler = CheckpointAssembler::for_stack(crate::lora::stack_id(&requests[0].loras));
        let mut on_part = |part: CheckpointPart| -> Result<(), EngineError> {
            if let Some(c) = assembler.add(part, parts)? {
                on_checkpoint(c);
            }
            Ok(())
        };
        let result = self.drive(&ev_rx, &done_rx, &ck_rx, &mut on_part, expected, &gates, on_step);
        if result
            .as_ref()
            .is_err_and(|e| !matches!(e, EngineError::Cancelled { .. }))
        {
            self.broken = true;
            // Some ranks may have merged the job's LoRA stack and others not (or failed
            // mid-merge): every rank starts the next job from its base weights.
            if let Some(hub) = &self.lora {
                hub.invalidate();
            }
        }
        let mut images = result?;
        images.sort_by_key(|(rank, _)| *rank);
        self.last_latents = images.iter().map(|(_, (_, l))| l.shallow_clone()).collect();
        Ok(images.into_iter().map(|(_, (im, _))| im).collect())
    }

    /// Runs the step callback for each reported step and collects every rank's result.
    #[allow(clippy::too_many_arguments)]
    fn drive(
        &mut self,
        events: &Receiver<StepEvent>,
        done: &Receiver<(usize, Result<RankOutput, EngineError>)>,
        checkpoints: &Receiver<CheckpointPart>,
        on_part: &mut dyn FnMut(CheckpointPart) -> Result<(), EngineError>,
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
            while let Ok(part) = checkpoints.try_recv() {
                if let Err(e) = on_part(part) {
                    tracing::warn!(error = %e, "a step checkpoint could not be assembled; the job goes on without it");
                }
            }
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
                // Every rank reads the same cancel decision at the same step: a cancelled rank
                // leaves its peers and the gate alone.
                Err(e @ EngineError::Cancelled { .. }) => {
                    if first_err.is_none() {
                        first_err = Some(e);
                    }
                }
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
        // Parts sent just before the ranks finished (the checkpoint of a cancelled step).
        while let Ok(part) = checkpoints.try_recv() {
            if let Err(e) = on_part(part) {
                tracing::warn!(error = %e, "a step checkpoint could not be assembled; the job goes on without it");
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

fn spawn_rank<R: RankWork>(rank: usize, model: R, plan: Plan) -> Result<RankThread<R>, EngineError> {
    let (tx, rx) = channel::<Cmd<R>>();
    let handle = std::thread::Builder::new()
        .name(format!("ditfleet-rank-{rank}"))
        .spawn(move || rank_loop(rank, model, plan, rx))
        .map_err(EngineError::Io)?;
    Ok(RankThread {
        tx,
        handle: Some(handle),
    })
}

/// `node_rank`: the thread's index over all groups (results are ordered by it: the group rank
/// `RankComms::rank` restarts at 0 in every data-parallel group).
fn rank_loop<R: RankWork>(node_rank: usize, model: R, plan: Plan, rx: Receiver<Cmd<R>>) {
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
                resume,
                checkpoints,
            } => {
                let Some(c) = comms.as_deref() else {
                    let _ = done.send((node_rank, Err(rank_gone(node_rank))));
                    continue;
                };
                let r = {
                    let _guard = tch::no_grad_guard();
                    model.run(&RankJob {
                        comms: c,
                        plan: &plan,
                        request: &request,
                        gate: &gate,
                        events: events.as_ref(),
                        fault_at,
                        graphs: &graphs,
                        resume: resume.as_deref(),
                        checkpoints: checkpoints.as_ref(),
                    })
                };
                if r.as_ref()
                    .is_err_and(|e| !matches!(e, EngineError::Cancelled { .. }))
                {
                    // Release the peers blocked in collectives and the gate; the graphs captured
                    // collectives of the communicators being aborted. (A cancel stops every rank
                    // at the same step: nothing to release.)
                    graphs.borrow_mut().clear();
                    c.abort();
                    gate.abort();
                }
                let _ = done.send((node_rank, r));
            }
        }
    }
}

impl<L: ParallelLeader> Drop for ParallelPipeline<L> {
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

impl<L: ParallelLeader> Engine for ParallelPipeline<L> {
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
        self.generate_resumable(request, None, 0, &mut |_| {}, on_step)
    }

    /// Checkpoints are [`LoopState`]s of the whole packed latents, with one scheduler part per
    /// rank slice.
    fn generate_resumable(
        &mut self,
        request: &GenerateRequest,
        resume: Option<&crate::StepCheckpoint>,
        every: u32,
        on_checkpoint: &mut dyn FnMut(crate::StepCheckpoint),
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
        self.generate_checkpointed(request, resume, every, on_checkpoint, on_step)
    }

    fn lora_status(&self) -> crate::LoraStatus {
        self.lora.as_ref().map(|h| h.status()).unwrap_or_default()
    }
}
