//! What every rank thread of a multi-GPU plan shares, whatever the model family: the driver's
//! per-step cancel decisions ([`StepGate`]), progress reports, fault injection for drills, step
//! checkpoint parts and their assembly, and the family interface the rank threads run
//! ([`ParallelLeader`], [`RankWork`]).

use std::cell::RefCell;
use std::sync::mpsc::Sender;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tch::{Device, Tensor};

use super::comm::{CommError, Communicator, RankComms};
use super::graphs::GraphCache;
use super::plan::{Plan, Splits};
use crate::checkpoint::{LoopState, SchedulerPart, Slice};
use crate::device::{device_name, sync_on};
use crate::{Control, EngineError, EngineInfo, GenerateRequest, GeneratedImage, StepEvent};

/// A model family's whole one-device pipeline, as a group leader of a multi-GPU plan: what the
/// engine splits over a group's devices.
pub trait ParallelLeader: Send + Sized + 'static {
    /// What one rank thread of a group holds (rank 0 holds the leader).
    type Rank: RankWork<Leader = Self>;

    /// What the model can split: plans are checked and shrunk against it.
    fn splits(&self) -> Splits;

    /// Splits the leader over a group's `devices` (rank `i` on `devices[i]`): rank 0 keeps the
    /// leader, the others get what they compute with.
    fn split(self, plan: &Plan, devices: &[Device]) -> Result<Vec<Self::Rank>, EngineError>;

    fn info(&self) -> EngineInfo;

    /// Where the leader computes (a leader is reused on its device when the plan changes).
    fn device(&self) -> Device;

    /// The adapters cache and LoRA status the leader's ranks share (`None`: no LoRA support).
    fn lora_hub(&self) -> Option<std::sync::Arc<crate::lora::LoraHub>> {
        None
    }

    /// Makes the leader read adapters through `hub` (the data-parallel groups of one engine
    /// share one cache).
    fn set_lora_hub(&mut self, hub: std::sync::Arc<crate::lora::LoraHub>) {
        let _ = hub;
    }
}

/// One rank thread's model: runs its part of each job.
pub trait RankWork: Send + 'static {
    type Leader;
    fn device(&self) -> Device;
    /// Weight elements this rank holds.
    fn parameters(&self) -> usize;
    fn run(&self, job: &RankJob<'_>) -> Result<RankOutput, EngineError>;
    /// The leader, on rank 0, when it still holds the whole model (it may be reused for another
    /// plan); `None` elsewhere.
    fn into_leader(self) -> Option<Self::Leader>;
}

/// What a rank gets for one job.
pub struct RankJob<'a> {
    pub comms: &'a RankComms,
    pub plan: &'a Plan,
    pub request: &'a GenerateRequest,
    pub gate: &'a StepGate,
    /// World rank 0's channel for progress events.
    pub events: Option<&'a Sender<StepEvent>>,
    /// Fault injection (tests, drills): fail with a device error at this step, or with `.1`
    /// stop there without an error (a hung device) until the groups are aborted.
    pub fault_at: Option<(u32, bool)>,
    /// This rank's CUDA graphs of the step.
    pub graphs: &'a RefCell<GraphCache>,
    pub resume: Option<&'a LoopState>,
    pub checkpoints: Option<&'a CheckpointSink>,
}

/// A finished image and its final latents (on the ranks that return the result).
pub type RankOutput = Option<(GeneratedImage, Tensor)>;

/// Per-step cancel decisions, published by the driver (which runs the caller's step callback)
/// and read by every rank at the same step, so all ranks stop at the same point.
#[derive(Debug, Default)]
pub struct StepGate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// `decisions[s - 1]` = cancel after step `s`.
    decisions: Vec<bool>,
    aborted: bool,
}

impl StepGate {
    pub fn publish(&self, step: u32, cancel: bool) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while s.decisions.len() < step as usize {
            s.decisions.push(false);
        }
        s.decisions[step as usize - 1] = cancel;
        self.cv.notify_all();
    }

    pub fn abort(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).aborted = true;
        self.cv.notify_all();
    }

    /// Waits for the decision on `step` (1-based): `Ok(true)` = cancel.
    pub fn wait(&self, step: u32) -> Result<bool, EngineError> {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if s.aborted {
                return Err(aborted());
            }
            if let Some(&d) = s.decisions.get(step as usize - 1) {
                return Ok(d);
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }
}

fn aborted() -> EngineError {
    EngineError::from(tch::TchError::from(CommError::Aborted {
        backend: "parallel group",
    }))
}

/// World rank 0 (the one with `events`) waits for step `step` and reports it; every rank then
/// honours the decision on the previous step: [`Control::Cancel`] stops the run here (its
/// checkpoint is of this step, the one every rank has finished).
pub fn report_and_check(
    step: u32,
    total: u32,
    x: &Tensor,
    (start, step_start): (Instant, Instant),
    gate: &StepGate,
    events: Option<&Sender<StepEvent>>,
) -> Result<Control, EngineError> {
    if let Some(ev) = events {
        let host = step_start.elapsed();
        sync_on(x)?;
        let _ = ev.send(StepEvent {
            step,
            total,
            elapsed: start.elapsed(),
            host,
        });
    }
    if step >= 2 && gate.wait(step - 1)? {
        return Ok(Control::Cancel);
    }
    Ok(Control::Continue)
}

/// Fault injection (tests, drills): a device error at the configured step, or a device that
/// stops answering until its groups are aborted.
pub fn inject_fault(
    fault_at: Option<(u32, bool)>,
    device: Device,
    comms: &RankComms,
    step: u32,
) -> Result<(), EngineError> {
    match fault_at {
        Some((at, false)) if at == step => Err(EngineError::Device {
            device: device_name(device),
            message: format!("injected device fault at step {step}"),
        }),
        Some((at, true)) if at == step => {
            // No error, no progress, until the watchdog aborts the groups (then this rank
            // reports the abort like its peers).
            tracing::warn!(device = %device_name(device), step, "injected hang");
            while !comms.is_aborted() {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(tch::TchError::from(CommError::Aborted {
                backend: "injected hang",
            })
            .into())
        }
        _ => Ok(()),
    }
}

/// The decision on the last step.
pub fn finish(gate: &StepGate, total: u32) -> Result<(), EngineError> {
    if gate.wait(total)? {
        return Err(EngineError::Cancelled { step: total });
    }
    Ok(())
}

/// One rank's part of a step checkpoint: its slice of the sample (on the CPU) and its
/// scheduler state.
#[derive(Debug)]
pub struct CheckpointPart {
    pub step: u32,
    pub slice: Option<Slice>,
    pub x: Tensor,
    pub state: Vec<u8>,
}

/// The checkpoint cadence and the channel to the driver.
#[derive(Debug, Clone)]
pub struct CheckpointSink {
    pub every: u32,
    pub tx: Sender<CheckpointPart>,
}

impl CheckpointSink {
    /// Sends this rank's part (the driver waits for every part of the step).
    pub fn send(
        &self,
        step: u32,
        slice: Option<Slice>,
        x: &Tensor,
        state: Vec<u8>,
    ) -> Result<(), EngineError> {
        // A copy, not a view: a rank may go on updating its sample in place (PipeFusion's
        // stage 0) while the driver assembles the checkpoint.
        let mut copy = Tensor::f_empty(x.size(), (x.kind(), Device::Cpu))?;
        copy.f_copy_(x)?;
        let x = copy;
        // A driver that stopped listening has given the job up: nothing to keep.
        let _ = self.tx.send(CheckpointPart {
            step,
            slice,
            x,
            state,
        });
        Ok(())
    }
}

/// Assembles step checkpoints from the parts of `expected` ranks (their slices of the sample
/// along one dim, or one part holding the whole sample).
#[derive(Debug, Default)]
pub struct CheckpointAssembler {
    pending: std::collections::BTreeMap<u32, Vec<CheckpointPart>>,
    /// The job's LoRA stack ([`crate::lora::stack_id`]), recorded in every checkpoint.
    lora: String,
}

impl CheckpointAssembler {
    /// An assembler for a job run under the LoRA stack `lora` ([`crate::lora::stack_id`]).
    pub fn for_stack(lora: String) -> Self {
        Self {
            pending: Default::default(),
            lora,
        }
    }

    /// Adds a part; returns the step's checkpoint once all `expected` parts are in.
    pub fn add(
        &mut self,
        part: CheckpointPart,
        expected: usize,
    ) -> Result<Option<crate::StepCheckpoint>, EngineError> {
        let step = part.step;
        let parts = self.pending.entry(step).or_default();
        parts.push(part);
        if parts.len() < expected {
            return Ok(None);
        }
        let mut parts = self.pending.remove(&step).unwrap_or_default();
        parts.sort_by_key(|p| p.slice.map_or(0, |s| s.start));
        let latents = match parts[0].slice {
            None => parts[0].x.shallow_clone(),
            Some(s) => {
                let xs: Vec<&Tensor> = parts.iter().map(|p| &p.x).collect();
                Tensor::f_cat(&xs, s.dim)?
            }
        };
        let state = LoopState {
            step,
            latents,
            scheduler: parts
                .into_iter()
                .map(|p| SchedulerPart {
                    slice: p.slice,
                    state: p.state,
                })
                .collect(),
            lora: self.lora.clone(),
        };
        Ok(Some(crate::StepCheckpoint {
            step,
            bytes: state.to_bytes()?,
        }))
    }
}

/// Concatenates every rank's slice `(b, len_j, c)` along dim 1 (slices may differ in length by
/// one: padded for the all-gather, then trimmed).
pub fn gather_seq(comm: &dyn Communicator, x: &Tensor, slices: &[(i64, i64)]) -> Result<Tensor, EngineError> {
    if comm.size() == 1 {
        return Ok(x.shallow_clone());
    }
    let max = slices.iter().map(|s| s.1).max().unwrap_or(0);
    let (b, len, c) = x.size3()?;
    let padded = if len < max {
        Tensor::f_cat(
            &[
                x.shallow_clone(),
                Tensor::f_zeros([b, max - len, c], (x.kind(), x.device()))?,
            ],
            1,
        )?
    } else {
        x.f_contiguous()?
    };
    let parts = comm.all_gather(&padded).map_err(tch::TchError::from)?;
    let trimmed = parts
        .iter()
        .zip(slices)
        .map(|(p, s)| p.f_narrow(1, 0, s.1))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Tensor::f_cat(&trimmed, 1)?)
}
