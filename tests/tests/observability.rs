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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loading_worker_is_alive_but_neither_started_nor_ready_then_serves_and_reports_draining() {
    let fleet = Fleet::new("probes").await;
    let _s = fleet.start_scheduler();
    let wp = free_port();
    let w_addr = format!("127.0.0.1:{wp}");
    let mut w = fleet.start_worker(
        "w-probes",
        &[
            ("DITFLEET_HTTP_ADDR", w_addr.as_str()),
            ("DITFLEET_SIM_LOAD_MS", "4000"),
            ("DITFLEET_SIM_STEP_MS", "100"),
        ],
    );
    // While the model loads: alive, not started, not ready (and the body says why).
    assert_eq!(wait_http(wp, "/healthz", 200).await, "ok\n");
    assert_eq!(http_get(wp, "/startupz"), Some((503, "loading\n".into())));
    assert_eq!(http_get(wp, "/readyz"), Some((503, "loading\n".into())));
    // Loaded: started for good; ready once it consumes.
    assert_eq!(wait_http(wp, "/startupz", 200).await, "loaded\n");
    assert_eq!(wait_http(wp, "/readyz", 200).await, "ready\n");

    fleet.submit(&job("probe-long", 40)).await;
    fleet.wait_state("probe-long", JobState::Running, T).await;
    w.signal(libc::SIGTERM);
    assert_eq!(wait_http(wp, "/readyz", 503).await, "draining\n");
    assert_eq!(http_get(wp, "/startupz").map(|r| r.0), Some(200));
    assert_eq!(w.wait_exit(T), Some(Some(0)));
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_the_model_loads_ends_the_worker_at_once_not_after_the_load() {
    let fleet = Fleet::new("probes-term").await;
    let wp = free_port();
    let w_addr = format!("127.0.0.1:{wp}");
    // A load far longer than the test waits for the exit.
    let mut w = fleet.start_worker(
        "w-loading",
        &[
            ("DITFLEET_HTTP_ADDR", w_addr.as_str()),
            ("DITFLEET_SIM_LOAD_MS", "600000"),
        ],
    );
    assert_eq!(wait_http(wp, "/startupz", 503).await, "loading\n");
    let sent = Instant::now();
    w.signal(libc::SIGTERM);
    assert_eq!(
        w.wait_exit(Duration::from_secs(20)),
        Some(Some(0)),
        "the worker did not exit within 20 s of SIGTERM while loading:\n{}",
        w.log_text()
    );
    assert!(
        w.log_text()
            .contains("shutdown requested while loading the models"),
        "{}",
        w.log_text()
    );
    eprintln!("exited {:.1} s after SIGTERM", sent.elapsed().as_secs_f64());
    fleet.teardown().await;
}
