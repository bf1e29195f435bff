//! Per-job LoRA through the whole fleet: an adapter pushed with `ditfleetctl lora push` to the
//! S3-compatible store (moto), admitted by the scheduler against the registry, downloaded and
//! verified by workers, applied by the simulated engine; jobs of a stack stick to the worker that
//! holds it (affinity) without waiting more than the bound; jobs naming missing or foreign
//! adapters are rejected with the reason.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ditfleet_common::job::{JobSpec, LoraSpec};
use ditfleet_common::state::{JobState, WorkerInfo};
use ditfleet_tests::services::Moto;
use ditfleet_tests::{Fleet, job};

const T: Duration = Duration::from_secs(30);

fn with_stack(id: &str, steps: u32, stack: &[&str]) -> JobSpec {
    let mut j = job(id, steps);
    j.width = 256;
    j.height = 256;
    j.loras = stack
        .iter()
        .map(|a| {
            let (name, version) = a.split_once('@').unwrap();
            LoraSpec {
                name: name.into(),
                version: version.into(),
                scale: Some(0.8),
            }
        })
        .collect();
    j
}

async fn workers(fleet: &Fleet) -> HashMap<String, WorkerInfo> {
    fleet
        .store
        .workers()
        .await
        .unwrap()
        .iter()
        .filter_map(|(_, v)| serde_json::from_str::<WorkerInfo>(v).ok())
        .map(|w| (w.id.clone(), w))
        .collect()
}

async fn ran_on(fleet: &Fleet, id: &str) -> String {
    let h = fleet.wait_state(id, JobState::Succeeded, T).await;
    h["worker"].clone()
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_pushed_to_s3_run_their_jobs_on_the_worker_holding_their_stack_and_unknown_ones_are_rejected()
 {
    let started = Instant::now();
    let moto = Moto::start();
    let bucket = "ditfleet-loras";
    moto.create_bucket(bucket);
    let mut fleet = Fleet::new("lora-affinity").await;
    let prefix = format!("fleet/{}", fleet.ns);
    for (k, v) in moto.worker_env(bucket, &prefix, "s3-test-secret") {
        if k != "DITFLEET_RESULT_URL" {
            fleet.env.insert(k, v);
        }
    }
    for (k, v) in [
        ("DITFLEET_LORA_REGISTRY", format!("s3://{bucket}/{prefix}")),
        ("DITFLEET_LORA_MANIFEST_CACHE_MS", "200".into()),
        ("DITFLEET_AFFINITY_WAIT_MS", "1500".into()),
        ("DITFLEET_BALANCE_INTERVAL_MS", "200".into()),
        ("DITFLEET_AFFINITY_POLL_MS", "50".into()),
        ("DITFLEET_SIM_LORA_APPLY_MS", "150".into()),
        // 100 steps (the most a job may have) take 4 s: the long job below.
        ("DITFLEET_SIM_STEP_MS", "40".into()),
    ] {
        fleet.env.insert(k.into(), v);
    }

    // Push: the adapter, then its manifest, under <prefix>/loras/<name>/<version>/.
    let out = fleet.push_lora("style-a", "1", "flux-dev");
    assert!(
        text(&out).contains("pushed style-a@1 for flux-dev (peft format"),
        "{}",
        text(&out)
    );
    fleet.push_lora("style-b", "1", "flux-dev");
    fleet.push_lora("sdxl-only", "1", "sdxl-base");
    let manifest = moto
        .get(bucket, &format!("{prefix}/loras/style-a/1/manifest.json"))
        .await
        .expect("the manifest is in the bucket");
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(
        (m["base_model"].as_str(), m["format"].as_str()),
        (Some("flux-dev"), Some("peft"))
    );
    assert_eq!(m["sha256"].as_str().map(str::len), Some(64));
    let list = text(&fleet.ctl(&["lora", "list"]));
    for a in ["style-a@1", "style-b@1", "sdxl-only@1"] {
        assert!(list.contains(a), "{list}");
    }
    let sdxl = text(&fleet.ctl(&["lora", "list", "--base-model", "sdxl-base"]));
    assert!(
        sdxl.contains("sdxl-only@1") && !sdxl.contains("style-a@1"),
        "{sdxl}"
    );
    // Names that would leave their folder never reach the store.
    let bad = fleet.ctl(&["lora", "rm", "../x@1"]);
    assert!(
        !bad.status.success() && text(&bad).contains("name \"../x\""),
        "{}",
        text(&bad)
    );
    let src = fleet
        .log_dir
        .parent()
        .unwrap()
        .join("lora-src/style-a-1.safetensors");
    let bad = fleet.ctl(&[
        "lora",
        "push",
        src.to_str().unwrap(),
        "--name",
        "..",
        "--version",
        "1",
        "--base-model",
        "flux-dev",
    ]);
    assert!(
        !bad.status.success() && text(&bad).contains("name \"..\""),
        "{}",
        text(&bad)
    );

    let _s = fleet.start_scheduler();
    let _w1 = fleet.start_worker("w-one", &[]);
    let _w2 = fleet.start_worker("w-two", &[]);
    fleet.wait_workers(2, T).await;

    // Rejections: an adapter the registry lacks, one made for another model.
    fleet.submit(&with_stack("missing", 2, &["nope@1"])).await;
    fleet.submit(&with_stack("foreign", 2, &["sdxl-only@1"])).await;
    for (id, why) in [
        ("missing", "loras: nope@1 is not in the LoRA registry"),
        (
            "foreign",
            "loras: sdxl-only@1 was made for sdxl-base, not flux-dev",
        ),
    ] {
        let h = fleet.wait_state(id, JobState::Failed, T).await;
        assert!(h["error"].contains(why), "{id}: {:?}", h["error"]);
        assert_eq!(h["rejected_by"], "scheduler");
    }
    let dead = fleet.dead_letters().await;
    assert!(
        dead.iter()
            .any(|(id, r, _)| id == "missing" && r.contains("is not in the LoRA registry")),
        "{dead:?}"
    );

    // Warm-up: alternate the two stacks until each is held by a different worker.
    let stack_a = "style-a@1*0.8";
    let stack_b = "style-b@1*0.8";
    let mut n = 0;
    let (hot_a, hot_b) = loop {
        assert!(
            n < 20,
            "the stacks never settled on different workers: {:?}",
            workers(&fleet).await
        );
        for (s, a) in [("a", "style-a@1"), ("b", "style-b@1")] {
            let id = format!("warm-{s}-{n}");
            fleet.submit(&with_stack(&id, 2, &[a])).await;
            ran_on(&fleet, &id).await;
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let ws = workers(&fleet).await;
        let holder = |k: &str| {
            ws.values()
                .find(|w| w.lora_stacks == [k.to_string()])
                .map(|w| w.id.clone())
        };
        if let (Some(a), Some(b)) = (holder(stack_a), holder(stack_b))
            && a != b
        {
            break (a, b);
        }
    };

    // Affinity: alternating jobs of the two stacks land on the worker holding their stack.
    let mut on = HashMap::<(char, bool), u32>::new();
    for i in 0..8 {
        for (s, a, hot) in [('a', "style-a@1", &hot_a), ('b', "style-b@1", &hot_b)] {
            let id = format!("job-{s}-{i}");
            fleet.submit(&with_stack(&id, 2, &[a])).await;
            let w = ran_on(&fleet, &id).await;
            *on.entry((s, &w == hot)).or_default() += 1;
        }
    }
    for s in ['a', 'b'] {
        let home = on.get(&(s, true)).copied().unwrap_or(0);
        assert!(
            home >= 7,
            "stack {s}: {home} of 8 jobs on its hot worker ({on:?})"
        );
    }
    // Each job's stack was applied: the timings name it.
    let h = fleet.wait_state("job-a-0", JobState::Succeeded, T).await;
    assert!(h["timings"].contains("style-a"), "{}", h["timings"]);

    // No starvation: the worker holding stack a is busy with a long job; the next a job waits
    // for it at most the bound (1.5 s), then the other worker takes it.
    fleet.submit(&with_stack("long-a", 100, &["style-a@1"])).await;
    let t = Instant::now();
    while fleet.state("long-a").await != Some(JobState::Running) {
        assert!(t.elapsed() < T, "long-a never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = Instant::now();
    fleet.submit(&with_stack("short-a", 2, &["style-a@1"])).await;
    let w = ran_on(&fleet, "short-a").await;
    let waited = t.elapsed();
    assert_eq!(w, hot_b, "after the bound any worker of the class runs it");
    assert!(
        waited >= Duration::from_millis(1400),
        "it waited for the hot worker first ({waited:?})"
    );
    assert_ne!(
        fleet.state("long-a").await,
        Some(JobState::Succeeded),
        "it did not wait for the long job"
    );
    assert_eq!(ran_on(&fleet, "long-a").await, hot_a);

    // Hot adapters are advertised and shown.
    let ws = text(&fleet.ctl(&["workers"]));
    assert!(ws.contains("lora applied: style-"), "{ws}");

    // Removing an adapter stops its admission.
    let out = fleet.ctl(&["lora", "rm", "style-b@1"]);
    assert!(out.status.success(), "{}", text(&out));
    tokio::time::sleep(Duration::from_millis(300)).await;
    fleet.submit(&with_stack("removed", 2, &["style-b@1"])).await;
    let h = fleet.wait_state("removed", JobState::Failed, T).await;
    assert!(
        h["error"].contains("style-b@1 is not in the LoRA registry"),
        "{:?}",
        h["error"]
    );
    let missing = fleet.ctl(&["lora", "rm", "style-b@1"]);
    assert!(
        !missing.status.success() && text(&missing).contains("is not in"),
        "{}",
        text(&missing)
    );
    eprintln!("lora e2e took {:?}", started.elapsed());
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_adapter_fails_its_job_with_the_reason_and_the_worker_serves_on() {
    let fleet = Fleet::new("lora-corrupt").await;
    fleet.push_lora("good", "1", "flux-dev");
    fleet.push_lora("rotten", "1", "flux-dev");
    let registry = fleet.env["DITFLEET_LORA_REGISTRY"]
        .strip_prefix("file://")
        .unwrap()
        .to_string();
    std::fs::write(
        format!("{registry}/loras/rotten/1/adapter.safetensors"),
        b"bit rot",
    )
    .unwrap();
    let _s = fleet.start_scheduler();
    let port = ditfleet_tests::free_port();
    let addr = format!("127.0.0.1:{port}");
    let _w = fleet.start_worker("w-rot", &[("DITFLEET_HTTP_ADDR", addr.as_str())]);
    fleet.wait_workers(1, T).await;
    fleet.submit(&with_stack("rotten-1", 2, &["rotten@1"])).await;
    let h = fleet.wait_state("rotten-1", JobState::Failed, T).await;
    assert!(
        h["error"].contains("does not match its manifest"),
        "{:?}",
        h["error"]
    );
    assert_eq!(h["attempts"], "1", "a permanent failure, not a retry loop");
    fleet.submit(&with_stack("good-1", 2, &["good@1"])).await;
    assert_eq!(ran_on(&fleet, "good-1").await, "w-rot");
    fleet.submit(&with_stack("good-2", 2, &["good@1"])).await;
    ran_on(&fleet, "good-2").await;
    // Metrics: the second job found the adapter downloaded and applied.
    let (_, text) = ditfleet_tests::http_get(port, "/metrics").expect("metrics served");
    let value = |series: &str| ditfleet_tests::metric_value(&text, series).unwrap_or(-1.0);
    assert_eq!(
        value(r#"ditfleet_lora_cache_total{cache="download",result="miss"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(r#"ditfleet_lora_cache_total{cache="download",result="hit"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(r#"ditfleet_lora_cache_total{cache="engine",result="miss"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(r#"ditfleet_lora_cache_total{cache="engine",result="hit"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        value("ditfleet_lora_apply_seconds_count"),
        1.0,
        "one stack switch: {text}"
    );
    fleet.teardown().await;
}
