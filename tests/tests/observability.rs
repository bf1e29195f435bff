//! The health and metrics endpoints of real scheduler and worker processes.

use std::time::{Duration, Instant};

use ditfleet_common::state::JobState;
use ditfleet_tests::{Fleet, free_port, http_get, job, metric_value};

const T: Duration = Duration::from_secs(60);

async fn wait_http(port: u16, path: &str, want: u16) -> String {
    let start = Instant::now();
    loop {
        if let Some((code, body)) = http_get(port, path)
            && code == want
        {
            return body;
        }
        assert!(start.elapsed() < T, "GET :{port}{path} never answered {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_metrics_follow_the_jobs_and_the_drain() {
    let fleet = Fleet::new("observability").await;
    let (sp, wp) = (free_port(), free_port());
    let s_addr = format!("127.0.0.1:{sp}");
    let w_addr = format!("127.0.0.1:{wp}");
    let _s = fleet.spawn_with(
        "ditfleet-scheduler",
        "scheduler",
        &[("DITFLEET_HTTP_ADDR", s_addr.as_str())],
    );
    let mut w = fleet.start_worker(
        "w-obs",
        &[
            ("DITFLEET_HTTP_ADDR", w_addr.as_str()),
            ("DITFLEET_SIM_STEP_MS", "100"),
        ],
    );
    assert_eq!(wait_http(wp, "/healthz", 200).await, "ok\n");
    wait_http(wp, "/readyz", 200).await;
    wait_http(sp, "/readyz", 200).await;
    assert_eq!(http_get(wp, "/nope").map(|r| r.0), Some(404));

    for i in 0..3 {
        fleet.submit(&job(&format!("obs-{i}"), 2)).await;
    }
    for i in 0..3 {
        fleet
            .wait_state(&format!("obs-{i}"), JobState::Succeeded, T)
            .await;
    }
    let wm = wait_http(wp, "/metrics", 200).await;
    let succeeded = r#"ditfleet_jobs_total{state="succeeded",class="small",model="flux-dev"}"#;
    assert_eq!(
        metric_value(&wm, succeeded),
        Some(3.0),
        "worker counts its jobs:\n{wm}"
    );
    let e2e = r#"ditfleet_job_duration_seconds_count{stage="end_to_end",class="small",model="flux-dev"}"#;
    assert_eq!(metric_value(&wm, e2e), Some(3.0), "{wm}");
    assert_eq!(
        metric_value(&wm, r#"ditfleet_model_loaded{model="flux-dev",version="sim-1"}"#),
        Some(1.0),
        "{wm}"
    );
    let sm = wait_http(sp, "/metrics", 200).await;
    assert_eq!(
        metric_value(
            &sm,
            r#"ditfleet_jobs_total{state="routed",class="small",model="flux-dev"}"#
        ),
        Some(3.0),
        "{sm}"
    );

    // A rejected job moves the scheduler's failure and DLQ counters.
    fleet.submit_raw(b"{broken", "obs-bad").await;
    fleet.wait_state("obs-bad", JobState::Failed, T).await;
    // The status is recorded before the DLQ copy is published: poll for the counter.
    let start = Instant::now();
    loop {
        let sm = wait_http(sp, "/metrics", 200).await;
        if metric_value(&sm, "ditfleet_dlq_total") == Some(1.0) {
            break;
        }
        assert!(start.elapsed() < T, "ditfleet_dlq_total never reached 1: {sm}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Draining: not ready while the in-flight job finishes, still alive.
    fleet.submit(&job("obs-long", 30)).await;
    fleet.wait_state("obs-long", JobState::Running, T).await;
    w.signal(libc::SIGTERM);
    wait_http(wp, "/readyz", 503).await;
    assert_eq!(
        http_get(wp, "/healthz").map(|r| r.0),
        Some(200),
        "alive while draining"
    );
    let wm = wait_http(wp, "/metrics", 200).await;
    assert_eq!(
        metric_value(&wm, r#"ditfleet_worker_state{state="draining"}"#),
        Some(1.0),
        "{wm}"
    );
    assert_eq!(w.wait_exit(T), Some(Some(0)));
    fleet.teardown().await;
}
