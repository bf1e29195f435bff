//! One job from delivery to ack.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use ditfleet_common::amqp::{self, now_ms};
use ditfleet_common::events::{DeadLetter, EventBus};
use ditfleet_common::job::{JobEvent, JobSpec, LoraRef, WorkOrder, deadline_ms};
use ditfleet_common::redact::public_reason;
use ditfleet_common::state::{CheckpointRef, Claim, EventClaim, JobState};
use ditfleet_common::telemetry;
use ditfleet_engine::{Control, EngineError, GenerateRequest, StepCheckpoint, StepEvent};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::Shared;
use crate::pool::PoolError;

/// What to do with the delivery once the job is settled.
enum Settle {
    Ack,
    Requeue,
    /// Nothing: the delivery's channel died (a broker restart), so the broker has already
    /// requeued the message and no settle of this delivery can reach it.
    Abandon,
}

/// A worker slot, held by a delivery's task only while it may run the engine.
///
/// Waiting (for another task of this job, for another worker's lease) and work that runs no
/// engine (re-publishing a settled job's event, dead-lettering) give the slot back, so such
/// deliveries (many of them after a broker restart redelivers every unacked message) never keep
/// new jobs from starting.
pub(crate) struct Slot {
    slots: Arc<tokio::sync::Semaphore>,
    freed: Arc<tokio::sync::Notify>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Slot {
    pub(crate) fn new(
        slots: Arc<tokio::sync::Semaphore>,
        freed: Arc<tokio::sync::Notify>,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        Self {
            slots,
            freed,
            permit: Some(permit),
        }
    }

    /// Gives the slot back and wakes the dispatch loop, which may start a buffered delivery on it.
    fn release(&mut self) {
        if self.permit.take().is_some() {
            self.freed.notify_one();
        }
    }

    /// Takes a slot again (waits for one), unless this task holds one.
    async fn acquire(&mut self) {
        if self.permit.is_none() {
            let p = self
                .slots
                .clone()
                .acquire_owned()
                .await
                .expect("the slot semaphore is never closed");
            self.permit = Some(p);
        }
    }
}

/// The delivery's channel died since it arrived (lapin poisons its acker when the channel fails
/// or starts recovering): the broker has requeued the message already.
fn orphaned(delivery: &Delivery) -> bool {
    delivery.acker.poisoned()
}

/// Failure talking to Redis/RabbitMQ/storage: the job is requeued (the message redelivers).
#[derive(Debug, thiserror::Error)]
enum InfraError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("publish: {0}")]
    Publish(#[from] amqp::PublishError),
    #[error("storage: {0}")]
    Storage(#[from] std::io::Error),
}

/// Retries of a Redis, broker or storage call before the job is handed back: with back-off from
/// `DITFLEET_RETRY_BASE_MS` doubling to 32x, 8 retries ride out a broker or Redis restart of
/// about 20 s.
const INFRA_RETRIES: usize = 8;

/// How long the worker that recorded a job's success holds the right to publish its done event
/// (while its registration lives); a redelivered copy meanwhile waits instead of publishing a
/// second one.
const EVENT_LEASE: Duration = Duration::from_secs(120);

fn backoff(shared: &Shared, times: usize) -> ExponentialBuilder {
    let base = shared.cfg.retry_base;
    ExponentialBuilder::default()
        .with_min_delay(base)
        .with_max_delay(base * 32)
        .with_factor(2.0)
        .with_max_times(times)
        .with_jitter()
}

/// Runs an idempotent infrastructure call (an expression ending in `.await` that gives a
/// `Result`) again after each failure, with the back-off and jitter of [`backoff`].
macro_rules! infra_retry {
    ($shared:expr, $what:expr, $call:expr) => {{
        let mut delays = backoff($shared, INFRA_RETRIES).build();
        loop {
            match $call {
                Ok(v) => break Ok(v),
                Err(e) => match delays.next() {
                    Some(d) => {
                        warn!(error = %e, retry_in_ms = d.as_millis() as u64, "{} failed; retrying", $what);
                        tokio::time::sleep(d).await;
                    }
                    None => break Err(e),
                },
            }
        }
    }};
}

/// One delivery, in the job's trace: the `job` span continues the trace context the scheduler put
/// in the message headers.
pub(crate) async fn process(shared: Arc<Shared>, delivery: Delivery, slot: Slot) {
    let job_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_default();
    let span = info_span!(
        "job",
        job_id = %job_id,
        worker = %shared.cfg.worker_id,
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
    );
    telemetry::set_parent_from_message(&span, &delivery.properties);
    process_in_span(shared, delivery, slot).instrument(span).await
}

async fn process_in_span(shared: Arc<Shared>, delivery: Delivery, mut slot: Slot) {
    let settle = match handle(&shared, &delivery, &mut slot).await {
        Ok(s) => s,
        Err(e) => {
            slot.release();
            error!(error = %e, "infrastructure failure; requeueing the job");
            shared.metrics.retries.inc();
            tokio::time::sleep(amqp::requeue_delay(&delivery.properties, Duration::from_secs(10))).await;
            Settle::Requeue
        }
    };
    slot.release();
    let settle = match settle {
        Settle::Ack | Settle::Requeue if orphaned(&delivery) => {
            // Its effect is recorded in Redis; the redelivered copy finds it there and settles.
            info!(
                "the delivery's channel died meanwhile; not settling it (the broker redelivered the message)"
            );
            Settle::Abandon
        }
        s => s,
    };
    let r = match settle {
        Settle::Abandon => Ok(false),
        Settle::Ack => {
            delivery
                .ack(BasicAckOptions::default())
                .instrument(info_span!("ack"))
                .await
        }
        Settle::Requeue => {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .instrument(info_span!("nack", requeue = true))
                .await
        }
    };
    if let Err(e) = r {
        warn!(error = %e, "settling the delivery failed; the broker redelivers it and the claim protocol absorbs the duplicate");
    }
}

async fn handle(shared: &Shared, delivery: &Delivery, slot: &mut Slot) -> Result<Settle, InfraError> {
    let order = match WorkOrder::decode(&delivery.data) {
        Ok(o) => o,
        Err(e) => {
            let job_id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_else(|| "unknown".into());
            let reason = e.to_string();
            error!(job_id = %job_id, reason = %reason, "unreadable work order");
            slot.release();
            fail(shared, delivery, &job_id, JobState::Failed, &reason, None, None).await?;
            return Ok(Settle::Ack);
        }
    };
    if !ditfleet_common::job::valid_job_id(&order.job_id) {
        // The scheduler never routes such an id; an order from elsewhere (an older scheduler, a
        // hand-published message) is refused before its id becomes a file or key name.
        let reason = format!(
            "invalid work order: job_id {:?} {}",
            order.job_id.chars().take(64).collect::<String>(),
            ditfleet_common::job::JOB_ID_RULE
        );
        error!(reason = %reason, "work order with an unusable job id");
        slot.release();
        fail(
            shared,
            delivery,
            &order.job_id,
            JobState::Failed,
            &reason,
            None,
            None,
        )
        .await?;
        return Ok(Settle::Ack);
    }
    if let Some(v) = &order.model_version {
        let mv = format!("{}@{v}", order.model);
        if !shared.pool.serves(&mv) {
            // Swapped out after the message was buffered: another holder takes it.
            info!(job_id = %order.job_id, model_version = %mv, "pinned version no longer held here; handing the job back");
            slot.release();
            tokio::time::sleep(Duration::from_millis(200)).await;
            return Ok(Settle::Requeue);
        }
    }
    // The order reached a worker: it no longer waits in the queue (queue-age metric; the set is
    // per class, whichever priority or pinned queue the order came from).
    if let Err(e) = shared.store.unmark_queued(&order.class, &order.job_id).await {
        debug!(job_id = %order.job_id, error = %e, "could not clear the queued mark");
    }
    let me = shared.cfg.worker_id.clone();
    // A second delivery of a job this process is still handling. After a broker restart the broker
    // redelivers every message whose channel died, while the task holding the first delivery lives
    // on and can no longer settle it (its acker is dead). Acking this copy away would lose the job
    // if that task then hands it back: so it waits for the task to end and is then handled like any
    // delivery (the claim sees what the task left: settled, requeued, or still leased).
    let mut waiting_since: Option<Instant> = None;
    while !shared
        .running
        .lock()
        .expect("running set")
        .insert(order.job_id.clone())
    {
        if waiting_since.is_none() {
            info!(job_id = %order.job_id, redelivered = delivery.redelivered, "job is being handled by another task of this worker; this delivery waits for it to end");
            waiting_since = Some(Instant::now());
            slot.release();
        }
        if shared.abort.load(Ordering::SeqCst) {
            return Ok(Settle::Requeue);
        }
        if orphaned(delivery) {
            info!(job_id = %order.job_id, "the waiting delivery's channel died; its redelivered copy takes over");
            return Ok(Settle::Abandon);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(t) = waiting_since {
        info!(job_id = %order.job_id, waited_ms = t.elapsed().as_millis() as u64, "the other task of this job ended; handling this delivery");
    }
    let _running = RunningGuard {
        shared,
        job_id: order.job_id.clone(),
    };
    let recreate = [
        ("tenant", order.tenant.clone()),
        ("model", order.model.clone()),
        ("model_version", order.model_version.clone().unwrap_or_default()),
        ("class", order.class.clone()),
        ("cost", order.cost.to_string()),
        ("width", order.width.to_string()),
        ("height", order.height.to_string()),
        ("steps", order.steps.to_string()),
        ("priority", order.priority.as_str().to_string()),
        ("submitted_ms", order.submitted_ms.to_string()),
        // Redis lost the record: the broker's delivery count stands in for the attempts so far.
        ("attempts", amqp::delivery_count(&delivery.properties).to_string()),
    ];
    let deadline = deadline_ms(order.deadline.as_deref());
    if let Some(routed_ms) =
        amqp::header_str(&delivery.properties, "x-routed-ms").and_then(|v| v.parse::<u64>().ok())
    {
        telemetry::record_interval(
            &telemetry::context_of(&tracing::Span::current()),
            "queue_wait",
            ms_to_time(routed_ms),
            std::time::SystemTime::now(),
            vec![
                opentelemetry::KeyValue::new("queue", "work"),
                opentelemetry::KeyValue::new("class", order.class.clone()),
            ],
        );
    }
    let claim_started = std::time::SystemTime::now();
    let (attempts, checkpoint) = loop {
        // A claimed job starts at once (its lease is not yet renewed), so the slot comes first.
        slot.acquire().await;
        let claim = infra_retry!(
            shared,
            "claim",
            shared
                .store
                .claim(
                    &order.job_id,
                    &me,
                    shared.cfg.job_lease,
                    shared.cfg.max_attempts,
                    deadline,
                    &recreate,
                )
                .await
        )?;
        match claim {
            Claim::Claimed { attempts, checkpoint } => break (attempts, checkpoint),
            Claim::Terminal(state) => {
                slot.release();
                info!(job_id = %order.job_id, state = %state, "job already settled; dropping this delivery");
                ensure_terminal_event(shared, &order.job_id, state).await?;
                return Ok(Settle::Ack);
            }
            Claim::Expired => {
                slot.release();
                let reason = format!(
                    "deadline {} passed before the job could start",
                    order.deadline.as_deref().unwrap_or("?")
                );
                info!(job_id = %order.job_id, reason = %reason, "job expired; not started");
                shared.metrics.job("expired", &order.class, &order.model);
                publish(
                    shared,
                    &JobEvent::Failed {
                        job_id: order.job_id.clone(),
                        state: JobState::Expired.to_string(),
                        reason,
                    },
                    order.reply_to.as_deref(),
                )
                .await?;
                return Ok(Settle::Ack);
            }
            Claim::Exhausted { attempts } => {
                slot.release();
                let reason = format!("gave up after {attempts} attempts");
                warn!(job_id = %order.job_id, attempts, "poison job dead-lettered");
                shared.metrics.job("dead_lettered", &order.class, &order.model);
                // The CLAIM script already recorded dead_lettered; copy to the DLQ and announce.
                dead_letter(shared, delivery, &order.job_id, &reason).await?;
                publish(
                    shared,
                    &JobEvent::Failed {
                        job_id: order.job_id.clone(),
                        state: JobState::DeadLettered.to_string(),
                        reason,
                    },
                    order.reply_to.as_deref(),
                )
                .await?;
                return Ok(Settle::Ack);
            }
            Claim::Busy {
                owner,
                lease_until_ms,
            } => {
                // Another worker holds a live lease. A first delivery is a second message for a
                // running job (its holder has the other one): drop it. A redelivered message is
                // the holder's own: its channel died (the holder was killed, or the broker
                // restarted under a holder that lives on and can no longer settle it). Wait, as
                // long as the lease is renewed, for the holder to settle the job, hand it back
                // or die; acking this copy away would lose the job if the holder hands it back.
                slot.release();
                if !delivery.redelivered {
                    info!(job_id = %order.job_id, owner = %owner, "job is running on another worker; dropping the duplicate delivery");
                    return Ok(Settle::Ack);
                }
                if shared.abort.load(Ordering::SeqCst) {
                    return Ok(Settle::Requeue);
                }
                if orphaned(delivery) {
                    info!(job_id = %order.job_id, "the waiting delivery's channel died; its redelivered copy takes over");
                    return Ok(Settle::Abandon);
                }
                let wait = lease_until_ms.saturating_sub(now_ms()).clamp(50, 1000);
                debug!(job_id = %order.job_id, owner = %owner, wait_ms = wait, "waiting for the previous holder's lease to lapse");
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
        }
    };
    telemetry::record_interval(
        &telemetry::context_of(&tracing::Span::current()),
        "claim",
        claim_started,
        std::time::SystemTime::now(),
        vec![opentelemetry::KeyValue::new("attempt", i64::from(attempts))],
    );
    let started_ms = now_ms();
    info!(job_id = %order.job_id, class = %order.class, attempt = attempts, steps = order.steps, checkpoint_step = ?checkpoint.as_ref().map(|c| c.step), size = %format!("{}x{}", order.width, order.height), "job started");
    run_claimed(shared, delivery, &order, attempts, started_ms, checkpoint).await
}

/// Removes the job from the worker's running set when its handling ends.
struct RunningGuard<'a> {
    shared: &'a Shared,
    job_id: String,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.shared.running.lock() {
            set.remove(&self.job_id);
        }
    }
}

/// What a checkpoint is valid for: an attempt resumes only from a checkpoint of the same plan,
/// so a resume never mixes samplers or LoRA stacks. A job with the model's default sampler and
/// no LoRAs keeps the plan string workers wrote before those fields existed (its checkpoints
/// stay usable across the upgrade); otherwise the sampler and a digest of the stack (adapters,
/// versions, scales, in order) are appended.
fn plan(order: &WorkOrder, model_version: &str, engine: &str) -> String {
    let digest = JobSpec::derived_seed(&format!(
        "{}\u{1f}{}",
        order.prompt,
        order.negative_prompt.as_deref().unwrap_or("")
    ));
    let mut plan = format!(
        "{engine}|{model_version}|{}x{}|{}|{}|{}|{digest:016x}",
        order.width, order.height, order.steps, order.seed, order.guidance
    );
    if order.scheduler != JobSpec::default_scheduler(&order.model) || !order.loras.is_empty() {
        let stack: Vec<String> = order.loras.iter().map(LoraRef::label).collect();
        let stack = JobSpec::derived_seed(&stack.join("\u{1f}"));
        plan.push_str(&format!(
            "|{}|{}:{stack:016x}",
            order.scheduler,
            order.loras.len()
        ));
    }
    plan
}

/// The engine's request for a work order, each adapter with the verified file `resolved` gives
/// it (in stack order; unresolved adapters keep no path, which engines refuse).
fn request_of(order: &WorkOrder, resolved: &[crate::lora::Resolved]) -> GenerateRequest {
    GenerateRequest {
        model: order.model.clone(),
        prompt: order.prompt.clone(),
        negative_prompt: order.negative_prompt.clone(),
        width: order.width,
        height: order.height,
        steps: order.steps,
        guidance: order.guidance,
        true_cfg_scale: order.true_cfg_scale,
        plan: order.plan.clone(),
        scheduler: Some(order.scheduler.clone()),
        loras: order
            .loras
            .iter()
            .enumerate()
            .map(|(i, l)| ditfleet_engine::request::LoraRef {
                name: l.name.clone(),
                version: l.version.clone(),
                scale: l.scale as f32,
                path: resolved.get(i).map(|r| r.path.clone()),
                checksum: resolved.get(i).map(|r| r.sha256.clone()),
            })
            .collect(),
        seed: order.seed,
    }
}

/// Loads the checkpoint to resume from, if it fits this attempt's plan and can be read.
async fn load_checkpoint(
    shared: &Shared,
    job_id: &str,
    c: Option<CheckpointRef>,
    plan: &str,
) -> Option<StepCheckpoint> {
    let c = c?;
    if c.plan != plan {
        info!(job_id = %job_id, checkpoint_plan = %c.plan, plan = %plan, "checkpoint is of another plan (e.g. another model version); starting from step 0");
        return None;
    }
    match infra_retry!(
        shared,
        "reading a checkpoint",
        shared.results.get_checkpoint(&c.url).await
    ) {
        Ok(bytes) => Some(StepCheckpoint { step: c.step, bytes }),
        Err(e) => {
            warn!(job_id = %job_id, url = %c.url, error = %e, "checkpoint unreadable; starting from step 0");
            None
        }
    }
}

/// Engine outcome with what happened on the way.
struct Generated {
    result: Result<(ditfleet_engine::StageTimings, Vec<u8>), EngineError>,
    resumed_from: Option<u32>,
    engine_retries: u32,
    /// The engine's degraded reason after this job (a GPU quarantined), if any.
    degraded: Option<String>,
    /// (step, time since the denoising loop started, when the step ended), for the step spans.
    step_times: Vec<(u32, Duration, std::time::SystemTime)>,
    /// The engine's LoRA status before and after the job.
    lora: (ditfleet_engine::LoraStatus, ditfleet_engine::LoraStatus),
}

/// Makes the order's adapters ready (see [`crate::lora::LoraCache::resolve`]), counting the
/// download cache's hits and misses.
async fn resolve_loras(
    shared: &Shared,
    order: &WorkOrder,
) -> Result<Vec<crate::lora::Resolved>, crate::lora::ResolveError> {
    let mut out: Vec<crate::lora::Resolved> = Vec::with_capacity(order.loras.len());
    for l in &order.loras {
        let keep: Vec<String> = out.iter().map(|r| r.sha256.clone()).collect();
        let r = shared
            .lora
            .resolve(&l.name, &l.version, &order.model, &keep)
            .await?;
        let result = match r.fetched {
            crate::lora::Fetched::Hit => "hit",
            crate::lora::Fetched::Miss => "miss",
        };
        shared
            .metrics
            .lora_cache
            .get_or_create(&ditfleet_common::metrics::LoraCacheLabels {
                cache: "download".into(),
                result: result.into(),
            })
            .inc();
        out.push(r);
    }
    if !order.loras.is_empty() {
        let bytes = shared.lora.bytes().await as i64;
        shared
            .metrics
            .lora_cache_bytes
            .get_or_create(&ditfleet_common::metrics::LoraCacheName {
                cache: "download".into(),
            })
            .set(bytes);
    }
    Ok(out)
}

/// Turns the engine's LoRA status change over one job into metrics, and asks for an early
/// heartbeat when the applied stack changed (the scheduler's affinity sees it sooner).
fn record_lora(shared: &Shared, before: &ditfleet_engine::LoraStatus, after: &ditfleet_engine::LoraStatus) {
    use ditfleet_common::metrics::{LoraCacheLabels, LoraCacheName};
    for (result, n) in [
        ("hit", after.cache_hits.saturating_sub(before.cache_hits)),
        ("miss", after.cache_misses.saturating_sub(before.cache_misses)),
    ] {
        if n > 0 {
            shared
                .metrics
                .lora_cache
                .get_or_create(&LoraCacheLabels {
                    cache: "engine".into(),
                    result: result.into(),
                })
                .inc_by(n);
        }
    }
    if after.applied != before.applied {
        shared.metrics.lora_apply.observe(after.last_apply_ms / 1e3);
        shared.beat_now.notify_one();
    }
    if after.cache_capacity_bytes > 0 {
        shared
            .metrics
            .lora_cache_bytes
            .get_or_create(&LoraCacheName {
                cache: "engine".into(),
            })
            .set(after.cache_bytes as i64);
    }
}

async fn run_claimed(
    shared: &Shared,
    delivery: &Delivery,
    order: &WorkOrder,
    attempts: u32,
    started_ms: u64,
    checkpoint: Option<CheckpointRef>,
) -> Result<Settle, InfraError> {
    let me = shared.cfg.worker_id.clone();
    let cancel = Arc::new(AtomicBool::new(false));
    let watch = LeaseWatch::spawn(shared, &order.job_id, &me, cancel.clone());
    // The job's adapters, downloaded and verified before an engine is taken.
    let resolved = match resolve_loras(shared, order).await {
        Ok(r) => r,
        Err(crate::lora::ResolveError::Permanent(reason)) => {
            watch.stop().await;
            warn!(job_id = %order.job_id, reason = %reason, "LoRA adapters unavailable; failing the job");
            return fail_permanently(shared, delivery, order, &reason, &me).await;
        }
        Err(crate::lora::ResolveError::Transient(reason)) => {
            watch.stop().await;
            warn!(job_id = %order.job_id, reason = %reason, "LoRA registry unreadable; handing the job back");
            shared.metrics.job("requeued", &order.class, &order.model);
            shared.metrics.retries.inc();
            requeue(shared, &order.job_id, &reason).await?;
            return Ok(Settle::Requeue);
        }
    };
    let taken = match shared
        .pool
        .take(&order.model, order.model_version.as_deref())
        .await
    {
        Ok(t) => t,
        Err(e) => {
            watch.stop().await;
            return match e {
                PoolError::VersionNotHeld(_) => {
                    // Unloaded since the claim: hand it back for a holder.
                    warn!(job_id = %order.job_id, error = %e, "handing the job back");
                    requeue(shared, &order.job_id, &e.to_string()).await?;
                    Ok(Settle::Requeue)
                }
                PoolError::ModelNotServed(_) => {
                    fail_permanently(shared, delivery, order, &format!("invalid request: {e}"), &me).await
                }
            };
        }
    };
    let model_version = taken.model_version();
    // The numeric format this version's engine computes in, recorded with the job's timings.
    let precision = taken.engine.info().precision;
    let plan = plan(order, &model_version, &shared.pool.info.kind);
    let resume = load_checkpoint(shared, &order.job_id, checkpoint, &plan).await;

    let (tx, forwarder) = spawn_progress_forwarder(shared, &order.job_id, &me);
    let (ck_tx, ck_rx) = mpsc::unbounded_channel::<StepCheckpoint>();
    let ck_writer = write_checkpoints(shared, &order.job_id, &me, &plan, ck_rx);

    let request = request_of(order, &resolved);
    let stack = ditfleet_common::lora::stack_key(
        request
            .loras
            .iter()
            .map(|l| (l.name.as_str(), l.version.as_str(), l.scale)),
    );
    // Advertised while the job runs: the stack the engine will hold afterwards.
    shared
        .busy_stacks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(order.job_id.clone(), stack);
    let gen_started = Instant::now();
    let gen_started_wall = std::time::SystemTime::now();
    let gen_span = info_span!("generate", steps = order.steps, engine = %shared.pool.info.kind, model_version = %model_version);
    let gen_cx = telemetry::context_of(&gen_span);
    let cancel_flag = cancel.clone();
    let abort = shared.abort.clone();
    let every = shared.cfg.checkpoint_every;
    let mut retry_delays = backoff(shared, shared.cfg.engine_retries as usize).build();
    let job_id = order.job_id.clone();
    let (engine_model, engine_version) = (taken.model.clone(), taken.version.clone());
    let engine_task = tokio::task::spawn_blocking(move || {
        let mut taken = taken;
        let stop = || cancel_flag.load(Ordering::SeqCst) || abort.load(Ordering::SeqCst);
        // When each step ended, for the per-step spans.
        let mut step_times = Vec::new();
        let mut on_step = |ev: StepEvent| {
            step_times.push((ev.step, ev.elapsed, std::time::SystemTime::now()));
            let _ = tx.send(ev);
            if stop() {
                Control::Cancel
            } else {
                Control::Continue
            }
        };
        let resumed_from = resume.as_ref().map(|c| c.step);
        let mut resume = resume;
        let mut engine_retries = 0;
        let lora_before = taken.engine.lora_status();
        let result = loop {
            let mut latest: Option<StepCheckpoint> = None;
            let out = taken.engine.generate_resumable(
                &request,
                resume.as_ref(),
                every,
                &mut |c| {
                    latest = Some(c.clone());
                    let _ = ck_tx.send(c);
                },
                &mut on_step,
            );
            match out {
                Err(EngineError::BadCheckpoint(m)) if resume.is_some() => {
                    warn!(job_id = %job_id, reason = %m, "checkpoint unusable; starting from step 0");
                    resume = None;
                }
                Err(e) if e.is_transient() && !stop() => match retry_delays.next() {
                    Some(delay) => {
                        engine_retries += 1;
                        warn!(job_id = %job_id, error = %e, retry = engine_retries, retry_in_ms = delay.as_millis() as u64, "transient engine failure; freeing memory and retrying");
                        taken.engine.release_memory();
                        std::thread::sleep(delay);
                        if latest.is_some() {
                            resume = latest;
                        }
                    }
                    None => break Err(e),
                },
                other => {
                    break other.and_then(|img| {
                        let png = img.to_png()?;
                        Ok((img.timings, png))
                    });
                }
            }
        };
        drop(ck_tx);
        let degraded = taken.engine.degraded();
        let lora_after = taken.engine.lora_status();
        (
            taken,
            Generated {
                result,
                resumed_from,
                engine_retries,
                degraded,
                step_times,
                lora: (lora_before, lora_after),
            },
        )
    })
    .instrument(gen_span);
    // Checkpoints are written while the engine runs; all are stored before the job settles.
    let (joined, ()) = tokio::join!(engine_task, ck_writer);
    shared
        .busy_stacks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&order.job_id);
    let (taken, generated) = match joined {
        Ok(v) => v,
        Err(e) => {
            // The engine was dropped while its thread unwound: rebuild it (the worker keeps its
            // slots) and hand the job back; its attempts are counted, so a job that panics every
            // engine ends dead-lettered with this reason rather than cycling.
            let reason = format!("engine panicked: {}", panic_text(e));
            error!(job_id = %order.job_id, reason = %reason, model_version = %model_version, "engine thread panicked; rebuilding the engine and requeueing the job");
            let _ = forwarder.await;
            watch.stop().await;
            if let Err(err) = shared.pool.replace_lost(&engine_model, &engine_version).await {
                error!(model_version = %model_version, error = %err, "rebuilding the engine failed; serving on with one engine less");
            }
            shared.metrics.job("requeued", &order.class, &order.model);
            shared.metrics.retries.inc();
            requeue(shared, &order.job_id, &reason).await?;
            return Ok(Settle::Requeue);
        }
    };
    shared.pool.give_back(taken);
    record_lora(shared, &generated.lora.0, &generated.lora.1);
    if let Some(reason) = &generated.degraded {
        // The engine keeps serving on fewer GPUs: advertise it (the slot count is unchanged).
        if shared
            .degraded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            != Some(reason.as_str())
        {
            shared.degrade(reason.clone(), 0);
        }
    }
    let generate_ms = gen_started.elapsed().as_millis() as u64;
    record_engine_stages(
        &gen_cx,
        gen_started_wall,
        generated.result.as_ref().ok().map(|(t, _)| t),
        &generated.step_times,
    );
    // What the generation cost, whatever its outcome (failed and cancelled work is paid for too):
    // the devices of the plan the job ran with (a multi-GPU worker picks one per job), else the
    // engine's.
    let devices = generated
        .result
        .as_ref()
        .ok()
        .and_then(|(t, _)| t.plan.as_deref())
        .and_then(|p| p.parse::<ditfleet_engine::parallel::Plan>().ok())
        .map_or(shared.pool.info.devices.len(), |p| p.world())
        .max(1) as u32;
    let generate_s = generate_ms as f64 / 1e3;
    let gpu_seconds = f64::from(devices) * generate_s;
    shared.metrics.job_cost(
        &order.class,
        &order.model,
        &order.tenant,
        order.cost,
        devices,
        generate_s,
    );
    let _ = forwarder.await;
    watch.stop().await;
    if generated.engine_retries > 0 {
        for _ in 0..generated.engine_retries {
            shared.metrics.retries.inc();
        }
        let _ = shared
            .store
            .set_fields(
                &order.job_id,
                &[("engine_retries", generated.engine_retries.to_string())],
            )
            .await;
    }
    let resumed_from = generated.resumed_from;

    match generated.result {
        Ok((timings, png)) => {
            let done = Finished {
                attempts,
                started_ms,
                model_version,
                precision,
                generate_ms,
                devices,
                gpu_seconds,
                resumed_from,
            };
            record_success(shared, order, &me, done, timings, png).await
        }
        Err(EngineError::Cancelled { step }) if !cancel.load(Ordering::SeqCst) => {
            // Stopped by the shutdown abort: hand the job back (its checkpoint is stored).
            shared.metrics.job("requeued", &order.class, &order.model);
            shared.metrics.retries.inc();
            requeue(
                shared,
                &order.job_id,
                &format!("worker {me} shut down at step {step}"),
            )
            .await?;
            Ok(Settle::Requeue)
        }
        Err(EngineError::Cancelled { step }) => {
            info!(job_id = %order.job_id, step, "job cancelled");
            shared.metrics.job("cancelled", &order.class, &order.model);
            cleanup_checkpoints(shared, &order.job_id).await;
            publish(
                shared,
                &JobEvent::Cancelled {
                    job_id: order.job_id.clone(),
                    at_step: Some(step),
                },
                order.reply_to.as_deref(),
            )
            .await?;
            Ok(Settle::Ack)
        }
        Err(e) if e.is_transient() => {
            warn!(job_id = %order.job_id, error = %e, attempt = attempts, engine_retries = generated.engine_retries, "transient engine failure persisted; requeueing for another attempt");
            shared.metrics.job("requeued", &order.class, &order.model);
            shared.metrics.retries.inc();
            requeue(shared, &order.job_id, &e.to_string()).await?;
            Ok(Settle::Requeue)
        }
        Err(e) => {
            cleanup_checkpoints(shared, &order.job_id).await;
            fail_permanently(shared, delivery, order, &e.to_string(), &me).await
        }
    }
}

/// The message of a panicked engine thread (or why there is none).
fn panic_text(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return format!("engine thread ended without a result: {e}");
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Renews the job's lease while it runs and raises `cancel` when the job leaves the running state
/// (a client cancelled it).
struct LeaseWatch {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseWatch {
    fn spawn(shared: &Shared, job_id: &str, me: &str, cancel: Arc<AtomicBool>) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let store = shared.store.clone();
        let job_id = job_id.to_string();
        let me = me.to_string();
        let lease = shared.cfg.job_lease;
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(
                (lease / 3)
                    .max(Duration::from_millis(200))
                    .min(Duration::from_millis(1000)),
            );
            loop {
                tokio::select! { _ = stopped.cancelled() => return, _ = tick.tick() => {} }
                match store.renew(&job_id, &me, lease).await {
                    Ok(Some(JobState::Running)) => {}
                    Ok(state) => {
                        info!(job_id = %job_id, state = ?state, "job left the running state (cancelled); stopping at the next step");
                        cancel.store(true, Ordering::SeqCst);
                    }
                    Err(e) => warn!(job_id = %job_id, error = %e, "lease renewal failed"),
                }
            }
        });
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Progress forwarding: the engine thread's step events → a channel → progress events on the bus
/// and the job's `progress` field in Redis. The task ends when the sender is dropped.
fn spawn_progress_forwarder(
    shared: &Shared,
    job_id: &str,
    me: &str,
) -> (mpsc::UnboundedSender<StepEvent>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::unbounded_channel::<StepEvent>();
    let job_id = job_id.to_string();
    let me = me.to_string();
    let store = shared.store.clone();
    let bus = events(shared);
    let task = tokio::spawn(
        async move {
            while let Some(ev) = rx.recv().await {
                let e = JobEvent::Progress {
                    job_id: job_id.clone(),
                    step: ev.step,
                    total: ev.total,
                    elapsed_ms: ev.elapsed.as_millis() as u64,
                    worker: me.clone(),
                };
                if let Err(err) = bus.publish(&e, None).await {
                    warn!(job_id = %job_id, error = %err, "progress event not published");
                }
                let _ = store
                    .set_fields(&job_id, &[("progress", format!("{}/{}", ev.step, ev.total))])
                    .await;
            }
        }
        .instrument(tracing::Span::current()),
    );
    (tx, task)
}

/// Checkpoints: the engine thread's step checkpoints → the result store, and their pointer in
/// Redis (only while the job is still ours). Ends when the sender is dropped.
async fn write_checkpoints(
    shared: &Shared,
    job_id: &str,
    me: &str,
    plan: &str,
    mut rx: mpsc::UnboundedReceiver<StepCheckpoint>,
) {
    while let Some(c) = rx.recv().await {
        let url = match shared.results.put_checkpoint(job_id, c.step, c.bytes).await {
            Ok(u) => u,
            Err(e) => {
                warn!(job_id = %job_id, step = c.step, error = %e, "checkpoint not stored");
                continue;
            }
        };
        let fields = [
            ("checkpoint_step", c.step.to_string()),
            ("checkpoint_url", url),
            ("checkpoint_plan", plan.to_string()),
        ];
        match shared.store.set_if_owner(job_id, me, &fields).await {
            Ok(true) => debug!(job_id = %job_id, step = c.step, "checkpoint saved"),
            Ok(false) => debug!(job_id = %job_id, "job no longer ours; checkpoint pointer not moved"),
            Err(e) => warn!(job_id = %job_id, error = %e, "checkpoint pointer not recorded"),
        }
    }
}

/// What a generation that produced an image cost and came from, for [`record_success`].
struct Finished {
    attempts: u32,
    started_ms: u64,
    model_version: String,
    /// The precision of the engine the job ran on (`bf16`, `fp8`).
    precision: ditfleet_engine::Precision,
    generate_ms: u64,
    devices: u32,
    gpu_seconds: f64,
    resumed_from: Option<u32>,
}

/// The job's stage timings as recorded (the job's `timings` field and the done event's), with
/// the precision the job ran at (`"precision": "fp8"`) unless the engine reported one itself.
pub(crate) fn timings_with_precision(
    timings: &ditfleet_engine::StageTimings,
    precision: ditfleet_engine::Precision,
) -> serde_json::Value {
    let mut json = serde_json::to_value(timings).expect("timings serialise");
    if let Some(o) = json.as_object_mut() {
        o.entry("precision").or_insert_with(|| precision.as_str().into());
    }
    json
}

/// Stores the image, records the success (owner-checked: a job settled elsewhere meanwhile keeps
/// that outcome), publishes the done event once, and updates the cost model and metrics.
async fn record_success(
    shared: &Shared,
    order: &WorkOrder,
    me: &str,
    done: Finished,
    timings: ditfleet_engine::StageTimings,
    png: Vec<u8>,
) -> Result<Settle, InfraError> {
    let Finished {
        attempts,
        started_ms,
        model_version,
        precision,
        generate_ms,
        devices,
        gpu_seconds,
        resumed_from,
    } = done;
    let me = me.to_string();
    let t = Instant::now();
    let url = match async {
        infra_retry!(
            shared,
            "storing the image",
            shared.results.put(&order.job_id, png.clone()).await
        )
    }
    .instrument(info_span!("store", store = %shared.results.describe()))
    .await
    {
        Ok(url) => url,
        Err(e) => {
            // Clients see why the job is retried, without the store's endpoint or keys.
            let _ = shared
                .store
                .set_fields(
                    &order.job_id,
                    &[(
                        "last_error",
                        format!("storing the result failed: {}", public_reason(&e.to_string())),
                    )],
                )
                .await;
            return Err(e.into());
        }
    };
    let store_ms = t.elapsed().as_millis() as u64;
    let finished_ms = now_ms();
    let queue_wait_ms = started_ms.saturating_sub(order.submitted_ms);
    let end_to_end_ms = finished_ms.saturating_sub(order.submitted_ms);
    let timings_json = timings_with_precision(&timings, precision);
    let fields = [
        ("result_url", url.clone()),
        ("finished_ms", finished_ms.to_string()),
        ("engine", shared.pool.info.kind.clone()),
        ("model_version_used", model_version.clone()),
        ("generate_ms", generate_ms.to_string()),
        ("store_ms", store_ms.to_string()),
        ("queue_wait_ms", queue_wait_ms.to_string()),
        ("timings", timings_json.to_string()),
        ("progress", format!("{}/{}", order.steps, order.steps)),
        ("devices", devices.to_string()),
        ("gpu_seconds", format!("{gpu_seconds:.3}")),
        (
            "resumed_from_step",
            resumed_from.map(|s| s.to_string()).unwrap_or_default(),
        ),
        // Only this task publishes the done event while its worker lives (see
        // EVENT_LEASE); a redelivered copy, even on this worker, waits for it.
        ("event_owner", ditfleet_common::state::event_claimant(&me)),
        (
            "event_until_ms",
            (now_ms() + EVENT_LEASE.as_millis() as u64).to_string(),
        ),
    ];
    let (mut applied, prev) = infra_retry!(
        shared,
        "recording success",
        shared
            .store
            .transition(
                &order.job_id,
                &[Some(JobState::Running)],
                JobState::Succeeded,
                Some(&me),
                &fields,
            )
            .await
    )?;
    if !applied && prev == Some(JobState::Succeeded) {
        // A retry after a lost reply: the first call applied if it recorded our result.
        let h = shared.store.get(&order.job_id).await?;
        applied = h.get("worker") == Some(&me) && h.get("result_url") == Some(&url);
    }
    if !applied {
        info!(job_id = %order.job_id, state = ?prev, "job was settled elsewhere while running (e.g. cancelled); result discarded");
        if prev == Some(JobState::Cancelled) {
            publish(
                shared,
                &JobEvent::Cancelled {
                    job_id: order.job_id.clone(),
                    at_step: Some(order.steps),
                },
                order.reply_to.as_deref(),
            )
            .await?;
        }
        return Ok(Settle::Ack);
    }
    // Counted the moment the success is recorded: a client that reads `succeeded`
    // never scrapes a count that lags it. A redelivered copy (e.g. after the done
    // event failed to publish) finds the job settled and does not count it again.
    shared.jobs_done.fetch_add(1, Ordering::Relaxed);
    let m = &shared.metrics;
    m.job("succeeded", &order.class, &order.model);
    m.observe(
        "queue_wait",
        &order.class,
        &order.model,
        queue_wait_ms as f64 / 1e3,
    );
    m.observe("generation", &order.class, &order.model, generate_ms as f64 / 1e3);
    m.observe(
        "end_to_end",
        &order.class,
        &order.model,
        end_to_end_ms as f64 / 1e3,
    );
    let ev = JobEvent::Done {
        job_id: order.job_id.clone(),
        result_url: url.clone(),
        worker: me.clone(),
        engine: shared.pool.info.kind.clone(),
        attempts,
        queue_wait_ms,
        generate_ms,
        store_ms,
        end_to_end_ms,
        timings: timings_json,
        model_version: Some(model_version.clone()),
        resumed_from_step: resumed_from,
        gpu_seconds,
    };
    if let Err(e) = async {
        infra_retry!(
            shared,
            "publishing the done event",
            publish(shared, &ev, order.reply_to.as_deref()).await
        )
    }
    .instrument(info_span!("publish_done"))
    .await
    {
        // Let the redelivered copy publish it.
        let _ = shared
            .store
            .set_fields(&order.job_id, &[("event_until_ms", "0".into())])
            .await;
        return Err(e);
    }
    infra_retry!(
        shared,
        "recording the done event",
        shared
            .store
            .set_fields(&order.job_id, &[("event_published", "1".into())])
            .await
    )?;
    cleanup_checkpoints(shared, &order.job_id).await;
    if shared.pool.info.kind != "simulated" {
        // Calibrates the scheduler's cost model; the simulated engine's time is not a
        // model's, so it is not recorded.
        // Recorded per guidance pass, and only for runs of the shape the model's price assumes
        // (`cost::calibration_sample`).
        let steps_run = order.steps.saturating_sub(resumed_from.unwrap_or(0)).max(1);
        let ms = timings.denoise_ms / f64::from(steps_run);
        let tokens = ditfleet_common::cost::image_tokens(order.width, order.height);
        let true_cfg = if order.true_cfg() {
            order.true_cfg_scale
        } else {
            1.0
        };
        if let Some(ms) =
            ditfleet_common::cost::calibration_sample(&order.model, order.guidance, true_cfg, ms)
            && let Err(e) = shared.store.record_step_time(&order.model, tokens, ms).await
        {
            warn!(error = %e, "step time not recorded");
        }
    }
    info!(job_id = %order.job_id, generate_ms, store_ms, queue_wait_ms, end_to_end_ms, resumed_from_step = ?resumed_from, model_version = %model_version, url = %url, "job succeeded");
    Ok(Settle::Ack)
}

/// Removes a finished job's checkpoints and pointer (best effort: they expire with the job).
async fn cleanup_checkpoints(shared: &Shared, job_id: &str) {
    if let Err(e) = shared.results.delete_checkpoints(job_id).await {
        warn!(job_id = %job_id, error = %e, "checkpoints not removed");
    }
    let _ = shared
        .store
        .del_fields(job_id, &["checkpoint_step", "checkpoint_url", "checkpoint_plan"])
        .await;
}

async fn requeue(shared: &Shared, job_id: &str, reason: &str) -> Result<(), InfraError> {
    let reason = &public_reason(reason);
    infra_retry!(
        shared,
        "handing the job back",
        shared
            .store
            .transition(
                job_id,
                &[Some(JobState::Running)],
                JobState::Routed,
                Some(&shared.cfg.worker_id),
                &[("last_error", reason.to_string())],
            )
            .await
    )?;
    Ok(())
}

/// Records a terminal failure, copies the message to the DLQ, and announces it.
/// A permanent failure of a job this worker runs: logged, counted, recorded `failed` with the
/// reason, dead-lettered, acked.
async fn fail_permanently(
    shared: &Shared,
    delivery: &Delivery,
    order: &WorkOrder,
    reason: &str,
    me: &str,
) -> Result<Settle, InfraError> {
    error!(job_id = %order.job_id, reason = %reason, "job failed permanently");
    shared.metrics.job("failed", &order.class, &order.model);
    fail(
        shared,
        delivery,
        &order.job_id,
        JobState::Failed,
        reason,
        Some(me),
        order.reply_to.as_deref(),
    )
    .await?;
    Ok(Settle::Ack)
}

async fn fail(
    shared: &Shared,
    delivery: &Delivery,
    job_id: &str,
    state: JobState,
    reason: &str,
    owner: Option<&str>,
    reply_to: Option<&str>,
) -> Result<(), InfraError> {
    let reason = &public_reason(reason);
    let from = [
        None,
        Some(JobState::Queued),
        Some(JobState::Routed),
        Some(JobState::Running),
    ];
    infra_retry!(
        shared,
        "recording the failure",
        shared
            .store
            .transition(
                job_id,
                &from,
                state,
                owner,
                &[
                    ("error", reason.to_string()),
                    ("finished_ms", now_ms().to_string()),
                ],
            )
            .await
    )?;
    dead_letter(shared, delivery, job_id, reason).await?;
    publish(
        shared,
        &JobEvent::Failed {
            job_id: job_id.to_string(),
            state: state.to_string(),
            reason: reason.to_string(),
        },
        reply_to,
    )
    .await?;
    Ok(())
}

/// The fleet's event bus as this worker publishes on it.
fn events(shared: &Shared) -> EventBus {
    EventBus::new(
        shared.publisher.clone(),
        shared.topo.clone(),
        format!("worker {}", shared.cfg.worker_id),
    )
}

/// Copies the job to the DLQ: the JSON the backend submitted (kept in the job's record by the
/// scheduler), or, when Redis lost the record, the job rebuilt from the work order as JSON; the
/// work order's bytes only when they cannot be read (`x-ditfleet-body` says which).
async fn dead_letter(
    shared: &Shared,
    delivery: &Delivery,
    job_id: &str,
    reason: &str,
) -> Result<(), InfraError> {
    let submitted = match shared.store.get(job_id).await {
        Ok(h) => h.get("spec").cloned(),
        Err(e) => {
            debug!(job_id = %job_id, error = %e, "job record unreadable; dead-lettering the rebuilt job");
            None
        }
    };
    let (body, content_type, origin) = match (submitted, WorkOrder::decode(&delivery.data)) {
        (Some(spec), _) => (spec.into_bytes(), "application/json", "submitted"),
        (None, Ok(order)) => (
            serde_json::to_vec(&order.to_spec()).expect("job serialises"),
            "application/json",
            "rebuilt-from-work-order",
        ),
        (None, Err(_)) => (
            delivery.data.clone(),
            ditfleet_common::job::WORK_ORDER_CONTENT_TYPE,
            "work-order",
        ),
    };
    let extra = [("x-ditfleet-body", origin.to_string())];
    let bus = events(shared);
    infra_retry!(
        shared,
        "dead-lettering",
        bus.dead_letter(DeadLetter {
            job_id,
            reason,
            body: &body,
            content_type,
            key: ditfleet_common::events::DLQ_KEY_WORKER,
            extra: &extra,
        })
        .await
    )?;
    shared.metrics.dlq.inc();
    Ok(())
}

/// Publishes a job event under `job.<id>.<kind>` and, for terminal events, the job's reply_to key
/// (one implementation for the fleet: [`EventBus::publish`]).
async fn publish(shared: &Shared, ev: &JobEvent, reply_to: Option<&str>) -> Result<(), InfraError> {
    Ok(events(shared).publish(ev, reply_to).await?)
}

/// A redelivered message for a job that already succeeded: make sure its done event goes out
/// exactly once. If the worker that recorded the success is alive and still publishing (e.g.
/// retrying through a broker restart), wait for it; if it died before publishing, publish here.
async fn ensure_terminal_event(shared: &Shared, job_id: &str, state: JobState) -> Result<(), InfraError> {
    if state != JobState::Succeeded {
        return Ok(());
    }
    let me = &ditfleet_common::state::event_claimant(&shared.cfg.worker_id);
    loop {
        match infra_retry!(
            shared,
            "claiming the done event",
            shared.store.claim_event(job_id, me, EVENT_LEASE).await
        )? {
            EventClaim::Published => return Ok(()),
            EventClaim::Claimed => break,
            EventClaim::Held { owner, until_ms } => {
                debug!(job_id = %job_id, owner = %owner, "the worker that finished the job is publishing its done event; waiting");
                let wait = until_ms.saturating_sub(now_ms()).clamp(50, 500);
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
        }
    }
    let h = shared.store.get(job_id).await?;
    let num = |k: &str| h.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let ev = JobEvent::Done {
        job_id: job_id.to_string(),
        result_url: h.get("result_url").cloned().unwrap_or_default(),
        worker: h.get("worker").cloned().unwrap_or_default(),
        engine: h.get("engine").cloned().unwrap_or_default(),
        attempts: num("attempts") as u32,
        queue_wait_ms: num("queue_wait_ms"),
        generate_ms: num("generate_ms"),
        store_ms: num("store_ms"),
        end_to_end_ms: num("finished_ms").saturating_sub(num("submitted_ms")),
        timings: h
            .get("timings")
            .and_then(|t| serde_json::from_str(t).ok())
            .unwrap_or_default(),
        model_version: h.get("model_version_used").cloned().filter(|s| !s.is_empty()),
        resumed_from_step: h.get("resumed_from_step").and_then(|s| s.parse().ok()),
        gpu_seconds: h
            .get("gpu_seconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or_default(),
    };
    let reply_to = h
        .get("spec")
        .and_then(|s| serde_json::from_str::<JobSpec>(s).ok())
        .and_then(|s| s.reply_to);
    publish(shared, &ev, reply_to.as_deref()).await?;
    shared
        .store
        .set_fields(job_id, &[("event_published", "1".into())])
        .await?;
    cleanup_checkpoints(shared, job_id).await;
    Ok(())
}

fn ms_to_time(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(ms)
}

/// Spans for the engine's stages, measured on its blocking thread: `encode`, `denoise` with one
/// `step` span per denoising step, `decode`. `step_times` holds (step, time since the denoising
/// loop started, when the step ended).
fn record_engine_stages(
    gen_cx: &opentelemetry::Context,
    gen_started: std::time::SystemTime,
    timings: Option<&ditfleet_engine::StageTimings>,
    step_times: &[(u32, Duration, std::time::SystemTime)],
) {
    use opentelemetry::KeyValue;
    let ms = |v: f64| Duration::from_secs_f64(v.max(0.0) / 1e3);
    let denoise_start = step_times
        .first()
        .map(|(_, elapsed, at)| at.checked_sub(*elapsed).unwrap_or(*at));
    if let Some(t) = timings {
        telemetry::record_interval(
            gen_cx,
            "encode",
            gen_started,
            gen_started + ms(t.encode_ms),
            vec![],
        );
    }
    let Some(denoise_start) = denoise_start else {
        return;
    };
    let denoise_end = step_times.last().map(|(_, _, at)| *at).unwrap_or(denoise_start);
    let denoise_cx = telemetry::record_interval(
        gen_cx,
        "denoise",
        denoise_start,
        denoise_end,
        vec![KeyValue::new("steps", step_times.len() as i64)],
    );
    let mut prev = denoise_start;
    for (step, _, at) in step_times {
        telemetry::record_interval(
            &denoise_cx,
            "step",
            prev,
            *at,
            vec![KeyValue::new("step", i64::from(*step))],
        );
        prev = *at;
    }
    if let Some(t) = timings {
        telemetry::record_interval(
            gen_cx,
            "decode",
            denoise_end,
            denoise_end + ms(t.decode_ms),
            vec![],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(model: &str, scheduler: Option<&str>, loras: &[(&str, &str, f64)]) -> WorkOrder {
        let mut spec = JobSpec::parse(
            format!(
                r#"{{"schema_version":1,"job_id":"j","tenant":"t","model":"{model}","prompt":"p","width":512,"height":512}}"#
            )
            .as_bytes(),
        )
        .unwrap();
        spec.scheduler = scheduler.map(str::to_string);
        spec.loras = loras
            .iter()
            .map(|(n, v, s)| ditfleet_common::job::LoraSpec {
                name: n.to_string(),
                version: v.to_string(),
                scale: Some(*s),
            })
            .collect();
        spec.validate(&Default::default()).unwrap();
        WorkOrder::from_spec(&spec, "small", 1, 2)
    }

    #[test]
    fn recorded_timings_carry_the_precision_the_job_ran_at() {
        use ditfleet_engine::{Precision, StageTimings};
        let t = StageTimings {
            denoise_ms: 12.0,
            plan: Some("single".into()),
            ..Default::default()
        };
        let fp8 = timings_with_precision(&t, Precision::Fp8);
        assert_eq!(fp8["precision"], "fp8");
        assert_eq!(fp8["denoise_ms"], 12.0);
        assert_eq!(fp8["plan"], "single");
        assert_eq!(timings_with_precision(&t, Precision::Bf16)["precision"], "bf16");
    }

    #[test]
    fn checkpoint_plans_differ_by_sampler_and_lora_stack_and_keep_the_old_form_without_them() {
        let plain = plan(&order("flux-dev", None, &[]), "flux-dev@v1", "flux");
        assert_eq!(
            plain.split('|').count(),
            7,
            "the form older workers wrote: {plain}"
        );
        assert_eq!(
            plan(&order("flux-dev", Some("flow_euler"), &[]), "flux-dev@v1", "flux"),
            plain
        );
        let mut seen = std::collections::HashSet::new();
        for o in [
            order("sdxl-base", None, &[]),
            order("sdxl-base", Some("dpmpp_2m"), &[]),
            order("sdxl-base", Some("dpmpp_2m_karras"), &[]),
            order("sdxl-base", None, &[("a", "1", 1.0)]),
            order("sdxl-base", None, &[("a", "1", 0.5)]),
            order("sdxl-base", None, &[("a", "2", 1.0)]),
            order("sdxl-base", None, &[("a", "1", 1.0), ("b", "1", 1.0)]),
            order("sdxl-base", None, &[("b", "1", 1.0), ("a", "1", 1.0)]),
            order("flux-dev", None, &[("a", "1", 1.0)]),
        ] {
            let p = plan(&o, &format!("{}@v1", o.model), "simulated");
            assert!(seen.insert(p.clone()), "two jobs share the plan {p}");
        }
    }

    #[test]
    fn the_engines_request_carries_the_orders_sampler_and_lora_stack_in_order() {
        let o = order("sdxl-base", Some("euler_a"), &[("b", "2", -0.5), ("a", "1", 1.0)]);
        let r = request_of(&o, &[]);
        assert_eq!(r.scheduler.as_deref(), Some("euler_a"));
        assert_eq!(
            r.loras
                .iter()
                .map(|l| (l.name.as_str(), l.version.as_str(), l.scale))
                .collect::<Vec<_>>(),
            [("b", "2", -0.5), ("a", "1", 1.0)]
        );
        assert_eq!((r.steps, r.guidance), (30, 5.0));
        let f = request_of(&order("flux-dev", None, &[]), &[]);
        assert_eq!((f.scheduler.as_deref(), f.loras.len()), (Some("flow_euler"), 0));
    }
}
