//! One submitted message, in the order of effects the crate's documentation lists: parse and
//! validate, admit, dedupe on `job_id` with the tenant's rate limit, choose the class, publish the
//! work order (to the hot worker's affinity queue or the class queue); then ack, or nack with
//! requeue on any Redis/AMQP failure before the ack.

use std::time::Duration;

use ditfleet_common::amqp::{self, header_str, now_ms, persistent};
use ditfleet_common::cost::{choose_class, spec_cost};
use ditfleet_common::job::{FieldError, JobError, JobSpec, WORK_ORDER_CONTENT_TYPE, WorkOrder, deadline_ms};
use ditfleet_common::state::{self, Created, JobState, RateLimit};
use ditfleet_common::telemetry;
use ditfleet_common::topology::Topology;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tracing::{Instrument, debug, error, info, warn};

use super::admission::{admit, hot_worker};
use super::rejection::{announce_rejected_copy, announce_rejection, dead_letter, expire, ms_to_time, reject};
use super::{Ctx, HandleError, precision};
pub(crate) async fn handle(ctx: &Ctx, delivery: Delivery) {
    let job_hint = delivery.properties.message_id().as_ref().map(|s| s.to_string());
    let span = tracing::info_span!(
        "route",
        job_id = job_hint.as_deref().unwrap_or(""),
        class = tracing::field::Empty,
        otel.kind = "consumer",
        messaging.system = "rabbitmq",
    );
    telemetry::set_parent_from_message(&span, &delivery.properties);
    handle_in_span(ctx, delivery, job_hint).instrument(span).await
}

async fn handle_in_span(ctx: &Ctx, delivery: Delivery, job_hint: Option<String>) {
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
    telemetry::record_interval(
        &telemetry::context_of(&tracing::Span::current()),
        "queue_wait",
        ms_to_time(submitted_ms),
        ms_to_time(received_ms),
        vec![opentelemetry::KeyValue::new("queue", "submit")],
    );
    let spec = match JobSpec::parse(&delivery.data).and_then(|s| s.validate(&ctx.limits).map(|()| s)) {
        Ok(spec) => spec,
        Err(e) => return reject(ctx, delivery, &e).await,
    };
    let mut pin = spec.model_version.as_ref().map(|v| format!("{}@{v}", spec.model));
    if let Err(e) = admit(ctx, &spec, pin.as_deref()).await? {
        return reject(ctx, delivery, &e).await;
    }
    // Adapters are merged only into bf16 versions: keep the job off fp8 ones (precision.rs).
    let mut lora_pin = None;
    if !spec.loras.is_empty() {
        let chosen = {
            let live = ctx.live.lock().unwrap_or_else(|p| p.into_inner());
            precision::lora_version(&live.workers, &spec.model, pin.as_deref())
        };
        match chosen {
            Ok(None) => {}
            Ok(Some(mv)) => {
                info!(job_id = %spec.job_id, model_version = %mv, "a live worker runs unpinned jobs of the model in fp8: pinning the adapter job to a bf16 version");
                lora_pin = Some(mv.clone());
                pin = Some(mv);
            }
            Err(reason) => {
                let e = JobError::Invalid(vec![FieldError {
                    field: Some("loras"),
                    reason,
                }]);
                return reject(ctx, delivery, &e).await;
            }
        }
    }
    let steps = spec.steps.unwrap_or_else(|| JobSpec::default_steps(&spec.model));
    let names = ctx.cfg.classes.names();
    let (cost, natural, chosen) = {
        let mut live = ctx.live.lock().unwrap_or_else(|p| p.into_inner());
        // Model factor (calibrated where measured) and guidance passes: cost::spec_cost.
        let cost = spec_cost(&spec, &live.calibration);
        let natural = ctx.cfg.classes.classify_index(cost);
        let chosen = if ctx.cfg.spill && !live.workers.is_empty() {
            let loads = live.loads(&names, natural, |w| match &pin {
                Some(mv) => w.model_versions.contains(mv),
                None => w.models.contains(&spec.model),
            });
            choose_class(natural, &loads)
        } else {
            natural
        };
        if live.routed_since.len() == names.len() {
            live.routed_since[chosen] += 1;
            if chosen != natural {
                live.spilled_since[chosen] += 1;
            }
        }
        (cost, natural, chosen)
    };
    let class = names[chosen].to_string();
    tracing::Span::current().record("class", class.as_str());
    if chosen != natural {
        info!(job_id = %spec.job_id, natural = names[natural], class = %class, "class backlogged while a bigger class idles: spilling up");
    }
    if let Some(deadline) = deadline_ms(spec.deadline.as_deref())
        && deadline < received_ms
    {
        return expire(ctx, &spec, &class, cost, submitted_ms).await;
    }
    let fingerprint = spec.fingerprint();
    let fields = [
        ("tenant", spec.tenant.clone()),
        ("model", spec.model.clone()),
        ("model_version", spec.model_version.clone().unwrap_or_default()),
        // The bf16 version an unpinned adapter job was pinned to (precision.rs), else empty.
        ("routed_version", lora_pin.clone().unwrap_or_default()),
        ("class", class.clone()),
        ("natural_class", names[natural].to_string()),
        ("cost", cost.to_string()),
        ("width", spec.width.to_string()),
        ("height", spec.height.to_string()),
        ("steps", steps.to_string()),
        ("priority", spec.priority.as_str().to_string()),
        ("submitted_ms", submitted_ms.to_string()),
        // The body as the backend sent it (valid JSON, so UTF-8): a worker that gives up on the
        // job copies this to the DLQ.
        (
            "spec",
            String::from_utf8(delivery.data.clone())
                .unwrap_or_else(|_| serde_json::to_string(&spec).expect("spec serialises")),
        ),
    ];
    let limit = ctx.cfg.tenant_limits.for_tenant(&spec.tenant).map(|l| RateLimit {
        rate: l.rate,
        burst: l.burst,
    });
    match ctx
        .store
        .create(&spec.job_id, &fingerprint, &fields, &spec.tenant, limit)
        .await?
    {
        Created::Created => {}
        Created::RateLimited { reason } => {
            warn!(job_id = %spec.job_id, tenant = %spec.tenant, reason = %reason, "rate limited");
            ctx.metrics.job("rate_limited", &class, &spec.model);
            announce_rejection(ctx, delivery, &spec, &reason).await?;
            return Ok(());
        }
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
            state: JobState::Failed,
            fingerprint: fp,
        } if fp == fingerprint => {
            // A rate-limited job whose rejection may not have been announced (crash in between).
            let h = ctx.store.get(&spec.job_id).await?;
            if h.get("rejection").map(String::as_str) == Some("rate_limited")
                && h.get("announced").map(String::as_str) != Some("1")
            {
                let reason = h.get("error").cloned().unwrap_or_default();
                announce_rejection(ctx, delivery, &spec, &reason).await?;
            } else {
                info!(job_id = %spec.job_id, "duplicate submission of a failed job ignored");
            }
            return Ok(());
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
            announce_rejected_copy(ctx, delivery, &spec.job_id, &reason, spec.reply_to.as_deref()).await?;
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
    let mut order = WorkOrder::from_spec(&spec, &class, cost, submitted_ms);
    if let Some(mv) = &lora_pin {
        order.model_version = mv.split_once('@').map(|(_, v)| v.to_string());
    }
    // For the oldest-waiting-job age per class; a worker removes it when the order reaches it.
    ctx.store.mark_queued(&class, &spec.job_id, now_ms()).await?;
    // The trace context continues in the worker; x-routed-ms starts its queue-wait span.
    let mut headers = amqp::headers(&[("x-routed-ms", now_ms().to_string())]);
    telemetry::inject_current(&mut headers);
    let props = persistent(WORK_ORDER_CONTENT_TYPE)
        .with_message_id(spec.job_id.as_str().into())
        .with_priority(spec.priority.amqp())
        .with_timestamp(received_ms / 1000)
        .with_headers(headers);
    let key = match &pin {
        Some(mv) => {
            let q = ctx.topo.pin_queue(&class, mv);
            let mut declared = ctx.pins_declared.lock().await;
            if !declared.contains(&q) {
                ctx.topo.declare_pin(ctx.publisher.channel(), &class, mv).await?;
                declared.insert(q);
            }
            Topology::pin_key(&class, mv)
        }
        None => Topology::model_key(&class, &spec.model, spec.priority),
    };
    let body = order.encode();
    let hot = match (&pin, ctx.cfg.affinity_wait) {
        (None, Some(wait)) if !order.loras.is_empty() => hot_worker(ctx, &order, &class).map(|w| (w, wait)),
        _ => None,
    };
    let mut via = "class";
    if let Some((worker, wait)) = hot {
        // The order waits in the hot worker's affinity queue at most `wait`, then the broker
        // dead-letters it to the return exchange with this same routing key: the class queue.
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(
            ditfleet_common::topology::AFFINITY_HEADER.into(),
            lapin::types::AMQPValue::LongString(worker.as_str().into()),
        );
        let aprops = props
            .clone()
            .with_headers(headers)
            .with_expiration(wait.as_millis().to_string().as_str().into());
        match ctx
            .publisher
            .publish(&ctx.topo.affinity_exchange(), &key, &body, aprops, true)
            .await
        {
            Ok(()) => via = "affinity",
            // The worker's queue is gone (it never declared one, or it expired): as without affinity.
            Err(amqp::PublishError::Unroutable { .. }) => {
                debug!(job_id = %spec.job_id, worker = %worker, "no affinity queue for the hot worker; routing to the class queue");
            }
            Err(e) => return Err(e.into()),
        }
        if via == "affinity" {
            info!(job_id = %spec.job_id, worker = %worker, wait_ms = wait.as_millis() as u64, "routed to the worker holding the job's LoRA stack");
        }
    }
    if via == "class" {
        ctx.publisher
            .publish(&ctx.topo.work_exchange(), &key, &body, props, true)
            .await?;
    }
    if !order.loras.is_empty() {
        ctx.metrics
            .lora_affinity
            .get_or_create(&ditfleet_common::metrics::StateLabel { state: via.into() })
            .inc();
    }
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
    info!(job_id = %spec.job_id, class = %class, key = %key, via, cost, tenant = %spec.tenant, priority = spec.priority.as_str(), "routed");
    Ok(())
}
