//! The ditfleet worker service.
//!
//! Consumes the work queues of the classes it serves — one queue per priority level
//! (`{ns}.work.<class>.high`, `{ns}.work.<class>`, `{ns}.work.<class>.low`) plus the pinned-version
//! queues of the versions it holds (`{ns}.work.<class>.pin.<model>@<version>`) — into a local
//! priority buffer, and starts the highest-priority buffered job whenever a slot is free. Each job
//! is claimed in Redis with a lease, run through the engine on a blocking thread (with step
//! checkpoints and in-process retries of transient failures), its PNG stored, `succeeded`
//! recorded, the done event published, and only then acked. A worker killed mid-job leaves an
//! unacked message that the broker redelivers to another worker, which takes the job over once the
//! dead worker's lease has lapsed, resuming from its last checkpoint.
//!
//! Operator control (`ditfleetctl drain`, `ditfleetctl model load|unload`) is read from Redis every
//! `DITFLEET_CONTROL_POLL_MS`: a drain behaves like SIGTERM; desired model versions are reconciled
//! by the engine pool (see [`pool`]).
//!
//! Shutdown (SIGTERM, a drain, or `run`'s token): cancel the consumers, hand buffered jobs back,
//! let in-flight jobs finish within the grace period, stop the rest at their next step (saving a
//! checkpoint) and requeue them, deregister, exit.

pub mod engines;
pub mod gpus;
mod heartbeat;
mod job;
pub mod lora;
pub mod pool;
pub mod results;

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ditfleet_common::amqp::{self, Publisher, now_ms};
use ditfleet_common::config::WorkerConfig;
use ditfleet_common::cost::ClassTable;
use ditfleet_common::http::{self, Health, ServiceState};
use ditfleet_common::job::{Priority, parse_model_version};
use ditfleet_common::metrics::Metrics;
use ditfleet_common::state::JobStore;
use ditfleet_common::topology::Topology;
use futures_util::StreamExt;
use futures_util::stream::{BoxStream, SelectAll};
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, warn};

use crate::heartbeat::{heartbeat_loop, others_idle_now};
use crate::pool::EnginePool;
use crate::results::ResultStore;

/// Worker failures that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("engine: {0}")]
    Engine(#[from] ditfleet_engine::EngineError),
    #[error("result store: {0}")]
    Store(#[from] std::io::Error),
    #[error("the broker cancelled the consumers")]
    ConsumerClosed,
    #[error(
        "no working RabbitMQ connection, channels and consumers for {secs:.1} s (DITFLEET_BROKER_RECOVERY_TIMEOUT_MS); exiting for the supervisor to restart the worker"
    )]
    BrokerLost { secs: f64 },
    #[error("health/metrics endpoint: {0}")]
    Http(std::io::Error),
}

/// State shared by the worker's tasks.
pub(crate) struct Shared {
    pub metrics: Metrics,
    pub health: Arc<Health>,
    pub cfg: WorkerConfig,
    pub topo: Topology,
    pub store: JobStore,
    pub results: Box<dyn ResultStore>,
    pub publisher: Publisher,
    pub pool: EnginePool,
    pub slots: Arc<Semaphore>,
    /// Notified when a task gives its slot back before it ends (see [`job::Slot`]).
    pub slot_freed: Arc<tokio::sync::Notify>,
    /// Set when the grace period has passed: running jobs stop at their next step and requeue.
    pub abort: Arc<AtomicBool>,
    pub draining: AtomicBool,
    /// Set while the broker link is down (connection or channels recovering, a consumer gone):
    /// advertised as state `reconnecting`, so the scheduler counts no free slots here.
    pub reconnecting: AtomicBool,
    pub jobs_done: AtomicU64,
    /// Jobs this process is running now (a second delivery of one of them is a duplicate).
    pub running: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Why the worker serves with reduced capacity (advertised as state `degraded`); see
    /// [`Shared::degrade`].
    pub degraded: std::sync::Mutex<Option<String>>,
    /// Downloaded, verified LoRA adapters.
    pub lora: lora::LoraCache,
    /// The LoRA stack key of each running job (its engine holds that stack when the job ends).
    pub busy_stacks: std::sync::Mutex<HashMap<String, String>>,
    /// Asks the heartbeat for an early registration (a job ended, or the applied LoRA stacks
    /// changed).
    pub beat_now: tokio::sync::Notify,
    /// Whether another live worker of one of this worker's classes had a free slot at the last
    /// read of the store (each heartbeat, and [`heartbeat::others_idle_now`]).
    pub others_idle: AtomicBool,
    /// Until when (unix ms) the main loop polls the affinity queue: the heartbeat moves it to
    /// [`heartbeat::AFFINITY_LINGER`] ahead while it advertises a LoRA stack, the only time the
    /// scheduler routes orders to this worker's affinity queue.
    pub affinity_until_ms: AtomicU64,
}

/// The longest the main loop waits for one `basic.get` on the affinity queue.
const AFFINITY_GET_BOUND: Duration = Duration::from_secs(2);

/// Whether a delivery is a LoRA affinity order whose wait for its hot worker is over: dead-lettered
/// from an affinity queue on expiry (`x-first-death-*` headers) into the class queue it came from.
fn affinity_expired(topo: &Topology, d: &Delivery) -> bool {
    let prefix = topo.affinity_queue("");
    amqp::header_str(&d.properties, "x-first-death-reason").as_deref() == Some("expired")
        && amqp::header_str(&d.properties, "x-first-death-queue").is_some_and(|q| q.starts_with(&prefix))
}

impl Shared {
    /// Marks the worker degraded: `reason` is advertised and `lost_slots` slots are taken out of
    /// service for good (e.g. a quarantined GPU). Called after a job when the engine reports
    /// itself degraded.
    pub(crate) fn degrade(&self, reason: String, lost_slots: u16) {
        let forgotten = self.slots.forget_permits(usize::from(lost_slots));
        warn!(reason = %reason, lost_slots, forgotten, "worker degraded");
        self.health.set_degraded(reason.clone());
        *self.degraded.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }
}

/// A delivery waiting for a slot, ordered by priority, then arrival.
struct Buffered {
    rank: u8,
    seq: u64,
    delivery: Delivery,
}

impl PartialEq for Buffered {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}
impl Eq for Buffered {}
impl PartialOrd for Buffered {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
impl Ord for Buffered {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.rank.cmp(&other.rank).then_with(|| other.seq.cmp(&self.seq))
    }
}

fn rank(d: &Delivery) -> u8 {
    match Priority::from_amqp(*d.properties.priority()) {
        Priority::High => 2,
        Priority::Normal => 1,
        Priority::Low => 0,
    }
}

/// The worker's consumers: one per class and priority, plus one per class and held pinned version.
struct Consumers {
    channel: Channel,
    streams: SelectAll<BoxStream<'static, lapin::Result<Delivery>>>,
    tags: Vec<String>,
    /// Pinned-version queue → consumer tag.
    pinned: HashMap<String, String>,
    worker_id: String,
}

impl Consumers {
    async fn consume(&mut self, queue: &str, tag: String) -> lapin::Result<()> {
        let c: Consumer = self
            .channel
            .basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.streams.push(c.boxed());
        self.tags.push(tag);
        Ok(())
    }

    /// Consumes exactly the pinned queues of the versions in `held`.
    async fn sync_pinned(
        &mut self,
        topo: &Topology,
        classes: &[String],
        held: &[String],
    ) -> lapin::Result<()> {
        // queue → its routing key: the pinned queue of every held version, and the per-model
        // queues (every priority) of every model with a held version.
        let mut want = BTreeMap::new();
        let models: BTreeSet<&str> = held
            .iter()
            .filter_map(|mv| mv.split_once('@'))
            .map(|(m, _)| m)
            .collect();
        for class in classes {
            for mv in held {
                want.insert(topo.pin_queue(class, mv), Topology::pin_key(class, mv));
            }
            for m in &models {
                for p in Priority::ALL {
                    want.insert(
                        topo.model_queue_for(class, m, p),
                        Topology::model_key(class, m, p),
                    );
                }
            }
        }
        let gone: Vec<String> = self
            .pinned
            .keys()
            .filter(|q| !want.contains_key(*q))
            .cloned()
            .collect();
        for q in gone {
            if let Some(tag) = self.pinned.remove(&q) {
                info!(queue = %q, "no longer holding this version or model: leaving its queue");
                self.tags.retain(|t| t != &tag);
                self.channel
                    .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                    .await?;
            }
        }
        for (q, key) in want {
            if self.pinned.contains_key(&q) {
                continue;
            }
            topo.declare_work_queue(&self.channel, &q, &key).await?;
            let tag = format!("{}-{key}-{}", self.worker_id, now_ms());
            self.consume(&q, tag.clone()).await?;
            info!(queue = %q, "consuming jobs of a held model or version");
            self.pinned.insert(q, tag);
        }
        Ok(())
    }

    async fn cancel_all(&mut self) {
        for tag in std::mem::take(&mut self.tags) {
            let _ = self
                .channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
        self.pinned.clear();
    }
}

/// Desired model versions from the control hash: JSON list of `model@version`, the first of each
/// model its default.
fn desired_models(json: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
    let list: Vec<String> = serde_json::from_str(json).map_err(|e| format!("models: {e}"))?;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for mv in list {
        let (m, v) = parse_model_version(&mv)?;
        let e = out.entry(m).or_default();
        if !e.contains(&v) {
            e.push(v);
        }
    }
    Ok(out)
}

/// Runs the worker until `shutdown` is cancelled (or an operator drains it) and in-flight work is
/// settled.
pub async fn run(cfg: WorkerConfig, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let process_started = std::time::Instant::now();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    // GPU metrics (ditfleet_gpu_*) exist only where NVML works.
    let gpus = gpus::Gpus::init();
    let gpu_metrics = gpus::GpuMetrics::register_if_present(&gpus, &mut registry);
    let health = Arc::new(Health::default());
    // Served from the start: /healthz answers while the model loads, /startupz once it is loaded,
    // /readyz while consuming.
    let http_stop = CancellationToken::new();
    if let Some(addr) = cfg.common.http_addr {
        http::serve(addr, health.clone(), Arc::new(registry), http_stop.clone())
            .await
            .map_err(WorkerError::Http)?;
    }
    let classes: Vec<String> = if cfg.classes.is_empty() {
        ClassTable::default()
            .names()
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        cfg.classes.clone()
    };
    let urls = match (&cfg.result_public_url, cfg.result_presign) {
        (Some(base), _) => results::ResultUrls::Public(base.clone()),
        (None, Some(valid)) => results::ResultUrls::Presigned(valid),
        (None, None) => results::ResultUrls::Object,
    };
    let results: Box<dyn ResultStore> = results::open(cfg.result_url.as_deref(), &cfg.result_dir, urls)?;
    let lora_registry = match &cfg.lora_registry {
        Some(url) => Some(
            ditfleet_common::lora::Registry::open(url)
                .map_err(|e| std::io::Error::other(format!("LoRA registry {url}: {e}")))?,
        ),
        None => None,
    };
    let lora_cache = lora::LoraCache::open(lora_registry, &cfg.lora_cache_dir, cfg.lora_cache_bytes)
        .map_err(|e| std::io::Error::other(format!("LoRA cache {}: {e}", cfg.lora_cache_dir.display())))?;
    let engine_cfg = cfg.engine.clone();
    let devices = cfg.devices.clone();
    let slots = cfg.slots;
    // Model loading is its own trace (`load`), once per process. A SIGTERM while loading (or
    // autotuning) ends the process at once: the load cannot be interrupted, but nothing has been
    // taken from the queue yet, so there is nothing to hand back.
    let load = tokio::task::spawn_blocking(move || engines::build(&engine_cfg, slots, devices.as_deref()))
        .instrument(tracing::info_span!("load", slots = slots));
    let engines = tokio::select! {
        r = load => r.map_err(std::io::Error::other)??,
        _ = shutdown.cancelled() => {
            info!(worker = %cfg.worker_id, "shutdown requested while loading the models; exiting without waiting for the load");
            health.set_state(ServiceState::Stopped);
            http_stop.cancel();
            return Ok(());
        }
    };
    health.set_loaded();
    let builder: pool::Builder = {
        let (choice, devices, root) = (cfg.engine.clone(), cfg.devices.clone(), cfg.model_root.clone());
        Arc::new(move |model: &str, version: &str| {
            engines::build_version(
                &choice,
                model,
                version,
                slots,
                devices.as_deref(),
                root.as_deref(),
            )
        })
    };
    let pool = EnginePool::new(engines, builder, cfg.swap_mode);
    let holdings = pool.holdings();
    for mv in &holdings.held {
        let (model, version) = mv.split_once('@').unwrap_or((mv.as_str(), ""));
        metrics
            .model_loaded
            .get_or_create(&ditfleet_common::metrics::ModelLabels {
                model: model.into(),
                version: version.into(),
            })
            .set(1);
    }
    info!(engine = %pool.info.kind, note = %pool.info.note, models = ?holdings.held, precisions = ?holdings.precisions, devices = ?pool.info.devices, "engine ready");

    let topo = Topology::new(&cfg.common.namespace);
    let conn = amqp::connect_cfg(&cfg.common, &format!("ditfleet-worker {}", cfg.worker_id)).await?;
    let store = JobStore::connect_cfg(&cfg.common).await?;
    let setup = conn.create_channel().await?;
    let class_refs: Vec<&str> = classes.iter().map(String::as_str).collect();
    // Only the worker's part of the topology: a least-privileged worker user has no rights on
    // the submit exchange and queue (docs/operations.md, "RabbitMQ users").
    topo.declare_worker(&setup, &class_refs).await?;
    // LoRA affinity: this worker's queue, and the return path to the class queues.
    topo.declare_affinity(&setup, &cfg.worker_id, &class_refs).await?;
    let affinity_queue = topo.affinity_queue(&cfg.worker_id);
    let publisher = Publisher::new(&conn).await?;
    let consume_ch = conn.create_channel().await?;
    consume_ch
        .basic_qos(cfg.prefetch, BasicQosOptions::default())
        .await?;

    let shared = Arc::new(Shared {
        metrics,
        health,
        topo: topo.clone(),
        store,
        results,
        publisher,
        pool,
        slots: Arc::new(Semaphore::new(usize::from(cfg.slots))),
        slot_freed: Arc::new(tokio::sync::Notify::new()),
        abort: Arc::new(AtomicBool::new(false)),
        draining: AtomicBool::new(false),
        reconnecting: AtomicBool::new(false),
        jobs_done: AtomicU64::new(0),
        running: std::sync::Mutex::new(Default::default()),
        degraded: std::sync::Mutex::new(None),
        lora: lora_cache,
        busy_stacks: std::sync::Mutex::new(HashMap::new()),
        beat_now: tokio::sync::Notify::new(),
        others_idle: AtomicBool::new(false),
        affinity_until_ms: AtomicU64::new(0),
        cfg,
    });
    let gpus = Arc::new(std::sync::Mutex::new(gpus));
    let started_ms = now_ms();
    let background_stop = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat_loop(
        shared.clone(),
        classes.clone(),
        gpus,
        gpu_metrics,
        started_ms,
        background_stop.clone(),
    ));
    // A drain requested by an operator ends the main loop like SIGTERM.
    let drain_requested = CancellationToken::new();
    let control = tokio::spawn(control_loop(
        shared.clone(),
        drain_requested.clone(),
        background_stop.clone(),
    ));

    let mut consumers = Consumers {
        channel: consume_ch.clone(),
        streams: SelectAll::new(),
        tags: Vec::new(),
        pinned: HashMap::new(),
        worker_id: shared.cfg.worker_id.clone(),
    };
    for class in &classes {
        for p in Priority::ALL {
            let tag = format!("{}-{}", shared.cfg.worker_id, Topology::work_key(class, p));
            consumers.consume(&topo.work_queue_for(class, p), tag).await?;
        }
    }
    consumers
        .sync_pinned(&topo, &classes, &shared.pool.holdings().held)
        .await?;
    shared.health.set_serving();
    // Start-up time is paid for on every device of the worker.
    shared.metrics.device_time(
        "startup",
        process_started.elapsed().as_secs_f64() * total_devices(&shared),
    );
    info!(worker = %shared.cfg.worker_id, classes = ?classes, slots = shared.cfg.slots, prefetch = shared.cfg.prefetch, results = %shared.results.describe(), "worker ready");

    let mut buffer: BinaryHeap<Buffered> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut tasks = JoinSet::new();
    let mut sync_tick = tokio::time::interval(shared.cfg.control_poll);
    // Jobs waiting for this worker in its affinity queue are taken only when a slot is free (a
    // get, not a consumer: nothing waits in this process's buffer, so the broker's bound on the
    // wait holds and an order this worker cannot start soon goes to its class queue).
    let mut affinity_tick = tokio::time::interval(shared.cfg.affinity_poll);
    affinity_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Watchdog of the broker link: lapin's automatic recovery usually brings the connection,
    // channels and consumers back after an outage, but it can wedge (channels left
    // `Reconnecting` for good). Past the bound the worker exits non-zero instead of idling.
    let mut watch = amqp::LinkWatch::new(shared.cfg.common.broker_recovery_timeout);
    let mut watch_tick = tokio::time::interval(watch.period());
    watch_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        shared.health.beat();
        // Start the highest-priority buffered jobs while slots are free.
        while !buffer.is_empty() {
            let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
                break;
            };
            let b = buffer.pop().expect("buffer is not empty");
            let slot = job::Slot::new(shared.slots.clone(), shared.slot_freed.clone(), permit);
            let shared = shared.clone();
            tasks.spawn(async move { job::process(shared, b.delivery, slot).await });
        }
        tokio::select! {
            // A waiting task gave its slot back: start a buffered delivery on it.
            _ = shared.slot_freed.notified(), if !buffer.is_empty() => {}
            _ = affinity_tick.tick(), if !watch.is_down() => {
                // While a slot is free, take affinity jobs first: they wait for this worker. Every
                // call is bounded and made only while the link is up: a get issued as the broker
                // goes away can stay pending through lapin's recovery, and awaited here it would
                // stall this loop, its watchdog included (a worker that neither consumes nor exits).
                while shared.slots.available_permits() > 0
                    && now_ms() < shared.affinity_until_ms.load(Ordering::Relaxed)
                    && amqp::link_up(&conn, &[&consume_ch])
                {
                    let got = tokio::time::timeout(
                        AFFINITY_GET_BOUND,
                        consume_ch.basic_get(
                            affinity_queue.as_str().into(),
                            lapin::options::BasicGetOptions { no_ack: false },
                        ),
                    )
                    .await;
                    let got = match got {
                        Ok(got) => got,
                        Err(_) => {
                            warn!(queue = %affinity_queue, bound_ms = AFFINITY_GET_BOUND.as_millis() as u64, "affinity queue get unanswered; the link watchdog decides");
                            break;
                        }
                    };
                    match got {
                        Ok(Some(m)) => {
                            let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
                                // Taken meanwhile: back to the queue (its expiry is kept).
                                tokio::spawn(async move {
                                    let _ = m.delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                                });
                                break;
                            };
                            let slot = job::Slot::new(shared.slots.clone(), shared.slot_freed.clone(), permit);
                            let shared = shared.clone();
                            tasks.spawn(async move { job::process(shared, m.delivery, slot).await });
                        }
                        Ok(None) => break,
                        Err(e) => {
                            debug!(error = %e, queue = %affinity_queue, "affinity queue get failed");
                            break;
                        }
                    }
                }
            }
            _ = shutdown.cancelled() => break Ok(()),
            _ = drain_requested.cancelled() => {
                info!(worker = %shared.cfg.worker_id, "drain requested by an operator");
                break Ok(());
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done { error!(error = %e, "job task panicked"); }
                // A slot is free: advertise it now, not at the next tick, so that a busy worker
                // deciding where an expired affinity order goes (and the scheduler) see it.
                shared.beat_now.notify_one();
            }
            next = consumers.streams.next() => match next {
                Some(Ok(delivery)) => {
                    // An affinity order that already waited its bound for a busy hot worker must
                    // not wait again in this busy worker's buffer while another worker idles:
                    // back to the class queue for that one.
                    // Handed back at most twice (each return counts toward the delivery limit).
                    if shared.slots.available_permits() == 0
                        && amqp::delivery_count(&delivery.properties) < 2
                        && affinity_expired(&topo, &delivery)
                        && others_idle_now(&shared, &classes).await
                    {
                        info!(job_id = ?delivery.properties.message_id(), "affinity order past its wait reached this busy worker while another idles: handing it back");
                        tokio::spawn(async move {
                            let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                        });
                        continue;
                    }
                    seq += 1;
                    buffer.push(Buffered { rank: rank(&delivery), seq, delivery });
                }
                // Not waited for here (a wedged recovery would block the loop for good): the
                // watchdog below sees the link down and bounds the outage.
                Some(Err(e)) => warn!(error = %e, "work consumer error; the connection is recovering"),
                None => break Err(WorkerError::ConsumerClosed),
            },
            _ = watch_tick.tick() => {
                // A consumer whose stream ended (cancelled, not recovered) leaves `streams`.
                let up = amqp::link_up(&conn, &[&consume_ch, shared.publisher.channel()])
                    && consumers.streams.len() >= consumers.tags.len()
                    && shared.publisher.confirm_timeouts_in_a_row() < amqp::CONFIRM_TIMEOUTS_DOWN;
                match watch.observe(up) {
                    amqp::LinkState::Up => {}
                    amqp::LinkState::Down(d) if d.is_zero() => {
                        shared.reconnecting.store(true, Ordering::SeqCst);
                        shared.health.set_state(ServiceState::Reconnecting);
                        warn!(connection = amqp::connection_state(&conn), consume_channel = amqp::channel_state(&consume_ch), publish_channel = amqp::channel_state(shared.publisher.channel()), consumers = consumers.streams.len(), confirm_timeouts = shared.publisher.confirm_timeouts_in_a_row(), bound_ms = shared.cfg.common.broker_recovery_timeout.as_millis() as u64, "broker link down: not ready until it recovers");
                    }
                    amqp::LinkState::Down(_) => {}
                    amqp::LinkState::Recovered(d) => {
                        shared.reconnecting.store(false, Ordering::SeqCst);
                        shared.health.set_serving();
                        info!(down_ms = d.as_millis() as u64, "broker link recovered: consuming again");
                    }
                    amqp::LinkState::Lost(d) => {
                        error!(down_ms = d.as_millis() as u64, connection = amqp::connection_state(&conn), consume_channel = amqp::channel_state(&consume_ch), publish_channel = amqp::channel_state(shared.publisher.channel()), "broker link did not recover within the bound: exiting");
                        break Err(WorkerError::BrokerLost { secs: d.as_secs_f64() });
                    }
                }
            }
            _ = sync_tick.tick(), if !watch.is_down() => {
                let held = shared.pool.holdings().held;
                if let Err(e) = consumers.sync_pinned(&topo, &classes, &held).await {
                    warn!(error = %e, "updating the pinned-version consumers failed; retrying");
                }
            }
        }
    };

    // Drain: stop taking work, hand buffered jobs back, let running jobs finish within the grace.
    shared.draining.store(true, Ordering::SeqCst);
    shared.health.set_state(ServiceState::Draining);
    shared.metrics.set_worker_state("draining");
    // With the broker link lost, nothing below can reach the broker: settle nothing, stop the
    // running jobs at their next step (their checkpoints are kept) and exit. Closing the process
    // closes its connection; the broker redelivers every unacked message and the claim/lease
    // protocol lets the next holder take the jobs over.
    let broker_lost = matches!(result, Err(WorkerError::BrokerLost { .. }));
    let settle_bound = Duration::from_secs(5);
    let _ = tokio::time::timeout(settle_bound, consumers.cancel_all()).await;
    let handed_back = buffer.len();
    let _ = tokio::time::timeout(settle_bound, async {
        for b in buffer.drain() {
            let _ = b
                .delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
        }
    })
    .await;
    info!(
        in_flight = tasks.len(),
        handed_back,
        grace_s = shared.cfg.shutdown_grace.as_secs(),
        "draining"
    );
    let grace = if broker_lost {
        Duration::ZERO
    } else {
        shared.cfg.shutdown_grace
    };
    let finished = tokio::time::timeout(grace, async {
        while let Some(done) = tasks.join_next().await {
            if let Err(e) = done {
                error!(error = %e, "job task panicked");
            }
        }
    })
    .await;
    if finished.is_err() {
        warn!(
            in_flight = tasks.len(),
            "grace period over: stopping running jobs at their next step (with a checkpoint) and requeueing them"
        );
        shared.abort.store(true, Ordering::SeqCst);
        let after_abort = if broker_lost {
            settle_bound
        } else {
            Duration::from_secs(30)
        };
        if tokio::time::timeout(after_abort, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            warn!("jobs still running after abort; exiting, the broker requeues their messages");
        }
    }
    background_stop.cancel();
    let _ = heartbeat.await;
    let _ = control.await;
    if let Err(e) = shared.store.deregister_worker(&shared.cfg.worker_id).await {
        warn!(error = %e, "deregistration failed; the registration expires on its own");
    }
    if drain_requested.is_cancelled() {
        // The drain is done; a process started again under this id serves again.
        let _ = shared
            .store
            .control_del(Some(&shared.cfg.worker_id), "drain")
            .await;
    }
    let _ = tokio::time::timeout(settle_bound, conn.close(200, "worker shutdown".into())).await;
    shared.health.set_state(ServiceState::Stopped);
    http_stop.cancel();
    info!(worker = %shared.cfg.worker_id, jobs_done = shared.jobs_done.load(Ordering::Relaxed), "worker stopped");
    result
}

/// Devices of all slots (each slot's engine has its own plan of devices).
fn total_devices(shared: &Shared) -> f64 {
    (shared.pool.info.devices.len().max(1) * usize::from(shared.cfg.slots)) as f64
}

/// Reads operator control from Redis: a drain request, and the desired model versions (reconciled
/// by the engine pool, one swap at a time).
async fn control_loop(shared: Arc<Shared>, drain: CancellationToken, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.cfg.control_poll);
    let mut applied: Option<String> = None;
    let mut swap: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let ctl = match shared.store.control(&shared.cfg.worker_id).await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "reading operator control failed");
                continue;
            }
        };
        if ctl.get("drain").map(String::as_str) == Some("1") && !drain.is_cancelled() {
            drain.cancel();
        }
        if swap.as_ref().is_some_and(|h| !h.is_finished()) {
            continue;
        }
        let Some(models) = ctl.get("models").cloned() else {
            continue;
        };
        if applied.as_deref() == Some(models.as_str()) {
            continue;
        }
        applied = Some(models.clone());
        match desired_models(&models) {
            Ok(desired) => {
                let shared = shared.clone();
                swap = Some(tokio::spawn(async move {
                    shared.pool.reconcile(&desired).await;
                    let h = shared.pool.holdings();
                    info!(held = ?h.held, defaults = ?h.defaults, load_error = ?h.load_error, "model versions reconciled");
                }));
            }
            Err(e) => warn!(error = %e, models = %models, "ignoring unreadable desired model versions"),
        }
    }
    if let Some(h) = swap {
        let _ = h.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_models_group_versions_by_model_default_first() {
        let d = desired_models(r#"["flux-dev@v2","flux-dev@v1","flux-schnell@s1","flux-dev@v2"]"#).unwrap();
        assert_eq!(d["flux-dev"], ["v2", "v1"]);
        assert_eq!(d["flux-schnell"], ["s1"]);
        assert!(desired_models(r#"["sdxl@1"]"#).is_err());
        assert!(desired_models("nope").is_err());
    }

    #[test]
    fn desired_versions_that_are_not_plain_names_are_refused_before_any_folder_is_read() {
        // An fp8 build is one more version name.
        let d = desired_models(r#"["flux-dev@v2-fp8","flux-dev@tiny-random-7-fp8"]"#).unwrap();
        assert_eq!(d["flux-dev"], ["v2-fp8", "tiny-random-7-fp8"]);
        for hostile in [
            "..",
            "../v2",
            "v2/../..",
            "a/b",
            ".hidden",
            "ditfleet:job:victim",
            "job.victim.done@x",
            "",
        ] {
            let list = serde_json::to_string(&[format!("flux-dev@{hostile}")]).unwrap();
            assert!(desired_models(&list).is_err(), "{hostile:?} accepted");
        }
    }
}
