//! The ends of a job the scheduler decides itself: expired on arrival, or rejected (recorded
//! `failed` with its reason, copied to the dead-letter queue, announced); and the answer to a
//! rejected copy of an existing job.

use super::{Ctx, HandleError};
use std::time::Duration;

use ditfleet_common::amqp::now_ms;
use ditfleet_common::events::{self, DeadLetter};
use ditfleet_common::job::{JobError, JobEvent, JobSpec, fnv1a};
use ditfleet_common::state::JobState;
use lapin::message::Delivery;
use tracing::{info, warn};

/// A job past its deadline on arrival: recorded `expired` (never routed) and announced.
pub(crate) async fn expire(
    ctx: &Ctx,
    spec: &JobSpec,
    class: &str,
    cost: u64,
    submitted_ms: u64,
) -> Result<(), HandleError> {
    let reason = format!(
        "deadline {} had passed when the scheduler received the job",
        spec.deadline.as_deref().unwrap_or("?")
    );
    let (applied, prev) = ctx
        .store
        .transition(
            &spec.job_id,
            &[None],
            JobState::Expired,
            None,
            &[
                ("error", reason.clone()),
                ("tenant", spec.tenant.clone()),
                ("model", spec.model.clone()),
                ("class", class.to_string()),
                ("cost", cost.to_string()),
                ("fingerprint", spec.fingerprint()),
                ("submitted_ms", submitted_ms.to_string()),
                ("finished_ms", now_ms().to_string()),
            ],
        )
        .await?;
    if !applied {
        info!(job_id = %spec.job_id, state = ?prev, "expired resubmission of an existing job ignored");
        return Ok(());
    }
    info!(job_id = %spec.job_id, reason = %reason, "job expired before routing");
    ctx.metrics.job("expired", class, &spec.model);
    publish_event(
        ctx,
        &JobEvent::Failed {
            job_id: spec.job_id.clone(),
            state: JobState::Expired.to_string(),
            reason,
        },
        spec.reply_to.as_deref(),
    )
    .await
}

/// Copies a rejected (rate-limited) job to the DLQ and announces the failure, once.
pub(crate) async fn announce_rejection(
    ctx: &Ctx,
    delivery: &Delivery,
    spec: &JobSpec,
    reason: &str,
) -> Result<(), HandleError> {
    dead_letter(ctx, delivery, &spec.job_id, reason).await?;
    publish_event(
        ctx,
        &JobEvent::Failed {
            job_id: spec.job_id.clone(),
            state: JobState::Failed.to_string(),
            reason: reason.to_string(),
        },
        spec.reply_to.as_deref(),
    )
    .await?;
    ctx.store
        .set_fields(&spec.job_id, &[("announced", "1".into())])
        .await?;
    Ok(())
}

pub(crate) fn ms_to_time(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(ms)
}

/// Records a rejected job as `failed` (unless the id belongs to an existing job), copies the
/// message to the DLQ with the reason, and announces the failure.
pub(crate) async fn reject(ctx: &Ctx, delivery: &Delivery, err: &JobError) -> Result<(), HandleError> {
    let job_id = JobSpec::sniff_job_id(&delivery.data)
        .or_else(|| delivery.properties.message_id().as_ref().map(|s| s.to_string()))
        .filter(|id| ditfleet_common::job::valid_job_id(id))
        .unwrap_or_else(|| format!("invalid-{:016x}", fnv1a(&delivery.data)));
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
    // Terminal events go to the job's reply_to when the body names a well-formed one.
    let reply_to = JobSpec::sniff_reply_to(&delivery.data);
    if recorded {
        let ev = JobEvent::Failed {
            job_id: job_id.clone(),
            state: JobState::Failed.to_string(),
            reason,
        };
        publish_event(ctx, &ev, reply_to.as_deref()).await?;
    } else {
        announce_rejected_copy(ctx, delivery, &job_id, &reason, reply_to.as_deref()).await?;
    }
    Ok(())
}

pub(crate) async fn dead_letter(
    ctx: &Ctx,
    delivery: &Delivery,
    job_id: &str,
    reason: &str,
) -> Result<(), HandleError> {
    let content_type = delivery
        .properties
        .content_type()
        .as_ref()
        .map(|s| s.to_string())
        .unwrap_or_else(|| "application/octet-stream".into());
    ctx.events
        .dead_letter(DeadLetter {
            job_id,
            reason,
            body: &delivery.data,
            content_type: &content_type,
            key: events::DLQ_KEY_SCHEDULER,
            extra: &[],
        })
        .await?;
    ctx.metrics.dlq.inc();
    Ok(())
}

async fn publish_event(ctx: &Ctx, ev: &JobEvent, reply_to: Option<&str>) -> Result<(), HandleError> {
    Ok(ctx.events.publish(ev, reply_to).await?)
}

/// Answers a rejected submission whose id belongs to an existing job: a `rejected` event (the
/// existing job's own events are untouched) on the job's keys and its `reply_to`.
pub(crate) async fn announce_rejected_copy(
    ctx: &Ctx,
    delivery: &Delivery,
    job_id: &str,
    reason: &str,
    reply_to: Option<&str>,
) -> Result<(), HandleError> {
    let ev = JobEvent::Rejected {
        job_id: job_id.to_string(),
        reason: reason.to_string(),
        body_hash: format!("{:016x}", fnv1a(&delivery.data)),
    };
    publish_event(ctx, &ev, reply_to).await
}
