//! The worker's registration in the store, every `DITFLEET_HEARTBEAT_S` and as soon as a job ends
//! or its LoRA stack changes (what it holds and serves, its free slots, its GPUs), with the device
//! time sampled at the periodic ticks; and its view of the other workers, which decides whether an
//! expired affinity order goes back to an idle one.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ditfleet_common::amqp::now_ms;
use ditfleet_common::state::WorkerInfo;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{Shared, gpus};

/// How long the affinity queue is still polled after the worker last advertised a LoRA stack:
/// orders routed just before the scheduler saw the change are taken, and any left expire into
/// their class queue at their wait bound. A worker that holds no stack polls nothing (on a quorum
/// queue every `basic.get` is a Raft command: an idle worker would cost the broker ten a second).
pub(crate) const AFFINITY_LINGER: Duration = Duration::from_secs(30);

/// How long the dispatch loop waits for the fresh read of [`others_idle_now`].
const OTHERS_IDLE_READ_BOUND: Duration = Duration::from_millis(300);

/// Whether another worker of this one's classes is idle, read from the store now (bounded by
/// [`OTHERS_IDLE_READ_BOUND`]); the last heartbeat's answer when the read fails or is late. Asked
/// only when an expired affinity order reaches this busy worker: the heartbeat's answer can be a
/// whole period old, long enough to keep an order that an idle worker would start at once.
pub(crate) async fn others_idle_now(shared: &Shared, classes: &[String]) -> bool {
    match tokio::time::timeout(OTHERS_IDLE_READ_BOUND, read_others_idle(shared, classes)).await {
        Ok(Some(idle)) => {
            shared.others_idle.store(idle, Ordering::Relaxed);
            idle
        }
        _ => shared.others_idle.load(Ordering::Relaxed),
    }
}

/// Whether another live worker of one of `classes` has a free slot, by the registrations in the
/// store (each at most one heartbeat old: a worker also registers as soon as a job of it ends).
/// `None` when the store could not be read.
async fn read_others_idle(shared: &Shared, classes: &[String]) -> Option<bool> {
    match shared.store.workers().await {
        Ok(list) => Some(
            list.iter()
                .filter_map(|(_, v)| serde_json::from_str::<WorkerInfo>(v).ok())
                .any(|w| {
                    w.id != shared.cfg.worker_id
                        && w.free_slots > 0
                        && !matches!(w.state.as_str(), "draining" | "reconnecting")
                        && w.classes.iter().any(|c| classes.contains(c))
                }),
        ),
        Err(e) => {
            debug!(error = %e, "reading the other workers failed");
            None
        }
    }
}

pub(crate) async fn heartbeat_loop(
    shared: Arc<Shared>,
    classes: Vec<String>,
    gpus: Arc<std::sync::Mutex<gpus::Gpus>>,
    gpu_metrics: Option<gpus::GpuMetrics>,
    started_ms: u64,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(shared.cfg.heartbeat);
    let mut last = std::time::Instant::now();
    let per_slot = shared.pool.info.devices.len().max(1) as f64;
    loop {
        let ticked = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => true,
            _ = shared.beat_now.notified() => false,
        };
        let g = gpus.clone();
        let gm = gpu_metrics.clone();
        let gpu_list = tokio::task::spawn_blocking(move || {
            g.lock()
                .map(|g| {
                    if let Some(m) = &gm {
                        g.update_metrics(m);
                    }
                    g.list()
                })
                .unwrap_or_default()
        })
        .await
        .unwrap_or_default();
        let free = shared.slots.available_permits() as u16;
        // Busy and idle device time since the last tick, sampled by slot occupancy at the periodic
        // ticks only: an early registration comes right after a job ended or its stack changed,
        // and sampling there would book the interval the job ran in as idle.
        if ticked {
            let busy = shared.cfg.slots.saturating_sub(free);
            let dt = last.elapsed().as_secs_f64();
            last = std::time::Instant::now();
            shared
                .metrics
                .device_time("busy", dt * per_slot * f64::from(busy));
            shared
                .metrics
                .device_time("idle", dt * per_slot * f64::from(free));
        }
        let degraded = shared.degraded.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let state = if shared.draining.load(Ordering::SeqCst) {
            "draining"
        } else if shared.reconnecting.load(Ordering::SeqCst) {
            "reconnecting"
        } else if degraded.is_some() {
            "degraded"
        } else if free < shared.cfg.slots {
            "busy"
        } else {
            "ready"
        };
        shared.metrics.set_worker_state(state);
        let h = shared.pool.holdings();
        // The LoRA stacks held applied: idle engines' and, for busy ones, their job's.
        let statuses = shared.pool.idle_lora_statuses();
        let mut lora_stacks: Vec<String> = statuses
            .iter()
            .map(|s| {
                ditfleet_common::lora::stack_key(
                    s.applied
                        .iter()
                        .map(|l| (l.name.as_str(), l.version.as_str(), l.scale)),
                )
            })
            .chain(
                shared
                    .busy_stacks
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .cloned(),
            )
            .filter(|k| !k.is_empty())
            .collect();
        lora_stacks.sort();
        lora_stacks.dedup();
        if !lora_stacks.is_empty() {
            shared
                .affinity_until_ms
                .store(now_ms() + AFFINITY_LINGER.as_millis() as u64, Ordering::Relaxed);
        }
        let mut lora_cached: Vec<String> = statuses.iter().flat_map(|s| s.cached.iter().cloned()).collect();
        lora_cached.sort();
        lora_cached.dedup();
        let info = WorkerInfo {
            id: shared.cfg.worker_id.clone(),
            host: ditfleet_common::config::hostname_fallback(),
            pid: std::process::id(),
            state: state.into(),
            classes: classes.clone(),
            slots: shared.cfg.slots,
            free_slots: free,
            engine: shared.pool.info.kind.clone(),
            engine_note: shared.pool.info.note.clone(),
            models: {
                let mut m: Vec<String> = h
                    .held
                    .iter()
                    .map(|mv| mv.split('@').next().unwrap_or_default().to_string())
                    .collect();
                m.dedup();
                m
            },
            model_versions: h.held.clone(),
            model_precisions: h.precisions,
            default_versions: h.defaults,
            loading: h.loading,
            load_error: h.load_error,
            degraded_reason: degraded,
            devices: shared.pool.info.devices.clone(),
            gpus: gpu_list,
            parallel_degree: shared.pool.info.parallel_degree,
            jobs_done: shared.jobs_done.load(Ordering::Relaxed),
            started_ms,
            heartbeat_ms: now_ms(),
            lora_stacks,
            lora_cached,
            affinity_queue: true,
        };
        let json = serde_json::to_string(&info).expect("worker info serialises");
        if let Err(e) = shared
            .store
            .register_worker(&shared.cfg.worker_id, &json, shared.cfg.heartbeat * 3)
            .await
        {
            warn!(error = %e, "heartbeat failed");
        }
        if let Some(idle) = read_others_idle(&shared, &classes).await {
            shared.others_idle.store(idle, Ordering::Relaxed);
        }
        if let Err(e) = shared.store.add_known_versions(&h.held).await {
            warn!(error = %e, "recording held versions failed");
        }
    }
}
