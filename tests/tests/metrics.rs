//! Metrics of real processes move as jobs run: queue depth per class (scheduler), cost and
//! GPU-seconds per class/model/tenant, the worker's start-up/busy/idle GPU time, and no
//! `ditfleet_gpu_*` series where NVML is absent (this machine has no GPU).

use std::time::{Duration, Instant};

use ditfleet_common::state::JobState;
use ditfleet_tests::{Fleet, free_port, http_get, job, metric_value};

const T: Duration = Duration::from_secs(60);

async fn wait_metric(port: u16, series: &str, want: impl Fn(f64) -> bool) -> String {
    let start = Instant::now();
    loop {
        if let Some((200, body)) = http_get(port, "/metrics") {
            if metric_value(&body, series).is_some_and(&want) {
                return body;
            }
            assert!(
                start.elapsed() < T,
                "{series} never reached the expected value:\n{body}"
            );
        }
        assert!(start.elapsed() < T, "no /metrics on :{port}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_cost_and_gpu_time_metrics_follow_the_jobs_and_no_gpu_series_without_nvml() {
    let fleet = Fleet::new("metrics").await;
    let (sp, wp) = (free_port(), free_port());
    let s_addr = format!("127.0.0.1:{sp}");
    let w_addr = format!("127.0.0.1:{wp}");
    let _s = fleet.spawn_with(
        "ditfleet-scheduler",
        "scheduler",
        &[
            ("DITFLEET_HTTP_ADDR", s_addr.as_str()),
            ("DITFLEET_QUEUE_POLL_S", "1"),
        ],
    );
    // No worker yet: routed jobs pile up in the small work queue.
    for i in 0..3 {
        fleet.submit(&job(&format!("m-{i}"), 4)).await;
    }
    for i in 0..3 {
        fleet.wait_state(&format!("m-{i}"), JobState::Routed, T).await;
    }
    let small = r#"ditfleet_queue_depth{queue="work",class="small"}"#;
    let body = wait_metric(sp, small, |v| v == 3.0).await;
    assert_eq!(
        metric_value(&body, r#"ditfleet_queue_consumers{queue="work",class="small"}"#),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        metric_value(&body, r#"ditfleet_queue_depth{queue="work",class="large"}"#),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&body, r#"ditfleet_queue_depth{queue="submit",class="none"}"#),
        Some(0.0)
    );
    assert_eq!(
        metric_value(&body, r#"ditfleet_queue_depth{queue="dead",class="none"}"#),
        Some(0.0)
    );
    // The oldest of them has waited since it was routed, and the age grows while nobody serves it.
    let age = r#"ditfleet_queue_oldest_age_seconds{queue="work",class="small"}"#;
    let first = metric_value(&wait_metric(sp, age, |v| v > 0.0).await, age).unwrap();
    let later = metric_value(&wait_metric(sp, age, |v| v >= first + 1.0).await, age).unwrap();
    assert!(later < 60.0, "{later}");
    assert_eq!(
        metric_value(
            &body,
            r#"ditfleet_queue_oldest_age_seconds{queue="work",class="large"}"#
        ),
        Some(0.0)
    );

    let w = fleet.start_worker("w-metrics", &[("DITFLEET_HTTP_ADDR", w_addr.as_str())]);
    for i in 0..3 {
        fleet.wait_state(&format!("m-{i}"), JobState::Succeeded, T).await;
    }
    let body = wait_metric(sp, small, |v| v == 0.0).await;
    wait_metric(sp, age, |v| v == 0.0).await;
    assert_eq!(
        metric_value(&body, r#"ditfleet_queue_consumers{queue="work",class="small"}"#),
        Some(1.0),
        "{body}"
    );

    // Cost: 256x256 = 256 tokens x 4 steps = 1024 token-steps per job.
    let labels = r#"{class="small",model="flux-dev",tenant="test"}"#;
    let wm = wait_metric(wp, &format!("ditfleet_job_cost_token_steps_total{labels}"), |v| {
        v == 3072.0
    })
    .await;
    let gpu_s = metric_value(&wm, &format!("ditfleet_job_gpu_seconds_total{labels}")).unwrap();
    assert!(gpu_s > 0.0, "jobs cost GPU-seconds: {wm}");
    // The status of each job carries what it cost.
    let h = fleet.store.get("m-0").await.unwrap();
    let job_s: f64 = h["gpu_seconds"].parse().unwrap();
    assert!(job_s > 0.0 && job_s <= gpu_s, "{h:?}");
    assert_eq!(h["devices"], "1");
    // Start-up, and after a heartbeat idle time, are accounted too.
    assert!(
        metric_value(&wm, r#"ditfleet_worker_gpu_seconds_total{state="startup"}"#).is_some_and(|v| v > 0.0),
        "{wm}"
    );
    wait_metric(wp, r#"ditfleet_worker_gpu_seconds_total{state="idle"}"#, |v| {
        v > 0.0
    })
    .await;

    // This machine has no NVML: the worker exports no GPU series and registers no GPUs.
    assert!(!wm.contains("ditfleet_gpu_"), "{wm}");
    assert!(w.log_text().contains("NVML not available"), "{}", w.log_text());
    let workers = fleet.store.workers().await.unwrap();
    let info: serde_json::Value = serde_json::from_str(&workers[0].1).unwrap();
    assert_eq!(info["gpus"], serde_json::json!([]));
    fleet.teardown().await;
}
