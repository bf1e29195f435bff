//! The ditfleet scheduler: consumes the submit queue, validates each job, dedupes it on `job_id`,
//! applies the tenant's rate limit, computes its class from the (calibrated) cost model and the
//! live load, and routes it to that class's work queue for its priority (or its pinned version).
//!
//! Order of effects for one submitted message (each step idempotent, so a crash anywhere loses
//! nothing and a redelivery never runs a job twice):
//! 1. parse + validate; a bad job is recorded `failed` with its reason, copied to the DLQ with the
//!    reason in headers, announced as `job.<id>.failed`, then acked. A job already past its
//!    deadline is recorded `expired` and announced; a pin to a version no worker ever held is
//!    rejected like an invalid job;
//! 2. create the job's Redis record as `queued` unless the id exists (duplicates stop here),
//!    taking a token from the tenant's bucket in the same script (none left: recorded `failed`,
//!    reason in the DLQ and the failed event);
//! 3. move the record `queued → routed`;
//! 4. publish the work order to `{ns}.work` with a publisher confirm (mandatory: no queue = error);
//! 5. ack the submit message. Any Redis/AMQP failure before 5 nacks with requeue.
//!
//! Live load (workers' free slots, classes and held versions from Redis; queue depths from the
//! broker; measured step times) is refreshed every `DITFLEET_BALANCE_INTERVAL_MS` by one task and
//! read by every message; see [`ditfleet_common::cost::choose_class`].

use std::sync::Arc;
use std::time::Duration;

use ditfleet_common::amqp::{self, Publisher, now_ms};
use ditfleet_common::config::SchedulerConfig;
use ditfleet_common::cost::{Calibration, ClassLoad};
use ditfleet_common::events::EventBus;
use ditfleet_common::http::{self, Health, ServiceState};
use ditfleet_common::job::{KNOWN_MODELS, Limits};
use ditfleet_common::lora::{Manifest, Registry};
use ditfleet_common::metrics::Metrics;
use ditfleet_common::state::{JobStore, WorkerInfo};
use ditfleet_common::topology::Topology;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

mod admission;
mod precision;
mod rejection;
mod route;

use route::handle;

/// Scheduler failures that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the submit consumer was cancelled by the broker")]
    ConsumerClosed,
    #[error(
        "no working RabbitMQ connection and channels for {secs:.1} s (DITFLEET_BROKER_RECOVERY_TIMEOUT_MS); exiting for the supervisor to restart the scheduler"
    )]
    BrokerLost { secs: f64 },
    #[error("health/metrics endpoint: {0}")]
    Http(std::io::Error),
    #[error("LoRA registry (DITFLEET_LORA_REGISTRY): {0}")]
    Registry(String),
}

/// Failure handling one message; the message is requeued.
#[derive(Debug, thiserror::Error)]
enum HandleError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("publish: {0}")]
    Publish(#[from] amqp::PublishError),
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("job {0} is being routed by another delivery; retrying later")]
    RouteInProgress(String),
    #[error("reading the LoRA registry: {0}")]
    Registry(String),
}

struct Ctx {
    metrics: Metrics,
    cfg: SchedulerConfig,
    topo: Topology,
    store: JobStore,
    publisher: Publisher,
    events: EventBus,
    limits: Limits,
    live: std::sync::Mutex<Live>,
    /// Pinned-version queues declared by this process.
    pins_declared: tokio::sync::Mutex<std::collections::HashSet<String>>,
    /// The LoRA registry (`None`: jobs naming adapters are rejected).
    registry: Option<Registry>,
    /// Manifest lookups by `(name, version)`, each reused for `DITFLEET_LORA_MANIFEST_CACHE_MS`.
    manifests: std::sync::Mutex<ManifestCache>,
}

/// Manifest lookups by `(name, version)` with when they were made.
type ManifestCache = std::collections::HashMap<(String, String), (std::time::Instant, Option<Manifest>)>;

/// The fleet's load as last seen (refreshed by [`refresh_loop`]).
#[derive(Debug, Default)]
struct Live {
    calibration: Calibration,
    /// Live workers that take work (not draining).
    workers: Vec<WorkerInfo>,
    /// Jobs waiting per class (every priority), by class index.
    depth: Vec<u64>,
    /// Jobs this process routed to each class since the last refresh (not yet in `depth`).
    routed_since: Vec<u64>,
    /// Free slots this process used up by spilling since the last refresh.
    spilled_since: Vec<u64>,
}

impl Live {
    /// Load per class as a job of class `natural` sees it, from `workers` that pass `serves`
    /// (e.g. hold a pinned version). Another class's free slots count only workers that do not
    /// also consume `natural`: such a worker takes the job from its own queue once it is free, so
    /// moving the job there would only relabel it.
    fn loads(
        &self,
        classes: &[&str],
        natural: usize,
        serves: impl Fn(&WorkerInfo) -> bool,
    ) -> Vec<ClassLoad> {
        let consumes = |w: &WorkerInfo, c: &str| w.classes.iter().any(|wc| wc == c);
        let own = classes.get(natural).copied();
        classes
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut l = ClassLoad {
                    depth: self.depth.get(i).copied().unwrap_or(0)
                        + self.routed_since.get(i).copied().unwrap_or(0),
                    ..Default::default()
                };
                for w in self.workers.iter().filter(|w| serves(w)) {
                    if consumes(w, c) {
                        l.workers += 1;
                        if i == natural || !own.is_some_and(|o| consumes(w, o)) {
                            l.free += u64::from(w.free_slots);
                        }
                    }
                }
                l.free = l
                    .free
                    .saturating_sub(self.spilled_since.get(i).copied().unwrap_or(0));
                l
            })
            .collect()
    }
}

/// Refreshes [`Live`] until `stop`.
async fn refresh_loop(ctx: Arc<Ctx>, conn: Arc<lapin::Connection>, stop: CancellationToken) {
    let classes: Vec<String> = ctx.cfg.classes.names().iter().map(|s| s.to_string()).collect();
    let mut ch: Option<lapin::Channel> = None;
    let mut tick = tokio::time::interval(ctx.cfg.balance_interval);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut calibration = Calibration::default();
        for m in KNOWN_MODELS {
            match ctx.store.step_times(m).await {
                Ok(samples) => calibration.set(m, samples),
                Err(e) => debug!(error = %e, "calibration not refreshed"),
            }
        }
        let workers: Vec<WorkerInfo> = match ctx.store.workers().await {
            Ok(list) => list
                .iter()
                .filter_map(|(_, v)| serde_json::from_str::<WorkerInfo>(v).ok())
                // A draining worker takes no more work; a reconnecting one cannot consume now.
                .filter(|w| !matches!(w.state.as_str(), "draining" | "reconnecting"))
                .collect(),
            Err(e) => {
                debug!(error = %e, "worker list not refreshed");
                continue;
            }
        };
        if ch.as_ref().is_none_or(|c| !c.status().connected()) {
            ch = conn.create_channel().await.ok();
        }
        let mut depth = vec![0u64; classes.len()];
        if let Some(c) = &ch {
            'classes: for (i, class) in classes.iter().enumerate() {
                for q in ctx.topo.routed_queues(class) {
                    match amqp::passive_declare(c, &q).await {
                        Ok(queue) => depth[i] += u64::from(queue.message_count()),
                        Err(e) => {
                            debug!(error = %e, queue = %q, "queue depth not read");
                            break 'classes;
                        }
                    }
                }
            }
        }
        let mut live = ctx.live.lock().unwrap_or_else(|p| p.into_inner());
        live.calibration = calibration;
        live.workers = workers;
        live.depth = depth;
        live.routed_since = vec![0; classes.len()];
        live.spilled_since = vec![0; classes.len()];
    }
}

/// Runs until `shutdown` is cancelled (then drains in-flight messages) or a fatal error.
pub async fn run(cfg: SchedulerConfig, shutdown: CancellationToken) -> Result<(), SchedulerError> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let health = Arc::new(Health::default());
    // The scheduler loads nothing: it is started once its HTTP endpoint is up.
    health.set_loaded();
    if let Some(addr) = cfg.common.http_addr {
        http::serve(addr, health.clone(), Arc::new(registry), shutdown.clone())
            .await
            .map_err(SchedulerError::Http)?;
    }
    let topo = Topology::new(&cfg.common.namespace);
    let conn = Arc::new(amqp::connect_cfg(&cfg.common, "ditfleet-scheduler").await?);
    let store = JobStore::connect_cfg(&cfg.common).await?;
    let setup = conn.create_channel().await?;
    topo.declare(&setup, &cfg.classes.names()).await?;
    topo.declare_affinity_exchange(&setup).await?;
    let registry = match &cfg.lora_registry {
        Some(url) => Some(Registry::open(url).map_err(|e| SchedulerError::Registry(e.to_string()))?),
        None => None,
    };
    let poller = tokio::spawn(poll_queues(
        conn.clone(),
        store.clone(),
        topo.clone(),
        cfg.classes.names().iter().map(|c| c.to_string()).collect(),
        metrics.clone(),
        cfg.queue_poll,
        shutdown.clone(),
    ));
    let publisher = Publisher::new(&conn).await?;
    let consume_ch = conn.create_channel().await?;
    consume_ch
        .basic_qos(cfg.prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!(
        "scheduler-{}-{}",
        ditfleet_common::config::hostname_fallback(),
        std::process::id()
    );
    let consumer = consume_ch
        .basic_consume(
            topo.submit_queue().as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // A fleet upgraded from the submit queue's old name: drain that queue too (on a channel of
    // its own, so a refusal cannot close the main consumer's), and delete it once empty.
    let legacy = adopt_legacy_submit(&conn, &topo, cfg.prefetch, &tag).await;
    let legacy_ch = legacy.as_ref().map(|(ch, _)| ch.clone());
    let mut consumer: futures_util::stream::BoxStream<'static, lapin::Result<Delivery>> = match legacy {
        Some((_, old)) => futures_util::stream::select(consumer, old).boxed(),
        None => consumer.boxed(),
    };
    let limits = Limits {
        max_prompt_chars: cfg.max_prompt_chars,
    };
    info!(queue = %topo.submit_queue(), prefetch = cfg.prefetch, classes = ?cfg.classes.names(), spill = cfg.spill, tenant_limits = ?cfg.tenant_limits, lora_registry = %registry.as_ref().map_or("none".to_string(), |r| r.describe()), affinity_wait_ms = cfg.affinity_wait.map_or(0, |d| d.as_millis() as u64), "scheduler ready");
    let events = EventBus::new(publisher.clone(), topo.clone(), "scheduler");
    let ctx = Arc::new(Ctx {
        metrics,
        cfg,
        topo,
        store,
        events,
        publisher,
        limits,
        live: std::sync::Mutex::new(Live::default()),
        pins_declared: tokio::sync::Mutex::new(Default::default()),
        registry,
        manifests: std::sync::Mutex::new(Default::default()),
    });
    let refresh_stop = CancellationToken::new();
    let refresher = tokio::spawn(refresh_loop(ctx.clone(), conn.clone(), refresh_stop.clone()));
    health.set_serving();
    let mut tasks = JoinSet::new();
    // Watchdog of the broker link (see the worker's): readiness follows it, and a recovery that
    // has not brought the link back within the bound ends the process non-zero.
    let mut watch = amqp::LinkWatch::new(ctx.cfg.common.broker_recovery_timeout);
    let mut watch_tick = tokio::time::interval(watch.period());
    watch_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        health.beat();
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done { error!(error = %e, "message task panicked"); }
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let ctx = ctx.clone();
                    tasks.spawn(async move { handle(&ctx, delivery).await });
                }
                // Not waited for here (a wedged recovery would block the loop for good): the
                // watchdog below sees the link down and bounds the outage.
                Some(Err(e)) => warn!(error = %e, "submit consumer error; the connection is recovering"),
                None => break Err(SchedulerError::ConsumerClosed),
            },
            _ = watch_tick.tick() => {
                let up = amqp::link_up(&conn, &[&consume_ch, ctx.publisher.channel()])
                    && ctx.publisher.confirm_timeouts_in_a_row() < amqp::CONFIRM_TIMEOUTS_DOWN;
                match watch.observe(up) {
                    amqp::LinkState::Down(d) if d.is_zero() => {
                        health.set_state(ServiceState::Reconnecting);
                        warn!(connection = amqp::connection_state(&conn), consume_channel = amqp::channel_state(&consume_ch), publish_channel = amqp::channel_state(ctx.publisher.channel()), confirm_timeouts = ctx.publisher.confirm_timeouts_in_a_row(), bound_ms = ctx.cfg.common.broker_recovery_timeout.as_millis() as u64, "broker link down: not ready until it recovers");
                    }
                    amqp::LinkState::Up | amqp::LinkState::Down(_) => {}
                    amqp::LinkState::Recovered(d) => {
                        health.set_serving();
                        info!(down_ms = d.as_millis() as u64, "broker link recovered: consuming the submit queue again");
                    }
                    amqp::LinkState::Lost(d) => {
                        error!(down_ms = d.as_millis() as u64, connection = amqp::connection_state(&conn), consume_channel = amqp::channel_state(&consume_ch), publish_channel = amqp::channel_state(ctx.publisher.channel()), "broker link did not recover within the bound: exiting");
                        break Err(SchedulerError::BrokerLost { secs: d.as_secs_f64() });
                    }
                }
            }
        }
    };
    health.set_state(ServiceState::Draining);
    info!(
        in_flight = tasks.len(),
        "scheduler stopping: cancelling consumer, finishing in-flight messages"
    );
    // With the broker link lost nothing in flight can settle: a short wait, then exit (the
    // broker requeues the unacked messages when the connection closes).
    let (settle, drain_for) = if matches!(result, Err(SchedulerError::BrokerLost { .. })) {
        (Duration::from_secs(2), Duration::from_secs(5))
    } else {
        (Duration::from_secs(10), Duration::from_secs(25))
    };
    let _ = tokio::time::timeout(
        settle,
        consume_ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()),
    )
    .await;
    if let Some(ch) = &legacy_ch {
        let _ = tokio::time::timeout(
            settle,
            ch.basic_cancel(
                format!("{tag}-legacy").as_str().into(),
                BasicCancelOptions::default(),
            ),
        )
        .await;
    }
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(drain_for, drain).await.is_err() {
        warn!(
            wait_s = drain_for.as_secs(),
            "in-flight messages did not finish; they are requeued by the broker"
        );
    }
    // Whatever still runs waits on a broker that is not answering; the broker requeues its
    // messages when the connection goes, so nothing is lost by not waiting longer.
    tasks.abort_all();
    poller.abort();
    refresh_stop.cancel();
    let refresher_abort = refresher.abort_handle();
    if tokio::time::timeout(settle, refresher).await.is_err() {
        refresher_abort.abort();
    }
    let _ = tokio::time::timeout(settle, conn.close(200, "scheduler shutdown".into())).await;
    result
}

/// The submit queue under its old name (`{ns}.submit`, shared with the exchange), if it exists:
/// unbound from the submit exchange (no new jobs reach it), deleted when empty, else consumed
/// until it is (its jobs dedupe on `job_id` like any redelivery). `None` when there is nothing to
/// drain or this user may not touch it.
async fn adopt_legacy_submit(
    conn: &lapin::Connection,
    topo: &Topology,
    prefetch: u16,
    tag: &str,
) -> Option<(lapin::Channel, lapin::Consumer)> {
    let q = topo.legacy_submit_queue();
    let ch = conn.create_channel().await.ok()?;
    // A missing queue closes this channel: nothing to adopt.
    amqp::passive_declare(&ch, &q).await.ok()?;
    if let Err(e) = ch
        .queue_unbind(
            q.as_str().into(),
            topo.submit_exchange().as_str().into(),
            ditfleet_common::topology::SUBMIT_KEY.into(),
            FieldTable::default(),
        )
        .await
    {
        warn!(queue = %q, error = %e, "cannot unbind the submit queue's old name; leave it to an operator (docs/operations.md)");
        return None;
    }
    // Counted again after the unbind, so no routed message can arrive after the count. Quorum
    // queues refuse `if_empty` deletes (NOT_IMPLEMENTED, which closes the whole connection), so
    // the delete is plain and happens only when nothing is ready and nobody consumes: a scheduler
    // of the old version still draining it holds unacknowledged jobs a delete would lose.
    let declared = amqp::passive_declare(&ch, &q).await.ok()?;
    if declared.message_count() == 0 && declared.consumer_count() == 0 {
        let deleted = ch
            .queue_delete(q.as_str().into(), lapin::options::QueueDeleteOptions::default())
            .await;
        info!(queue = %q, deleted = deleted.is_ok(), "removed the empty submit queue of the old name");
        let _ = ch.close(200, "done".into()).await;
        return None;
    }
    ch.basic_qos(prefetch, BasicQosOptions::default()).await.ok()?;
    let consumer = ch
        .basic_consume(
            q.as_str().into(),
            format!("{tag}-legacy").as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .ok()?;
    info!(queue = %q, messages = declared.message_count(), "draining the submit queue of the old name (unbound; a later start deletes it once empty)");
    Some((ch, consumer))
}

/// Reads each queue's depth and consumer count with passive declares every `every`, into
/// `ditfleet_queue_depth` / `ditfleet_queue_consumers` (ready messages: a quorum queue's
/// declare-ok does not count unacknowledged ones). A class's series (`queue="work"`) covers its
/// three priority queues (`.high`, normal, `.low`): the depth is their sum, the consumer count
/// their maximum (every worker of the class consumes each level, so the maximum is the number of
/// workers serving it). Pinned-version queues (`.pin.<model>@<version>`, created on demand) are not
/// in `ditfleet_queue_depth`; their jobs are in `ditfleet_queue_oldest_age_seconds`, which reads the
/// class's queued set, whatever queue the order went to.
async fn poll_queues(
    conn: Arc<lapin::Connection>,
    store: JobStore,
    topo: Topology,
    classes: Vec<String>,
    metrics: Metrics,
    every: Duration,
    stop: CancellationToken,
) {
    let mut queues = vec![
        ("submit", "none".to_string(), vec![topo.submit_queue()]),
        ("dead", "none".to_string(), vec![topo.dead_queue()]),
    ];
    queues.extend(classes.iter().map(|c| ("work", c.clone(), topo.routed_queues(c))));
    let mut ch: Option<lapin::Channel> = None;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        for class in &classes {
            match store.oldest_queued(class).await {
                Ok(oldest) => {
                    let age = oldest.map_or(0.0, |ms| now_ms().saturating_sub(ms) as f64 / 1e3);
                    metrics
                        .queue_oldest_age
                        .get_or_create(&ditfleet_common::metrics::QueueLabels {
                            queue: "work".into(),
                            class: class.clone(),
                        })
                        .set(age);
                }
                Err(e) => debug!(class = %class, error = %e, "queue age poll failed"),
            }
        }
        'queues: for (role, class, names) in &queues {
            let (mut depth, mut consumers) = (0i64, 0i64);
            for name in names {
                let channel = match &ch {
                    Some(c) if c.status().connected() => c.clone(),
                    _ => match conn.create_channel().await {
                        Ok(c) => {
                            ch = Some(c.clone());
                            c
                        }
                        Err(e) => {
                            debug!(error = %e, "queue poll: no channel");
                            break 'queues;
                        }
                    },
                };
                match amqp::passive_declare(&channel, name).await {
                    Ok(q) => {
                        depth += i64::from(q.message_count());
                        consumers = consumers.max(i64::from(q.consumer_count()));
                    }
                    Err(e) => {
                        // A missing queue closes the channel; a new one is opened next time. A
                        // partial sum would understate the depth: leave the series as it was.
                        debug!(queue = %name, error = %e, "queue poll failed");
                        ch = None;
                        continue 'queues;
                    }
                }
            }
            let l = ditfleet_common::metrics::QueueLabels {
                queue: (*role).to_string(),
                class: class.clone(),
            };
            metrics.queue_depth.get_or_create(&l).set(depth);
            metrics.queue_consumers.get_or_create(&l).set(consumers);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::admission::pick_hot;
    use super::*;
    use ditfleet_common::cost::choose_class;
    use ditfleet_common::lora::stack_key;

    /// A live simulated worker of `flux-dev@sim-1` (also the fixture of `precision`'s tests).
    pub(crate) fn worker(id: &str, classes: &[&str], free_slots: u16) -> WorkerInfo {
        WorkerInfo {
            id: id.into(),
            host: "h".into(),
            pid: 1,
            state: "ready".into(),
            classes: classes.iter().map(|c| c.to_string()).collect(),
            slots: free_slots.max(1),
            free_slots,
            engine: "simulated".into(),
            engine_note: String::new(),
            models: vec!["flux-dev".into()],
            model_versions: vec!["flux-dev@sim-1".into()],
            model_precisions: Default::default(),
            default_versions: vec![],
            loading: vec![],
            load_error: None,
            degraded_reason: None,
            devices: vec![],
            gpus: vec![],
            parallel_degree: 1,
            jobs_done: 0,
            started_ms: 0,
            heartbeat_ms: 0,
            lora_stacks: vec![],
            lora_cached: vec![],
            affinity_queue: true,
        }
    }

    fn live(workers: Vec<WorkerInfo>, depth: Vec<u64>) -> Live {
        let n = depth.len();
        Live {
            workers,
            depth,
            routed_since: vec![0; n],
            spilled_since: vec![0; n],
            ..Default::default()
        }
    }

    const CLASSES: [&str; 3] = ["small", "medium", "large"];

    #[test]
    fn affinity_picks_a_worker_holding_the_exact_stack_for_the_class_and_model() {
        let mut a = worker("a", &["small"], 0);
        a.lora_stacks = vec!["px@1*0.8".into()];
        let mut b = worker("b", &["small"], 1);
        b.lora_stacks = vec!["px@1*0.8".into(), "other@2*1".into()];
        let mut old = worker("old", &["small"], 4);
        old.lora_stacks = vec!["px@1*0.8".into()];
        old.affinity_queue = false;
        let ws = vec![a.clone(), b, old];
        assert_eq!(
            pick_hot(&ws, "px@1*0.8", "small", "flux-dev").as_deref(),
            Some("b"),
            "most free slots"
        );
        assert_eq!(
            pick_hot(&ws, "other@2*1", "small", "flux-dev").as_deref(),
            Some("b")
        );
        assert_eq!(
            pick_hot(&ws, "px@1*1", "small", "flux-dev"),
            None,
            "another scale is another stack"
        );
        assert_eq!(
            pick_hot(&ws, "px@1*0.8", "large", "flux-dev"),
            None,
            "not of the class"
        );
        assert_eq!(
            pick_hot(&ws, "px@1*0.8", "small", "sdxl-base"),
            None,
            "not of the model"
        );
        assert_eq!(
            pick_hot(&[a], "px@1*0.8", "small", "flux-dev").as_deref(),
            Some("a"),
            "a busy hot worker is still preferred: the wait is bounded"
        );
        assert_eq!(
            stack_key([("px", "1", 0.8f64 as f32)]),
            "px@1*0.8",
            "the scheduler's f64 scale keys like the engine's f32"
        );
    }

    #[test]
    fn a_backlog_does_not_spill_to_a_class_whose_idle_worker_also_serves_the_jobs_own_class() {
        // One worker serving every class, one free slot, small already holds a job: the free
        // slot will take that small job, so the next one stays small (not relabelled medium).
        let l = live(vec![worker("all", &CLASSES, 1)], vec![1, 0, 0]);
        let loads = l.loads(&CLASSES, 0, |_| true);
        assert_eq!((loads[1].workers, loads[1].free), (1, 0), "{loads:?}");
        assert_eq!(choose_class(0, &loads), 0);
    }

    #[test]
    fn a_backlog_spills_up_to_an_idle_worker_that_serves_only_bigger_classes() {
        let l = live(
            vec![
                worker("small", &["small"], 0),
                worker("big", &["medium", "large"], 2),
            ],
            vec![3, 0, 0],
        );
        let loads = l.loads(&CLASSES, 0, |_| true);
        assert_eq!((loads[1].workers, loads[1].free), (1, 2), "{loads:?}");
        assert_eq!(choose_class(0, &loads), 1);
        // The same worker seen from a medium job counts its own free slots.
        let loads = l.loads(&CLASSES, 1, |_| true);
        assert_eq!((loads[1].free, loads[2].free), (2, 0), "{loads:?}");
        assert_eq!(choose_class(1, &loads), 1);
    }
}
