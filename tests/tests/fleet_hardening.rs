//! Defects an outside backend client found (issue 22), each against real RabbitMQ, Redis and our
//! processes: path-segment job ids, forged reply_to events, model-blind routing, engine panics,
//! rejections of existing ids, idempotency of defaults, DLQ bodies, message ids, CLI pipes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ditfleet_common::amqp::persistent;
use ditfleet_common::job::{JobEvent, WORK_ORDER_CONTENT_TYPE, WorkOrder};
use ditfleet_common::state::JobState;
use ditfleet_common::topology::Topology;
use ditfleet_tests::{Fleet, job};
use futures_util::StreamExt;

const T: Duration = Duration::from_secs(60);

/// Waits until `f` holds, polling every 50 ms.
async fn eventually(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !f().await {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn files_in(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_segment_job_ids_are_rejected_and_no_order_can_reach_outside_the_result_folder() {
    let fleet = Fleet::new("path-ids").await;
    let _s = fleet.start_scheduler();
    // A checkpoint every step: the path the `..` id used to escape through.
    let _w = fleet.start_worker("w-paths", &[("DITFLEET_CHECKPOINT_EVERY", "1")]);
    fleet.wait_workers(1, T).await;
    fleet.submit(&job("keeper", 3)).await;
    let h = fleet.wait_state("keeper", JobState::Succeeded, T).await;
    let keeper_png = h["result_url"].strip_prefix("file://").unwrap().to_string();

    // Through the scheduler: every path-segment id is rejected with the rule, recorded under the
    // message id, dead-lettered.
    let hostile = ["..", ".", ".hidden", "a/b", "..\\x", "-flag"];
    for (i, id) in hostile.iter().enumerate() {
        let mut spec = serde_json::to_value(job("x", 3)).unwrap();
        spec["job_id"] = serde_json::json!(id);
        let msg_id = format!("hostile-{i}");
        fleet
            .submit_raw(&serde_json::to_vec(&spec).unwrap(), &msg_id)
            .await;
        let h = fleet.wait_state(&msg_id, JobState::Failed, T).await;
        assert!(
            h["error"].contains(
                "job_id: must be 1-128 characters of [A-Za-z0-9._:-] starting with a letter or digit"
            ),
            "{id:?}: {h:?}"
        );
    }
    // Straight to the work queue (an order no scheduler of this version writes): the worker
    // refuses the id before it becomes a path, and keeps serving.
    for id in ["..", "."] {
        let mut order = WorkOrder::from_spec(&job("placeholder", 3), "small", 1, 0);
        order.job_id = id.to_string();
        fleet
            .publisher
            .publish(
                &fleet.topo.work_exchange(),
                &Topology::model_key("small", "flux-dev", ditfleet_common::job::Priority::Normal),
                &order.encode(),
                persistent(WORK_ORDER_CONTENT_TYPE).with_message_id(id.into()),
                true,
            )
            .await
            .unwrap();
        let h = fleet.wait_state(id, JobState::Failed, T).await;
        assert!(h["error"].contains("invalid work order: job_id"), "{h:?}");
    }
    fleet.submit(&job("after", 3)).await;
    fleet.wait_state("after", JobState::Succeeded, T).await;
    assert!(
        std::fs::metadata(&keeper_png).is_ok(),
        "the other job's PNG survived; results: {:?}",
        files_in(&fleet.result_dir)
    );
    assert!(fleet.result_dir.join("after.png").exists());
    let dlq = fleet.dead_letters().await;
    for i in 0..hostile.len() {
        assert!(
            dlq.iter().any(|(id, _, _)| *id == format!("hostile-{i}")),
            "{dlq:?}"
        );
    }
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_lives_in_its_own_namespace_so_no_job_can_publish_another_jobs_events() {
    let fleet = Fleet::new("reply-ns").await;
    let _s = fleet.start_scheduler();
    let _w = fleet.start_worker("w-reply", &[("DITFLEET_SIM_STEP_MS", "30")]);
    fleet.wait_workers(1, T).await;
    // The victim runs long enough for a forged done to arrive first.
    let victim = "victim";
    let ctl = {
        let env = fleet.env.clone();
        std::thread::spawn(move || {
            let mut cmd = std::process::Command::new(ditfleet_tests::bin("ditfleetctl"));
            cmd.env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .envs(&env)
                .args([
                    "submit",
                    "--prompt",
                    "a fox",
                    "--width",
                    "256",
                    "--height",
                    "256",
                    "--steps",
                    "100",
                    "--job-id",
                    victim,
                    "--wait",
                    "--timeout-s",
                    "60",
                ]);
            ditfleet_tests::output_within(&mut cmd, ditfleet_tests::CTL_LIMIT)
        })
    };
    eventually("victim running", T, async || {
        fleet.state(victim).await == Some(JobState::Running)
    })
    .await;
    // 1. A job whose reply_to is the victim's done key is rejected by the contract.
    let mut forger = job("forger", 2);
    forger.reply_to = Some(format!("job.{victim}.done"));
    fleet.submit(&forger).await;
    let h = fleet.wait_state("forger", JobState::Failed, T).await;
    assert!(h["error"].contains("reply_to: must be `reply.`"), "{h:?}");
    // 2. An event published under the victim's key with another job's body (what the fleet used
    //    to publish for such a reply_to) is ignored by a waiting ditfleetctl.
    let forged = JobEvent::Done {
        job_id: "forger".into(),
        result_url: "file:///nowhere.png".into(),
        worker: "evil".into(),
        engine: "none".into(),
        attempts: 1,
        queue_wait_ms: 0,
        generate_ms: 0,
        store_ms: 0,
        end_to_end_ms: 0,
        timings: serde_json::json!({}),
        model_version: None,
        resumed_from_step: None,
        gpu_seconds: 0.0,
    };
    fleet
        .publisher
        .publish(
            &fleet.topo.events_exchange(),
            &format!("job.{victim}.done"),
            &serde_json::to_vec(&forged).unwrap(),
            persistent("application/json").with_message_id(forged.message_id().as_str().into()),
            false,
        )
        .await
        .unwrap();
    // 3. A reply_to in the reply namespace gets the job's terminal events.
    let ch = fleet.conn.create_channel().await.unwrap();
    let mut replies = fleet.topo.subscribe_events(&ch, "reply.billing").await.unwrap();
    let mut ok = job("replier", 2);
    ok.reply_to = Some("reply.billing".into());
    fleet.submit(&ok).await;
    let d = tokio::time::timeout(T, replies.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let ev: JobEvent = serde_json::from_slice(&d.data).unwrap();
    assert!(
        matches!(&ev, JobEvent::Done { job_id, .. } if job_id == "replier"),
        "{ev:?}"
    );
    assert_eq!(d.routing_key.as_str(), "reply.billing");

    let out = ctl.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("job victim succeeded on worker w-reply"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("nowhere.png") && !stdout.contains("evil"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&fleet.result_dir.join("victim.png").display().to_string()),
        "{stdout}"
    );
    // No event of the forger's went out under the victim's keys.
    let under_victim: Vec<_> = fleet
        .events
        .all()
        .into_iter()
        .filter(|(k, e)| k.starts_with("job.victim.") && e.job_id() != victim)
        .collect();
    assert_eq!(
        under_victim.len(),
        1,
        "only the test's own forgery: {under_victim:?}"
    );
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_reach_only_workers_holding_their_model_and_a_model_never_held_is_rejected() {
    let fleet = Fleet::new("model-routing").await;
    let _s = fleet.start_scheduler();
    let _dev = fleet.start_worker("w-dev-only", &[("DITFLEET_SIM_MODELS", "flux-dev")]);
    fleet.wait_workers(1, T).await;
    // No worker of this fleet ever held flux-schnell: rejected with that reason.
    let mut never = job("schnell-never", 2);
    never.model = "flux-schnell".into();
    fleet.submit(&never).await;
    let h = fleet.wait_state("schnell-never", JobState::Failed, T).await;
    assert!(
        h["error"].contains("no worker of this fleet has ever held a version of flux-schnell"),
        "{h:?}"
    );
    // A schnell worker comes and goes: the model is known now, but nobody live holds it.
    let mut sch = fleet.start_worker("w-schnell", &[("DITFLEET_SIM_MODELS", "flux-schnell")]);
    fleet.wait_workers(2, T).await;
    sch.signal(libc::SIGTERM);
    sch.wait_exit(T).expect("the schnell worker stops");
    let mut waiting = job("schnell-waits", 2);
    waiting.model = "flux-schnell".into();
    fleet.submit(&waiting).await;
    fleet.submit(&job("dev-runs", 2)).await;
    fleet.wait_state("dev-runs", JobState::Succeeded, T).await;
    // The flux-dev worker never takes it: the job waits, routed, not failed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fleet.state("schnell-waits").await, Some(JobState::Routed));
    let _sch2 = fleet.start_worker("w-schnell-2", &[("DITFLEET_SIM_MODELS", "flux-schnell")]);
    let h = fleet.wait_state("schnell-waits", JobState::Succeeded, T).await;
    assert_eq!(h["worker"], "w-schnell-2");
    assert_eq!(h["attempts"], "1", "no failed attempt on the wrong worker: {h:?}");
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_panic_requeues_the_job_with_its_reason_and_the_rebuilt_engine_keeps_serving() {
    let fleet = Fleet::new("engine-panic").await;
    let _s = fleet.start_scheduler();
    let w = fleet.start_worker(
        "w-panic",
        &[("DITFLEET_SIM_FAULTS", "panic=1"), ("DITFLEET_WORKER_SLOTS", "1")],
    );
    fleet.wait_workers(1, T).await;
    for (seed, id) in [(1, "panics-once-a"), (2, "panics-once-b")] {
        let mut spec = job(id, 3);
        spec.seed = Some(seed);
        fleet.submit(&spec).await;
        let h = fleet.wait_state(id, JobState::Succeeded, T).await;
        assert_eq!(h["attempts"], "2", "{h:?}");
        assert!(
            h["history"].contains("running") && h["history"].matches("routed").count() >= 2,
            "{h:?}"
        );
        let log = w.log_text();
        assert!(
            log.contains("engine thread panicked"),
            "the panic was caught and logged"
        );
    }
    assert!(w.log_text().contains("engine rebuilt after a panic"));
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_copy_of_an_existing_id_gets_a_rejected_event_and_defaults_count_as_given() {
    let fleet = Fleet::new("rejected-copy").await;
    let _s = fleet.start_scheduler();
    let _w = fleet.start_worker("w-copy", &[]);
    fleet.wait_workers(1, T).await;
    let mut first = job("taken-id", 2);
    first.steps = None;
    fleet.submit(&first).await;
    fleet.wait_state("taken-id", JobState::Succeeded, T).await;
    // The documented default written out is the same job: absorbed, no DLQ entry.
    let mut same = first.clone();
    same.steps = Some(28);
    same.guidance = Some(3.5);
    fleet.submit(&same).await;
    // A different job under the taken id, and an invalid body naming it.
    let mut other = first.clone();
    other.prompt = "something else".into();
    other.reply_to = Some("reply.copies".into());
    let other_body = serde_json::to_vec(&other).unwrap();
    fleet.submit_raw(&other_body, "taken-id").await;
    let mut invalid = serde_json::to_value(&first).unwrap();
    invalid["width"] = serde_json::json!(1000);
    fleet
        .submit_raw(&serde_json::to_vec(&invalid).unwrap(), "taken-id")
        .await;
    // On the job's own key (the copy with a reply_to also gets one on reply.copies).
    let rejected = async || {
        fleet
            .events
            .all()
            .iter()
            .filter(|(k, e)| k == "job.taken-id.rejected" && matches!(e, JobEvent::Rejected { .. }))
            .count()
    };
    let start = Instant::now();
    while rejected().await < 2 && start.elapsed() < T {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rejected().await, 2, "events: {:?}", fleet.events.all());
    let evs: Vec<JobEvent> = fleet
        .events
        .all()
        .into_iter()
        .filter(|(k, _)| k.starts_with("job.taken-id."))
        .map(|(_, e)| e)
        .collect();
    let reasons: Vec<&str> = evs
        .iter()
        .filter_map(|e| match e {
            JobEvent::Rejected {
                reason, body_hash, ..
            } => {
                assert_eq!(body_hash.len(), 16);
                Some(reason.as_str())
            }
            _ => None,
        })
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("already used by a different job")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("width: must be a multiple of 16")),
        "{reasons:?}"
    );
    assert_eq!(
        evs.iter().filter(|e| matches!(e, JobEvent::Done { .. })).count(),
        1,
        "the existing job's events are untouched: {evs:?}"
    );
    assert!(
        fleet
            .events
            .all()
            .iter()
            .any(|(k, e)| k == "reply.copies" && matches!(e, JobEvent::Rejected { .. })),
        "the rejected copy's reply_to got its answer"
    );
    assert_eq!(fleet.state("taken-id").await, Some(JobState::Succeeded));
    let dlq = fleet.dead_letters().await;
    assert_eq!(
        dlq.len(),
        2,
        "the two rejected copies, not the identical resubmission: {dlq:?}"
    );
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_differing_only_in_invalid_bytes_get_different_invalid_ids_each_recorded_and_announced() {
    let fleet = Fleet::new("invalid-bytes").await;
    let _s = fleet.start_scheduler();
    let a: &[u8] = b"\xff\xfe this is not json";
    let b: &[u8] = b"\xff\xfd this is not json";
    assert_eq!(String::from_utf8_lossy(a), String::from_utf8_lossy(b));
    let props = persistent("application/json");
    for body in [a, b] {
        fleet
            .publisher
            .publish(
                &fleet.topo.submit_exchange(),
                ditfleet_common::topology::SUBMIT_KEY,
                body,
                props.clone(),
                true,
            )
            .await
            .unwrap();
    }
    let ids: Vec<String> = [a, b]
        .iter()
        .map(|body| format!("invalid-{:016x}", ditfleet_common::job::fnv1a(body)))
        .collect();
    assert_ne!(ids[0], ids[1]);
    for id in &ids {
        let h = fleet.wait_state(id, JobState::Failed, T).await;
        assert!(h["error"].starts_with("malformed job:"), "{h:?}");
    }
    eventually("a failed event for each", T, async || {
        ids.iter().all(|id| {
            fleet
                .events
                .for_job(id)
                .iter()
                .any(|e| matches!(e, JobEvent::Failed { .. }))
        })
    })
    .await;
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_has_a_message_id_worker_dlq_entries_hold_the_submitted_json_and_sim_timings_name_the_plan()
 {
    let fleet = Fleet::new("event-ids").await;
    let _s = fleet.start_scheduler();
    let _w = fleet.start_worker("w-ids", &[]);
    let _bad = fleet.start_worker(
        "w-bad",
        &[
            ("DITFLEET_SIM_FAULTS", "bad-weights"),
            ("DITFLEET_SIM_MODELS", "flux-schnell"),
        ],
    );
    fleet.wait_workers(2, T).await;
    let ch = fleet.conn.create_channel().await.unwrap();
    let mut sub = fleet.topo.subscribe_events(&ch, "job.ids-ok.*").await.unwrap();
    fleet.submit(&job("ids-ok", 4)).await;
    let h = fleet.wait_state("ids-ok", JobState::Succeeded, T).await;
    let timings: serde_json::Value = serde_json::from_str(&h["timings"]).unwrap();
    assert_eq!(timings["plan"], "single", "{timings}");
    assert_eq!(
        timings["precision"], "bf16",
        "the precision the job ran at: {timings}"
    );
    let mut ids = HashMap::new();
    while ids.len() < 5 {
        let d = tokio::time::timeout(T, sub.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let ev: JobEvent = serde_json::from_slice(&d.data).unwrap();
        let mid = d.properties.message_id().as_ref().map(|s| s.to_string());
        ids.insert(ev.message_id(), mid);
    }
    for step in 1..=4 {
        let want = format!("ids-ok:progress:{step}");
        assert_eq!(ids.get(&want), Some(&Some(want.clone())), "{ids:?}");
    }
    assert_eq!(ids.get("ids-ok:done"), Some(&Some("ids-ok:done".to_string())));
    // A worker's permanent failure copies the JSON the backend sent (byte for byte) to the DLQ.
    let mut spec = job("ids-bad", 2);
    spec.model = "flux-schnell".into();
    let body = format!(
        "{{ \"schema_version\": 1,\n  \"job_id\": \"ids-bad\", \"tenant\": \"test\", \"model\": \"flux-schnell\", \"prompt\": \"{}\", \"width\": 256, \"height\": 256, \"steps\": 2.0, \"priority\": null }}",
        spec.prompt
    );
    fleet.submit_raw(body.as_bytes(), "ids-bad").await;
    let h = fleet.wait_state("ids-bad", JobState::Failed, T).await;
    assert!(h["error"].contains("weights"), "{h:?}");
    let dlq = fleet.dead_letters().await;
    let entry = dlq.iter().find(|(id, _, _)| id == "ids-bad").expect("DLQ entry");
    assert_eq!(String::from_utf8_lossy(&entry.2), body);
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ditfleetctl_output_into_a_closed_pipe_exits_quietly() {
    let fleet = Fleet::new("ctl-epipe").await;
    fleet
        .store
        .set_fields(
            "piped",
            &[("state", "succeeded".into()), ("note", "x".repeat(200_000))],
        )
        .await
        .unwrap();
    let mut cmd = std::process::Command::new(ditfleet_tests::bin("ditfleetctl"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&fleet.env)
        .args(["status", "piped"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    // `| true`: the reader is gone before ditfleetctl writes.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_drains_the_submit_queue_of_its_old_name_unbinds_it_and_deletes_it_when_empty() {
    let fleet = Fleet::new("legacy-submit").await;
    // The queue as schedulers before the rename declared it, bound to the submit exchange, with a
    // job waiting in it.
    let legacy = fleet.topo.legacy_submit_queue();
    let ch = fleet.conn.create_channel().await.unwrap();
    Fleet::declare_quorum_queue(&ch, &legacy).await;
    ch.queue_bind(
        legacy.as_str().into(),
        fleet.topo.submit_exchange().as_str().into(),
        ditfleet_common::topology::SUBMIT_KEY.into(),
        Default::default(),
        Default::default(),
    )
    .await
    .unwrap();
    fleet
        .publisher
        .publish(
            "",
            &legacy,
            &serde_json::to_vec(&job("left-behind", 2)).unwrap(),
            persistent("application/json").with_message_id("left-behind".into()),
            true,
        )
        .await
        .unwrap();
    let mut s = fleet.start_scheduler();
    let _w = fleet.start_worker("w-legacy", &[]);
    fleet.wait_workers(1, T).await;
    fleet.wait_state("left-behind", JobState::Succeeded, T).await;
    // Unbound: a new job reaches only the new queue, and runs once.
    fleet.submit(&job("after-rename", 2)).await;
    let h = fleet.wait_state("after-rename", JobState::Succeeded, T).await;
    assert_eq!(h["attempts"], "1");
    s.signal(libc::SIGTERM);
    s.wait_exit(T).expect("scheduler stops");
    // The next start finds it empty and deletes it.
    let _s2 = fleet.start_scheduler();
    eventually("legacy queue deleted", T, async || {
        let probe = fleet.conn.create_channel().await.unwrap();
        ditfleet_common::amqp::passive_declare(&probe, &legacy)
            .await
            .is_err()
    })
    .await;
    fleet.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_waiting_for_its_jobs_other_task_gives_its_slot_to_the_next_job() {
    // Two slots: the long job runs in one; a second copy of its work order (as a broker restart
    // redelivers it) takes the other and waits for the first task to end. It must give that slot
    // back while it waits, or the short job queued behind it waits for the long one.
    let fleet = Fleet::new("slot-wait").await;
    let _s = fleet.start_scheduler();
    let _w = fleet.start_worker(
        "w-slots",
        &[("DITFLEET_WORKER_SLOTS", "2"), ("DITFLEET_SIM_STEP_MS", "100")],
    );
    fleet.wait_workers(1, T).await;
    let long = job("long", 60);
    fleet.submit(&long).await;
    fleet.wait_state("long", JobState::Running, T).await;
    let order = WorkOrder::from_spec(&long.normalized(), "small", 1, 0);
    fleet
        .publisher
        .publish(
            &fleet.topo.work_exchange(),
            &Topology::model_key("small", "flux-dev", ditfleet_common::job::Priority::Normal),
            &order.encode(),
            persistent(WORK_ORDER_CONTENT_TYPE).with_message_id("long".into()),
            true,
        )
        .await
        .unwrap();
    // The copy reaches the worker before the short job does.
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.submit(&job("short", 2)).await;
    let short = fleet.wait_state("short", JobState::Succeeded, T).await;
    let long_now = fleet.state("long").await;
    assert_eq!(
        long_now,
        Some(JobState::Running),
        "the short job waited for the long one (its slot was held by the waiting copy): {short:?}"
    );
    fleet.wait_state("long", JobState::Succeeded, T).await;
    fleet.teardown().await;
}
