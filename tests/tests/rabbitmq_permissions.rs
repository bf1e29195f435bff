//! Least-privilege RabbitMQ users per role (`Topology::permissions` and
//! `Topology::topic_permissions`), created with `rabbitmqctl` on the real broker: the services
//! work with them, and each user is refused what its role must not do.

use std::future::Future;
use std::time::Duration;

use ditfleet_common::amqp::{self, Publisher, persistent};
use ditfleet_common::job::Priority;
use ditfleet_common::state::JobState;
use ditfleet_common::topology::{Role, Topology};
use ditfleet_tests::Fleet;
use ditfleet_tests::services::RabbitUser;
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, ExchangeBindOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};

const T: Duration = Duration::from_secs(60);

/// A user of `role` with the permissions and topic permissions ditfleetctl prints for it.
fn user(fleet: &Fleet, role: Role, tag: &str) -> RabbitUser {
    let p = fleet.topo.permissions(role);
    let id = &fleet.ns[fleet.ns.len() - 8..];
    let u = RabbitUser::create(
        &format!("ditfleet-{tag}-{id}"),
        &format!("pw-{tag}-{id}"),
        &p.configure,
        &p.write,
        &p.read,
    );
    if let Some(t) = fleet.topo.topic_permissions(role) {
        u.set_topic_permissions(&t.exchange, &t.write, &t.read);
    }
    u
}

/// A backend user scoped to `tenant` (`Topology::tenant_topic_permissions`).
fn tenant_backend(fleet: &Fleet, tenant: &str) -> RabbitUser {
    let p = fleet.topo.permissions(Role::Backend);
    let id = &fleet.ns[fleet.ns.len() - 8..];
    let u = RabbitUser::create(
        &format!("ditfleet-backend-{tenant}-{id}"),
        &format!("pw-{tenant}-{id}"),
        &p.configure,
        &p.write,
        &p.read,
    );
    let t = fleet.topo.tenant_topic_permissions(tenant).unwrap();
    u.set_topic_permissions(&t.exchange, &t.write, &t.read);
    u
}

/// Runs `f` on a channel of a fresh connection as `url`; the error text if anything is refused.
async fn on_channel<F, Fut>(url: &str, f: F) -> Result<(), String>
where
    F: FnOnce(Channel) -> Fut,
    Fut: Future<Output = lapin::Result<()>>,
{
    let conn = amqp::connect(url, "perm-test").await.map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    let r = f(ch).await.map_err(|e| e.to_string());
    let _ = conn.close(200, "done".into()).await;
    r
}

/// Binds `queue` to `exchange` with `key` as `url`.
async fn bind_queue_as(url: &str, queue: &str, exchange: &str, key: &str) -> Result<(), String> {
    on_channel(url, |ch| async move {
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    })
    .await
}

/// Declares a server-named exclusive queue as `url` and binds it to `exchange` with `key`, as a
/// backend following events does.
async fn bind_own_queue_as(url: &str, exchange: &str, key: &str) -> Result<(), String> {
    on_channel(url, |ch| async move {
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
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    })
    .await
}

/// Binds exchange `destination` to exchange `source` with `key` as `url`.
async fn bind_exchange_as(url: &str, destination: &str, source: &str, key: &str) -> Result<(), String> {
    on_channel(url, |ch| async move {
        ch.exchange_bind(
            destination.into(),
            source.into(),
            key.into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
    })
    .await
}

async fn unbind_queue_as(url: &str, queue: &str, exchange: &str, key: &str) -> Result<(), String> {
    on_channel(url, |ch| async move {
        ch.queue_unbind(queue.into(), exchange.into(), key.into(), FieldTable::default())
            .await
    })
    .await
}

async fn purge_queue_as(url: &str, queue: &str) -> Result<(), String> {
    on_channel(url, |ch| async move {
        ch.queue_purge(queue.into(), QueuePurgeOptions::default())
            .await
            .map(|_| ())
    })
    .await
}

async fn delete_exchange_as(url: &str, exchange: &str) -> Result<(), String> {
    on_channel(url, |ch| async move {
        ch.exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await
    })
    .await
}

/// Declares (non-passive) a durable queue named `queue` as `url`.
async fn declare_queue_as(url: &str, queue: &str) -> Result<(), String> {
    on_channel(url, |ch| async move {
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|_| ())
    })
    .await
}

/// Reads a queue's depth as `url` (passive declare), as the scheduler's poller does.
async fn queue_depth_as(url: &str, queue: &str) -> Result<u32, String> {
    let conn = amqp::connect(url, "perm-test").await.map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    let r = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
        .map_err(|e| e.to_string());
    let _ = conn.close(200, "done".into()).await;
    r
}

/// Follows `keys` on the events exchange as `url` through one server-named queue; keep the
/// connection while reading the consumer.
async fn follow_as(url: &str, topo: &Topology, keys: &[&str]) -> (lapin::Connection, Consumer) {
    let conn = amqp::connect(url, "perm-follow").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
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
        .await
        .unwrap();
    for key in keys {
        ch.queue_bind(
            q.name().clone(),
            topo.events_exchange().as_str().into(),
            (*key).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("binding {key}: {e}"));
    }
    let c = ch
        .basic_consume(
            q.name().clone(),
            "perm-follow".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (conn, c)
}

/// The routing key of the next delivery on `c`, within `timeout`.
async fn next_key(c: &mut Consumer, timeout: Duration) -> Option<String> {
    match tokio::time::timeout(timeout, c.next()).await {
        Ok(Some(Ok(d))) => Some(d.routing_key.to_string()),
        _ => None,
    }
}

/// Messages in the submit queue now, read as the admin user.
async fn submit_depth(fleet: &Fleet) -> u32 {
    queue_depth_as(ditfleet_tests::AMQP_URL, &fleet.topo.submit_queue())
        .await
        .unwrap()
}

/// Publishes with a confirm through a fresh connection as `url`; the error text if refused.
async fn publish_as(url: &str, exchange: &str, key: &str) -> Result<(), String> {
    let conn = amqp::connect(url, "perm-test").await.map_err(|e| e.to_string())?;
    let p = Publisher::new(&conn).await.map_err(|e| e.to_string())?;
    let r = p
        .publish(exchange, key, b"{}", persistent("application/json"), false)
        .await
        .map_err(|e| e.to_string());
    let _ = conn.close(200, "done".into()).await;
    r
}

async fn delete_queue_as(url: &str, queue: &str) -> Result<(), String> {
    let conn = amqp::connect(url, "perm-test").await.map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    let r = ch
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let _ = conn.close(200, "done".into()).await;
    r
}

async fn consume_as(url: &str, queue: &str) -> Result<(), String> {
    let conn = amqp::connect(url, "perm-test").await.map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    let r = ch
        .basic_consume(
            queue.into(),
            "perm-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let _ = conn.close(200, "done".into()).await;
    r
}

fn refused(r: Result<(), String>, what: &str) {
    match r {
        Ok(()) => panic!("{what} was allowed"),
        Err(e) => assert!(
            e.contains("ACCESS_REFUSED") || e.contains("access") || e.contains("403"),
            "{what}: expected an access refusal, got {e}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_run_with_least_privilege_users_and_a_worker_or_backend_cannot_overstep() {
    let fleet = Fleet::new("rmq-perms").await;
    let sched = user(&fleet, Role::Scheduler, "sched");
    let worker = user(&fleet, Role::Worker, "worker");
    let backend = user(&fleet, Role::Backend, "backend");

    let _s = fleet.spawn_with(
        "ditfleet-scheduler",
        "scheduler",
        &[("DITFLEET_AMQP_URL", sched.url().as_str())],
    );
    let _w = fleet.start_worker("w-perm", &[("DITFLEET_AMQP_URL", worker.url().as_str())]);
    fleet.wait_workers(1, T).await;
    let out = fleet.ctl_submit_wait(&[("DITFLEET_AMQP_URL", backend.url().as_str())], "perm-1", 2, &[]);
    assert!(
        out.status.success(),
        "the backend user submits and waits: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.wait_state("perm-1", JobState::Succeeded, T).await;

    // The fleet's other work queues work with these users too: a high and a low priority queue,
    // and a pinned-version queue (declared on demand by the scheduler and the worker).
    for (job_id, extra) in [
        ("perm-high", ["--priority", "high"]),
        ("perm-low", ["--priority", "low"]),
        ("perm-pin", ["--model-version", "sim-1"]),
    ] {
        let out = fleet.ctl_submit_wait(
            &[("DITFLEET_AMQP_URL", backend.url().as_str())],
            job_id,
            2,
            &extra,
        );
        assert!(
            out.status.success(),
            "{job_id} through the least-privilege users: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        fleet.wait_state(job_id, JobState::Succeeded, T).await;
    }
    let pinned = fleet.store.get("perm-pin").await.unwrap();
    assert_eq!(
        pinned.get("model_version_used").map(String::as_str),
        Some("flux-dev@sim-1"),
        "{pinned:?}"
    );
    // The pinned job went through its own queue, which the worker consumes.
    let ch = fleet.conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            fleet.topo.pin_queue("small", "flux-dev@sim-1").as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("the pinned queue was declared");
    assert_eq!(q.consumer_count(), 1, "the worker consumes the pinned queue");

    let topo = &fleet.topo;
    // The commands ditfleetctl prints for operators grant exactly these permissions.
    let out = fleet.ctl(&["rabbitmq-permissions", "--user-prefix", "x"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for role in [Role::Backend, Role::Scheduler, Role::Worker] {
        let p = topo.permissions(role);
        let line = format!("'{}' '{}' '{}'", p.configure, p.write, p.read);
        assert!(text.contains(&line), "{line} missing from:\n{text}");
    }
    let tp = topo.topic_permissions(Role::Backend).unwrap();
    let line = format!(
        "rabbitmqctl set_topic_permissions -p '/' 'x-backend' '{}' '{}' '{}'",
        tp.exchange, tp.write, tp.read
    );
    assert!(text.contains(&line), "{line} missing from:\n{text}");
    assert_eq!(
        text.matches("rabbitmqctl set_topic_permissions").count(),
        1,
        "only the backend gets topic permissions:\n{text}"
    );
    // A tenant-scoped backend user instead of the global one; a tenant with a '.' is refused.
    let out = fleet.ctl(&["rabbitmq-permissions", "--user-prefix", "x", "--tenant", "acme"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let tp = topo.tenant_topic_permissions("acme").unwrap();
    let line = format!(
        "rabbitmqctl set_topic_permissions -p '/' 'x-backend-acme' '{}' '{}' '{}'",
        tp.exchange, tp.write, tp.read
    );
    assert!(text.contains(&line), "{line} missing from:\n{text}");
    assert!(!text.contains("'x-backend' "), "no global backend user:\n{text}");
    let out = fleet.ctl(&["rabbitmq-permissions", "--tenant", "acme.eu"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A tenant-scoped backend follows its own job (id `acme:…`) and its reply namespace: the
    // terminal event reaches the reply key the job names.
    let acme = tenant_backend(&fleet, "acme");
    let (_replies_conn, mut replies) = follow_as(&acme.url(), topo, &["reply.acme.#"]).await;
    let out = fleet.ctl_submit_wait(
        &[("DITFLEET_AMQP_URL", acme.url().as_str())],
        "acme:perm-reply",
        2,
        &["--tenant", "acme", "--reply-to", "reply.acme.inbox"],
    );
    assert!(
        out.status.success(),
        "the tenant-scoped backend submits and waits: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        next_key(&mut replies, T).await.as_deref(),
        Some("reply.acme.inbox"),
        "the job's terminal event on its reply key"
    );

    // Positive controls: each user can do its own job over the same kind of connection.
    publish_as(&worker.url(), &topo.events_exchange(), "job.x.progress")
        .await
        .expect("a worker publishes events");
    publish_as(&backend.url(), &topo.submit_exchange(), "nothing-bound")
        .await
        .expect("a backend publishes to the submit exchange");

    // A worker may not inject jobs, route them, or touch the submit side.
    refused(
        publish_as(&worker.url(), &topo.submit_exchange(), "job").await,
        "worker publishing to the submit exchange",
    );
    refused(
        publish_as(&worker.url(), &topo.work_exchange(), "small").await,
        "worker publishing to the work exchange",
    );
    refused(
        delete_queue_as(&worker.url(), &topo.submit_queue()).await,
        "worker deleting the submit queue",
    );
    refused(
        consume_as(&worker.url(), &topo.submit_queue()).await,
        "worker consuming the submit queue",
    );
    // A backend may only submit: not publish work, consume or delete queues.
    refused(
        publish_as(&backend.url(), &topo.work_exchange(), "small").await,
        "backend publishing to the work exchange",
    );
    refused(
        consume_as(&backend.url(), &topo.work_queue("small")).await,
        "backend consuming a work queue",
    );
    refused(
        consume_as(
            &backend.url(),
            &topo.work_queue_for("small", ditfleet_common::job::Priority::High),
        )
        .await,
        "backend consuming a priority work queue",
    );
    refused(
        consume_as(&backend.url(), &topo.pin_queue("small", "flux-dev@sim-1")).await,
        "backend consuming a pinned-version queue",
    );
    refused(
        publish_as(
            &worker.url(),
            &topo.work_exchange(),
            &ditfleet_common::topology::Topology::pin_key("small", "flux-dev@sim-1"),
        )
        .await,
        "worker publishing a pinned work order",
    );
    refused(
        delete_queue_as(&backend.url(), &topo.submit_queue()).await,
        "backend deleting the submit queue",
    );
    refused(
        delete_queue_as(&backend.url(), &topo.work_queue("small")).await,
        "backend deleting a work queue",
    );
    // The scheduler has no business with other namespaces.
    refused(
        publish_as(&sched.url(), "other-namespace.submit", "job").await,
        "scheduler publishing outside its namespace",
    );
    fleet.teardown().await;
}

/// Issue 22 item 5: the backend's write permission on `{ns}.submit` (the exchange it publishes
/// to) also matches the submit queue, and it may read the events exchange, so without topic
/// permissions it can bind the submit queue there with `#` and feed every event to the scheduler
/// (which dead-letters each). The topic permissions refuse every wildcard binding key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_cannot_bind_the_submit_queue_to_the_events_exchange() {
    let fleet = Fleet::new("rmq-perms-submit-bind").await;
    let backend = user(&fleet, Role::Backend, "backend");
    let topo = &fleet.topo;
    for key in [
        "#",
        "job.#",
        "job.*.*",
        "job.*.done",
        "reply.#",
        "reply.*",
        "*.*.*",
    ] {
        refused(
            bind_queue_as(&backend.url(), &topo.submit_queue(), &topo.events_exchange(), key).await,
            &format!("backend binding the submit queue to the events exchange with {key:?}"),
        );
        refused(
            bind_exchange_as(
                &backend.url(),
                &topo.submit_exchange(),
                &topo.events_exchange(),
                key,
            )
            .await,
            &format!("backend binding the submit exchange to the events exchange with {key:?}"),
        );
    }
    // Exact keys, which a backend may bind to its own queues: the submit queue has a name of its
    // own and the backend no right on it. Binding the submit *exchange* with such a key is allowed
    // (write on the exchange, topic read on the key) and harmless: the submit exchange is direct
    // and routes only the key `job`, which no event carries; the check below proves it.
    for key in ["job.x.done", "reply.x"] {
        refused(
            bind_queue_as(&backend.url(), &topo.submit_queue(), &topo.events_exchange(), key).await,
            &format!("backend binding the submit queue to the events exchange with {key:?}"),
        );
        bind_exchange_as(
            &backend.url(),
            &topo.submit_exchange(),
            &topo.events_exchange(),
            key,
        )
        .await
        .unwrap();
    }
    // Nothing was bound: events published now do not reach the submit queue.
    for key in ["job.x.progress", "job.x.done", "reply.x"] {
        fleet
            .publisher
            .publish(
                &topo.events_exchange(),
                key,
                b"{}",
                persistent("application/json"),
                false,
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(submit_depth(&fleet).await, 0, "no event reached the submit queue");
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_follows_named_jobs_and_exact_reply_keys_but_no_wildcard_subscription() {
    let fleet = Fleet::new("rmq-perms-follow").await;
    let backend = user(&fleet, Role::Backend, "backend");
    let topo = &fleet.topo;
    // Job ids may contain dots; `*` stands for the event kind only.
    let (_conn, mut events) = follow_as(
        &backend.url(),
        topo,
        &["job.j-1.*", "job.j.2.done", "reply.inbox-1"],
    )
    .await;
    for key in [
        "job.other.done",
        "job.j-1.progress",
        "reply.inbox-2",
        "job.j.2.done",
        "job.j.2.progress",
        "reply.inbox-1",
    ] {
        fleet
            .publisher
            .publish(
                &topo.events_exchange(),
                key,
                b"{}",
                persistent("application/json"),
                false,
            )
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while let Some(k) = next_key(&mut events, Duration::from_secs(2)).await {
        got.push(k);
    }
    assert_eq!(got, ["job.j-1.progress", "job.j.2.done", "reply.inbox-1"]);
    for key in [
        "#",
        "job.#",
        "job.*.done",
        "job.*.*",
        "job.j-1.#",
        "job.j-1.started",
        "reply.#",
        "reply.*",
        "reply.inbox.#",
        "*.inbox-1",
        "other",
    ] {
        refused(
            bind_own_queue_as(&backend.url(), &topo.events_exchange(), key).await,
            &format!("backend following {key:?}"),
        );
    }
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_backend_follows_only_its_own_job_ids_and_reply_namespace() {
    let fleet = Fleet::new("rmq-perms-tenant").await;
    let acme = tenant_backend(&fleet, "acme");
    let topo = &fleet.topo;
    let (_conn, mut events) = follow_as(
        &acme.url(),
        topo,
        &["job.acme:7.*", "job.acme:b.8.done", "reply.acme.#"],
    )
    .await;
    for key in [
        "job.7.done",
        "job.acme:7.progress",
        "job.other:7.done",
        "reply.other.inbox",
        "reply.acme.inbox.eu",
        "job.acme:b.8.done",
    ] {
        fleet
            .publisher
            .publish(
                &topo.events_exchange(),
                key,
                b"{}",
                persistent("application/json"),
                false,
            )
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while let Some(k) = next_key(&mut events, Duration::from_secs(2)).await {
        got.push(k);
    }
    assert_eq!(
        got,
        ["job.acme:7.progress", "reply.acme.inbox.eu", "job.acme:b.8.done"]
    );
    for key in [
        "#",
        "job.#",
        "job.7.*",
        "job.acme.7.*",
        "job.other:7.*",
        "job.acme:#",
        "reply.#",
        "reply.acme",
        "reply.acmex.inbox",
        "reply.other.inbox",
    ] {
        refused(
            bind_own_queue_as(&acme.url(), &topo.events_exchange(), key).await,
            &format!("tenant backend following {key:?}"),
        );
    }
    refused(
        bind_queue_as(
            &acme.url(),
            &topo.submit_queue(),
            &topo.events_exchange(),
            "reply.#",
        )
        .await,
        "tenant backend binding the submit queue to all replies",
    );
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_cannot_publish_events_work_orders_or_dead_letters() {
    let fleet = Fleet::new("rmq-perms-backend-publish").await;
    let backend = user(&fleet, Role::Backend, "backend");
    let topo = &fleet.topo;
    refused(
        publish_as(&backend.url(), &topo.events_exchange(), "job.x.done").await,
        "backend publishing an event",
    );
    refused(
        publish_as(&backend.url(), &topo.events_exchange(), "reply.x").await,
        "backend publishing a reply",
    );
    refused(
        publish_as(&backend.url(), &topo.dlx(), "").await,
        "backend publishing a dead letter",
    );
    refused(
        publish_as(&backend.url(), &topo.work_exchange(), "small").await,
        "backend publishing a work order",
    );
    // The default exchange routes to any queue by name: it is `amq.default` to the permissions.
    for q in [topo.work_queue("small"), topo.submit_queue(), topo.dead_queue()] {
        refused(
            publish_as(&backend.url(), "", &q).await,
            &format!("backend publishing to {q} through the default exchange"),
        );
    }
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_cannot_read_delete_rebind_or_redeclare_fleet_queues_and_exchanges() {
    let fleet = Fleet::new("rmq-perms-backend-queues").await;
    let backend = user(&fleet, Role::Backend, "backend");
    let topo = &fleet.topo;
    let u = backend.url();
    refused(
        consume_as(&u, &topo.submit_queue()).await,
        "backend consuming the submit queue",
    );
    refused(
        consume_as(&u, &topo.dead_queue()).await,
        "backend consuming the DLQ",
    );
    refused(
        purge_queue_as(&u, &topo.submit_queue()).await,
        "backend purging the submit queue",
    );
    refused(
        delete_queue_as(&u, &topo.dead_queue()).await,
        "backend deleting the DLQ",
    );
    for x in [
        topo.submit_exchange(),
        topo.events_exchange(),
        topo.work_exchange(),
        topo.dlx(),
    ] {
        refused(
            delete_exchange_as(&u, &x).await,
            &format!("backend deleting exchange {x}"),
        );
    }
    for q in [topo.submit_queue(), topo.work_queue("evil")] {
        refused(declare_queue_as(&u, &q).await, &format!("backend declaring {q}"));
    }
    // Its own queues may not be bound where jobs or dead letters flow (that would copy them).
    for (x, key) in [
        (topo.submit_exchange(), "job"),
        (topo.work_exchange(), "small"),
        (topo.dlx(), ""),
    ] {
        refused(
            bind_own_queue_as(&u, &x, key).await,
            &format!("backend binding its own queue to {x}"),
        );
    }
    refused(
        unbind_queue_as(&u, &topo.submit_queue(), &topo.submit_exchange(), "job").await,
        "backend unbinding the submit queue",
    );
    refused(
        bind_queue_as(
            &u,
            &topo.work_queue("small"),
            &topo.events_exchange(),
            "job.x.done",
        )
        .await,
        "backend binding a work queue to the events exchange",
    );
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_cannot_inject_jobs_bind_the_submit_queue_or_read_the_dlq() {
    let fleet = Fleet::new("rmq-perms-worker").await;
    let worker = user(&fleet, Role::Worker, "worker");
    let topo = &fleet.topo;
    let u = worker.url();
    for q in [topo.work_queue("small"), topo.submit_queue()] {
        refused(
            publish_as(&u, "", &q).await,
            &format!("worker publishing to {q} through the default exchange"),
        );
    }
    for (x, key) in [
        (topo.work_exchange(), "small"),
        (topo.events_exchange(), "#"),
        (topo.dlx(), ""),
    ] {
        refused(
            bind_queue_as(&u, &topo.submit_queue(), &x, key).await,
            &format!("worker binding the submit queue to {x}"),
        );
    }
    refused(
        bind_queue_as(&u, &topo.work_queue("small"), &topo.events_exchange(), "#").await,
        "worker binding a work queue to the events exchange",
    );
    refused(
        bind_queue_as(&u, &topo.dead_queue(), &topo.submit_exchange(), "job").await,
        "worker binding the DLQ to the submit exchange",
    );
    refused(
        consume_as(&u, &topo.dead_queue()).await,
        "worker consuming the DLQ",
    );
    refused(
        purge_queue_as(&u, &topo.dead_queue()).await,
        "worker purging the DLQ",
    );
    refused(
        bind_own_queue_as(&u, &topo.events_exchange(), "#").await,
        "worker following events",
    );
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_reads_queue_depths_but_cannot_consume_work_queues_or_bind_to_events() {
    let fleet = Fleet::new("rmq-perms-scheduler").await;
    let sched = user(&fleet, Role::Scheduler, "sched");
    let topo = &fleet.topo;
    let u = sched.url();
    for q in topo.class_queues("small") {
        queue_depth_as(&u, &q)
            .await
            .unwrap_or_else(|e| panic!("the scheduler reads the depth of {q}: {e}"));
    }
    for q in [
        topo.work_queue("small"),
        topo.work_queue_for("small", Priority::High),
    ] {
        refused(consume_as(&u, &q).await, &format!("scheduler consuming {q}"));
        refused(purge_queue_as(&u, &q).await, &format!("scheduler purging {q}"));
    }
    for q in [topo.submit_queue(), topo.dead_queue(), topo.work_queue("small")] {
        refused(
            bind_queue_as(&u, &q, &topo.events_exchange(), "#").await,
            &format!("scheduler binding {q} to the events exchange"),
        );
    }
    fleet.teardown().await;
}
