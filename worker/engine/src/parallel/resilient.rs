//! GPU isolation: a [`ParallelPipeline`] that survives a failing GPU.
//!
//! When a generation fails with a device error that a rank reported (a CUDA or NCCL error, an
//! injected fault; not an abort caused by a peer, not out-of-memory), the engine quarantines that
//! rank's device, rebuilds the plan on the remaining devices (same strategy family, largest valid
//! degree), retries the generation once there and keeps serving, reporting itself degraded.
//! Rebuilding reloads the leader from its source (checkpoint directory or random seed) on the
//! first healthy device: the failed device's memory is never read again.

use super::autotune::PlanTable;
use super::comm::CommFactory;
use super::health::DeviceHealth;
use super::pipeline::ParallelPipeline;
use super::plan::{Plan, Splits};
use super::rank::ParallelLeader;
use crate::device::device_name;
use crate::{
    Control, Engine, EngineError, EngineInfo, GenerateRequest, GeneratedImage, StepCheckpoint, StepEvent,
};
use tch::Device;

/// Builds a leader pipeline on a device.
pub type LeaderFn<L> = Box<dyn Fn(Device) -> Result<L, EngineError> + Send>;
/// Builds the communicator factory for a list of devices (rank `i` on `devices[i]`).
pub type FactoryFn = Box<dyn Fn(&[Device]) -> Box<dyn CommFactory + Send> + Send>;

/// A fault to inject for tests and drills: the device in slot `slot` fails at step `step`
/// (1-based) of every generation until it is quarantined: with a device error, or with `hang`,
/// by stopping without one (its peers wait until the step watchdog aborts the groups, and the
/// health probe then reports the slot as not answering, as NVML does for a GPU off the bus).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InjectedFault {
    pub slot: usize,
    pub step: u32,
    pub hang: bool,
}

/// See the module docs. Slots are the node's devices in configuration order.
pub struct ResilientParallel<L: ParallelLeader> {
    slots: Vec<Device>,
    healthy: Vec<bool>,
    requested: Plan,
    make_leader: LeaderFn<L>,
    make_factory: FactoryFn,
    inner: Option<ParallelPipeline<L>>,
    /// What the model can split (from the first leader built).
    splits: Splits,
    /// Slots the current pipeline's node ranks run on.
    active: Vec<usize>,
    fault: Option<InjectedFault>,
    degraded: Option<String>,
    info: EngineInfo,
    /// Measured plans: each request runs the fastest for its size (unless it names one).
    table: Option<PlanTable>,
    /// Plan switches so far (each rebuilds the rank threads and re-replicates weights).
    switches: u64,
    /// NVML view of the devices (lost GPU, critical Xid, uncorrected ECC).
    health: DeviceHealth,
    /// Overrides the step watchdog's timeout (tests); `None` = `DITFLEET_STEP_TIMEOUT_S`.
    step_timeout: Option<std::time::Duration>,
}

impl<L: ParallelLeader> std::fmt::Debug for ResilientParallel<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResilientParallel")
            .field("slots", &self.slots)
            .field("healthy", &self.healthy)
            .field("plan", &self.inner.as_ref().map(|p| p.plan()))
            .finish()
    }
}

impl<L: ParallelLeader> ResilientParallel<L> {
    pub fn new(
        slots: Vec<Device>,
        plan: Plan,
        make_leader: LeaderFn<L>,
        make_factory: FactoryFn,
        fault: Option<InjectedFault>,
    ) -> Result<Self, EngineError> {
        let healthy = vec![true; slots.len()];
        let health = DeviceHealth::new(&slots);
        let mut me = Self {
            health,
            step_timeout: None,
            slots,
            healthy,
            requested: plan,
            splits: Splits::Tokens { heads: 1 },
            make_leader,
            make_factory,
            inner: None,
            active: Vec::new(),
            fault,
            degraded: None,
            table: None,
            switches: 0,
            info: EngineInfo {
                kind: "parallel".into(),
                models: Vec::new(),
                model_versions: Vec::new(),
                devices: Vec::new(),
                parallel_degree: 0,
                precision: crate::Precision::Bf16,
                note: String::new(),
            },
        };
        me.build(plan)?;
        Ok(me)
    }

    /// The plan the engine runs now.
    pub fn plan(&self) -> Option<Plan> {
        self.inner.as_ref().map(|p| p.plan())
    }

    /// Devices not quarantined.
    pub fn healthy_devices(&self) -> usize {
        self.healthy.iter().filter(|h| **h).count()
    }

    /// What the model can split (how its plans are checked).
    pub fn splits(&self) -> Splits {
        self.splits
    }

    /// Sets the step watchdog's timeout (applies to the current and every rebuilt pipeline).
    pub fn set_step_timeout(&mut self, t: std::time::Duration) {
        self.step_timeout = Some(t);
        if let Some(p) = self.inner.as_mut() {
            p.set_step_timeout(t);
        }
    }

    /// Quarantines every active device the health probe reports (NVML: lost, critical Xid,
    /// uncorrected ECC errors), before a job runs on it.
    fn check_health(&mut self) -> Result<(), EngineError> {
        let bad: Vec<(usize, String)> = self
            .active
            .clone()
            .into_iter()
            .filter(|&s| self.healthy[s])
            .filter_map(|s| self.health.unhealthy(s, self.slots[s]).map(|why| (s, why)))
            .collect();
        for (slot, why) in bad {
            let cause = EngineError::Device {
                device: device_name(self.slots[slot]),
                message: why,
            };
            self.quarantine(slot, &cause)?;
        }
        Ok(())
    }

    /// Plan switches so far.
    pub fn plan_switches(&self) -> u64 {
        self.switches
    }

    /// The measured plan table this engine selects from, if any.
    pub fn table(&self) -> Option<&PlanTable> {
        self.table.as_ref()
    }

    /// Selects each request's plan from `table` from now on (see [`PlanTable::best`]); `None`
    /// returns to the configured plan.
    pub fn set_table(&mut self, table: Option<PlanTable>) {
        self.table = table;
    }

    /// Switches to `plan` on the healthy devices (no-op if it runs already). The group leaders'
    /// weights are reused where they sit on the right device and hold the whole transformer;
    /// otherwise (after PipeFusion, whose leaders keep one stage) they are loaded again.
    pub fn set_plan(&mut self, plan: Plan) -> Result<(), EngineError> {
        if self.plan() == Some(plan) {
            return Ok(());
        }
        self.splits
            .validate(&plan, self.healthy_devices())
            .map_err(EngineError::InvalidRequest)?;
        let reuse = match self.inner.take() {
            Some(p) => p.into_leaders(),
            _ => Vec::new(),
        };
        let from = self.info.note.clone();
        let t = std::time::Instant::now();
        self.switches += 1;
        self.build_with(plan, reuse)?;
        tracing::info!(plan = %plan, previous = %from, ms = t.elapsed().as_millis() as u64, "parallel plan switched");
        Ok(())
    }

    /// The plan a request runs with: its own, else the table's fastest for its size on the
    /// healthy devices, else the configured plan (shrunk to the healthy devices).
    pub fn plan_for(&self, request: &GenerateRequest) -> Result<Plan, EngineError> {
        let healthy = self.healthy_devices();
        if let Some(text) = &request.plan {
            let plan: Plan = text
                .parse()
                .map_err(|e| EngineError::InvalidRequest(format!("plan {text:?}: {e}")))?;
            self.splits.validate(&plan, healthy).map_err(|e| {
                EngineError::InvalidRequest(format!("plan {text:?} cannot run on this worker: {e}"))
            })?;
            return Ok(plan);
        }
        if let Some(p) = self
            .table
            .as_ref()
            .and_then(|t| t.best(request.width, request.height, healthy, request.true_cfg()))
        {
            return Ok(p);
        }
        Ok(self.plan().unwrap_or(self.requested))
    }

    /// Builds `plan` on the healthy slots.
    fn build(&mut self, plan: Plan) -> Result<(), EngineError> {
        self.build_with(plan, Vec::new())
    }

    /// Builds `plan` on the healthy slots, taking group leaders from `reuse` where one sits on
    /// the group's first device.
    fn build_with(&mut self, plan: Plan, mut reuse: Vec<L>) -> Result<(), EngineError> {
        let active: Vec<usize> = (0..self.slots.len()).filter(|&i| self.healthy[i]).collect();
        let devices: Vec<Device> = active.iter().map(|&i| self.slots[i]).collect();
        let group = plan.group_size();
        let leaders = (0..plan.dp)
            .map(|g| {
                let dev = devices[g * group];
                match reuse.iter().position(|p| p.device() == dev) {
                    Some(i) => Ok(reuse.swap_remove(i)),
                    None => (self.make_leader)(dev),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        drop(reuse);
        self.splits = leaders[0].splits();
        let factory = (self.make_factory)(&devices);
        let mut p = ParallelPipeline::new(leaders, &devices, plan, factory)?;
        // The injected fault follows its slot to whatever node rank now runs on it.
        p.set_fault(self.fault.and_then(|f| {
            active
                .iter()
                .position(|&s| s == f.slot)
                .map(|rank| (rank, f.step, f.hang))
        }));
        if let Some(t) = self.step_timeout {
            p.set_step_timeout(t);
        }
        self.info = p.info();
        // The engine holds every configured device, whatever the plan of the moment uses (a job
        // may run on fewer; a quarantined one stays allocated): what the node pays for.
        self.info.devices = self.slots.iter().map(|d| device_name(*d)).collect();
        if let Some(d) = &self.degraded {
            self.info.note = format!("{} | DEGRADED: {d}", self.info.note);
        }
        self.active = active;
        self.inner = Some(p);
        Ok(())
    }

    /// The largest plan of the requested plan's family that fits `n` devices.
    fn shrink(&self, n: usize) -> Option<Plan> {
        (n > 0).then(|| self.splits.shrink(&self.requested, n))
    }

    /// Quarantines `slot`, rebuilds on the rest.
    fn quarantine(&mut self, slot: usize, cause: &EngineError) -> Result<(), EngineError> {
        self.healthy[slot] = false;
        let left = self.healthy.iter().filter(|h| **h).count();
        // Stop the old ranks first (their memory, their communicators).
        drop(self.inner.take());
        let plan = self.shrink(left).ok_or_else(|| EngineError::Device {
            device: "all".into(),
            message: "every device of the node is quarantined".into(),
        })?;
        let lost: Vec<String> = (0..self.slots.len())
            .filter(|&i| !self.healthy[i])
            .map(|i| format!("slot {i} ({})", device_name(self.slots[i])))
            .collect();
        self.degraded = Some(format!(
            "quarantined {} after: {cause}; serving on {left} of {} devices with plan {plan}",
            lost.join(", "),
            self.slots.len()
        ));
        tracing::error!(slot, device = %device_name(self.slots[slot]), error = %cause, new_plan = %plan, "device quarantined; rebuilding the parallel groups");
        self.build(plan)
    }
}

impl<L: ParallelLeader> Engine for ResilientParallel<L> {
    fn info(&self) -> EngineInfo {
        self.info.clone()
    }

    fn generate(
        &mut self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<GeneratedImage, EngineError> {
        self.generate_resumable(request, None, 0, &mut |_| {}, on_step)
    }

    /// A job interrupted by a failing device resumes on the rebuilt groups from the last
    /// checkpoint it wrote (when it wrote one).
    fn generate_resumable(
        &mut self,
        request: &GenerateRequest,
        resume: Option<&StepCheckpoint>,
        every: u32,
        on_checkpoint: &mut dyn FnMut(StepCheckpoint),
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<GeneratedImage, EngineError> {
        let last: std::cell::RefCell<Option<StepCheckpoint>> = Default::default();
        let mut keep = |c: StepCheckpoint| {
            *last.borrow_mut() = Some(c.clone());
            on_checkpoint(c);
        };
        if self.inner.is_some() {
            self.check_health()?;
        }
        let plan = self.plan_for(request)?;
        if self.inner.is_some() {
            self.set_plan(plan)?;
        }
        let inner = self.inner.as_mut().ok_or_else(|| EngineError::Device {
            device: "all".into(),
            message: "no healthy devices left".into(),
        })?;
        match inner.generate_resumable(request, resume, every, &mut keep, on_step) {
            Err(e @ EngineError::Device { .. }) => {
                let (rank, timed_out, wedged) = (
                    inner.last_failed_rank(),
                    inner.last_timed_out(),
                    inner.is_wedged(),
                );
                let (slot, cause) = match rank {
                    Some(rank) => (self.active[rank], e),
                    None if timed_out => {
                        // Nobody reported an error: ask the health probe which device stopped.
                        if let Some(f) = self.fault.filter(|f| f.hang) {
                            self.health.inject_hang(f.slot);
                        }
                        let found = self
                            .active
                            .clone()
                            .into_iter()
                            .find_map(|s| self.health.unhealthy(s, self.slots[s]).map(|why| (s, why)));
                        match found {
                            Some((s, why)) => {
                                let cause = EngineError::Device {
                                    device: device_name(self.slots[s]),
                                    message: format!("{why} ({e})"),
                                };
                                (s, cause)
                            }
                            None => {
                                // Not attributable: rebuild the groups (a wedged pipeline's
                                // threads are gone for good) and let the caller retry the job.
                                if wedged {
                                    let plan = self.plan().unwrap_or(self.requested);
                                    drop(self.inner.take());
                                    self.build(plan)?;
                                }
                                return Err(e);
                            }
                        }
                    }
                    None => return Err(e),
                };
                let e = cause;
                self.quarantine(slot, &e)?;
                // Retry the interrupted job once on the rebuilt groups (the caller's retry policy
                // still applies if this fails too). A plan the job named may no longer fit:
                // then it runs on what the engine would choose now.
                let mut retry = request.clone();
                let plan = match self.plan_for(&retry) {
                    Ok(p) => p,
                    Err(_) => {
                        retry.plan = None;
                        self.plan_for(&retry)?
                    }
                };
                self.set_plan(plan)?;
                retry.plan = None;
                let from = last.borrow_mut().take().or_else(|| resume.cloned());
                let inner = self.inner.as_mut().expect("rebuilt");
                match inner.generate_resumable(&retry, from.as_ref(), every, &mut keep, on_step) {
                    // A checkpoint the new split cannot take: the whole job again.
                    Err(EngineError::BadCheckpoint(why)) if from.is_some() => {
                        tracing::warn!(reason = %why, "the checkpoint does not fit the rebuilt plan; running the job from the start");
                        inner.generate_resumable(&retry, None, every, &mut keep, on_step)
                    }
                    other => other,
                }
            }
            other => other,
        }
    }

    fn degraded(&self) -> Option<String> {
        self.degraded.clone()
    }

    fn lora_status(&self) -> crate::LoraStatus {
        self.inner.as_ref().map(|p| p.lora_status()).unwrap_or_default()
    }
}
