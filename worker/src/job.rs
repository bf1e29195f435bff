//! One job from delivery to ack.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ditfleet_common::amqp::{self, now_ms, persistent};
use ditfleet_common::job::{JobEvent, WorkOrder};
use ditfleet_common::state::{Claim, JobState};
use ditfleet_engine::{Control, EngineError, GenerateRequest, StepEvent};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::Shared;

/// What to do with the delivery once the job is settled.
enum Settle {
    Ack,
    Requeue,
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

pub(crate) async fn process(shared: Arc<Shared>, delivery: Delivery) {
    let permit = match shared.slots.clone().acquire_owned().await {
        Ok(p) => p,
        Err(_) => return,
    };
    let settle = match handle(&shared, &delivery).await {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "infrastructure failure; requeueing the job");
            tokio::time::sleep(amqp::requeue_delay(&delivery.properties, Duration::from_secs(10))).await;
            Settle::Requeue
        }
    };
    let r = match settle {
        Settle::Ack => delivery.ack(BasicAckOptions::default()).await,
        Settle::Requeue => {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        }
    };
    if let Err(e) = r {
        warn!(error = %e, "settling the delivery failed; the broker redelivers it and the claim protocol absorbs the duplicate");
    }
    drop(permit);
}

async fn handle(shared: &Shared, delivery: &Delivery) -> Result<Settle, InfraError> {
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
            fail(shared, delivery, &job_id, JobState::Failed, &reason, None).await?;
            return Ok(Settle::Ack);
        }
    };
    let me = shared.cfg.worker_id.clone();
    if !shared
        .running
        .lock()
        .expect("running set")
        .insert(order.job_id.clone())
    {
        info!(job_id = %order.job_id, "job is already running in this worker; dropping the duplicate delivery");
        return Ok(Settle::Ack);
    }
    let _running = RunningGuard {
        shared,
        job_id: order.job_id.clone(),
    };
    let recreate = [
        ("tenant", order.tenant.clone()),
        ("model", order.model.clone()),
        ("class", order.class.clone()),
        ("cost", order.cost.to_string()),
        ("width", order.width.to_string()),
        ("height", order.height.to_string()),
        ("steps", order.steps.to_string()),
        ("submitted_ms", order.submitted_ms.to_string()),
        ("attempts", "0".into()),
    ];
    let wait_started = Instant::now();
    let attempts = loop {
        match shared
            .store
            .claim(
                &order.job_id,
                &me,
                shared.cfg.job_lease,
                shared.cfg.max_attempts,
                &recreate,
            )
            .await?
        {
            Claim::Claimed { attempts } => break attempts,
            Claim::Terminal(state) => {
                info!(job_id = %order.job_id, state = %state, "job already settled; dropping this delivery");
                ensure_terminal_event(shared, &order.job_id, state).await?;
                return Ok(Settle::Ack);
            }
            Claim::Exhausted { attempts } => {
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
                // Another worker holds a live lease. If the broker redelivered this message, the
                // holder's delivery is gone (it died): wait for its lease to lapse. Otherwise this
                // is a duplicate copy of a job that is running: drop it.
                if !delivery.redelivered || wait_started.elapsed() > shared.cfg.job_lease * 2 {
                    info!(job_id = %order.job_id, owner = %owner, "job is running on another worker; dropping the duplicate delivery");
                    return Ok(Settle::Ack);
                }
                let wait = lease_until_ms.saturating_sub(now_ms()).clamp(50, 1000);
                debug!(job_id = %order.job_id, owner = %owner, wait_ms = wait, "waiting for the previous holder's lease to lapse");
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
        }
    };
    let started_ms = now_ms();
    info!(job_id = %order.job_id, class = %order.class, attempt = attempts, steps = order.steps, size = %format!("{}x{}", order.width, order.height), "job started");
    run_claimed(shared, delivery, &order, attempts, started_ms).await
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

async fn run_claimed(
    shared: &Shared,
    delivery: &Delivery,
    order: &WorkOrder,
    attempts: u32,
    started_ms: u64,
) -> Result<Settle, InfraError> {
    let me = shared.cfg.worker_id.clone();
    let cancel = Arc::new(AtomicBool::new(false));
    // Lease renewal and cancellation watch.
    let watch_stop = tokio_util::sync::CancellationToken::new();
    let watcher = {
        let store = shared.store.clone();
        let job_id = order.job_id.clone();
        let me = me.clone();
        let lease = shared.cfg.job_lease;
        let cancel = cancel.clone();
        let stop = watch_stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(
                (lease / 3)
                    .max(Duration::from_millis(200))
                    .min(Duration::from_millis(1000)),
            );
            loop {
                tokio::select! { _ = stop.cancelled() => return, _ = tick.tick() => {} }
                match store.renew(&job_id, &me, lease).await {
                    Ok(Some(JobState::Running)) => {}
                    Ok(state) => {
                        info!(job_id = %job_id, state = ?state, "job left the running state (cancelled); stopping at the next step");
                        cancel.store(true, Ordering::SeqCst);
                    }
                    Err(e) => warn!(job_id = %job_id, error = %e, "lease renewal failed"),
                }
            }
        })
    };
    // Progress forwarding: engine thread → channel → events + Redis.
    let (tx, mut rx) = mpsc::unbounded_channel::<StepEvent>();
    let forwarder = {
        let job_id = order.job_id.clone();
        let me = me.clone();
        let store = shared.store.clone();
        let publisher = shared.publisher.clone();
        let exchange = shared.topo.events_exchange();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let e = JobEvent::Progress {
                    job_id: job_id.clone(),
                    step: ev.step,
                    total: ev.total,
                    elapsed_ms: ev.elapsed.as_millis() as u64,
                    worker: me.clone(),
                };
                let body = serde_json::to_vec(&e).expect("event serialises");
                if let Err(err) = publisher
                    .publish(
                        &exchange,
                        &e.routing_key(),
                        &body,
                        persistent("application/json"),
                        false,
                    )
                    .await
                {
                    warn!(job_id = %job_id, error = %err, "progress event not published");
                }
                let _ = store
                    .set_fields(&job_id, &[("progress", format!("{}/{}", ev.step, ev.total))])
                    .await;
            }
        })
    };

    let mut engine = shared.engines.lock().await.pop().expect("an engine per slot");
    let request = GenerateRequest {
        model: order.model.clone(),
        prompt: order.prompt.clone(),
        negative_prompt: order.negative_prompt.clone(),
        width: order.width,
        height: order.height,
        steps: order.steps,
        guidance: order.guidance,
        seed: order.seed,
    };
    let gen_started = Instant::now();
    let cancel_flag = cancel.clone();
    let abort = shared.abort.clone();
    let (engine_back, outcome) = tokio::task::spawn_blocking(move || {
        let mut on_step = |ev: StepEvent| {
            let _ = tx.send(ev);
            if cancel_flag.load(Ordering::SeqCst) || abort.load(Ordering::SeqCst) {
                Control::Cancel
            } else {
                Control::Continue
            }
        };
        let out = engine.generate(&request, &mut on_step).and_then(|img| {
            let png = img.to_png()?;
            Ok((img.timings, png))
        });
        (engine, out)
    })
    .await
    .expect("engine thread does not panic");
    shared.engines.lock().await.push(engine_back);
    let generate_ms = gen_started.elapsed().as_millis() as u64;
    let _ = forwarder.await;
    watch_stop.cancel();
    let _ = watcher.await;

    match outcome {
        Ok((timings, png)) => {
            let t = Instant::now();
            let url = shared.results.put(&order.job_id, png).await?;
            let store_ms = t.elapsed().as_millis() as u64;
            let finished_ms = now_ms();
            let queue_wait_ms = started_ms.saturating_sub(order.submitted_ms);
            let end_to_end_ms = finished_ms.saturating_sub(order.submitted_ms);
            let timings_json = serde_json::to_value(&timings).expect("timings serialise");
            let (applied, prev) = shared
                .store
                .transition(
                    &order.job_id,
                    &[Some(JobState::Running)],
                    JobState::Succeeded,
                    Some(&me),
                    &[
                        ("result_url", url.clone()),
                        ("finished_ms", finished_ms.to_string()),
                        ("engine", shared.engine_info.kind.clone()),
                        ("generate_ms", generate_ms.to_string()),
                        ("store_ms", store_ms.to_string()),
                        ("queue_wait_ms", queue_wait_ms.to_string()),
                        ("timings", timings_json.to_string()),
                        ("progress", format!("{}/{}", order.steps, order.steps)),
                    ],
                )
                .await?;
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
            let ev = JobEvent::Done {
                job_id: order.job_id.clone(),
                result_url: url.clone(),
                worker: me.clone(),
                engine: shared.engine_info.kind.clone(),
                attempts,
                queue_wait_ms,
                generate_ms,
                store_ms,
                end_to_end_ms,
                timings: timings_json,
            };
            publish(shared, &ev, order.reply_to.as_deref()).await?;
            shared
                .store
                .set_fields(&order.job_id, &[("event_published", "1".into())])
                .await?;
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
            info!(job_id = %order.job_id, generate_ms, store_ms, queue_wait_ms, end_to_end_ms, url = %url, "job succeeded");
            Ok(Settle::Ack)
        }
        Err(EngineError::Cancelled { step }) if !cancel.load(Ordering::SeqCst) => {
            // Stopped by the shutdown abort: hand the job back.
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
            warn!(job_id = %order.job_id, error = %e, attempt = attempts, "transient engine failure; requeueing");
            shared.metrics.job("requeued", &order.class, &order.model);
            shared.metrics.retries.inc();
            requeue(shared, &order.job_id, &e.to_string()).await?;
            Ok(Settle::Requeue)
        }
        Err(e) => {
            let reason = e.to_string();
            error!(job_id = %order.job_id, reason = %reason, "job failed permanently");
            shared.metrics.job("failed", &order.class, &order.model);
            fail(
                shared,
                delivery,
                &order.job_id,
                JobState::Failed,
                &reason,
                Some(&me),
            )
            .await?;
            Ok(Settle::Ack)
        }
    }
}

async fn requeue(shared: &Shared, job_id: &str, reason: &str) -> Result<(), InfraError> {
    shared
        .store
        .transition(
            job_id,
            &[Some(JobState::Running)],
            JobState::Routed,
            Some(&shared.cfg.worker_id),
            &[("last_error", reason.to_string())],
        )
        .await?;
    Ok(())
}

/// Records a terminal failure, copies the message to the DLQ, and announces it.
async fn fail(
    shared: &Shared,
    delivery: &Delivery,
    job_id: &str,
    state: JobState,
    reason: &str,
    owner: Option<&str>,
) -> Result<(), InfraError> {
    let from = [
        None,
        Some(JobState::Queued),
        Some(JobState::Routed),
        Some(JobState::Running),
    ];
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
        .await?;
    dead_letter(shared, delivery, job_id, reason).await?;
    publish(
        shared,
        &JobEvent::Failed {
            job_id: job_id.to_string(),
            state: state.to_string(),
            reason: reason.to_string(),
        },
        None,
    )
    .await?;
    Ok(())
}

async fn dead_letter(
    shared: &Shared,
    delivery: &Delivery,
    job_id: &str,
    reason: &str,
) -> Result<(), InfraError> {
    let props = persistent(ditfleet_common::job::WORK_ORDER_CONTENT_TYPE)
        .with_message_id(job_id.into())
        .with_headers(amqp::headers(&[
            ("x-ditfleet-job-id", job_id.to_string()),
            ("x-ditfleet-reason", reason.to_string()),
            (
                "x-ditfleet-rejected-by",
                format!("worker {}", shared.cfg.worker_id),
            ),
            ("x-ditfleet-rejected-ms", now_ms().to_string()),
        ]));
    shared
        .publisher
        .publish(&shared.topo.dlx(), "worker", &delivery.data, props, true)
        .await?;
    shared.metrics.dlq.inc();
    Ok(())
}

/// Publishes a job event under `job.<id>.<kind>` and, for terminal events, the job's reply_to key.
async fn publish(shared: &Shared, ev: &JobEvent, reply_to: Option<&str>) -> Result<(), InfraError> {
    let body = serde_json::to_vec(ev).expect("event serialises");
    let exchange = shared.topo.events_exchange();
    shared
        .publisher
        .publish(
            &exchange,
            &ev.routing_key(),
            &body,
            persistent("application/json"),
            false,
        )
        .await?;
    if let (Some(key), false) = (reply_to, matches!(ev, JobEvent::Progress { .. })) {
        shared
            .publisher
            .publish(&exchange, key, &body, persistent("application/json"), false)
            .await?;
    }
    Ok(())
}

/// A redelivered message for a job that already succeeded: make sure its done event went out
/// (the worker may have died between recording success and publishing).
async fn ensure_terminal_event(shared: &Shared, job_id: &str, state: JobState) -> Result<(), InfraError> {
    if state != JobState::Succeeded {
        return Ok(());
    }
    let h = shared.store.get(job_id).await?;
    if h.get("event_published").map(String::as_str) == Some("1") {
        return Ok(());
    }
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
    };
    publish(shared, &ev, None).await?;
    shared
        .store
        .set_fields(job_id, &[("event_published", "1".into())])
        .await?;
    Ok(())
}
