//! AMQP topology: exchanges, queues and their arguments, declared idempotently by every service.
//!
//! ```text
//! backends ──▶ {ns}.submit (direct) ──▶ {ns}.submit (quorum queue) ──▶ scheduler
//! scheduler ──▶ {ns}.work (direct) ──▶ {ns}.work.<class>[.high|.low] (quorum, one per priority)
//!                                   └─▶ {ns}.work.<class>.pin.<model>@<version> (pinned jobs)
//!                                                                              ──▶ workers
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

use crate::job::Priority;

/// Routing key of submitted jobs on the submit exchange.
pub const SUBMIT_KEY: &str = "job";
/// Broker-side delivery limit of a work message (the worker's attempt counter stops sooner).
pub const WORK_DELIVERY_LIMIT: i64 = 20;
/// Broker-side delivery limit of a submit message. The scheduler rejects poison input itself
/// (validation → DLQ), so a submit message is only requeued for infrastructure failures (Redis
/// down, a routing claim held by a crashed replica); those must not lose the job, hence the high
/// limit, paired with exponential back-off in the scheduler.
pub const SUBMIT_DELIVERY_LIMIT: i64 = 1000;

/// Who connects to RabbitMQ, for least-privilege users ([`Topology::permissions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Submits jobs (ditfleetctl submit, product backends) and may wait for their events.
    Backend,
    Scheduler,
    Worker,
}

/// RabbitMQ permission regexes of one user on the fleet's vhost (`rabbitmqctl set_permissions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    pub configure: String,
    pub write: String,
    pub read: String,
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                vec![c]
            } else {
                vec!['\\', c]
            }
        })
        .collect()
}

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
    /// The normal-priority work queue of a class (also its name before priorities existed).
    pub fn work_queue(&self, class: &str) -> String {
        format!("{}.work.{class}", self.ns)
    }
    /// Routing key on the work exchange for a class and priority: `<class>`, `<class>.high`,
    /// `<class>.low`.
    pub fn work_key(class: &str, priority: Priority) -> String {
        match priority {
            Priority::Normal => class.to_string(),
            p => format!("{class}.{}", p.as_str()),
        }
    }
    /// The work queue of a class and priority (`{ns}.work.<key>`).
    pub fn work_queue_for(&self, class: &str, priority: Priority) -> String {
        format!("{}.work.{}", self.ns, Self::work_key(class, priority))
    }
    /// Every work queue of a class, highest priority first.
    pub fn class_queues(&self, class: &str) -> Vec<String> {
        Priority::ALL
            .iter()
            .map(|p| self.work_queue_for(class, *p))
            .collect()
    }
    /// Routing key of jobs of a class pinned to `model_version` (`flux-dev@v2`).
    pub fn pin_key(class: &str, model_version: &str) -> String {
        format!("{class}.pin.{model_version}")
    }
    /// The queue of jobs of a class pinned to `model_version`; only workers holding that version
    /// consume it. Priorities within it are taken from each message's AMQP priority by the worker.
    pub fn pin_queue(&self, class: &str, model_version: &str) -> String {
        format!("{}.work.{}", self.ns, Self::pin_key(class, model_version))
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

    /// The least permissions a user of `role` needs in this namespace (docs/operations.md,
    /// "RabbitMQ users"). A backend can publish to the submit exchange and read its own events
    /// (through a server-named `amq.gen-*` queue) and nothing else; a worker can consume its work
    /// queues and publish to the DLX and events, but neither publish to the submit or work
    /// exchanges nor touch the submit queue.
    pub fn permissions(&self, role: Role) -> Permissions {
        let ns = regex_escape(&self.ns);
        let (configure, write, read) = match role {
            Role::Backend => (
                r"^amq\.gen-.*$".to_string(),
                format!(r"^({ns}\.submit|amq\.gen-.*)$"),
                format!(r"^({ns}\.events|amq\.gen-.*)$"),
            ),
            Role::Scheduler => (
                format!(r"^{ns}\.(submit|work|work\..+|dlx|dead|events)$"),
                format!(r"^{ns}\.(submit|work|work\..+|dlx|dead|events)$"),
                format!(r"^{ns}\.(submit|work|work\..+|dlx)$"),
            ),
            Role::Worker => (
                format!(r"^{ns}\.(work|work\..+|dlx|dead|events)$"),
                format!(r"^{ns}\.(work\..+|dlx|dead|events)$"),
                format!(r"^{ns}\.(work|work\..+|dlx)$"),
            ),
        };
        Permissions {
            configure,
            write,
            read,
        }
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
        self.declare_dlq(ch).await?;
        self.declare_submit(ch).await?;
        self.declare_work(ch, classes).await?;
        self.declare_events(ch).await
    }

    /// Declares what a worker uses, and nothing of the submit side: the DLX and DLQ, the work
    /// exchange with the queues of `classes`, and the events exchange. A least-privileged worker
    /// user needs configure rights on exactly these (docs/operations.md, "RabbitMQ users"). Same
    /// declarations (and queue arguments) as [`Topology::declare`].
    pub async fn declare_worker(&self, ch: &Channel, classes: &[&str]) -> lapin::Result<()> {
        self.declare_dlq(ch).await?;
        self.declare_work(ch, classes).await?;
        self.declare_events(ch).await
    }

    fn durable() -> (ExchangeDeclareOptions, QueueDeclareOptions) {
        (
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
        )
    }

    async fn declare_dlq(&self, ch: &Channel) -> lapin::Result<()> {
        let (durable, qdurable) = Self::durable();
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
        Ok(())
    }

    async fn declare_submit(&self, ch: &Channel) -> lapin::Result<()> {
        let (durable, qdurable) = Self::durable();
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
        Ok(())
    }

    async fn declare_work(&self, ch: &Channel, classes: &[&str]) -> lapin::Result<()> {
        let (durable, _) = Self::durable();
        ch.exchange_declare(
            self.work_exchange().as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
        for class in classes {
            for p in Priority::ALL {
                self.declare_work_queue(ch, &self.work_queue_for(class, p), &Self::work_key(class, p))
                    .await?;
            }
        }
        Ok(())
    }

    async fn declare_events(&self, ch: &Channel) -> lapin::Result<()> {
        let (durable, _) = Self::durable();
        ch.exchange_declare(
            self.events_exchange().as_str().into(),
            ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await?;
        Ok(())
    }

    async fn declare_work_queue(&self, ch: &Channel, queue: &str, key: &str) -> lapin::Result<()> {
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            self.quorum_args(true, Some(WORK_DELIVERY_LIMIT)),
        )
        .await?;
        ch.queue_bind(
            queue.into(),
            self.work_exchange().as_str().into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }

    /// Declares the queue of a class's jobs pinned to `model_version` (idempotent; the work
    /// exchange must exist).
    pub async fn declare_pin(&self, ch: &Channel, class: &str, model_version: &str) -> lapin::Result<()> {
        self.declare_work_queue(
            ch,
            &self.pin_queue(class, model_version),
            &Self::pin_key(class, model_version),
        )
        .await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_names_keep_the_normal_queue_and_add_one_per_priority_and_pin() {
        let t = Topology::new("ns");
        assert_eq!(t.work_queue("small"), "ns.work.small");
        assert_eq!(t.work_queue_for("small", Priority::Normal), "ns.work.small");
        assert_eq!(
            t.class_queues("large"),
            ["ns.work.large.high", "ns.work.large", "ns.work.large.low"]
        );
        assert_eq!(
            t.pin_queue("small", "flux-dev@v2"),
            "ns.work.small.pin.flux-dev@v2"
        );
        assert_eq!(Topology::pin_key("small", "flux-dev@v2"), "small.pin.flux-dev@v2");
    }
}
