//! Strategy selection in a real worker process: `DITFLEET_PLAN=auto` on 2 CPU "devices" (threads
//! backend, tiny random-weight Flux) measures every plan on first start, caches the table on
//! disk, runs each job with the table's fastest plan for its size or the plan the job names,
//! fails a job whose plan the node cannot run with the reason (status and DLQ), and loads the
//! cached table instead of measuring again after a restart.

use std::time::Duration;

use ditfleet_common::state::JobState;
use ditfleet_tests::{Fleet, job};

const T: Duration = Duration::from_secs(180);

#[derive(serde::Deserialize)]
struct Measured {
    plan: String,
    devices: usize,
    ms_per_step: Option<f64>,
}

#[derive(serde::Deserialize)]
struct Size {
    width: u32,
    results: Vec<Measured>,
}

#[derive(serde::Deserialize)]
struct Table {
    node: String,
    measured_at: u64,
    sizes: Vec<Size>,
}

fn read_table(path: &std::path::Path) -> Table {
    serde_json::from_slice(&std::fs::read(path).expect("plan table written")).expect("plan table is JSON")
}

fn plan_of(h: &std::collections::HashMap<String, String>) -> String {
    let t: serde_json::Value =
        serde_json::from_str(h.get("timings").map(String::as_str).unwrap_or("{}")).unwrap();
    t["plan"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_plan_measures_once_caches_the_table_runs_the_fastest_or_named_plan_and_refuses_impossible_ones()
{
    let fleet = Fleet::new("plan-auto").await;
    let dir = std::env::temp_dir().join(format!("ditfleet-plan-auto-{}", std::process::id()));
    let cache = dir.join("plans.json");
    let cache_s = cache.display().to_string();
    let env = [
        ("DITFLEET_ENGINE", "flux"),
        ("DITFLEET_DEVICES", "cpu,cpu"),
        ("DITFLEET_PLAN", "auto"),
        ("DITFLEET_PLAN_CACHE", cache_s.as_str()),
        ("DITFLEET_AUTOTUNE_SIZES", "256x256,512x512"),
    ];
    let _s = fleet.start_scheduler();
    let mut w = fleet.start_worker("w-auto", &env);
    fleet.wait_workers(1, T).await;

    let table = read_table(&cache);
    assert!(
        table.node.starts_with("2x cpu | tiny-random | ditfleet-engine "),
        "{}",
        table.node
    );
    assert_eq!(table.sizes.len(), 2);
    for s in &table.sizes {
        let plans: Vec<&str> = s.results.iter().map(|m| m.plan.as_str()).collect();
        // Every 2-device strategy of the tiny config (2 heads) runs on the threads backend.
        for want in ["single", "ulysses=2", "ring=2"] {
            assert!(
                plans.contains(&want),
                "{want} not measured at {}: {plans:?}",
                s.width
            );
        }
        assert!(s.results.iter().all(|m| m.ms_per_step.is_some_and(|v| v > 0.0)));
        assert!(s.results.iter().all(|m| m.devices <= 2));
    }
    let log = w.log_text();
    assert!(
        log.contains("plan measured"),
        "progress of the measurement is logged"
    );

    // A job without a plan runs the table's fastest at its size.
    let best = |width: u32| -> &Measured {
        let s = table.sizes.iter().find(|s| s.width == width).unwrap();
        s.results
            .iter()
            .filter(|m| !m.plan.starts_with("cfg="))
            .min_by(|a, b| a.ms_per_step.unwrap().total_cmp(&b.ms_per_step.unwrap()))
            .unwrap()
    };
    let fastest = |width: u32| best(width).plan.clone();
    let mut a = job("auto-a", 3);
    a.width = 512;
    a.height = 512;
    fleet.submit(&a).await;
    let h = fleet.wait_state("auto-a", JobState::Succeeded, T).await;
    assert_eq!(plan_of(&h), fastest(512), "timings: {:?}", h.get("timings"));
    // Its cost counts the devices of the plan it ran with.
    assert_eq!(h["devices"], best(512).devices.to_string());

    // A job naming a plan runs with it.
    let mut b = job("auto-b", 3);
    b.width = 256;
    b.height = 256;
    b.plan = Some("ulysses=2".into());
    fleet.submit(&b).await;
    let h = fleet.wait_state("auto-b", JobState::Succeeded, T).await;
    assert_eq!(plan_of(&h), "ulysses=2");
    assert_eq!(h["devices"], "2");

    // A plan the node cannot run: failed with the reason, dead-lettered; the worker serves on.
    let mut c = job("auto-c", 3);
    c.width = 256;
    c.height = 256;
    c.plan = Some("ring=4".into());
    fleet.submit(&c).await;
    let h = fleet.wait_state("auto-c", JobState::Failed, T).await;
    let reason = h.get("error").cloned().unwrap_or_default();
    assert!(
        reason.contains("needs 4 GPUs, the node has 2"),
        "reason: {reason:?} in {h:?}"
    );
    let dead = fleet.dead_letters().await;
    assert!(
        dead.iter()
            .any(|(id, why, _)| id == "auto-c" && why.contains("needs 4 GPUs")),
        "{:?}",
        dead.iter().map(|(i, r, _)| (i, r)).collect::<Vec<_>>()
    );
    let mut d = job("auto-d", 3);
    d.width = 256;
    d.height = 256;
    fleet.submit(&d).await;
    let h = fleet.wait_state("auto-d", JobState::Succeeded, T).await;
    assert_eq!(plan_of(&h), fastest(256));

    // Restart: the cached table is loaded, not measured again.
    w.signal(libc::SIGTERM);
    assert_eq!(w.wait_exit(Duration::from_secs(60)), Some(Some(0)));
    let _w2 = fleet.start_worker("w-auto-2", &env);
    fleet.wait_workers(1, T).await;
    let again = read_table(&cache);
    assert_eq!(
        again.measured_at, table.measured_at,
        "the table was not measured again"
    );
    let mut e = job("auto-e", 3);
    e.width = 512;
    e.height = 512;
    fleet.submit(&e).await;
    let h = fleet.wait_state("auto-e", JobState::Succeeded, T).await;
    assert_eq!(plan_of(&h), fastest(512));

    fleet.teardown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
