//! AMQP topology: exchanges, queues and their arguments, declared idempotently by every service.
//!
//! ```text
//! backends ──▶ {ns}.submit (direct) ──▶ {ns}.submit (quorum queue) ──▶ scheduler
//! scheduler ──▶ {ns}.work (direct, key = class) ──▶ {ns}.work.<class> (quorum) ──▶ workers
//! any service ──▶ {ns}.dlx (fanout) ──▶ {ns}.dead (quorum, the DLQ)
//! workers/scheduler ──▶ {ns}.events (topic: job.<id>.progress|done|failed|cancelled, reply_to keys)
//! ```
//!
//! Every queue is a durable quorum queue with the DLX set, so a message the broker gives up on
//! (delivery limit) lands in the DLQ rather than vanishing. Quorum queues need the same arguments
//! on every declaration; change them only with a new queue name or a policy.

use lapin::options::{BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Consumer, ExchangeKind};

/// Routing key of submitted jobs on the submit exchange.
pub const SUBMIT_KEY: &str = "job";
/// Broker-side delivery limit of a work message (the worker's attempt counter stops sooner).
pub const WORK_DELIVERY_LIMIT: i64 = 20;
/// Broker-side delivery limit of a submit message. The scheduler rejects poison input itself
/// (validation → DLQ), so a submit message is only requeued for infrastructure failures (Redis
/// down, a routing claim held by a crashed replica); those must not lose the job, hence the high
/// limit, paired with exponential back-off in the scheduler.
pub const SUBMIT_DELIVERY_LIMIT: i64 = 1000;

/// Names derived from a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub ns: String,
}

impl Topology {
    pub fn new(ns: &str) -> Self {
        Self { ns: ns.to_string() }
    }
    pub fn submit_exchange(&self) -> String {
        format!("{}.submit", self.ns)
    }
    pub fn submit_queue(&self) -> String {
        format!("{}.submit", self.ns)
    }
    pub fn work_exchange(&self) -> String {
        format!("{}.work", self.ns)
    }
    pub fn work_queue(&self, class: &str) -> String {
        format!("{}.work.{class}", self.ns)
    }
    pub fn events_exchange(&self) -> String {
        format!("{}.events", self.ns)
    }
    pub fn dlx(&self) -> String {
        format!("{}.dlx", self.ns)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.ns)
    }

    fn quorum_args(&self, with_dlx: bool, delivery_limit: Option<i64>) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("quorum".into()),
        );
        if with_dlx {
            t.insert(
                ShortString::from("x-dead-letter-exchange"),
                AMQPValue::LongString(self.dlx().into()),
            );
        }
        if let Some(limit) = delivery_limit {
            t.insert(
                ShortString::from("x-delivery-limit"),
                AMQPValue::LongLongInt(limit),
            );
        }
        t
    }

    /// Declares everything; safe to call from every process at start-up.
    pub async fn declare(&self, ch: &Channel, classes: &[&str]) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let qdurable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.exchange_declare(
            self.dlx().as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(
            self.dead_queue().as_str().into(),
            qdurable,
            self.quorum_args(false, None),
        )
        .await?;
        ch.queue_bind(
            self.dead_queue().as_str().into(),
            self.dlx().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

        ch.exchange_declare(
            self.submit_exchange().as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
        ch.queue_declare(
            self.submit_queue().as_str().into(),
            qdurable,
            self.quorum_args(true, Some(SUBMIT_DELIVERY_LIMIT)),
        )
        .await?;
        ch.queue_bind(
            self.submit_queue().as_str().into(),
            self.submit_exchange().as_str().into(),
            SUBMIT_KEY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

        ch.exchange_declare(
            self.work_exchange().as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
        for class in classes {
            let q = self.work_queue(class);
            ch.queue_declare(
                q.as_str().into(),
                qdurable,
                self.quorum_args(true, Some(WORK_DELIVERY_LIMIT)),
            )
            .await?;
            ch.queue_bind(
                q.as_str().into(),
                self.work_exchange().as_str().into(),
                (*class).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }

        ch.exchange_declare(
            self.events_exchange().as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
        Ok(())
    }

    /// Subscribes to job events matching `pattern` (e.g. `job.<id>.*`, `job.#`) through an
    /// exclusive, auto-deleted queue. Subscribe before publishing the job so nothing is missed.
    /// Deliveries need no ack.
    pub async fn subscribe_events(&self, ch: &Channel, pattern: &str) -> lapin::Result<Consumer> {
        let q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        ch.queue_bind(
            q.name().clone(),
            self.events_exchange().as_str().into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        ch.basic_consume(
            q.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
    }
}
