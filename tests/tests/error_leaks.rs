//! Errors that reach clients (job status, events, DLQ headers, ditfleetctl, /metrics) never
//! contain credentials, hosts or paths, even when the services run with secrets in their URLs and
//! fail because of the infrastructure.

use std::time::Duration;

use ditfleet_common::state::JobState;
use ditfleet_tests::services::{Moto, RabbitUser};
use ditfleet_tests::{Fleet, free_port, http_get, job, metric_value};

const T: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_result_store_and_password_urls_leak_no_secret_host_or_path_to_clients() {
    let moto = Moto::start();
    let fleet = Fleet::new("error-leaks").await;
    let id = &fleet.ns[fleet.ns.len() - 8..];
    let amqp_secret = format!("amqp-pw-{id}");
    let redis_secret = format!("redis-pw-{id}");
    let aws_secret = format!("aws-secret-{id}");
    let user = RabbitUser::create(&format!("ditfleet-leak-{id}"), &amqp_secret, ".*", ".*", ".*");
    // Redis's default user has no password here, so any password authenticates; it must still
    // never show.
    let redis_url = format!("redis://default:{redis_secret}@127.0.0.1:6379/0");
    // The bucket does not exist: every store fails.
    let mut env = moto.worker_env(&format!("missing-{id}"), "results", &aws_secret);
    env.extend([
        ("DITFLEET_AMQP_URL".to_string(), user.url()),
        ("DITFLEET_REDIS_URL".to_string(), redis_url.clone()),
        ("DITFLEET_MAX_ATTEMPTS".to_string(), "2".to_string()),
        ("DITFLEET_JOB_LEASE_S".to_string(), "1".to_string()),
    ]);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    env.push(("DITFLEET_HTTP_ADDR".into(), addr));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let s = fleet.spawn_with(
        "ditfleet-scheduler",
        "scheduler",
        &[
            ("DITFLEET_AMQP_URL", user.url().as_str()),
            ("DITFLEET_REDIS_URL", redis_url.as_str()),
        ],
    );
    let w = fleet.start_worker("w-leak", &env);
    fleet.wait_workers(1, T).await;

    fleet.submit(&job("leak-1", 2)).await;
    // It fails to store, is retried, and is dead-lettered after its attempts.
    let mut last_error = String::new();
    let start = std::time::Instant::now();
    while start.elapsed() < T {
        let h = fleet.store.get("leak-1").await.unwrap();
        if let Some(e) = h.get("last_error") {
            last_error = e.clone();
        }
        if h.get("state").map(String::as_str) == Some("dead_lettered") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let h = fleet
        .wait_state("leak-1", JobState::DeadLettered, Duration::from_secs(1))
        .await;
    assert!(
        last_error.starts_with("storing the result failed:") && last_error.contains("<url>"),
        "the client is told why, without the endpoint: {last_error:?}"
    );
    let moto_host = format!("127.0.0.1:{}", moto.port);
    assert!(
        w.log_text().contains(&moto_host),
        "the operator's log has the full error (the failure really went to the S3 endpoint)"
    );

    // Everything a client can see.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut visible = vec![serde_json::to_string(&h).unwrap()];
    for (key, ev) in fleet.events.all() {
        visible.push(key);
        visible.push(serde_json::to_string(&ev).unwrap());
    }
    for (job_id, reason, _) in fleet.dead_letters().await {
        visible.push(job_id);
        visible.push(reason);
    }
    let status = fleet.ctl(&["status", "leak-1"]);
    visible.push(String::from_utf8_lossy(&status.stdout).to_string());
    let status_json = fleet.ctl(&["status", "leak-1", "--json"]);
    visible.push(String::from_utf8_lossy(&status_json.stdout).to_string());
    let metrics = http_get(port, "/metrics").expect("metrics").1;
    // The retries and the dead-lettering show in the worker's metrics.
    assert!(
        metric_value(&metrics, "ditfleet_job_retries_total").is_some_and(|v| v >= 2.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(&metrics, "ditfleet_dlq_total"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            r#"ditfleet_jobs_total{state="dead_lettered",class="small",model="flux-dev"}"#
        ),
        Some(1.0),
        "{metrics}"
    );
    visible.push(metrics);
    let text = visible.join("\n");
    assert!(
        text.contains("dead_lettered") && text.contains("storing the result failed"),
        "{text}"
    );
    for secret in [
        amqp_secret.as_str(),
        redis_secret.as_str(),
        aws_secret.as_str(),
        moto_host.as_str(),
        "/results/leak-1.png",
    ] {
        assert!(
            !text.contains(secret),
            "{secret:?} is visible to clients:\n{text}"
        );
    }
    // The services' own logs never print the passwords of their URLs either.
    for p in [&s, &w] {
        let log = p.log_text();
        for secret in [&amqp_secret, &redis_secret, &aws_secret] {
            assert!(!log.contains(secret.as_str()), "{} logged {secret}", p.name);
        }
    }
    drop(user);
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_broker_password_fails_the_service_without_printing_it() {
    let fleet = Fleet::new("leak-badpw").await;
    let secret = "wrong-amqp-password-7391";
    let url = format!("amqp://guest:{secret}@127.0.0.1:5672/%2f");
    let mut s = fleet.spawn_with(
        "ditfleet-scheduler",
        "scheduler",
        &[("DITFLEET_AMQP_URL", url.as_str())],
    );
    assert_eq!(s.wait_exit(T), Some(Some(1)), "{}", s.log_text());
    let log = s.log_text();
    assert!(!log.contains(secret), "{log}");
    let out = fleet.ctl_with(
        &[("DITFLEET_AMQP_URL", url.as_str())],
        &["submit", "--prompt", "x", "--width", "256", "--height", "256"],
    );
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("connecting to RabbitMQ at amqp://guest:***@127.0.0.1:5672"),
        "{text}"
    );
    assert!(!text.contains(secret), "{text}");
    fleet.teardown().await;
}
