//! The ditfleet worker service.
//!
//! Consumes the class queues it serves (per-consumer prefetch = its slots), claims each job in
//! Redis with a lease, runs it through the engine on a blocking thread, stores the PNG, records
//! `succeeded`, publishes the done event, and only then acks. A worker killed mid-job leaves an
//! unacked message that the broker redelivers to another worker, which takes the job over once
//! the dead worker's lease has lapsed.
//!
//! Shutdown (SIGTERM or `run`'s token): cancel the consumers, let in-flight jobs finish within
//! the grace period, stop the rest at their next step and requeue them, deregister, exit.

pub mod engines;
pub mod gpus;
mod job;
pub mod results;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ditfleet_common::amqp::{self, Publisher, now_ms};
use ditfleet_common::config::WorkerConfig;
use ditfleet_common::cost::ClassTable;
use ditfleet_common::http::{self, Health};
use ditfleet_common::metrics::Metrics;
use ditfleet_common::state::{JobStore, WorkerInfo};
use ditfleet_common::topology::Topology;
use ditfleet_engine::{Engine, EngineInfo};
use futures_util::StreamExt;
use futures_util::stream::SelectAll;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

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
    /// Idle engines; a job takes one for its duration.
    pub engines: Mutex<Vec<Box<dyn Engine>>>,
    pub engine_info: EngineInfo,
    pub slots: Arc<Semaphore>,
    /// Set when the grace period has passed: running jobs stop at their next step and requeue.
    pub abort: Arc<AtomicBool>,
    pub draining: AtomicBool,
    pub jobs_done: AtomicU64,
    /// Jobs this process is running now (a second delivery of one of them is a duplicate).
    pub running: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Runs the worker until `shutdown` is cancelled and in-flight work is settled.
pub async fn run(cfg: WorkerConfig, shutdown: CancellationToken) -> Result<(), WorkerError> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let health = Arc::new(Health::default());
    // Served from the start: /healthz answers while the model loads, /readyz once consuming.
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
    let results: Box<dyn ResultStore> = Box::new(results::LocalDirStore::new(&cfg.result_dir)?);
    let engine_cfg = cfg.engine.clone();
    let devices = cfg.devices.clone();
    let slots = cfg.slots;
    let engines = tokio::task::spawn_blocking(move || engines::build(&engine_cfg, slots, devices.as_deref()))
        .await
        .map_err(std::io::Error::other)??;
    let engine_info = engines[0].info();
    for mv in &engine_info.model_versions {
        let (model, version) = mv.split_once('@').unwrap_or((mv.as_str(), ""));
        metrics
            .model_loaded
            .get_or_create(&ditfleet_common::metrics::ModelLabels {
                model: model.into(),
                version: version.into(),
            })
            .set(1);
    }
    info!(engine = %engine_info.kind, note = %engine_info.note, models = ?engine_info.model_versions, devices = ?engine_info.devices, "engine ready");

    let topo = Topology::new(&cfg.common.namespace);
    let conn = amqp::connect(
        &cfg.common.amqp_url,
        &format!("ditfleet-worker {}", cfg.worker_id),
    )
    .await?;
    let store = JobStore::connect(&cfg.common.redis_url, &cfg.common.namespace, cfg.common.job_ttl).await?;
    let setup = conn.create_channel().await?;
    let class_refs: Vec<&str> = classes.iter().map(String::as_str).collect();
    topo.declare(&setup, &class_refs).await?;
    let publisher = Publisher::new(&conn).await?;
    let consume_ch = conn.create_channel().await?;
    consume_ch
        .basic_qos(cfg.slots, BasicQosOptions::default())
        .await?;

    let shared = Arc::new(Shared {
        metrics,
        health,
        topo: topo.clone(),
        store,
        results,
        publisher,
        engines: Mutex::new(engines),
        engine_info,
        slots: Arc::new(Semaphore::new(usize::from(cfg.slots))),
        abort: Arc::new(AtomicBool::new(false)),
        draining: AtomicBool::new(false),
        jobs_done: AtomicU64::new(0),
        running: std::sync::Mutex::new(Default::default()),
        cfg,
    });
    let gpus = Arc::new(std::sync::Mutex::new(gpus::Gpus::init()));
    let started_ms = now_ms();
    let heartbeat_stop = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat_loop(
        shared.clone(),
        classes.clone(),
        gpus,
        started_ms,
        heartbeat_stop.clone(),
    ));

    let mut consumers = SelectAll::new();
    let mut tags = Vec::new();
    for class in &classes {
        let tag = format!("{}-{class}", shared.cfg.worker_id);
        let c = consume_ch
            .basic_consume(
                topo.work_queue(class).as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push(c);
        tags.push(tag);
    }
    shared.health.set_ready(true);
    info!(worker = %shared.cfg.worker_id, classes = ?classes, slots = shared.cfg.slots, results = %shared.results.describe(), "worker ready");

    let mut tasks = JoinSet::new();
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done { error!(error = %e, "job task panicked"); }
            }
            next = consumers.next() => match next {
                Some(Ok(delivery)) => {
                    let shared = shared.clone();
                    tasks.spawn(async move { job::process(shared, delivery).await });
                }
                Some(Err(e)) => {
                    warn!(error = %e, "work consumer error; waiting for recovery");
                    if let Err(e) = consume_ch.wait_for_recovery(e).await {
                        break Err(WorkerError::Amqp(e));
                    }
                }
                None => break Err(WorkerError::ConsumerClosed),
            }
        }
    };

    // Drain: stop taking work, let running jobs finish within the grace period.
    shared.draining.store(true, Ordering::SeqCst);
    shared.health.set_ready(false);
    shared.metrics.set_worker_state("draining");
    for tag in &tags {
        let _ = consume_ch
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await;
    }
    info!(
        in_flight = tasks.len(),
        grace_s = shared.cfg.shutdown_grace.as_secs(),
        "draining"
    );
    let grace = shared.cfg.shutdown_grace;
    let finished = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        warn!(
            in_flight = tasks.len(),
            "grace period over: stopping running jobs at their next step and requeueing them"
        );
        shared.abort.store(true, Ordering::SeqCst);
        if tokio::time::timeout(Duration::from_secs(30), async {
            while tasks.join_next().await.is_some() {}
        })
        .await
        .is_err()
        {
            warn!("jobs still running after abort; exiting, the broker requeues their messages");
        }
    }
    heartbeat_stop.cancel();
    let _ = heartbeat.await;
    if let Err(e) = shared.store.deregister_worker(&shared.cfg.worker_id).await {
        warn!(error = %e, "deregistration failed; the registration expires on its own");
    }
    let _ = conn.close(200, "worker shutdown".into()).await;
    http_stop.cancel();
    info!(worker = %shared.cfg.worker_id, jobs_done = shared.jobs_done.load(Ordering::Relaxed), "worker stopped");
    result
}

async fn heartbeat_loop(
    shared: Arc<Shared>,
    classes: Vec<String>,
    gpus: Arc<std::sync::Mutex<gpus::Gpus>>,
    started_ms: u64,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(shared.cfg.heartbeat);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let g = gpus.clone();
        let gpu_list = tokio::task::spawn_blocking(move || g.lock().map(|g| g.list()).unwrap_or_default())
            .await
            .unwrap_or_default();
        let free = shared.slots.available_permits() as u16;
        let state = if shared.draining.load(Ordering::SeqCst) {
            "draining"
        } else if free < shared.cfg.slots {
            "busy"
        } else {
            "ready"
        };
        shared.metrics.set_worker_state(state);
        let info = WorkerInfo {
            id: shared.cfg.worker_id.clone(),
            host: ditfleet_common::config::hostname_fallback(),
            pid: std::process::id(),
            state: state.into(),
            classes: classes.clone(),
            slots: shared.cfg.slots,
            free_slots: free,
            engine: shared.engine_info.kind.clone(),
            engine_note: shared.engine_info.note.clone(),
            models: shared.engine_info.models.clone(),
            model_versions: shared.engine_info.model_versions.clone(),
            devices: shared.engine_info.devices.clone(),
            gpus: gpu_list,
            parallel_degree: shared.engine_info.parallel_degree,
            jobs_done: shared.jobs_done.load(Ordering::Relaxed),
            started_ms,
            heartbeat_ms: now_ms(),
        };
        let json = serde_json::to_string(&info).expect("worker info serialises");
        if let Err(e) = shared
            .store
            .register_worker(&shared.cfg.worker_id, &json, shared.cfg.heartbeat * 3)
            .await
        {
            warn!(error = %e, "heartbeat failed");
        }
    }
}
