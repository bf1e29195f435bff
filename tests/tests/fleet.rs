//! Fleet behaviour through real RabbitMQ, Redis, schedulers, workers and ditfleetctl: priorities,
//! tenant rate limits, spilling between classes, deadlines, retries, step checkpoints, drain,
//! hot-swapped model versions and rolling upgrades.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use ditfleet_common::job::{JobEvent, Priority};
use ditfleet_common::state::{JobState, WorkerInfo};
use ditfleet_tests::{Fleet, history, job};

const T: Duration = Duration::from_secs(90);

fn rfc3339_in(d: Duration) -> String {
    humantime::format_rfc3339_seconds(SystemTime::now() + d).to_string()
}

async fn wait_terminal(
    fleet: &Fleet,
    ids: &[String],
    timeout: Duration,
) -> HashMap<String, HashMap<String, String>> {
    let start = Instant::now();
    loop {
        let mut out = HashMap::new();
        for id in ids {
            let h = fleet.store.get(id).await.unwrap();
            if h.get("state")
                .and_then(|s| s.parse::<JobState>().ok())
                .is_some_and(|s| s.is_terminal())
            {
                out.insert(id.clone(), h);
            }
        }
        if out.len() == ids.len() {
            return out;
        }
        assert!(
            start.elapsed() < timeout,
            "{} of {} jobs terminal after {timeout:?}",
            out.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn ctl(fleet: &Fleet, args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let fleet_env = fleet.env.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(ditfleet_tests::bin("ditfleetctl"));
        cmd.args(&args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &fleet_env {
            cmd.env(k, v);
        }
        ditfleet_tests::output_within(&mut cmd, ditfleet_tests::CTL_LIMIT)
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

async fn workers(fleet: &Fleet) -> Vec<WorkerInfo> {
    fleet
        .store
        .workers()
        .await
        .unwrap()
        .iter()
        .filter_map(|(_, v)| serde_json::from_str(v).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_priority_jobs_start_before_normal_and_low_ones_queued_earlier() {
    let fleet = Fleet::new("priorities").await;
    let _s = fleet.start_scheduler();
    let _w = fleet.start_worker("w-prio", &[("DITFLEET_SIM_STEP_MS", "30")]);
    fleet.wait_workers(1, T).await;
    // The only slot is busy while the rest queue up, lowest priority first.
    fleet.submit(&job("blocker", 80)).await;
    fleet.wait_state("blocker", JobState::Running, T).await;
    let mut ids = Vec::new();
    for (p, name) in [
        (Priority::Low, "low"),
        (Priority::Normal, "normal"),
        (Priority::High, "high"),
    ] {
        for i in 0..5 {
            let mut j = job(&format!("{name}-{i}"), 2);
            j.priority = p;
            fleet.submit(&j).await;
            ids.push(j.job_id);
        }
    }
    for id in &ids {
        fleet.wait_state(id, JobState::Routed, T).await;
    }
    assert_eq!(
        fleet.state("blocker").await,
        Some(JobState::Running),
        "everything was queued before the slot freed up"
    );
    let done = wait_terminal(&fleet, &ids, T).await;
    let started = |prefix: &str| -> Vec<u64> {
        done.iter()
            .filter(|(id, _)| id.starts_with(prefix))
            .map(|(_, h)| {
                assert_eq!(h["state"], "succeeded", "{h:?}");
                h["started_ms"].parse().unwrap()
            })
            .collect()
    };
    let (high, normal, low) = (started("high-"), started("normal-"), started("low-"));
    assert!(
        high.iter().max() < normal.iter().min() && normal.iter().max() < low.iter().min(),
        "start order must be high < normal < low: high {high:?}, normal {normal:?}, low {low:?}"
    );
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_over_its_rate_limit_is_failed_with_the_reason_in_status_dlq_and_event() {
    let fleet = Fleet::new("rate-limit").await;
    let _s = fleet.spawn_with(
        "ditfleet-scheduler",
        "scheduler",
        &[("DITFLEET_TENANT_LIMITS", "greedy=0.1:3")],
    );
    let _w = fleet.start_worker(
        "w-rate",
        &[("DITFLEET_SIM_STEP_MS", "1"), ("DITFLEET_WORKER_SLOTS", "4")],
    );
    fleet.wait_workers(1, T).await;
    let mut ids = Vec::new();
    for i in 0..8 {
        let mut j = job(&format!("greedy-{i}"), 2);
        j.tenant = "greedy".into();
        fleet.submit(&j).await;
        ids.push(j.job_id);
    }
    for i in 0..3 {
        let mut j = job(&format!("calm-{i}"), 2);
        j.tenant = "calm".into();
        fleet.submit(&j).await;
        ids.push(j.job_id);
    }
    let done = wait_terminal(&fleet, &ids, T).await;
    let greedy_ok = done
        .iter()
        .filter(|(id, h)| id.starts_with("greedy") && h["state"] == "succeeded")
        .count();
    let limited: Vec<_> = done
        .iter()
        .filter(|(id, h)| id.starts_with("greedy") && h["state"] == "failed")
        .collect();
    assert_eq!(greedy_ok, 3, "the bucket holds 3 and refills 0.1/s");
    assert_eq!(limited.len(), 5);
    for (id, h) in &limited {
        assert!(
            h["error"].starts_with(
                "rate limited: tenant \"greedy\" is over its limit of 0.1 jobs/s (burst 3); a token is free again in"
            ),
            "{id}: {h:?}"
        );
        assert_eq!(h["rejection"], "rate_limited");
        assert!(!h.contains_key("started_ms"), "never started: {h:?}");
    }
    for id in ids.iter().filter(|id| id.starts_with("calm")) {
        assert_eq!(done[id]["state"], "succeeded", "other tenants are not limited");
    }
    let dead = fleet.dead_letters().await;
    assert_eq!(dead.len(), 5, "each rejection is in the DLQ once: {dead:?}");
    assert!(
        dead.iter()
            .all(|d| d.0.starts_with("greedy") && d.1.starts_with("rate limited"))
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let failed_events = fleet
        .events
        .all()
        .into_iter()
        .filter(|(_, e)| matches!(e, JobEvent::Failed { reason, .. } if reason.starts_with("rate limited")))
        .count();
    assert_eq!(failed_events, 5);
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_deadline_is_expired_and_never_started() {
    let fleet = Fleet::new("deadline").await;
    let _s = fleet.start_scheduler();
    let _w = fleet.start_worker("w-deadline", &[("DITFLEET_SIM_STEP_MS", "50")]);
    fleet.wait_workers(1, T).await;
    // Past on arrival: the scheduler expires it.
    let mut late = job("dl-late", 2);
    late.deadline = Some("2020-01-01T00:00:00Z".into());
    fleet.submit(&late).await;
    let h = fleet.wait_state("dl-late", JobState::Expired, T).await;
    assert_eq!(history(&h), ["expired"]);
    assert!(
        h["error"].contains("had passed when the scheduler received"),
        "{h:?}"
    );
    // Passes while queued behind a 2 s job: the worker expires it instead of starting it.
    fleet.submit(&job("dl-blocker", 40)).await;
    fleet.wait_state("dl-blocker", JobState::Running, T).await;
    let mut queued = job("dl-queued", 2);
    queued.deadline = Some(rfc3339_in(Duration::from_secs(1)));
    fleet.submit(&queued).await;
    let mut roomy = job("dl-roomy", 2);
    roomy.deadline = Some(rfc3339_in(Duration::from_secs(3600)));
    fleet.submit(&roomy).await;
    let h = fleet.wait_state("dl-queued", JobState::Expired, T).await;
    assert_eq!(history(&h), ["queued", "routed", "expired"]);
    assert!(!h.contains_key("started_ms"), "never started: {h:?}");
    assert!(h["error"].starts_with("deadline passed"), "{h:?}");
    fleet.wait_state("dl-roomy", JobState::Succeeded, T).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in ["dl-late", "dl-queued"] {
        let evs = fleet.events.for_job(id);
        assert!(
            matches!(evs.as_slice(), [JobEvent::Failed { state, .. }] if state == "expired"),
            "{id}: one failed event with state expired: {evs:?}"
        );
    }
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_engine_failures_are_retried_and_permanent_or_poison_ones_end_in_the_dlq() {
    let fleet = Fleet::new("retries").await;
    // No spilling: each job must reach the one worker of its class (a small job spilled to the
    // idle large-only worker, whose engine always fails, would be dead-lettered there).
    let _s = fleet.spawn_with("ditfleet-scheduler", "scheduler", &[("DITFLEET_SPILL", "0")]);
    let fast = [("DITFLEET_RETRY_BASE_MS", "50")];
    let _oom = fleet.start_worker(
        "w-oom",
        &[
            fast[0],
            ("DITFLEET_SIM_FAULTS", "oom=2"),
            ("DITFLEET_WORKER_CLASSES", "small"),
        ],
    );
    let _bad = fleet.start_worker(
        "w-bad",
        &[
            fast[0],
            ("DITFLEET_SIM_FAULTS", "bad-weights"),
            ("DITFLEET_WORKER_CLASSES", "medium"),
        ],
    );
    let _poison = fleet.start_worker(
        "w-poison",
        &[
            fast[0],
            ("DITFLEET_SIM_FAULTS", "oom=1000"),
            ("DITFLEET_ENGINE_RETRIES", "1"),
            ("DITFLEET_MAX_ATTEMPTS", "2"),
            ("DITFLEET_WORKER_CLASSES", "large"),
        ],
    );
    fleet.wait_workers(3, T).await;
    // Transient: two out-of-memory failures, retried in the process with back-off, then success.
    fleet.submit(&job("r-oom", 3)).await;
    let h = fleet.wait_state("r-oom", JobState::Succeeded, T).await;
    assert_eq!(
        (h["attempts"].as_str(), h["engine_retries"].as_str()),
        ("1", "2"),
        "{h:?}"
    );
    // Permanent: straight to failed + DLQ, no retry.
    let mut bad = job("r-bad", 13);
    (bad.width, bad.height) = (1024, 1024); // 53,248 token-steps: medium
    fleet.submit(&bad).await;
    let h = fleet.wait_state("r-bad", JobState::Failed, T).await;
    assert!(h["error"].contains("model load failed: simulated fault"), "{h:?}");
    assert_eq!(h["attempts"], "1");
    assert!(
        !h.contains_key("engine_retries"),
        "permanent failures are not retried"
    );
    // Poison: fails every time; the attempt counter stops it after 2 attempts.
    let mut poison = job("r-poison", 28);
    (poison.width, poison.height) = (2048, 2048); // large
    fleet.submit(&poison).await;
    let h = fleet.wait_state("r-poison", JobState::DeadLettered, T).await;
    assert_eq!(h["error"], "gave up after 2 attempts", "{h:?}");
    assert_eq!(
        history(&h),
        [
            "queued",
            "routed",
            "running",
            "routed",
            "running",
            "routed",
            "dead_lettered"
        ]
    );
    let dead = fleet.dead_letters().await;
    let reasons: HashMap<String, String> = dead.iter().map(|d| (d.0.clone(), d.1.clone())).collect();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(reasons["r-bad"].contains("model load failed"));
    assert_eq!(reasons["r-poison"], "gave up after 2 attempts");
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_killed_mid_way_resumes_from_its_checkpoint_on_another_worker_and_gives_the_same_image() {
    let fleet = Fleet::new("resume").await;
    let _s = fleet.start_scheduler();
    let first = fleet.start_worker(
        "w-first",
        &[
            ("DITFLEET_SIM_STEP_MS", "100"),
            ("DITFLEET_CHECKPOINT_EVERY", "3"),
        ],
    );
    fleet.wait_workers(1, T).await;
    fleet.submit(&job("ck-killed", 30)).await;
    let start = Instant::now();
    loop {
        let h = fleet.store.get("ck-killed").await.unwrap();
        if h.get("checkpoint_step")
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0)
            >= 9
        {
            break;
        }
        assert!(start.elapsed() < T, "no checkpoint at step 9: {h:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.signal(libc::SIGKILL);
    let killed_at = fleet.store.get("ck-killed").await.unwrap();
    let ck: u32 = killed_at["checkpoint_step"].parse().unwrap();
    let _second = fleet.start_worker("w-second", &[("DITFLEET_SIM_STEP_MS", "5")]);
    let h = fleet.wait_state("ck-killed", JobState::Succeeded, T).await;
    assert_eq!(h["worker"], "w-second");
    let resumed: u32 = h["resumed_from_step"].parse().unwrap();
    assert!(
        resumed >= ck && resumed.is_multiple_of(3),
        "resumed from {resumed}, checkpoint was {ck}"
    );
    // The worker removes the checkpoint files, then their pointer, once it has published the
    // done event, which is after the success is recorded: wait for the pointer to go.
    let start = Instant::now();
    loop {
        let now = fleet.store.get("ck-killed").await.unwrap();
        if !now.contains_key("checkpoint_url") {
            break;
        }
        assert!(start.elapsed() < T, "pointer removed once done: {now:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !fleet.result_dir.join("checkpoints").join("ck-killed").exists(),
        "checkpoint files removed once done"
    );
    // The second worker's progress starts after the checkpoint.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second_steps: Vec<u32> = fleet
        .events
        .for_job("ck-killed")
        .iter()
        .filter_map(|e| match e {
            JobEvent::Progress { step, worker, .. } if worker == "w-second" => Some(*step),
            _ => None,
        })
        .collect();
    assert_eq!(second_steps, ((resumed + 1)..=30).collect::<Vec<_>>());
    // An uninterrupted run of the same job (same prompt and seed) gives the same bytes.
    fleet.submit(&job("ck-reference", 30)).await;
    let r = fleet.wait_state("ck-reference", JobState::Succeeded, T).await;
    assert_eq!(r["resumed_from_step"], "");
    let png = |h: &HashMap<String, String>| {
        std::fs::read(h["result_url"].strip_prefix("file://").unwrap()).unwrap()
    };
    assert!(
        png(&h) == png(&r),
        "resumed image differs from the uninterrupted one"
    );
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_past_its_grace_period_checkpoints_and_the_next_worker_resumes_at_that_step() {
    let fleet = Fleet::new("grace-ckpt").await;
    let _s = fleet.start_scheduler();
    let mut w = fleet.start_worker(
        "w-grace-ck",
        &[
            ("DITFLEET_SIM_STEP_MS", "100"),
            ("DITFLEET_SHUTDOWN_GRACE_S", "1"),
            ("DITFLEET_CHECKPOINT_EVERY", "1000"),
        ],
    );
    fleet.wait_workers(1, T).await;
    fleet.submit(&job("gc-1", 60)).await;
    fleet.wait_state("gc-1", JobState::Running, T).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.signal(libc::SIGTERM);
    assert_eq!(w.wait_exit(Duration::from_secs(30)), Some(Some(0)));
    let h = fleet.store.get("gc-1").await.unwrap();
    assert_eq!(h["state"], "routed", "{h:?}");
    let stopped: u32 = h["last_error"].rsplit(' ').next().unwrap().parse().unwrap();
    assert_eq!(
        h["checkpoint_step"],
        stopped.to_string(),
        "checkpoint at the stop step: {h:?}"
    );
    let _w2 = fleet.start_worker("w-after-ck", &[("DITFLEET_SIM_STEP_MS", "1")]);
    let h = fleet.wait_state("gc-1", JobState::Succeeded, T).await;
    assert_eq!(h["resumed_from_step"], stopped.to_string());
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_drain_finishes_the_running_job_then_the_worker_deregisters_and_exits_0() {
    let fleet = Fleet::new("ctl-drain").await;
    let _s = fleet.start_scheduler();
    let mut w = fleet.start_worker(
        "w-drained",
        &[
            ("DITFLEET_SIM_STEP_MS", "100"),
            ("DITFLEET_CONTROL_POLL_MS", "200"),
        ],
    );
    fleet.wait_workers(1, T).await;
    let (code, _, err) = ctl(&fleet, &["drain", "nobody"]).await;
    assert_eq!(code, 3, "unknown worker: {err}");
    fleet.submit(&job("cd-1", 20)).await;
    fleet.wait_state("cd-1", JobState::Running, T).await;
    let (code, out, _) = ctl(&fleet, &["drain", "w-drained", "--no-wait"]).await;
    assert_eq!(code, 0, "{out}");
    // `workers` shows it draining while its job finishes.
    let start = Instant::now();
    loop {
        let (_, out, _) = ctl(&fleet, &["workers"]).await;
        if out
            .lines()
            .any(|l| l.starts_with("w-drained") && l.contains("draining"))
        {
            break;
        }
        assert!(start.elapsed() < T, "never shown draining: {out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet.submit(&job("cd-2", 2)).await;
    let (code, out, _) = ctl(&fleet, &["drain", "w-drained"]).await;
    assert!(
        code == 0 && out.contains("drained and deregistered") || code == 3,
        "waits for the drain: {code} {out}"
    );
    assert_eq!(
        w.wait_exit(Duration::from_secs(30)),
        Some(Some(0)),
        "worker exits 0; log:\n{}",
        w.log_text()
    );
    assert_eq!(
        fleet.state("cd-1").await,
        Some(JobState::Succeeded),
        "finished its job"
    );
    assert_eq!(
        fleet.state("cd-2").await,
        Some(JobState::Routed),
        "took no new job"
    );
    assert!(fleet.store.workers().await.unwrap().is_empty(), "deregistered");
    // The same id may serve again: the drain request was cleared.
    let _w2 = fleet.start_worker("w-drained", &[("DITFLEET_CONTROL_POLL_MS", "200")]);
    fleet.wait_state("cd-2", JobState::Succeeded, T).await;
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_load_fails_no_job_and_pinned_jobs_run_only_on_holders() {
    let fleet = Fleet::new("hot-swap").await;
    let _s = fleet.start_scheduler();
    let opts = [
        ("DITFLEET_SIM_STEP_MS", "10"),
        ("DITFLEET_WORKER_SLOTS", "2"),
        ("DITFLEET_CONTROL_POLL_MS", "200"),
    ];
    let _a = fleet.start_worker("w-a", &opts);
    let _b = fleet.start_worker("w-b", &opts);
    fleet.wait_workers(2, T).await;
    // Unpinned load throughout the swaps.
    let load_ids: Vec<String> = (0..150).map(|i| format!("hs-load-{i}")).collect();
    let loader = fleet
        .submit_paced("hot-swap loader", load_ids.clone(), 5, Duration::from_millis(40))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (code, out, err) = ctl(&fleet, &["model", "load", "flux-dev@v2", "--workers", "w-a"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("flux-dev@v2 serves on w-a"), "{out}");
    let ws = workers(&fleet).await;
    let a = ws.iter().find(|w| w.id == "w-a").unwrap();
    let b = ws.iter().find(|w| w.id == "w-b").unwrap();
    assert!(a.default_versions.contains(&"flux-dev@v2".to_string()), "{a:?}");
    assert!(
        !a.model_versions.contains(&"flux-dev@sim-1".to_string()),
        "old version unloaded: {a:?}"
    );
    assert!(
        b.model_versions.contains(&"flux-dev@sim-1".to_string()),
        "w-b untouched: {b:?}"
    );
    let (_, table, _) = ctl(&fleet, &["workers"]).await;
    assert!(table.contains("*flux-dev@v2"), "{table}");
    // Jobs pinned to v2 run only on its holder; a pin to a version nobody ever held is rejected.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut pinned = Vec::new();
    for i in 0..12 {
        let mut j = job(&format!("hs-pin-{i}"), 3);
        j.model_version = Some("v2".into());
        fleet.submit(&j).await;
        pinned.push(j.job_id);
    }
    let mut ghost = job("hs-ghost", 3);
    ghost.model_version = Some("v9".into());
    fleet.submit(&ghost).await;
    let h = fleet.wait_state("hs-ghost", JobState::Failed, T).await;
    assert!(
        h["error"].contains("no worker of this fleet has ever held flux-dev@v9"),
        "{h:?}"
    );
    for (id, h) in wait_terminal(&fleet, &pinned, T).await {
        assert_eq!(h["state"], "succeeded", "{id}: {h:?}");
        assert_eq!(
            (h["worker"].as_str(), h["model_version_used"].as_str()),
            ("w-a", "flux-dev@v2"),
            "{id}"
        );
    }
    // The whole fleet moves to v2.
    let (code, out, err) = ctl(&fleet, &["model", "load", "flux-dev@v2"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let conn = loader.await.unwrap();
    let done = wait_terminal(&fleet, &load_ids, T).await;
    let mut by_version: HashMap<String, usize> = HashMap::new();
    for (id, h) in &done {
        assert_eq!(h["state"], "succeeded", "no job fails during a swap: {id} {h:?}");
        *by_version
            .entry(format!("{}@{}", h["worker"], h["model_version_used"]))
            .or_default() += 1;
    }
    assert!(by_version.contains_key("w-a@flux-dev@v2"), "{by_version:?}");
    assert!(by_version.contains_key("w-b@flux-dev@sim-1"), "{by_version:?}");
    let ws = workers(&fleet).await;
    assert!(
        ws.iter()
            .all(|w| w.model_versions == ["flux-dev@v2", "flux-schnell@sim-1", "sdxl-base@sim-1"]),
        "{ws:?}"
    );
    let _ = conn.close(200, "done".into()).await;
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_replaces_every_worker_under_load_with_zero_failed_jobs() {
    let fleet = Fleet::new("rolling").await;
    let _s = fleet.start_scheduler();
    let opts = [("DITFLEET_SIM_STEP_MS", "20"), ("DITFLEET_WORKER_SLOTS", "2")];
    let mut old: Vec<_> = (0..3)
        .map(|i| fleet.start_worker(&format!("w-old-{i}"), &opts))
        .collect();
    fleet.wait_workers(3, T).await;
    let ids: Vec<String> = (0..240).map(|i| format!("roll-{i}")).collect();
    let submitter = fleet
        .submit_paced("rolling loader", ids.clone(), 4, Duration::from_millis(25))
        .await;
    let mut new = Vec::new();
    for (i, w) in old.iter_mut().enumerate() {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        new.push(fleet.start_worker(&format!("w-new-{i}"), &opts));
        let start = Instant::now();
        while !workers(&fleet).await.iter().any(|x| x.id == format!("w-new-{i}")) {
            assert!(start.elapsed() < T);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        w.signal(libc::SIGTERM);
        assert_eq!(
            w.wait_exit(Duration::from_secs(60)),
            Some(Some(0)),
            "w-old-{i} drains and exits 0"
        );
    }
    let conn = submitter.await.unwrap();
    let done = wait_terminal(&fleet, &ids, T).await;
    let failed: Vec<_> = done.iter().filter(|(_, h)| h["state"] != "succeeded").collect();
    assert!(failed.is_empty(), "zero failed jobs: {failed:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut done_events: HashMap<String, usize> = HashMap::new();
    for (_, e) in fleet.events.all() {
        if let JobEvent::Done { job_id, .. } = e {
            *done_events.entry(job_id).or_default() += 1;
        }
    }
    assert_eq!(done_events.len(), ids.len());
    assert!(done_events.values().all(|n| *n == 1), "one done event per job");
    let by_old = done.values().filter(|h| h["worker"].starts_with("w-old")).count();
    let by_new = done.values().filter(|h| h["worker"].starts_with("w-new")).count();
    assert!(by_old > 0 && by_new > 0, "old {by_old}, new {by_new}");
    let _ = conn.close(200, "done".into()).await;
    fleet.teardown().await;
}

/// A fleet of one scheduler (refreshing its view of the load every 100 ms) and `workers`
/// (id, classes consumed; one slot, 300 ms steps) gets three small jobs at once: the first takes
/// a small slot, the others are backlogged behind it. Returns each job's status (all succeeded,
/// natural class small), to see which class and worker each ran on.
async fn burst_of_small_jobs(name: &str, workers: &[(&str, &str)]) -> Vec<HashMap<String, String>> {
    let fleet = Fleet::new(name).await;
    let _s = fleet.spawn_with(
        "ditfleet-scheduler",
        "scheduler",
        &[("DITFLEET_BALANCE_INTERVAL_MS", "100")],
    );
    let _w: Vec<_> = workers
        .iter()
        .map(|(id, classes)| {
            fleet.start_worker(
                id,
                &[
                    ("DITFLEET_SIM_STEP_MS", "300"),
                    ("DITFLEET_WORKER_CLASSES", classes),
                ],
            )
        })
        .collect();
    fleet.wait_workers(workers.len(), T).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // the scheduler's refresh sees them
    let ids: Vec<String> = (0..3).map(|i| format!("{name}-{i}")).collect();
    for id in &ids {
        fleet.submit(&job(id, 4)).await;
    }
    let done = wait_terminal(&fleet, &ids, T).await;
    fleet.teardown().await;
    ids.iter()
        .map(|id| {
            let h = done[id].clone();
            assert_eq!(h["state"], "succeeded", "{h:?}");
            assert_eq!(h["natural_class"], "small", "{h:?}");
            h
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_backlog_spills_up_to_an_idle_worker_that_serves_only_a_bigger_class() {
    let jobs = burst_of_small_jobs("spill-up", &[("w-small", "small"), ("w-large", "large")]).await;
    for h in &jobs {
        let want = if h["class"] == "large" {
            "w-large"
        } else {
            "w-small"
        };
        assert_eq!(h["worker"], want, "a job runs on a worker of its class: {h:?}");
    }
    let spilled = jobs.iter().filter(|h| h["class"] == "large").count();
    assert!(
        (1..3).contains(&spilled),
        "the backlog beyond the small slot spills to the idle large worker, not all of it: {jobs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_stays_in_its_class_when_the_only_idle_bigger_slot_is_its_own_workers() {
    // One worker consumes small and large: its free slot takes the next small job from the
    // small queue, so moving a job to large would only relabel it.
    for h in burst_of_small_jobs("spill-same", &[("w-both", "small,large")]).await {
        assert_eq!(
            (h["class"].as_str(), h["worker"].as_str()),
            ("small", "w-both"),
            "{h:?}"
        );
    }
}

/// A worker of the tiny random-weight Flux config on the CPU (holding `flux-dev@tiny-random-0`
/// at start, bf16), registered.
async fn start_tiny_flux_worker(fleet: &Fleet, id: &str) -> ditfleet_tests::Proc {
    let w = fleet.start_worker(
        id,
        &[
            ("DITFLEET_ENGINE", "flux"),
            ("DITFLEET_DEVICES", "cpu"),
            ("DITFLEET_CONTROL_POLL_MS", "200"),
        ],
    );
    fleet.wait_workers(1, Duration::from_secs(300)).await;
    w
}

/// `ditfleetctl model load <model_version> --workers <id> <extra…>`, which must succeed; the
/// worker's record after it.
async fn load_on(fleet: &Fleet, model_version: &str, id: &str, extra: &[&str]) -> WorkerInfo {
    let mut args = vec!["model", "load", model_version, "--workers", id];
    args.extend_from_slice(extra);
    let (code, out, err) = ctl(fleet, &args).await;
    assert_eq!(code, 0, "{out}{err}");
    workers(fleet)
        .await
        .into_iter()
        .find(|w| w.id == id)
        .expect("the worker is live")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_fp8_version_is_loaded_shown_with_its_precision_and_recorded_on_each_job_it_runs() {
    let fleet = Fleet::new("fp8-version").await;
    let _s = fleet.start_scheduler();
    let _w = start_tiny_flux_worker(&fleet, "w-fp8").await;
    let slow = Duration::from_secs(300);
    // The tiny Flux config in bf16 first: its job records bf16.
    let mut j = job("fp8v-bf16", 2);
    j.scheduler = Some("flow_euler".into());
    fleet.submit(&j).await;
    let h = fleet.wait_state("fp8v-bf16", JobState::Succeeded, slow).await;
    let timings: serde_json::Value = serde_json::from_str(&h["timings"]).unwrap();
    assert_eq!(timings["precision"], "bf16", "{timings}");

    let w = load_on(&fleet, "flux-dev@tiny-random-7-fp8", "w-fp8", &[]).await;
    assert_eq!(
        w.model_precisions
            .get("flux-dev@tiny-random-7-fp8")
            .map(String::as_str),
        Some("fp8"),
        "{w:?}"
    );
    let (_, table, _) = ctl(&fleet, &["workers"]).await;
    assert!(table.contains("flux-dev@tiny-random-7-fp8(fp8)"), "{table}");

    // A job pinned to the fp8 version runs there and says so.
    let mut j = job("fp8v-fp8", 2);
    j.scheduler = Some("flow_euler".into());
    j.model_version = Some("tiny-random-7-fp8".into());
    fleet.submit(&j).await;
    let h = fleet.wait_state("fp8v-fp8", JobState::Succeeded, slow).await;
    let timings: serde_json::Value = serde_json::from_str(&h["timings"]).unwrap();
    assert_eq!(timings["precision"], "fp8", "{timings}");
    assert_eq!(h["worker"], "w-fp8");
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_jobs_are_kept_off_fp8_versions_pinned_to_a_held_bf16_one_or_rejected_with_the_reason() {
    // A worker of the tiny real Flux runs fp8 by default and holds the bf16 version beside it:
    // an unpinned adapter job is pinned to the bf16 one (and its adapter changes the image), a
    // plain job runs on the fp8 default, an adapter job pinned to the fp8 version is rejected by
    // the scheduler with the bf16 versions held, and once no bf16 version is held an adapter job
    // is rejected naming the fix. Rejections land in the status and the dead-letter queue.
    use ditfleet_common::job::LoraSpec;
    let mut fleet = Fleet::new("fp8-lora").await;
    fleet
        .env
        .insert("DITFLEET_BALANCE_INTERVAL_MS".into(), "200".into());
    let (r, d) = (2usize, 64usize); // rank, the tiny Flux transformer's width
    let a: Vec<f32> = (0..r * d).map(|i| ((i as f32) * 0.37).sin() * 0.5).collect();
    let b: Vec<f32> = (0..d * r).map(|i| ((i as f32) * 0.71).cos() * 0.5).collect();
    fleet.push_lora_tensors(
        "pixel-art",
        "v1",
        "flux-dev",
        &[
            (
                "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                vec![r, d],
                a,
            ),
            (
                "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
                vec![d, r],
                b,
            ),
        ],
    );
    let _s = fleet.start_scheduler();
    let _w = start_tiny_flux_worker(&fleet, "w-mix").await;
    let slow = Duration::from_secs(300);
    let w = load_on(&fleet, "flux-dev@tiny-random-7-fp8", "w-mix", &["--keep-old"]).await;
    assert!(
        w.default_versions
            .iter()
            .any(|v| v == "flux-dev@tiny-random-7-fp8"),
        "{w:?}"
    );
    assert!(
        w.model_versions.iter().any(|v| v == "flux-dev@tiny-random-0"),
        "{w:?}"
    );
    // The scheduler's view of the workers refreshes every 200 ms; heartbeats come every second.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let styled = |id: &str| {
        let mut j = job(id, 2);
        j.scheduler = Some("flow_euler".into());
        j.loras = vec![LoraSpec {
            name: "pixel-art".into(),
            version: "v1".into(),
            scale: Some(2.0),
        }];
        j
    };
    let png = |h: &HashMap<String, String>| {
        std::fs::read(h["result_url"].strip_prefix("file://").expect("file URL")).expect("result PNG")
    };

    fleet.submit(&styled("fl-unpinned")).await;
    let h = fleet.wait_state("fl-unpinned", JobState::Succeeded, slow).await;
    assert_eq!(h["routed_version"], "flux-dev@tiny-random-0", "{h:?}");
    assert_eq!(h["model_version_used"], "flux-dev@tiny-random-0", "{h:?}");
    assert_eq!(h["model_version"], "", "the job's own field stays as sent: {h:?}");
    let timings: serde_json::Value = serde_json::from_str(&h["timings"]).unwrap();
    assert_eq!(timings["precision"], "bf16", "{timings}");
    let styled_png = png(&h);
    // The same job without the adapter, pinned to the same bf16 version: another image.
    let mut base = styled("fl-base");
    base.loras.clear();
    base.model_version = Some("tiny-random-0".into());
    fleet.submit(&base).await;
    let h = fleet.wait_state("fl-base", JobState::Succeeded, slow).await;
    assert_ne!(png(&h), styled_png, "the adapter was applied");

    let mut plain = job("fl-plain", 2);
    plain.scheduler = Some("flow_euler".into());
    fleet.submit(&plain).await;
    let h = fleet.wait_state("fl-plain", JobState::Succeeded, slow).await;
    assert_eq!(h["model_version_used"], "flux-dev@tiny-random-7-fp8", "{h:?}");
    assert_eq!(h["routed_version"], "", "{h:?}");

    let mut pinned = styled("fl-pinned-fp8");
    pinned.model_version = Some("tiny-random-7-fp8".into());
    fleet.submit(&pinned).await;
    let h = fleet.wait_state("fl-pinned-fp8", JobState::Failed, T).await;
    assert!(
        h["error"].contains("flux-dev@tiny-random-7-fp8 computes in fp8")
            && h["error"].contains("bf16 versions held now: flux-dev@tiny-random-0"),
        "{h:?}"
    );
    assert!(
        !h.contains_key("worker"),
        "rejected before any worker saw it: {h:?}"
    );

    let (code, out, err) = ctl(
        &fleet,
        &["model", "unload", "flux-dev@tiny-random-0", "--workers", "w-mix"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let start = Instant::now();
    while workers(&fleet)
        .await
        .iter()
        .any(|w| w.model_versions.iter().any(|v| v == "flux-dev@tiny-random-0"))
    {
        assert!(start.elapsed() < T, "flux-dev@tiny-random-0 still held");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.submit(&styled("fl-fp8-only")).await;
    let h = fleet.wait_state("fl-fp8-only", JobState::Failed, T).await;
    assert!(
        h["error"].contains("every live worker serving flux-dev holds it in fp8 only")
            && h["error"].contains("flux-dev@tiny-random-7-fp8 (fp8) on w-mix")
            && h["error"].contains("--keep-old"),
        "{h:?}"
    );
    let dead = fleet.dead_letters().await;
    for id in ["fl-pinned-fp8", "fl-fp8-only"] {
        assert!(
            dead.iter().any(|(i, why, _)| i == id && why.contains("fp8")),
            "{id} in the DLQ with its reason: {:?}",
            dead.iter().map(|(i, r, _)| (i, r)).collect::<Vec<_>>()
        );
    }
    fleet.teardown().await;
}
