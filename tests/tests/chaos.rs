//! Chaos: 2,000 jobs through 4 workers and 2 scheduler replicas while workers are SIGKILLed,
//! RabbitMQ is restarted, Redis is killed and restarted, and a worker is drained. Every job must
//! end in exactly one terminal state with exactly one terminal event, none lost, none published
//! twice.
//!
//! Other tests share the RabbitMQ and Redis on the default ports, so this one starts a private
//! RabbitMQ node and a private Redis (AOF, fsync on every write) on free ports and restarts those.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ditfleet_common::amqp::{self, Publisher, persistent};
use ditfleet_common::job::{JobEvent, Priority};
use ditfleet_common::state::JobState;
use ditfleet_common::topology::SUBMIT_KEY;
use ditfleet_tests::broker::RestartableRabbit as PrivateRabbit;
use ditfleet_tests::{Fleet, Proc, free_port, job};
use rand::{Rng, SeedableRng};

const JOBS: usize = 2000;
/// Workers running at any time (a killed or drained one is replaced) and their slots each.
const WORKERS: usize = 4;
const SLOTS: usize = 3;
/// A Redis of this test only: AOF with fsync on every write, so a SIGKILL loses no acknowledged
/// write.
struct PrivateRedis {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn new(root: &Path) -> Self {
        let dir = root.join("redis");
        std::fs::create_dir_all(&dir).unwrap();
        Self {
            dir,
            port: free_port(),
            child: None,
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("server.out")).unwrap();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                self.dir.to_str().unwrap(),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read, Write};
                let mut buf = [0u8; 64];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
                {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "private Redis did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Publishes the jobs at a steady pace, reconnecting (and republishing the job that failed) when
/// the broker goes away: submissions are at-least-once, job ids make them idempotent.
async fn submit_all(
    url: String,
    topo: ditfleet_common::topology::Topology,
    ids: Vec<String>,
    pace: Duration,
) -> u32 {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut reconnects = 0;
    let mut conn: Option<(lapin::Connection, Publisher)> = None;
    for id in ids {
        let mut j = job(&id, rng.random_range(3..=8));
        j.priority = [Priority::Low, Priority::Normal, Priority::High][rng.random_range(0..3)];
        j.seed = Some(rng.random());
        let body = serde_json::to_vec(&j).unwrap();
        loop {
            if conn.is_none() {
                if let Ok(c) = amqp::connect(&url, "chaos submitter").await
                    && let Ok(p) = Publisher::new(&c).await
                {
                    conn = Some((c, p));
                }
                if conn.is_none() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
            let (_, p) = conn.as_ref().unwrap();
            let props = persistent("application/json").with_message_id(id.as_str().into());
            match p
                .publish(&topo.submit_exchange(), SUBMIT_KEY, &body, props, true)
                .await
            {
                Ok(()) => break,
                Err(_) => {
                    conn = None;
                    reconnects += 1;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        tokio::time::sleep(pace).await;
    }
    if let Some((c, _)) = conn {
        let _ = c.close(200, "submitted".into()).await;
    }
    reconnects
}

/// Processes the test supervises like an orchestrator would: a process that exits on its own is
/// started again (and counted).
struct Supervisor {
    procs: Vec<(String, Proc)>,
    restarted_after_exit: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_2000_jobs_through_killed_workers_and_restarted_broker_and_redis_lose_nothing_and_publish_nothing_twice()
 {
    let root = std::env::temp_dir().join(format!("ditfleet-chaos-{}", uuid::Uuid::new_v4()));
    let mut rabbit = PrivateRabbit::new(&root);
    let mut redis = PrivateRedis::new(&root);
    rabbit.start();
    redis.start();
    let fleet = Fleet::new_on("chaos", &rabbit.url(), &redis.url()).await;
    fleet.record_terminal_events_durably().await;
    let slots = SLOTS.to_string();
    let worker_env: [(&str, &str); 7] = [
        ("DITFLEET_SIM_STEP_MS", "5"),
        ("DITFLEET_WORKER_SLOTS", slots.as_str()),
        ("DITFLEET_CHECKPOINT_EVERY", "2"),
        ("DITFLEET_CONTROL_POLL_MS", "300"),
        ("DITFLEET_RETRY_BASE_MS", "100"),
        ("DITFLEET_MAX_ATTEMPTS", "10"),
        ("DITFLEET_SHUTDOWN_GRACE_S", "10"),
    ];
    let mut sup = Supervisor {
        procs: Vec::new(),
        restarted_after_exit: 0,
    };
    for i in 0..2 {
        sup.procs
            .push((format!("scheduler-{i}"), fleet.start_scheduler()));
    }
    let mut next_worker = 0;
    let mut start_worker = |sup: &mut Supervisor| {
        let id = format!("cw-{next_worker}");
        next_worker += 1;
        let p = fleet.start_worker(&id, &worker_env);
        sup.procs.push((id, p));
    };
    for _ in 0..WORKERS {
        start_worker(&mut sup);
    }
    fleet.wait_workers(WORKERS, Duration::from_secs(60)).await;

    let ids: Vec<String> = (0..JOBS).map(|i| format!("chaos-{i:04}")).collect();
    let t0 = Instant::now();
    let submitter = tokio::spawn(submit_all(
        rabbit.url(),
        fleet.topo.clone(),
        ids.clone(),
        Duration::from_millis(12),
    ));

    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let mut faults: Vec<String> = Vec::new();
    let plan = [
        (3, "kill"),
        (7, "kill"),
        (10, "rabbit"),
        (22, "kill"),
        (26, "redis"),
        (31, "drain"),
        (36, "kill"),
    ];
    let mut drained: Option<String> = None;
    for (at, what) in plan {
        while t0.elapsed() < Duration::from_secs(at) {
            supervise(&fleet, &mut sup, &worker_env);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        match what {
            "kill" => {
                let workers: Vec<usize> = (0..sup.procs.len())
                    .filter(|i| {
                        sup.procs[*i].0.starts_with("cw-") && Some(&sup.procs[*i].0) != drained.as_ref()
                    })
                    .collect();
                let i = workers[rng.random_range(0..workers.len())];
                let (id, p) = sup.procs.remove(i);
                p.signal(libc::SIGKILL);
                faults.push(format!(
                    "SIGKILL worker {id} at {:.1} s",
                    t0.elapsed().as_secs_f64()
                ));
                drop(p);
                start_worker(&mut sup);
            }
            "rabbit" => {
                let t = Instant::now();
                rabbit.stop();
                rabbit.start();
                faults.push(format!(
                    "RabbitMQ restart at {at} s (down {:.1} s)",
                    t.elapsed().as_secs_f64()
                ));
            }
            "redis" => {
                let t = Instant::now();
                redis.kill();
                tokio::time::sleep(Duration::from_millis(500)).await;
                redis.start();
                faults.push(format!(
                    "Redis SIGKILL + restart at {at} s (down {:.1} s)",
                    t.elapsed().as_secs_f64()
                ));
            }
            "drain" => {
                let id = sup
                    .procs
                    .iter()
                    .find(|(n, _)| n.starts_with("cw-"))
                    .map(|(n, _)| n.clone())
                    .unwrap();
                let out = fleet.ctl(&["drain", &id, "--no-wait"]);
                assert!(out.status.success(), "{out:?}");
                faults.push(format!("ditfleetctl drain {id} at {at} s"));
                drained = Some(id);
                start_worker(&mut sup);
            }
            _ => unreachable!(),
        }
    }
    let reconnects = submitter.await.unwrap();
    let submitted_s = t0.elapsed().as_secs_f64();

    // Wait for every job to settle (supervising meanwhile).
    let mut states: HashMap<String, HashMap<String, String>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        supervise(&fleet, &mut sup, &worker_env);
        for id in &ids {
            if states.contains_key(id) {
                continue;
            }
            if let Ok(h) = fleet.store.get(id).await
                && h.get("state")
                    .and_then(|s| s.parse::<JobState>().ok())
                    .is_some_and(|s| s.is_terminal())
            {
                states.insert(id.clone(), h);
            }
        }
        if states.len() == ids.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed_s = t0.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Drained worker exited 0.
    if let Some(id) = &drained
        && let Some((_, p)) = sup.procs.iter_mut().find(|(n, _)| n == id)
    {
        assert_eq!(
            p.wait_exit(Duration::from_secs(30)),
            Some(Some(0)),
            "drained worker {id} exits 0"
        );
    }

    // A job's state turns terminal before its event is out: a redelivered copy may still be
    // waiting for a dead worker's event claim to lapse (its registration expiring, at most the
    // worker's EVENT_LEASE of 120 s). Collect events until every job has one, then a little more so
    // a late duplicate would still be seen.
    let mut events = Vec::new();
    let events_deadline = Instant::now() + Duration::from_secs(150);
    loop {
        supervise(&fleet, &mut sup, &worker_env);
        events.extend(fleet.terminal_events().await);
        let seen: std::collections::HashSet<&str> = events.iter().map(|(_, e)| e.job_id()).collect();
        let missing = ids.iter().filter(|id| !seen.contains(id.as_str())).count();
        if missing == 0 || Instant::now() > events_deadline {
            println!(
                "terminal events collected {:.1} s after the last job settled ({missing} missing)",
                t0.elapsed().as_secs_f64() - elapsed_s
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    events.extend(fleet.terminal_events().await);
    // (kind, message id, body) of every terminal event per job.
    let mut terminal_events: HashMap<String, Vec<(String, String, String)>> = HashMap::new();
    for (msg_id, e) in &events {
        terminal_events.entry(e.job_id().to_string()).or_default().push((
            e.kind().to_string(),
            msg_id.clone(),
            serde_json::to_string(e).unwrap(),
        ));
    }
    let mut by_state: HashMap<String, usize> = HashMap::new();
    let mut lost = Vec::new();
    let mut duplicates = Vec::new();
    let mut copies = Vec::new();
    let mut multi_terminal = Vec::new();
    let mut resumed = 0;
    let mut retried = 0;
    for id in &ids {
        let Some(h) = states.get(id) else {
            lost.push(format!("{id}: {:?}", fleet.store.get(id).await.ok()));
            continue;
        };
        *by_state.entry(h["state"].clone()).or_default() += 1;
        let terminal_in_history = h["history"]
            .split_whitespace()
            .filter(|e| {
                e.split('@')
                    .next()
                    .and_then(|s| s.parse::<JobState>().ok())
                    .is_some_and(|s| s.is_terminal())
            })
            .count();
        if terminal_in_history != 1 {
            multi_terminal.push(format!("{id}: {}", h["history"]));
        }
        match terminal_events.get(id).map(Vec::as_slice) {
            Some([_]) => {}
            // The contract's one exception (docs/message-contract.md): a worker killed between
            // the broker's confirm of a done event and recording it; the next delivery publishes
            // the same event again, under the same message id, for consumers to drop. Anything
            // else (two outcomes, two different done events) is a duplicate.
            Some([first, rest @ ..])
                if first.0 == "done"
                    && first.1 == format!("{id}:done")
                    && rest.iter().all(|e| e.0 == first.0 && e.1 == first.1) =>
            {
                copies.push(format!("{id}: {} copies", rest.len() + 1));
            }
            Some(evs) => duplicates.push(format!("{id}: {evs:?}")),
            None => lost.push(format!("{id}: no terminal event (state {})", h["state"])),
        }
        if h.get("resumed_from_step").is_some_and(|s| !s.is_empty()) {
            resumed += 1;
        }
        if h["attempts"] != "1" {
            retried += 1;
        }
        if h["state"] == "succeeded" {
            let path = h["result_url"].strip_prefix("file://").unwrap();
            assert!(std::fs::metadata(path).is_ok(), "{id}: result missing at {path}");
        }
    }
    println!("chaos figures:");
    println!(
        "  jobs submitted            {JOBS} (submitter reconnects: {reconnects}, submission took {submitted_s:.1} s)"
    );
    println!("  faults injected           {}", faults.len());
    for f in &faults {
        println!("    - {f}");
    }
    println!(
        "  services restarted after exiting on their own: {}",
        sup.restarted_after_exit
    );
    println!("  terminal states           {by_state:?}");
    println!("  jobs with >1 attempt      {retried} (resumed from a checkpoint: {resumed})");
    println!("  lost                      {}", lost.len());
    println!("  duplicates (terminal events > 1) {}", duplicates.len());
    println!(
        "  same-id copies of a done event (killed between confirm and record) {}",
        copies.len()
    );
    println!(
        "  jobs with >1 terminal state in history {}",
        multi_terminal.len()
    );
    println!("  wall time                 {elapsed_s:.1} s");
    if !lost.is_empty() {
        // What every process logged about the first lost jobs (killed workers' logs included),
        // and their Redis records: enough to follow a lost job's path after the fact.
        for l in lost.iter().take(3) {
            let id = l.split(':').next().unwrap_or_default();
            eprintln!("--- {id}: record {:?}", states.get(id));
            for line in log_lines_mentioning(&fleet.log_dir, id) {
                eprintln!("{line}");
            }
        }
    }
    assert!(lost.is_empty(), "lost jobs: {:?}", &lost[..lost.len().min(10)]);
    assert!(
        duplicates.is_empty(),
        "published twice: {:?}",
        &duplicates[..duplicates.len().min(10)]
    );
    // A same-id copy needs a done event that reached the queue without its publisher learning it
    // for sure: the worker killed between the broker's confirm and recording it, or the confirm
    // lost when the broker went down. Each kill can leave at most a worker's slots in that window,
    // and the broker restart at most every live worker's slots.
    let kills = faults.iter().filter(|f| f.starts_with("SIGKILL worker")).count();
    let restarts = faults
        .iter()
        .filter(|f| f.starts_with("RabbitMQ restart"))
        .count();
    let bound = SLOTS * (kills + restarts * WORKERS);
    assert!(
        copies.len() <= bound,
        "{} same-id done copies for {kills} worker kills and {restarts} broker restarts (at most {bound}): {copies:?}",
        copies.len()
    );
    assert!(
        multi_terminal.is_empty(),
        "{:?}",
        &multi_terminal[..multi_terminal.len().min(10)]
    );
    assert_eq!(
        by_state.get("succeeded"),
        Some(&JOBS),
        "every job succeeded: {by_state:?}"
    );
    assert!(faults.len() >= 7);
    assert!(retried > 0, "the faults hit running jobs");

    for (_, p) in &sup.procs {
        p.signal(libc::SIGTERM);
    }
    for (_, p) in &mut sup.procs {
        p.wait_exit(Duration::from_secs(30));
    }
    fleet.teardown().await;
    rabbit.stop();
    redis.kill();
    let _ = std::fs::remove_dir_all(&root);
    // One done event per job (same-id copies, counted above, are one event to a consumer that
    // drops repeated message ids).
    let done: std::collections::HashSet<&str> = events
        .iter()
        .filter(|(_, e)| matches!(e, JobEvent::Done { .. }))
        .map(|(_, e)| e.job_id())
        .collect();
    assert_eq!(done.len(), JOBS);
}

/// Restarts services that exited on their own (not ones the test killed or drained: those were
/// removed from the list or exit 0 after a drain).
fn supervise(fleet: &Fleet, sup: &mut Supervisor, worker_env: &[(&str, &str)]) {
    for i in 0..sup.procs.len() {
        let exited = sup.procs[i].1.child.try_wait().ok().flatten();
        if let Some(status) = exited {
            if status.code() == Some(0) {
                continue; // drained
            }
            let name = sup.procs[i].0.clone();
            eprintln!(
                "{name} exited on its own ({status}); restarting it:\n{}",
                tail(&sup.procs[i].1.log_text())
            );
            sup.restarted_after_exit += 1;
            sup.procs[i].1 = if name.starts_with("scheduler") {
                fleet.start_scheduler()
            } else {
                fleet.start_worker(&name, worker_env)
            };
        }
    }
}

/// Every line of every log in `dir` that mentions `needle`, prefixed with the log's name.
fn log_lines_mentioning(dir: &Path, needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for p in paths {
        let name = p.file_name().unwrap_or_default().to_string_lossy().to_string();
        for line in std::fs::read_to_string(&p).unwrap_or_default().lines() {
            if line.contains(needle) {
                out.push(format!("[{name}] {line}"));
            }
        }
    }
    out
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(5)..].join("\n")
}
