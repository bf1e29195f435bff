//! GPU isolation in a real worker process: a Flux worker with a 4-device plan (the in-process
//! threads backend on CPU "devices", tiny random-weight model) and an injected device failure.

use std::time::{Duration, Instant};

use ditfleet_common::state::{JobState, WorkerInfo};
use ditfleet_tests::{Fleet, job};

const T: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_gpu_is_quarantined_the_job_completes_on_the_rest_and_the_worker_reports_degraded() {
    let fleet = Fleet::new("gpu-isolation").await;
    let _s = fleet.start_scheduler();
    let _w = fleet.start_worker(
        "w-iso",
        &[
            ("DITFLEET_ENGINE", "flux"),
            ("DITFLEET_DEVICES", "cpu,cpu,cpu,cpu"),
            ("DITFLEET_PLAN", "ring=4"),
            // The device in slot 2 fails at step 3 of every job until it is quarantined.
            ("DITFLEET_FAULT_GPU", "2:3"),
        ],
    );
    fleet.wait_workers(1, T).await;
    let mut first = job("iso-1", 4);
    first.width = 256;
    first.height = 256;
    fleet.submit(&first).await;
    let h = fleet.wait_state("iso-1", JobState::Succeeded, T).await;
    let timings = h.get("timings").cloned().unwrap_or_default();
    assert!(
        timings.contains("\"plan\":\"ring=3\""),
        "ran on the 3 healthy devices: {timings}"
    );

    // The worker advertises the reduced capacity.
    let start = Instant::now();
    let info = loop {
        let workers = fleet.store.workers().await.unwrap();
        let info: Option<WorkerInfo> = workers
            .iter()
            .filter_map(|(_, json)| serde_json::from_str::<WorkerInfo>(json).ok())
            .find(|w| w.id == "w-iso" && w.state == "degraded");
        if let Some(i) = info {
            break i;
        }
        assert!(start.elapsed() < T, "worker never reported degraded: {workers:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let why = info.degraded_reason.unwrap_or_default();
    assert!(why.contains("slot 2") && why.contains("3 of 4 devices"), "{why}");
    let ctl = fleet.ctl(&["workers"]);
    let table = String::from_utf8_lossy(&ctl.stdout);
    assert!(
        table.contains("degraded"),
        "ditfleetctl workers shows it:\n{table}"
    );

    // Later jobs succeed on the remaining devices.
    for i in 2..=3 {
        let mut j = job(&format!("iso-{i}"), 3);
        j.width = 256;
        j.height = 256;
        fleet.submit(&j).await;
        fleet
            .wait_state(&format!("iso-{i}"), JobState::Succeeded, T)
            .await;
    }
    fleet.teardown().await;
}
