//! Least-privilege RabbitMQ users per role (`Topology::permissions`), created with `rabbitmqctl`
//! on the real broker: the services work with them, and each user is refused what its role must
//! not do.

use std::time::Duration;

use ditfleet_common::amqp::{self, Publisher, persistent};
use ditfleet_common::state::JobState;
use ditfleet_common::topology::Role;
use ditfleet_tests::Fleet;
use ditfleet_tests::services::RabbitUser;
use lapin::options::{BasicConsumeOptions, QueueDeleteOptions};
use lapin::types::FieldTable;

const T: Duration = Duration::from_secs(60);

fn user(fleet: &Fleet, role: Role, tag: &str) -> RabbitUser {
    let p = fleet.topo.permissions(role);
    let id = &fleet.ns[fleet.ns.len() - 8..];
    RabbitUser::create(
        &format!("ditfleet-{tag}-{id}"),
        &format!("pw-{tag}-{id}"),
        &p.configure,
        &p.write,
        &p.read,
    )
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
