//! AMQP topology: exchanges, queues and their arguments, declared idempotently by every service.
//!
//! ```text
//! backends ──▶ {ns}.submit (direct) ──▶ {ns}.submit.jobs (quorum queue) ──▶ scheduler
//! scheduler ──▶ {ns}.work (direct) ──▶ {ns}.work.<class>[.high|.low] (quorum, one per priority)
//!                                   └─▶ {ns}.work.<class>.pin.<model>@<version> (pinned jobs)
//!                                                                              ──▶ workers
//! scheduler ──▶ {ns}.work.affinity (headers: ditfleet-worker) ──▶ {ns}.work.affinity.<worker>
//!              (LoRA affinity; a message past its wait is dead-lettered to {ns}.work.return,
//!               direct, bound to every class and per-model queue with its work key) ──▶ workers
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
/// Header naming the worker whose affinity queue a work order is for (see
/// [`Topology::affinity_exchange`]). Not `x-…`: a headers exchange ignores such keys when
/// matching, so every affinity queue would get a copy.
pub const AFFINITY_HEADER: &str = "ditfleet-worker";
/// How long an idle affinity queue (no consumer, no get) lives: a worker that went away for good
/// leaves no queue behind. Far above any wait bound, so no order is ever in a queue that expires.
pub const AFFINITY_QUEUE_EXPIRES_MS: i64 = 3_600_000;
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

/// RabbitMQ topic permission regexes of one user on one topic exchange of the fleet's vhost
/// (`rabbitmqctl set_topic_permissions <user> <exchange> <write> <read>`): `write` is matched
/// against the routing key of each publish, `read` against the binding key of each bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPermissions {
    pub exchange: String,
    pub write: String,
    pub read: String,
}

/// A character of a job id (`[A-Za-z0-9._:-]`, common/src/job.rs): no topic wildcard.
const JOB_ID_CHAR: &str = r"[A-Za-z0-9._:-]";
/// The last word of a job's binding key: one event kind, or `*` for all of them.
const EVENT_KIND: &str = r"(\*|progress|done|failed|cancelled)";
/// A character of a reply key (`[A-Za-z0-9._-]`, common/src/job.rs): no topic wildcard.
const REPLY_CHAR: &str = r"[A-Za-z0-9._-]";

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
    /// The queue the scheduler consumes, `{ns}.submit.jobs`. It has a name of its own, not the
    /// exchange's: RabbitMQ's permission regexes match a name whatever its kind, so the backend's
    /// write right on the exchange `{ns}.submit` would also be write on a queue of that name,
    /// which lets it bind that queue to other exchanges (e.g. feed events to the scheduler).
    pub fn submit_queue(&self) -> String {
        format!("{}.submit.jobs", self.ns)
    }
    /// The submit queue's earlier name (the exchange's, `{ns}.submit`). A scheduler finding it
    /// unbinds it from the submit exchange, drains it, and deletes it once it is empty.
    pub fn legacy_submit_queue(&self) -> String {
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
    /// Routing key of a class's unpinned jobs for `model` at a priority: `<class>.model.<model>`,
    /// with `.high` / `.low` for those priorities. Only workers holding a version of the model
    /// consume these queues, so a job never reaches a worker that cannot run it.
    pub fn model_key(class: &str, model: &str, priority: Priority) -> String {
        match priority {
            Priority::Normal => format!("{class}.model.{model}"),
            p => format!("{class}.model.{model}.{}", p.as_str()),
        }
    }
    /// The queue of [`Topology::model_key`] (`{ns}.work.<key>`).
    pub fn model_queue_for(&self, class: &str, model: &str, priority: Priority) -> String {
        format!("{}.work.{}", self.ns, Self::model_key(class, model, priority))
    }
    /// Every queue a job of `class` can wait in without a pin: the class's own priority queues
    /// (what schedulers before model routing used) and its per-model queues, highest priority
    /// first within each.
    pub fn routed_queues(&self, class: &str) -> Vec<String> {
        let mut q = self.class_queues(class);
        for m in crate::job::KNOWN_MODELS {
            q.extend(Priority::ALL.iter().map(|p| self.model_queue_for(class, m, *p)));
        }
        q
    }
    /// The headers exchange of LoRA affinity: a work order published here with the header
    /// [`AFFINITY_HEADER`] = a worker id reaches that worker's affinity queue only; its routing
    /// key is the work key of the queue it falls back to ([`Topology::model_key`]).
    pub fn affinity_exchange(&self) -> String {
        format!("{}.work.affinity", self.ns)
    }
    /// A worker's LoRA affinity queue, `{ns}.work.affinity.<worker>` (the worker id is checked as
    /// a name where it is configured: `[A-Za-z0-9._-]`).
    pub fn affinity_queue(&self, worker: &str) -> String {
        format!("{}.work.affinity.{worker}", self.ns)
    }
    /// Where an affinity queue dead-letters an order whose wait is over (or that hit the delivery
    /// limit there): a direct exchange bound to every class and per-model work queue with the
    /// queue's own work key, so the order lands in the queue it would have gone to without
    /// affinity. Declared (and bound) by workers, which are the only ones with affinity queues.
    pub fn return_exchange(&self) -> String {
        format!("{}.work.return", self.ns)
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
    /// "RabbitMQ users"). RabbitMQ matches these regexes against a name whatever its kind: the
    /// submit queue is `{ns}.submit.jobs`, not the exchange's `{ns}.submit`, because the write a
    /// backend needs to publish to the exchange would otherwise also let it bind a queue of that
    /// name, as destination, to any exchange it may read (the events exchange).
    /// [`Topology::topic_permissions`] (binding keys on the events exchange) limits what a backend
    /// may subscribe to; both must be set. A backend may bind the submit exchange to the events
    /// exchange with the exact keys it may follow, which routes nothing: the submit exchange is
    /// direct and routes only [`SUBMIT_KEY`], which no event carries.
    ///
    /// A backend publishes to the submit exchange and declares, binds, consumes and deletes its
    /// own server-named `amq.gen-*` queues, bound to the events exchange. The scheduler declares
    /// everything, consumes the submit queue and publishes work orders, dead letters and events;
    /// reading a queue's depth (passive declare) needs no permission, so it may not consume work
    /// queues. A worker declares the work side, consumes work queues and publishes dead letters
    /// and events; neither it nor the scheduler may read the events exchange, so neither can bind
    /// a fleet queue to it.
    pub fn permissions(&self, role: Role) -> Permissions {
        let ns = regex_escape(&self.ns);
        let (configure, write, read) = match role {
            Role::Backend => (
                r"^amq\.gen-.*$".to_string(),
                format!(r"^({ns}\.submit|amq\.gen-.*)$"),
                format!(r"^({ns}\.events|amq\.gen-.*)$"),
            ),
            // `submit` alone is the exchange and the legacy queue the scheduler drains.
            Role::Scheduler => (
                format!(r"^{ns}\.(submit|submit\.jobs|work|work\..+|dlx|dead|events)$"),
                format!(r"^{ns}\.(submit|submit\.jobs|work|work\..+|dlx|dead|events)$"),
                format!(r"^{ns}\.(submit|submit\.jobs|work|dlx)$"),
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

    /// Topic permissions of a backend user on the events exchange (`rabbitmqctl
    /// set_topic_permissions`), which RabbitMQ checks against binding keys on `queue.bind` and
    /// `exchange.bind` (read) and routing keys on publish (write). A backend binds only the keys of
    /// one job (`job.<id>.<kind>` or `job.<id>.*`, the id without wildcards) and exact reply keys
    /// (`reply.<suffix>`, no wildcards), so no `#`, `job.#` or `job.*.done` subscription: it
    /// cannot follow jobs whose id it does not know, nor bind the submit queue so that it
    /// receives every event. It publishes no events (write matches only the empty key, and its
    /// [`Topology::permissions`] refuse the exchange anyway).
    ///
    /// The scheduler and the worker get none (`None`): they cannot read the events exchange, and
    /// their routing keys come from validated jobs; a refused publish would close their channel.
    pub fn topic_permissions(&self, role: Role) -> Option<TopicPermissions> {
        match role {
            Role::Backend => Some(TopicPermissions {
                exchange: self.events_exchange(),
                write: "^$".to_string(),
                read: format!(r"^(job\.{JOB_ID_CHAR}+\.{EVENT_KIND}|reply\.{REPLY_CHAR}+)$"),
            }),
            Role::Scheduler | Role::Worker => None,
        }
    }

    /// Topic permissions of a backend user scoped to `tenant`: it binds only the events of job
    /// ids that start with `<tenant>:` (`job.<tenant>:<rest>.<kind>`; a tenant name has no `:`, so
    /// no other tenant's prefix matches) and keys of its reply namespace `reply.<tenant>.`, with
    /// wildcards (`reply.<tenant>.#`). Nothing enforces the id prefix or the reply namespace on
    /// submission: a tenant that follows this convention is private from other tenant-scoped
    /// users; one that does not cannot be followed by tenant-scoped users at all, and a global
    /// backend user ([`Topology::topic_permissions`]) still binds any exact key.
    ///
    /// Refuses a tenant outside `[A-Za-z0-9_-]{1,64}`: tenant names may contain `.`, and then
    /// `reply.acme.#` would also match the reply namespace `reply.acme.eu.` of tenant `acme.eu`.
    pub fn tenant_topic_permissions(&self, tenant: &str) -> Result<TopicPermissions, String> {
        if tenant.is_empty()
            || tenant.len() > 64
            || !tenant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(format!(
                "tenant {tenant:?}: a tenant-scoped user needs 1-64 characters of [A-Za-z0-9_-] \
                 (a '.' would make its reply namespace a prefix of another tenant's)"
            ));
        }
        let t = regex_escape(tenant);
        Ok(TopicPermissions {
            exchange: self.events_exchange(),
            write: "^$".to_string(),
            read: format!(r"^(job\.{t}:{JOB_ID_CHAR}*\.{EVENT_KIND}|reply\.{t}\.({REPLY_CHAR}|[*#])+)$"),
        })
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
                for m in crate::job::KNOWN_MODELS {
                    self.declare_work_queue(
                        ch,
                        &self.model_queue_for(class, m, p),
                        &Self::model_key(class, m, p),
                    )
                    .await?;
                }
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

    /// Declares the affinity exchange (scheduler and workers; idempotent).
    pub async fn declare_affinity_exchange(&self, ch: &Channel) -> lapin::Result<()> {
        let (durable, _) = Self::durable();
        ch.exchange_declare(
            self.affinity_exchange().as_str().into(),
            ExchangeKind::Headers,
            durable,
            FieldTable::default(),
        )
        .await
    }

    /// Declares what LoRA affinity needs on a worker's side: the affinity and return exchanges,
    /// the return bindings of the work queues of `classes` (class and per-model queues, every
    /// priority), and `worker`'s affinity queue: quorum, dead-lettering to the return exchange
    /// (with the order's own routing key, its fallback work key), bound to the affinity exchange
    /// by the worker header, and deleted after an hour unused. The wait bound is each message's
    /// `expiration` (set by the scheduler; RabbitMQ removes it when dead-lettering, so the order
    /// does not expire again in the class queue). Quorum queues honour message TTL from
    /// RabbitMQ 3.10.
    pub async fn declare_affinity(&self, ch: &Channel, worker: &str, classes: &[&str]) -> lapin::Result<()> {
        let (durable, qdurable) = Self::durable();
        self.declare_affinity_exchange(ch).await?;
        ch.exchange_declare(
            self.return_exchange().as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
        for class in classes {
            for p in Priority::ALL {
                let mut pairs = vec![(self.work_queue_for(class, p), Self::work_key(class, p))];
                for m in crate::job::KNOWN_MODELS {
                    pairs.push((self.model_queue_for(class, m, p), Self::model_key(class, m, p)));
                }
                for (q, key) in pairs {
                    ch.queue_bind(
                        q.as_str().into(),
                        self.return_exchange().as_str().into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                }
            }
        }
        let q = self.affinity_queue(worker);
        let mut args = FieldTable::default();
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            ShortString::from("x-dead-letter-exchange"),
            AMQPValue::LongString(self.return_exchange().into()),
        );
        args.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongLongInt(WORK_DELIVERY_LIMIT),
        );
        args.insert(
            ShortString::from("x-expires"),
            AMQPValue::LongLongInt(AFFINITY_QUEUE_EXPIRES_MS),
        );
        // Dead-lettering stays at the default (at-most-once), as on every fleet queue: with
        // `x-dead-letter-strategy=at-least-once` RabbitMQ 3.10.8 stopped accepting connections
        // (twice, after test namespaces with such queues were torn down).
        ch.queue_declare(q.as_str().into(), qdurable, args).await?;
        let mut bind = FieldTable::default();
        bind.insert(ShortString::from("x-match"), AMQPValue::LongString("all".into()));
        bind.insert(
            ShortString::from(AFFINITY_HEADER),
            AMQPValue::LongString(worker.into()),
        );
        ch.queue_bind(
            q.as_str().into(),
            self.affinity_exchange().as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            bind,
        )
        .await
    }

    /// Declares a work queue bound to the work exchange with `key` (idempotent).
    pub async fn declare_work_queue(&self, ch: &Channel, queue: &str, key: &str) -> lapin::Result<()> {
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
        assert_eq!(
            t.model_queue_for("small", "flux-schnell", Priority::High),
            "ns.work.small.model.flux-schnell.high"
        );
        assert_eq!(
            Topology::model_key("small", "flux-dev", Priority::Normal),
            "small.model.flux-dev"
        );
        let all = t.routed_queues("small");
        assert_eq!(all.len(), 3 + 3 * crate::job::KNOWN_MODELS.len());
        assert!(all.contains(&"ns.work.small.model.flux-dev.low".to_string()));
    }

    #[test]
    fn tenant_scoped_topic_permissions_refuse_a_tenant_whose_namespace_could_prefix_another() {
        let t = Topology::new("ns");
        assert!(t.tenant_topic_permissions("acme.eu").is_err());
        assert!(t.tenant_topic_permissions("").is_err());
        assert!(t.tenant_topic_permissions("a*").is_err());
        let p = t.tenant_topic_permissions("acme-eu").unwrap();
        assert_eq!(p.exchange, "ns.events");
        assert!(
            p.read.contains(r"job\.acme\-eu:") && p.read.contains(r"reply\.acme\-eu\."),
            "{}",
            p.read
        );
        assert!(t.topic_permissions(Role::Worker).is_none());
        assert!(t.topic_permissions(Role::Scheduler).is_none());
    }
}
