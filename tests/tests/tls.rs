//! AMQPS and rediss:// with a private CA: real TLS endpoints (a private RabbitMQ node with a TLS
//! listener and a private `redis-server` with a TLS port, both started by the test on free ports;
//! the shared broker and Redis are not touched), certificates made in the test.

use std::time::Duration;

use ditfleet_common::state::JobState;
use ditfleet_tests::services::{PrivateRabbit, TestCa, private_tls_redis};
use ditfleet_tests::{Fleet, free_port, http_get};

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_worker_and_ctl_run_a_job_over_amqps_and_rediss_trusting_a_private_ca() {
    let dir = std::env::temp_dir().join(format!("ditfleet-tls-{}", std::process::id()));
    let ca = TestCa::create(&dir);
    let (_redis, plain, tls) = private_tls_redis(&ca);
    let rabbit = PrivateRabbit::start(&ca);
    let amqps = rabbit.tls;
    // The harness watches through the plain port; the services know only the TLS ports.
    let mut fleet = Fleet::with_urls(
        "tls",
        &rabbit.plain_url(),
        &format!("redis://127.0.0.1:{plain}/0"),
    )
    .await;
    let ca_file = ca.ca_cert.display().to_string();
    for (k, v) in [
        (
            "DITFLEET_AMQP_URL",
            format!("amqps://guest:guest@127.0.0.1:{amqps}/%2f"),
        ),
        ("DITFLEET_REDIS_URL", format!("rediss://127.0.0.1:{tls}/0")),
        ("DITFLEET_AMQP_CA_FILE", ca_file.clone()),
        ("DITFLEET_REDIS_CA_FILE", ca_file.clone()),
    ] {
        fleet.env.insert(k.into(), v);
    }
    let _s = fleet.start_scheduler();
    let _w = fleet.start_worker("w-tls", &[]);
    fleet.wait_workers(1, T).await;
    let out = fleet.ctl_submit_wait(&[], "tls-1", 2, &[]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    fleet.wait_state("tls-1", JobState::Succeeded, T).await;
    let status = fleet.ctl(&["status", "tls-1"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("succeeded"));

    // Without the private CA, neither endpoint is trusted. The broker connection is retried (a
    // broker may come up late), never trusted: the scheduler stays unready and logs why.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let no_amqp_ca = fleet.spawn_with(
        "ditfleet-scheduler",
        "scheduler-no-ca",
        &[
            ("DITFLEET_AMQP_CA_FILE", ""),
            ("DITFLEET_HTTP_ADDR", addr.as_str()),
        ],
    );
    let start = std::time::Instant::now();
    while !no_amqp_ca.log_text().contains("UnknownIssuer") {
        assert!(start.elapsed() < T, "{}", no_amqp_ca.log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(http_get(port, "/readyz").map(|r| r.0), Some(503));
    drop(no_amqp_ca);
    // Redis is not retried at start: the scheduler exits with the TLS error.
    let mut no_redis_ca = fleet.spawn_with(
        "ditfleet-scheduler",
        "scheduler-no-redis-ca",
        &[("DITFLEET_REDIS_CA_FILE", "")],
    );
    assert_eq!(
        no_redis_ca.wait_exit(T),
        Some(Some(1)),
        "{}",
        no_redis_ca.log_text()
    );
    let log = no_redis_ca.log_text().to_lowercase();
    assert!(
        log.contains("certificate") || log.contains("tls") || log.contains("issuer"),
        "{log}"
    );
    fleet.teardown().await;
    let _ = std::fs::remove_dir_all(dir);
}
