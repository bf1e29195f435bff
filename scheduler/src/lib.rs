//! The ditfleet scheduler: consumes the submit queue, validates each job, dedupes it on `job_id`,
//! computes its class from the cost model and routes it to that class's work queue.
//!
//! Order of effects for one submitted message (each step idempotent, so a crash anywhere loses
//! nothing and a redelivery never runs a job twice):
//! 1. parse + validate; a bad job is recorded `failed` with its reason, copied to the DLQ with the
//!    reason in headers, announced as `job.<id>.failed`, then acked;
//! 2. create the job's Redis record as `queued` unless the id exists (duplicates stop here);
//! 3. publish the work order to `{ns}.work` with a publisher confirm (mandatory: no queue = error);
//! 4. move the record `queued → routed`;
//! 5. ack the submit message. Any Redis/AMQP failure before 5 nacks with requeue.

use std::sync::Arc;
use std::time::Duration;

use ditfleet_common::amqp::{self, Publisher, header_str, now_ms, persistent};
use ditfleet_common::config::SchedulerConfig;
use ditfleet_common::cost::job_cost;
use ditfleet_common::http::{self, Health};
use ditfleet_common::job::{JobError, JobEvent, JobSpec, Limits, WORK_ORDER_CONTENT_TYPE, WorkOrder};
use ditfleet_common::metrics::Metrics;
use ditfleet_common::state::{self, Created, JobState, JobStore};
use ditfleet_common::topology::Topology;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Scheduler failures that stop the service.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the submit consumer was cancelled by the broker")]
    ConsumerClosed,
    #[error("health/metrics endpoint: {0}")]
    Http(std::io::Error),
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
}

struct Ctx {
    metrics: Metrics,
    cfg: SchedulerConfig,
    topo: Topology,
    store: JobStore,
    publisher: Publisher,
    limits: Limits,
}

/// Runs until `shutdown` is cancelled (then drains in-flight messages) or a fatal error.
pub async fn run(cfg: SchedulerConfig, shutdown: CancellationToken) -> Result<(), SchedulerError> {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::new(&mut registry);
    let health = Arc::new(Health::default());
    if let Some(addr) = cfg.common.http_addr {
        http::serve(addr, health.clone(), Arc::new(registry), shutdown.clone())
            .await
            .map_err(SchedulerError::Http)?;
    }
    let topo = Topology::new(&cfg.common.namespace);
    let conn = amqp::connect(&cfg.common.amqp_url, "ditfleet-scheduler").await?;
    let store = JobStore::connect(&cfg.common.redis_url, &cfg.common.namespace, cfg.common.job_ttl).await?;
    let setup = conn.create_channel().await?;
    topo.declare(&setup, &cfg.classes.names()).await?;
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
    let mut consumer = consume_ch
        .basic_consume(
            topo.submit_queue().as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let limits = Limits {
        max_prompt_chars: cfg.max_prompt_chars,
    };
    info!(queue = %topo.submit_queue(), prefetch = cfg.prefetch, classes = ?cfg.classes.names(), "scheduler ready");
    let ctx = Arc::new(Ctx {
        metrics,
        cfg,
        topo,
        store,
        publisher,
        limits,
    });
    health.set_ready(true);
    let mut tasks = JoinSet::new();
    let result = loop {
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
                Some(Err(e)) => {
                    warn!(error = %e, "submit consumer error; waiting for recovery");
                    if let Err(e) = consume_ch.wait_for_recovery(e).await {
                        break Err(SchedulerError::Amqp(e));
                    }
                }
                None => break Err(SchedulerError::ConsumerClosed),
            }
        }
    };
    health.set_ready(false);
    info!(
        in_flight = tasks.len(),
        "scheduler stopping: cancelling consumer, finishing in-flight messages"
    );
    let _ = consume_ch
        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await;
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(25), drain)
        .await
        .is_err()
    {
        warn!("in-flight messages did not finish in 25 s; they are requeued by the broker");
    }
    let _ = conn.close(200, "scheduler shutdown".into()).await;
    result
}

async fn handle(ctx: &Ctx, delivery: Delivery) {
    let job_hint = delivery.properties.message_id().as_ref().map(|s| s.to_string());
    match route(ctx, &delivery).await {
        Ok(()) => {
            if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                warn!(error = %e, job_id = ?job_hint, "ack failed; the broker will redeliver and the dedupe absorbs it");
            }
        }
        Err(e) => {
            if matches!(e, HandleError::RouteInProgress(_)) {
                debug!(error = %e, "requeueing a concurrent duplicate");
            } else {
                error!(error = %e, job_id = ?job_hint, "routing failed; requeueing the submit message");
                tokio::time::sleep(amqp::requeue_delay(&delivery.properties, Duration::from_secs(10))).await;
            }
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
        }
    }
}

async fn route(ctx: &Ctx, delivery: &Delivery) -> Result<(), HandleError> {
    let received_ms = now_ms();
    let submitted_ms = header_str(&delivery.properties, "x-submitted-ms")
        .and_then(|s| s.parse().ok())
        .unwrap_or(received_ms);
    let spec = match JobSpec::parse(&delivery.data).and_then(|s| s.validate(&ctx.limits).map(|()| s)) {
        Ok(spec) => spec,
        Err(e) => return reject(ctx, delivery, &e).await,
    };
    let steps = spec.steps.unwrap_or_else(|| JobSpec::default_steps(&spec.model));
    let cost = job_cost(&spec.model, spec.width, spec.height, steps);
    let class = ctx.cfg.classes.classify(cost).to_string();
    let fingerprint = spec.fingerprint();
    let fields = [
        ("tenant", spec.tenant.clone()),
        ("model", spec.model.clone()),
        ("model_version", spec.model_version.clone().unwrap_or_default()),
        ("class", class.clone()),
        ("cost", cost.to_string()),
        ("width", spec.width.to_string()),
        ("height", spec.height.to_string()),
        ("steps", steps.to_string()),
        ("priority", format!("{:?}", spec.priority).to_lowercase()),
        ("submitted_ms", submitted_ms.to_string()),
        ("spec", serde_json::to_string(&spec).expect("spec serialises")),
    ];
    match ctx.store.create(&spec.job_id, &fingerprint, &fields).await? {
        Created::Created => {}
        Created::Resume => {
            info!(job_id = %spec.job_id, "resuming a job recorded but not yet published (an earlier attempt stopped)");
        }
        Created::RoutingElsewhere { remaining_ms } => {
            // Another copy is being routed right now (by this or another replica), or one that
            // crashed holds the claim. Hold this copy until the claim may have lapsed, then
            // requeue it: either the other copy published the job (this one is then a
            // duplicate) or this one takes over.
            tokio::time::sleep(Duration::from_millis(remaining_ms.min(state::ROUTING_LEASE_MS))).await;
            return Err(HandleError::RouteInProgress(spec.job_id.clone()));
        }
        Created::Exists {
            state,
            fingerprint: fp,
        } if fp == fingerprint => {
            ctx.metrics.job("duplicate", &class, &spec.model);
            info!(job_id = %spec.job_id, state = %state, "duplicate submission ignored (job_id is the idempotency key)");
            return Ok(());
        }
        Created::Exists { state, .. } => {
            let reason = format!(
                "job_id {:?} is already used by a different job (state {state}); choose a new job_id",
                spec.job_id
            );
            warn!(job_id = %spec.job_id, "conflicting reuse of job_id sent to the DLQ; the existing job is untouched");
            dead_letter(ctx, delivery, &spec.job_id, &reason).await?;
            return Ok(());
        }
    }
    // Mark routed before publishing, so a worker can never see the job before the scheduler's
    // record says where it went. A crash before `published` is set leaves the job routable by
    // the redelivered submit message (the CREATE script answers "resume").
    let (applied, prev) = ctx
        .store
        .transition(
            &spec.job_id,
            &[Some(JobState::Queued)],
            JobState::Routed,
            None,
            &[("routed_ms", now_ms().to_string())],
        )
        .await?;
    if !applied && prev != Some(JobState::Routed) {
        info!(job_id = %spec.job_id, state = ?prev, "job left the queue before routing (cancelled); not publishing");
        return Ok(());
    }
    let order = WorkOrder::from_spec(&spec, &class, cost, submitted_ms);
    let props = persistent(WORK_ORDER_CONTENT_TYPE)
        .with_message_id(spec.job_id.as_str().into())
        .with_priority(spec.priority.amqp())
        .with_timestamp(received_ms / 1000);
    ctx.publisher
        .publish(&ctx.topo.work_exchange(), &class, &order.encode(), props, true)
        .await?;
    ctx.store
        .set_fields(&spec.job_id, &[("published", "1".into())])
        .await?;
    ctx.metrics.job("routed", &class, &spec.model);
    ctx.metrics.observe(
        "route",
        &class,
        &spec.model,
        now_ms().saturating_sub(submitted_ms) as f64 / 1e3,
    );
    info!(job_id = %spec.job_id, class = %class, cost, tenant = %spec.tenant, "routed");
    Ok(())
}

/// Records a rejected job as `failed` (unless the id belongs to an existing job), copies the
/// message to the DLQ with the reason, and announces the failure.
async fn reject(ctx: &Ctx, delivery: &Delivery, err: &JobError) -> Result<(), HandleError> {
    let job_id = JobSpec::sniff_job_id(&delivery.data)
        .or_else(|| delivery.properties.message_id().as_ref().map(|s| s.to_string()))
        .filter(|id| ditfleet_common::job::valid_job_id(id))
        .unwrap_or_else(|| {
            format!(
                "invalid-{:016x}",
                JobSpec::derived_seed(&String::from_utf8_lossy(&delivery.data))
            )
        });
    let reason = err.to_string();
    let (recorded, prev) = ctx
        .store
        .transition(
            &job_id,
            &[None],
            JobState::Failed,
            None,
            &[
                ("error", reason.clone()),
                ("rejected_by", "scheduler".into()),
                ("finished_ms", now_ms().to_string()),
            ],
        )
        .await?;
    warn!(job_id = %job_id, reason = %reason, recorded, existing = ?prev, "job rejected");
    ctx.metrics.job("failed", "none", "none");
    dead_letter(ctx, delivery, &job_id, &reason).await?;
    if recorded {
        let ev = JobEvent::Failed {
            job_id: job_id.clone(),
            state: JobState::Failed.to_string(),
            reason,
        };
        publish_event(ctx, &ev).await?;
    }
    Ok(())
}

async fn dead_letter(ctx: &Ctx, delivery: &Delivery, job_id: &str, reason: &str) -> Result<(), HandleError> {
    let content_type = delivery
        .properties
        .content_type()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_else(|| "application/octet-stream".into());
    let props = persistent(&content_type)
        .with_message_id(job_id.into())
        .with_headers(amqp::headers(&[
            ("x-ditfleet-job-id", job_id.to_string()),
            ("x-ditfleet-reason", reason.to_string()),
            ("x-ditfleet-rejected-by", "scheduler".into()),
            ("x-ditfleet-rejected-ms", now_ms().to_string()),
        ]));
    ctx.publisher
        .publish(&ctx.topo.dlx(), "rejected", &delivery.data, props, true)
        .await?;
    ctx.metrics.dlq.inc();
    Ok(())
}

async fn publish_event(ctx: &Ctx, ev: &JobEvent) -> Result<(), HandleError> {
    let body = serde_json::to_vec(ev).expect("event serialises");
    ctx.publisher
        .publish(
            &ctx.topo.events_exchange(),
            &ev.routing_key(),
            &body,
            persistent("application/json"),
            false,
        )
        .await?;
    Ok(())
}
