//! End-to-end job flow through real RabbitMQ, Redis, scheduler, workers and ditfleetctl.

use std::collections::HashMap;
use std::time::Duration;

use ditfleet_common::job::{JobEvent, LoraSpec};
use ditfleet_common::state::JobState;
use ditfleet_tests::{Fleet, job};
use serde_json::json;

const T: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_job_goes_queued_routed_running_succeeded_with_png_and_progress_events() {
    let fleet = Fleet::new("valid-job").await;
    let _s = fleet.start_scheduler();
    let _w = fleet.start_worker("w-valid", &[]);
    fleet.wait_workers(1, T).await;
    fleet.submit(&job("job-ok", 6)).await;
    let h = fleet.wait_state("job-ok", JobState::Succeeded, T).await;

    let history: Vec<&str> = h["history"]
        .split_whitespace()
        .map(|e| e.split('@').next().unwrap())
        .collect();
    assert_eq!(
        history,
        ["queued", "routed", "running", "succeeded"],
        "state machine path"
    );
    assert_eq!(h["attempts"], "1");
    assert_eq!(h["worker"], "w-valid");
    assert_eq!(h["class"], "small");
    let path = h["result_url"].strip_prefix("file://").expect("file URL");
    let png = std::fs::read(path).expect("result PNG exists");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a real PNG");

    // Progress events 1..=6, then exactly one done event, in order.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let evs = fleet.events.for_job("job-ok");
    let steps: Vec<u32> = evs
        .iter()
        .filter_map(|e| {
            if let JobEvent::Progress { step, .. } = e {
                Some(*step)
            } else {
                None
            }
        })
        .collect();
    assert_eq!(
        steps,
        (1..=6).collect::<Vec<_>>(),
        "one progress event per step, in order"
    );
    assert!(
        matches!(evs.last(), Some(JobEvent::Done { .. })),
        "done is the last event: {evs:?}"
    );
    assert_eq!(
        evs.iter().filter(|e| matches!(e, JobEvent::Done { .. })).count(),
        1
    );
    let keys: Vec<String> = fleet.events.all().iter().map(|(k, _)| k.clone()).collect();
    assert!(
        keys.contains(&"job.job-ok.progress".to_string()) && keys.contains(&"job.job-ok.done".to_string()),
        "{keys:?}"
    );

    // The CLI reads the same status.
    let out = fleet.ctl(&["status", "job-ok"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("succeeded"));
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_submit_wait_prints_the_png_path_and_stage_timings() {
    let fleet = Fleet::new("ctl-wait").await;
    let _s = fleet.start_scheduler();
    let _w = fleet.start_worker("w-ctl", &[]);
    fleet.wait_workers(1, T).await;
    let out = fleet.ctl(&[
        "submit",
        "--prompt",
        "a quiet harbour",
        "--width",
        "256",
        "--height",
        "256",
        "--steps",
        "3",
        "--job-id",
        "ctl-1",
        "--wait",
        "--timeout-s",
        "60",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("image: "))
        .expect("an image line");
    let path = line.trim_start_matches("image: ");
    assert!(std::fs::read(path).unwrap().starts_with(b"\x89PNG"));
    assert!(stdout.contains("stages: queue wait"), "{stdout}");
    // A contract-v1 JSON file works the same way.
    let file = fleet.result_dir.join("job.json");
    std::fs::write(&file, serde_json::to_vec(&job("ctl-file", 2)).unwrap()).unwrap();
    let out = fleet.ctl(&[
        "submit",
        "--file",
        file.to_str().unwrap(),
        "--wait",
        "--timeout-s",
        "60",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("job ctl-file succeeded"), "{stdout}");
    // A rejected job makes --wait exit non-zero with the reason.
    let out = fleet.ctl(&[
        "submit",
        "--prompt",
        "x",
        "--width",
        "1000",
        "--no-validate",
        "--job-id",
        "ctl-bad",
        "--wait",
        "--timeout-s",
        "60",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("width: must be a multiple of 16"), "{stdout}");
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_job_is_recorded_failed_with_its_reason_and_dead_lettered() {
    let fleet = Fleet::new("invalid-jobs").await;
    let _s = fleet.start_scheduler();
    let ok = |extra: &str| {
        format!(
            r#"{{"schema_version":1,"tenant":"t","model":"flux-dev","prompt":"p","width":512,"height":512{extra}}}"#
        )
    };
    // (job id, body, expected reason fragment)
    let long_prompt = "x".repeat(2001);
    let labels = (0..33)
        .map(|i| format!(r#""k{i}":"v""#))
        .collect::<Vec<_>>()
        .join(",");
    let cases: Vec<(String, String, &str)> = vec![
        ("bad-json".into(), "{not json".into(), "malformed job: key must be a string"),
        ("bad-type".into(), ok(r#","job_id":"bad-type","steps":"many""#), "steps: invalid type: string \"many\""),
        ("bad-unknown-field".into(), ok(r#","job_id":"bad-unknown-field","colour":"red""#), "unknown field `colour`"),
        ("bad-missing".into(), r#"{"schema_version":1,"job_id":"bad-missing","tenant":"t","model":"flux-dev","width":512,"height":512}"#.into(), "missing field `prompt`"),
        ("bad-version".into(), ok(r#","job_id":"bad-version""#).replace(r#""schema_version":1"#, r#""schema_version":7"#), "schema_version: unsupported version 7"),
        ("bad id with space".into(), ok(r#","job_id":"bad id with space""#), "job_id: must be 1-128 characters"),
        ("bad-tenant".into(), ok(r#","job_id":"bad-tenant""#).replace(r#""tenant":"t""#, r#""tenant":"a/b""#), "tenant: must be 1-64 characters"),
        ("bad-model".into(), ok(r#","job_id":"bad-model""#).replace("flux-dev", "sd-1.5"), "model: unknown model \"sd-1.5\""),
        ("bad-model-version".into(), ok(r#","job_id":"bad-model-version","model_version":"v 2""#), "model_version: must be 1-64"),
        ("bad-blank".into(), ok(r#","job_id":"bad-blank""#).replace(r#""prompt":"p""#, r#""prompt":"  ""#), "prompt: must not be blank"),
        ("bad-long-prompt".into(), ok(r#","job_id":"bad-long-prompt""#).replace(r#""prompt":"p""#, &format!(r#""prompt":"{long_prompt}""#)), "prompt: is 2001 characters, the limit is 2000"),
        ("bad-long-negative".into(), ok(&format!(r#","job_id":"bad-long-negative","negative_prompt":"{long_prompt}""#)), "negative_prompt: is 2001 characters"),
        ("bad-width".into(), ok(r#","job_id":"bad-width""#).replace(r#""width":512"#, r#""width":1000"#), "width: must be a multiple of 16 between 256 and 4096, got 1000"),
        ("bad-height".into(), ok(r#","job_id":"bad-height""#).replace(r#""height":512"#, r#""height":65536"#), "height: must be a multiple of 16 between 256 and 4096, got 65536"),
        ("bad-steps-0".into(), ok(r#","job_id":"bad-steps-0","steps":0"#), "steps: must be between 1 and 100, got 0"),
        ("bad-steps-500".into(), ok(r#","job_id":"bad-steps-500","steps":500"#), "steps: must be between 1 and 100, got 500"),
        ("bad-guidance".into(), ok(r#","job_id":"bad-guidance","guidance":99.0"#), "guidance: must be between 0 and 30, got 99"),
        ("bad-deadline".into(), ok(r#","job_id":"bad-deadline","deadline":"soon""#), "deadline: must be an RFC 3339 time"),
        ("bad-reply-to".into(), ok(r#","job_id":"bad-reply-to","reply_to":"job.*""#), "reply_to: must be `reply.` then a name"),
        ("bad-labels".into(), ok(&format!(r#","job_id":"bad-labels","labels":{{{labels}}}"#)), "labels: has 33 entries, the limit is 32"),
        ("bad-priority".into(), ok(r#","job_id":"bad-priority","priority":"urgent""#), "unknown variant `urgent`"),
        ("bad-seed".into(), ok(r#","job_id":"bad-seed","seed":-1"#), "seed: -1 is not an integer in 0..=18446744073709551615"),
        ("bad-lora-dots".into(), ok(r#","job_id":"bad-lora-dots","loras":[{"name":"..","version":"1"}]"#).replace("flux-dev", "sdxl-base"), "loras: entry 0: name \"..\" must be 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit"),
        ("bad-lora-scale".into(), ok(r#","job_id":"bad-lora-scale","loras":[{"name":"a","version":"1","scale":9}]"#), "loras: entry 0: scale must be between -4 and 4, got 9"),
        ("bad-lora-twice".into(), ok(r#","job_id":"bad-lora-twice","loras":[{"name":"a","version":"1"},{"name":"a","version":"1","scale":0.5}]"#), "loras: entries 0 and 1 are both a@1"),
        ("bad-scheduler".into(), ok(r#","job_id":"bad-scheduler","scheduler":"euler""#), "scheduler: \"euler\" is not a sampler of flux-dev; flux-dev runs flow_euler"),
        ("bad-sdxl-true-cfg".into(), ok(r#","job_id":"bad-sdxl-true-cfg","true_cfg_scale":4,"negative_prompt":"blur""#).replace("flux-dev", "sdxl-base"), "true_cfg_scale: above 1 is a Flux option (true CFG); sdxl-base runs classic CFG"),
    ];
    for (id, body, _) in &cases {
        fleet.submit_raw(body.as_bytes(), id).await;
    }
    for (id, _, expected) in &cases {
        // Unparseable bodies are recorded under the AMQP message id; invalid ids under a derived one.
        let key = if id.contains(' ') {
            format!(
                "invalid-{:016x}",
                ditfleet_common::job::JobSpec::derived_seed(&cases.iter().find(|c| &c.0 == id).unwrap().1)
            )
        } else {
            id.clone()
        };
        let h = fleet.wait_state(&key, JobState::Failed, T).await;
        assert!(
            h["error"].contains(expected),
            "job {id}: expected {expected:?} in {:?}",
            h["error"]
        );
        assert_eq!(h["rejected_by"], "scheduler");
    }
    let dead = fleet.dead_letters().await;
    assert_eq!(
        dead.len(),
        cases.len(),
        "every rejected job is in the DLQ exactly once"
    );
    for (id, body, expected) in &cases {
        let d = dead
            .iter()
            .find(|d| d.2 == body.as_bytes())
            .unwrap_or_else(|| panic!("{id} not in the DLQ"));
        assert!(d.1.contains(expected), "DLQ reason of {id}: {:?}", d.1);
    }
    // Each rejection was announced on the events exchange.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fleet.events.count_kind("failed"), cases.len());
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdxl_job_runs_with_its_sampler_and_lora_stack_and_its_timings_show_them() {
    let fleet = Fleet::new("sdxl-lora").await;
    fleet.push_lora("pixel-art", "v1.2", "sdxl-base");
    fleet.push_lora("detail", "2", "sdxl-base");
    let _s = fleet.start_scheduler();
    // The simulated engine serves every known model by default, sdxl-base included.
    let _w = fleet.start_worker("w-sdxl", &[]);
    fleet.wait_workers(1, T).await;
    let mut plain = job("sdxl-plain", 4);
    plain.model = "sdxl-base".into();
    let mut styled = plain.clone();
    styled.job_id = "sdxl-styled".into();
    styled.scheduler = Some("dpmpp_2m_karras".into());
    styled.loras = vec![
        LoraSpec {
            name: "pixel-art".into(),
            version: "v1.2".into(),
            scale: Some(0.8),
        },
        LoraSpec {
            name: "detail".into(),
            version: "2".into(),
            scale: None,
        },
    ];
    fleet.submit(&plain).await;
    fleet.submit(&styled).await;
    let p = fleet.wait_state("sdxl-plain", JobState::Succeeded, T).await;
    let h = fleet.wait_state("sdxl-styled", JobState::Succeeded, T).await;
    assert_eq!(h["model"], "sdxl-base");
    let timings: serde_json::Value = serde_json::from_str(&h["timings"]).unwrap();
    assert_eq!(timings["scheduler"], "dpmpp_2m_karras", "{timings}");
    assert_eq!(
        timings["loras"],
        json!([{"name": "pixel-art", "version": "v1.2", "scale": 0.8},
               {"name": "detail", "version": "2", "scale": 1.0}]),
        "the stack in order, the absent scale resolved to 1"
    );
    let plain_timings: serde_json::Value = serde_json::from_str(&p["timings"]).unwrap();
    assert_eq!(plain_timings["scheduler"], "euler", "sdxl-base's default sampler");
    assert!(plain_timings.get("loras").is_none(), "{plain_timings}");
    let png = |h: &std::collections::HashMap<String, String>| {
        std::fs::read(h["result_url"].strip_prefix("file://").unwrap()).unwrap()
    };
    assert_ne!(png(&p), png(&h), "the sampler and stack change the image");
    // The done event reaches the test's listener shortly after the job's record.
    let waited = std::time::Instant::now();
    let done = loop {
        let done = fleet
            .events
            .for_job("sdxl-styled")
            .into_iter()
            .find_map(|e| match e {
                JobEvent::Done { timings, .. } => Some(timings),
                _ => None,
            });
        match done {
            Some(t) => break t,
            None if waited.elapsed() < T => tokio::time::sleep(Duration::from_millis(50)).await,
            None => panic!("no done event for sdxl-styled within {T:?}"),
        }
    };
    assert_eq!(done["scheduler"], "dpmpp_2m_karras");
    assert_eq!(done["loras"], timings["loras"]);
    // The same through ditfleetctl's flags, which it validates before publishing.
    let out = fleet.ctl(&[
        "submit",
        "--prompt",
        "a quiet harbour",
        "--model",
        "sdxl-base",
        "--width",
        "256",
        "--height",
        "256",
        "--steps",
        "3",
        "--scheduler",
        "euler_a",
        "--lora",
        "pixel-art@v1.2:-0.5",
        "--lora",
        "detail@2",
        "--job-id",
        "sdxl-ctl",
        "--wait",
        "--timeout-s",
        "60",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("sampler: euler_a | loras: pixel-art@v1.2*-0.5, detail@2*1"),
        "{stdout}"
    );
    let out = fleet.ctl(&[
        "submit",
        "--prompt",
        "x",
        "--model",
        "sdxl-base",
        "--width",
        "256",
        "--height",
        "256",
        "--scheduler",
        "flow_euler",
        "--lora",
        "..@1",
        "--job-id",
        "sdxl-ctl-bad",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("scheduler: \"flow_euler\" is not a sampler of sdxl-base")
            && stderr.contains("loras: entry 0: name \"..\""),
        "{stderr}"
    );
    assert_eq!(fleet.state("sdxl-ctl-bad").await, None, "never published");
    assert!(fleet.dead_letters().await.is_empty());
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_engines_apply_a_pushed_lora_return_to_the_base_weights_and_refuse_one_that_matches_nothing()
 {
    // The tiny random-weight Flux and SDXL pipelines (no model directory). A PEFT adapter on the
    // tiny Flux transformer's first attention is fetched from the registry, merged for its job
    // (another image than the base model's) and taken out again (the same seed without adapters
    // gives the base image byte for byte before and after); an adapter whose keys name nothing in
    // the model fails its job with the keys listed, and the worker serves on.
    let fleet = Fleet::new("model-engines").await;
    let (r, d) = (2usize, 64usize); // rank, the tiny Flux transformer's width
    let a: Vec<f32> = (0..r * d).map(|i| ((i as f32) * 0.37).sin() * 0.5).collect();
    let b: Vec<f32> = (0..d * r).map(|i| ((i as f32) * 0.71).cos() * 0.5).collect();
    let tensors = [
        (
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
            vec![r, d],
            a.clone(),
        ),
        (
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
            vec![d, r],
            b.clone(),
        ),
        (
            "transformer.transformer_blocks.0.attn.to_v.lora_A.weight",
            vec![r, d],
            a,
        ),
        (
            "transformer.transformer_blocks.0.attn.to_v.lora_B.weight",
            vec![d, r],
            b,
        ),
    ];
    fleet.push_lora_tensors("pixel-art", "v1", "flux-dev", &tensors);
    // A well-formed PEFT pair on a module the model does not have.
    let (ba, bb) = (vec![0.1f32; r * d], vec![0.1f32; d * r]);
    fleet.push_lora_tensors(
        "bogus",
        "v1",
        "flux-dev",
        &[
            ("bogus.blocks.0.attn.to_q.lora_A.weight", vec![r, d], ba),
            ("bogus.blocks.0.attn.to_q.lora_B.weight", vec![d, r], bb),
        ],
    );
    let _s = fleet.start_scheduler();
    let _w = fleet.start_worker(
        "w-tiny",
        &[("DITFLEET_ENGINE", "flux"), ("DITFLEET_DEVICES", "cpu")],
    );
    let slow = Duration::from_secs(300);
    fleet.wait_workers(1, slow).await;
    let png = |h: &HashMap<String, String>| {
        std::fs::read(h["result_url"].strip_prefix("file://").expect("file URL")).expect("result PNG")
    };
    let run = |id: &'static str, loras: Vec<LoraSpec>| {
        let mut j = job(id, 2);
        j.loras = loras;
        j
    };
    let styled = || {
        vec![LoraSpec {
            name: "pixel-art".into(),
            version: "v1".into(),
            scale: Some(2.0),
        }]
    };
    fleet.submit(&run("tiny-base-1", Vec::new())).await;
    let base1 = png(&fleet.wait_state("tiny-base-1", JobState::Succeeded, slow).await);
    fleet.submit(&run("tiny-lora", styled())).await;
    let h = fleet.wait_state("tiny-lora", JobState::Succeeded, slow).await;
    let with_lora = png(&h);
    fleet.submit(&run("tiny-base-2", Vec::new())).await;
    let base2 = png(&fleet.wait_state("tiny-base-2", JobState::Succeeded, slow).await);
    assert_ne!(with_lora, base1, "the adapter changed the image");
    assert_eq!(
        base1, base2,
        "after the adapter's job the base weights are back exactly"
    );

    let bogus = vec![LoraSpec {
        name: "bogus".into(),
        version: "v1".into(),
        scale: Some(0.5),
    }];
    fleet.submit(&run("tiny-bogus", bogus)).await;
    let h = fleet.wait_state("tiny-bogus", JobState::Failed, slow).await;
    assert!(h["error"].contains("match nothing"), "{h:?}");
    assert!(
        h["error"].contains("bogus.blocks.0.attn.to_q.lora_A.weight"),
        "{h:?}"
    );
    let dead = fleet.dead_letters().await;
    assert!(
        dead.iter()
            .any(|(id, why, _)| id == "tiny-bogus" && why.contains("match nothing")),
        "{:?}",
        dead.iter().map(|(i, r, _)| (i, r)).collect::<Vec<_>>()
    );
    fleet.submit(&run("tiny-base-3", Vec::new())).await;
    let base3 = png(&fleet.wait_state("tiny-base-3", JobState::Succeeded, slow).await);
    assert_eq!(
        base1, base3,
        "a refused adapter leaves the base weights as they were"
    );
    let mut sdxl = job("tiny-sdxl", 2);
    sdxl.model = "sdxl-base".into();
    sdxl.scheduler = Some("dpmpp_2m_karras".into());
    sdxl.negative_prompt = Some("blurry".into());
    fleet.submit(&sdxl).await;
    let h = fleet.wait_state("tiny-sdxl", JobState::Succeeded, slow).await;
    assert_eq!(
        (h["worker"].as_str(), h["model"].as_str()),
        ("w-tiny", "sdxl-base")
    );
    let mut flux = job("tiny-flux", 2);
    flux.scheduler = Some("flow_euler".into());
    fleet.submit(&flux).await;
    fleet.wait_state("tiny-flux", JobState::Succeeded, slow).await;
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_job_id_runs_once_and_conflicting_reuse_is_dead_lettered() {
    let fleet = Fleet::new("dupes").await;
    let _s = fleet.start_scheduler();
    let _w1 = fleet.start_worker("w-d1", &[("DITFLEET_WORKER_SLOTS", "2")]);
    let _w2 = fleet.start_worker("w-d2", &[("DITFLEET_WORKER_SLOTS", "2")]);
    fleet.wait_workers(2, T).await;
    let spec = job("dup-1", 5);
    for _ in 0..5 {
        fleet.submit(&spec).await;
    }
    let h = fleet.wait_state("dup-1", JobState::Succeeded, T).await;
    // Submitted again after completion: still nothing new runs.
    fleet.submit(&spec).await;
    let mut conflicting = spec.clone();
    conflicting.prompt = "a different picture".into();
    fleet.submit(&conflicting).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = fleet.store.get("dup-1").await.unwrap();
    assert_eq!(after["attempts"], "1", "ran exactly once");
    assert_eq!(after["history"], h["history"], "no further transitions");
    assert_eq!(after["state"], "succeeded");
    let evs = fleet.events.for_job("dup-1");
    assert_eq!(
        evs.iter().filter(|e| matches!(e, JobEvent::Done { .. })).count(),
        1,
        "one done event"
    );
    let progress = evs
        .iter()
        .filter(|e| matches!(e, JobEvent::Progress { .. }))
        .count();
    assert_eq!(progress, 5, "one execution's progress only");
    let dead = fleet.dead_letters().await;
    assert_eq!(
        dead.len(),
        1,
        "only the conflicting reuse is dead-lettered: {dead:?}"
    );
    assert!(
        dead[0].1.contains("already used by a different job"),
        "{}",
        dead[0].1
    );
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_job_is_redelivered_and_completes_on_another_worker() {
    let fleet = Fleet::new("sigkill").await;
    let _s = fleet.start_scheduler();
    let slow = [("DITFLEET_SIM_STEP_MS", "100")];
    let w1 = fleet.start_worker("w-victim", &slow);
    fleet.wait_workers(1, T).await;
    fleet.submit(&job("kill-1", 40)).await;
    let h = fleet.wait_state("kill-1", JobState::Running, T).await;
    assert_eq!(h["worker"], "w-victim");
    // Let it make progress, start the rescuer, then kill the holder without warning.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let _w2 = fleet.start_worker("w-rescuer", &slow);
    fleet.wait_workers(2, T).await;
    w1.signal(libc::SIGKILL);
    let h = fleet.wait_state("kill-1", JobState::Succeeded, T).await;
    assert_eq!(h["worker"], "w-rescuer");
    assert_eq!(h["attempts"], "2");
    let history: Vec<&str> = h["history"]
        .split_whitespace()
        .map(|e| e.split('@').next().unwrap())
        .collect();
    assert_eq!(history, ["queued", "routed", "running", "running", "succeeded"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let done = fleet
        .events
        .for_job("kill-1")
        .into_iter()
        .filter(|e| matches!(e, JobEvent::Done { .. }))
        .count();
    assert_eq!(done, 1);
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_the_scheduler_loses_nothing() {
    let fleet = Fleet::new("sched-restart").await;
    let mut s1 = fleet.start_scheduler();
    let _w1 = fleet.start_worker(
        "w-r1",
        &[("DITFLEET_WORKER_SLOTS", "4"), ("DITFLEET_SIM_STEP_MS", "1")],
    );
    let _w2 = fleet.start_worker(
        "w-r2",
        &[("DITFLEET_WORKER_SLOTS", "4"), ("DITFLEET_SIM_STEP_MS", "1")],
    );
    fleet.wait_workers(2, T).await;
    let n = 300;
    let ids: Vec<String> = (0..n).map(|i| format!("r-{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        fleet.submit(&job(id, 2)).await;
        if i == n / 3 {
            // Kill mid-stream without warning; publish the rest while it is down.
            s1.signal(libc::SIGKILL);
            s1.wait_exit(Duration::from_secs(10));
        }
    }
    let mut s2 = fleet.start_scheduler();
    for id in &ids {
        fleet
            .wait_state(id, JobState::Succeeded, Duration::from_secs(120))
            .await;
    }
    // Graceful stop of the replacement: exits 0.
    s2.signal(libc::SIGTERM);
    assert_eq!(
        s2.wait_exit(Duration::from_secs(30)),
        Some(Some(0)),
        "scheduler exits 0 on SIGTERM"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in &ids {
        let h = fleet.store.get(id).await.unwrap();
        assert_eq!(h["attempts"], "1", "job {id} ran exactly once");
    }
    assert_eq!(fleet.events.count_kind("done"), n, "one done event per job");
    assert!(fleet.dead_letters().await.is_empty());
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_worker_finishing_its_job_and_deregistering() {
    let fleet = Fleet::new("drain").await;
    let _s = fleet.start_scheduler();
    let mut w = fleet.start_worker("w-drain", &[("DITFLEET_SIM_STEP_MS", "100")]);
    fleet.wait_workers(1, T).await;
    fleet.submit(&job("drain-1", 15)).await;
    fleet.wait_state("drain-1", JobState::Running, T).await;
    w.signal(libc::SIGTERM);
    // A job submitted after the drain began is not taken by the draining worker.
    fleet.submit(&job("drain-2", 2)).await;
    assert_eq!(
        w.wait_exit(Duration::from_secs(30)),
        Some(Some(0)),
        "worker exits 0 after draining; log:\n{}",
        w.log_text()
    );
    let h = fleet.store.get("drain-1").await.unwrap();
    assert_eq!(
        h["state"], "succeeded",
        "the in-flight job finished within the grace period"
    );
    assert!(fleet.store.workers().await.unwrap().is_empty(), "deregistered");
    assert_eq!(
        fleet.state("drain-2").await,
        Some(JobState::Routed),
        "left for another worker"
    );
    // A new worker picks up what was left.
    let _w2 = fleet.start_worker("w-next", &[]);
    fleet.wait_state("drain-2", JobState::Succeeded, T).await;
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_past_its_grace_period_requeues_the_running_job() {
    let fleet = Fleet::new("grace").await;
    let _s = fleet.start_scheduler();
    let mut w = fleet.start_worker(
        "w-grace",
        &[
            ("DITFLEET_SIM_STEP_MS", "200"),
            ("DITFLEET_SHUTDOWN_GRACE_S", "1"),
        ],
    );
    fleet.wait_workers(1, T).await;
    fleet.submit(&job("grace-1", 50)).await;
    fleet.wait_state("grace-1", JobState::Running, T).await;
    w.signal(libc::SIGTERM);
    assert_eq!(w.wait_exit(Duration::from_secs(30)), Some(Some(0)));
    let h = fleet.store.get("grace-1").await.unwrap();
    assert_eq!(h["state"], "routed", "handed back: {h:?}");
    assert!(h["last_error"].contains("shut down at step"), "{h:?}");
    let _w2 = fleet.start_worker("w-after", &[("DITFLEET_SIM_STEP_MS", "1")]);
    let h = fleet.wait_state("grace-1", JobState::Succeeded, T).await;
    assert_eq!(h["worker"], "w-after");
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_queued_and_running_jobs() {
    let fleet = Fleet::new("cancel").await;
    let _s = fleet.start_scheduler();
    let _w = fleet.start_worker("w-cancel", &[("DITFLEET_SIM_STEP_MS", "100")]);
    fleet.wait_workers(1, T).await;
    fleet.submit(&job("c-run", 100)).await;
    fleet.wait_state("c-run", JobState::Running, T).await;
    // The worker's only slot is busy, so this one waits in its class queue.
    fleet.submit(&job("c-queued", 5)).await;
    fleet.wait_state("c-queued", JobState::Routed, T).await;
    let out = fleet.ctl(&["cancel", "c-queued"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("cancelled before it started"),
        "{out:?}"
    );
    let out = fleet.ctl(&["cancel", "c-run"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("stops it at the next step"),
        "{out:?}"
    );
    // The running job stops early: the worker frees up and skips the cancelled queued job.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let run = fleet.store.get("c-run").await.unwrap();
    assert_eq!(run["state"], "cancelled");
    let steps: u32 = run
        .get("progress")
        .and_then(|p| p.split('/').next()?.parse().ok())
        .unwrap_or(0);
    assert!(steps < 100, "stopped before finishing: {run:?}");
    let q = fleet.store.get("c-queued").await.unwrap();
    assert_eq!(q["state"], "cancelled");
    assert!(
        !q.contains_key("started_ms"),
        "the cancelled queued job never started: {q:?}"
    );
    assert_eq!(
        fleet.ctl(&["cancel", "c-run"]).status.code(),
        Some(4),
        "cancelling twice says it is already cancelled"
    );
    fleet.teardown().await;
}

#[test]
fn bad_configuration_exits_64_and_names_the_variable() {
    for (bin, var, value) in [
        ("ditfleet-worker", "DITFLEET_WORKER_SLOTS", "lots"),
        ("ditfleet-worker", "DITFLEET_ENGINE", "quantum"),
        ("ditfleet-scheduler", "DITFLEET_CLASSES", "a=10,b=5,c"),
        ("ditfleet-scheduler", "DITFLEET_AMQP_URL", "http://nope"),
        ("ditfleetctl", "DITFLEET_REDIS_URL", "tcp://nope"),
    ] {
        let mut cmd = std::process::Command::new(ditfleet_tests::bin(bin));
        if bin == "ditfleetctl" {
            cmd.args(["workers"]);
        }
        let out = ditfleet_tests::output_within(cmd.env(var, value), ditfleet_tests::CTL_LIMIT);
        assert_eq!(out.status.code(), Some(64), "{bin} with {var}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var), "{bin}: error names {var}: {err}");
    }
    for bin in ["ditfleet-worker", "ditfleet-scheduler", "ditfleetctl"] {
        let out = std::process::Command::new(ditfleet_tests::bin(bin))
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("DITFLEET_AMQP_URL"),
            "{bin} --help lists the environment variables"
        );
    }
}

#[test]
fn scheduler_and_ctl_do_not_link_libtorch_but_the_worker_keeps_libtorch_cuda() {
    let libs = |bin: &str| {
        let out = std::process::Command::new("ldd")
            .arg(ditfleet_tests::bin(bin))
            .output()
            .expect("ldd runs");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    for bin in ["ditfleet-scheduler", "ditfleetctl"] {
        assert!(
            !libs(bin).contains("libtorch"),
            "{bin} links libtorch:\n{}",
            libs(bin)
        );
    }
    let worker = libs("ditfleet-worker");
    assert!(worker.contains("libtorch_cpu"), "{worker}");
    // Kept despite --as-needed, or CUDA is silently unavailable on GPU machines.
    assert!(worker.contains("libtorch_cuda"), "{worker}");
}
