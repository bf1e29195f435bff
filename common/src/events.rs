//! The one implementation of the contract's outputs: job events on the events exchange and
//! entries in the dead-letter queue, used by the scheduler and the worker alike
//! (docs/message-contract.md, "Events" and "Rejections").
//!
//! Every event is JSON with an AMQP `message_id` ([`JobEvent::message_id`]), persistent, and
//! carries the current trace context (`traceparent`) when traces are on. Its routing key is the
//! fleet's own `job.<id>.<kind>`; terminal events also go to the job's `reply_to`, which the
//! contract confines to the `reply.` namespace, so a job can never make the fleet publish under
//! another job's keys. A `reply_to` that is not in that namespace (an order from an older
//! scheduler) is not published to, whoever wrote it.

use lapin::types::FieldTable;
use tracing::warn;

use crate::amqp::{self, PublishError, Publisher, now_ms, persistent};
use crate::job::{JobEvent, valid_reply_to};
use crate::telemetry;
use crate::topology::Topology;

/// Routing key on the DLX of entries the scheduler rejected.
pub const DLQ_KEY_SCHEDULER: &str = "rejected";
/// Routing key on the DLX of entries a worker gave up on.
pub const DLQ_KEY_WORKER: &str = "worker";

/// Publishes events and dead-letter entries for one service (`origin`: `scheduler` or
/// `worker <id>`, recorded in the DLQ's `x-ditfleet-rejected-by`).
#[derive(Debug, Clone)]
pub struct EventBus {
    publisher: Publisher,
    topo: Topology,
    origin: String,
}

/// What is copied to the DLQ: the job's body as the backend sent it (JSON) where it is known.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetter<'a> {
    pub job_id: &'a str,
    pub reason: &'a str,
    pub body: &'a [u8],
    pub content_type: &'a str,
    /// `DLQ_KEY_SCHEDULER` or `DLQ_KEY_WORKER`.
    pub key: &'a str,
    /// Extra headers (e.g. `x-ditfleet-body`).
    pub extra: &'a [(&'a str, String)],
}

impl EventBus {
    pub fn new(publisher: Publisher, topo: Topology, origin: impl Into<String>) -> Self {
        Self {
            publisher,
            topo,
            origin: origin.into(),
        }
    }

    pub fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// The AMQP properties of an event: JSON, persistent, its `message_id`, the trace context.
    pub fn properties(ev: &JobEvent) -> lapin::BasicProperties {
        let mut headers = FieldTable::default();
        telemetry::inject_current(&mut headers);
        persistent("application/json")
            .with_message_id(ev.message_id().as_str().into())
            .with_app_id("ditfleet".into())
            .with_headers(headers)
    }

    /// Publishes `ev` under `job.<id>.<kind>` and, for terminal events, under `reply_to` too
    /// (only a key of the `reply.` namespace). Waits for the broker's confirms.
    pub async fn publish(&self, ev: &JobEvent, reply_to: Option<&str>) -> Result<(), PublishError> {
        let body = serde_json::to_vec(ev).expect("event serialises");
        let exchange = self.topo.events_exchange();
        let props = Self::properties(ev);
        self.publisher
            .publish(&exchange, &ev.routing_key(), &body, props.clone(), false)
            .await?;
        match reply_to {
            Some(key) if ev.is_terminal() && valid_reply_to(key) => {
                self.publisher
                    .publish(&exchange, key, &body, props, false)
                    .await?;
            }
            Some(key) if ev.is_terminal() => {
                warn!(job_id = %ev.job_id(), reply_to = %key, "reply_to outside the reply. namespace; not published there");
            }
            _ => {}
        }
        Ok(())
    }

    /// Copies a job to the DLQ with the reason in its headers (`x-ditfleet-job-id`,
    /// `x-ditfleet-reason`, `x-ditfleet-rejected-by`, `x-ditfleet-rejected-ms`).
    pub async fn dead_letter(&self, d: DeadLetter<'_>) -> Result<(), PublishError> {
        let mut pairs = vec![
            ("x-ditfleet-job-id", d.job_id.to_string()),
            ("x-ditfleet-reason", d.reason.to_string()),
            ("x-ditfleet-rejected-by", self.origin.clone()),
            ("x-ditfleet-rejected-ms", now_ms().to_string()),
        ];
        pairs.extend(d.extra.iter().cloned());
        let mut headers = amqp::headers(&pairs);
        telemetry::inject_current(&mut headers);
        let props = persistent(d.content_type)
            .with_message_id(d.job_id.into())
            .with_headers(headers);
        self.publisher
            .publish(&self.topo.dlx(), d.key, d.body, props, true)
            .await
    }
}
