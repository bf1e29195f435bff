//! Broker-restart drill (issue 22): a scheduler and three workers (2 slots, 5 ms steps) under a
//! steady feed while a private RabbitMQ node's application is stopped and started 10 times. After
//! every restart each service must consume again within a bound: by reconnecting in place, or by
//! exiting non-zero (its supervisor, here the test, starts it again). During each outage every
//! service's `/readyz` must turn non-200 and every worker's registry entry must say
//! `reconnecting`. At the end every job has exactly one terminal state, none lost.
//!
//! The shared broker on 5672 is never touched: the restarted node is this test's own. Redis is the
//! shared one, under the fleet's unique namespace.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ditfleet_common::amqp::{self, Publisher, persistent};
use ditfleet_common::state::{JobState, WorkerInfo};
use ditfleet_common::topology::SUBMIT_KEY;
use ditfleet_tests::broker::RestartableRabbit;
use ditfleet_tests::{Fleet, Proc, REDIS_URL, free_port, http_get, job, percentile};

const WORKERS: usize = 3;
const RESTARTS: usize = 10;
/// The services' DITFLEET_BROKER_RECOVERY_TIMEOUT_MS.
const RECOVERY_TIMEOUT_MS: u64 = 10_000;
/// How long the broker stays stopped each time.
const OUTAGE: Duration = Duration::from_millis(1500);
/// After `start_app` returns, each service must consume again within this (the recovery bound,
/// a supervisor restart and a process start-up, with room for a loaded 2-core machine).
const RESUME_BOUND: Duration = Duration::from_secs(40);

/// A service process the test supervises, with its health port.
struct Svc {
    name: String,
    port: u16,
    proc: Proc,
    /// Times it exited on its own and was started again.
    restarts: usize,
}

struct Drill {
    fleet: Fleet,
    worker_env: Vec<(String, String)>,
    sched_env: Vec<(String, String)>,
}

impl Drill {
    fn start(&self, name: &str, port: u16) -> Proc {
        let addr = format!("127.0.0.1:{port}");
        if name == "scheduler" {
            let mut env: Vec<(&str, &str)> = self
                .sched_env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            env.push(("DITFLEET_HTTP_ADDR", &addr));
            self.fleet.spawn_with("ditfleet-scheduler", name, &env)
        } else {
            let mut env: Vec<(&str, &str)> = self
                .worker_env
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            env.push(("DITFLEET_HTTP_ADDR", &addr));
            self.fleet.start_worker(name, &env)
        }
    }

    /// Starts again every service that exited on its own (what an orchestrator does).
    fn supervise(&self, svcs: &mut [Svc]) {
        for s in svcs.iter_mut() {
            if let Some(status) = s.proc.child.try_wait().ok().flatten() {
                let log = s.proc.log_text();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                eprintln!(
                    "{} exited on its own ({status}); starting it again. Last lines: {:?}",
                    s.name, tail
                );
                assert_ne!(
                    status.code(),
                    Some(0),
                    "{} exited 0 without being asked to",
                    s.name
                );
                s.restarts += 1;
                s.proc = self.start(&s.name, s.port);
            }
        }
    }
}

fn ready(port: u16) -> bool {
    http_get(port, "/readyz").is_some_and(|(code, _)| code == 200)
}

async fn workers(fleet: &Fleet) -> HashMap<String, WorkerInfo> {
    fleet
        .store
        .workers()
        .await
        .unwrap_or_default()
        .iter()
        .filter_map(|(_, v)| serde_json::from_str::<WorkerInfo>(v).ok())
        .map(|w| (w.id.clone(), w))
        .collect()
}

/// Consumer count of a queue on the private broker (`None` while it cannot be read).
async fn consumers(url: &str, queue: &str) -> Option<u32> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .ok()?;
    let ch = conn.create_channel().await.ok()?;
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .ok();
    let _ = conn.close(200, "".into()).await;
    Some(q?.consumer_count())
}

/// Publishes jobs at a steady pace until `stop`, reconnecting and republishing the job that failed
/// when the broker goes away (ids make submissions idempotent). Returns the ids published.
async fn feed(url: String, topo: ditfleet_common::topology::Topology, stop: Arc<AtomicBool>) -> Vec<String> {
    let mut ids = Vec::new();
    let exchange = topo.submit_exchange();
    let mut conn: Option<(lapin::Connection, Publisher)> = None;
    let mut n = 0u32;
    while !stop.load(Ordering::SeqCst) {
        let id = format!("br-{n:05}");
        let body = serde_json::to_vec(&job(&id, 3 + n % 6)).unwrap();
        n += 1;
        loop {
            if conn.is_none() {
                if let Ok(c) = amqp::connect(&url, "broker-restarts feed").await
                    && let Ok(p) = Publisher::new(&c).await
                {
                    conn = Some((c, p));
                } else {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            }
            let (_, p) = conn.as_ref().unwrap();
            let props = persistent("application/json").with_message_id(id.as_str().into());
            let publish = p.publish(&exchange, SUBMIT_KEY, &body, props, true);
            match tokio::time::timeout(Duration::from_secs(5), publish).await {
                Ok(Ok(())) => break,
                _ => {
                    // Closed, not just dropped: a dropped connection keeps reconnecting.
                    if let Some((c, _)) = conn.take() {
                        let _ = tokio::time::timeout(Duration::from_secs(1), c.close(200, "".into())).await;
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    if let Some((c, _)) = conn {
        let _ = c.close(200, "fed".into()).await;
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_and_the_scheduler_consume_again_after_each_of_10_broker_restarts_and_no_job_is_lost() {
    let root = std::env::temp_dir().join(format!("ditfleet-broker-restarts-{}", uuid::Uuid::new_v4()));
    let mut node = RestartableRabbit::new(&root);
    node.start();
    let url = node.url();
    // Shared with the blocking start_app calls; stopped when the last handle drops.
    let rabbit = Arc::new(node);
    let fleet = Fleet::new_on("broker-restarts", &url, REDIS_URL).await;
    let timeout = RECOVERY_TIMEOUT_MS.to_string();
    let common = [
        ("DITFLEET_BROKER_RECOVERY_TIMEOUT_MS", timeout.as_str()),
        ("DITFLEET_LOG", "info,lapin=info"),
    ];
    let mut worker_env: Vec<(String, String)> = [
        ("DITFLEET_SIM_STEP_MS", "5"),
        ("DITFLEET_WORKER_SLOTS", "2"),
        ("DITFLEET_CHECKPOINT_EVERY", "2"),
        ("DITFLEET_CONTROL_POLL_MS", "300"),
        ("DITFLEET_RETRY_BASE_MS", "100"),
        ("DITFLEET_MAX_ATTEMPTS", "20"),
        ("DITFLEET_SHUTDOWN_GRACE_S", "10"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    worker_env.extend(common.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let sched_env: Vec<(String, String)> = [("DITFLEET_BALANCE_INTERVAL_MS", "300")]
        .iter()
        .chain(common.iter())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let drill = Drill {
        fleet,
        worker_env,
        sched_env,
    };
    let fleet = &drill.fleet;
    let mut svcs: Vec<Svc> = std::iter::once("scheduler".to_string())
        .chain((0..WORKERS).map(|i| format!("brw-{i}")))
        .map(|name| {
            let port = free_port();
            let proc = drill.start(&name, port);
            Svc {
                name,
                port,
                proc,
                restarts: 0,
            }
        })
        .collect();
    fleet.wait_workers(WORKERS, Duration::from_secs(60)).await;

    let stop_feed = Arc::new(AtomicBool::new(false));
    let feeder = tokio::spawn(feed(url.clone(), fleet.topo.clone(), stop_feed.clone()));
    let work_queue = fleet
        .topo
        .work_queue_for("small", ditfleet_common::job::Priority::Normal);
    let mut consumer_shortfalls: Vec<String> = Vec::new();
    let submit_queue = fleet.topo.submit_queue();

    let mut failures: Vec<String> = Vec::new();
    // Per restart and service: ms from `start_app` returning to consuming again.
    let mut resume_ms: Vec<u64> = Vec::new();
    let mut outage_not_seen: Vec<String> = Vec::new();
    let mut registry_not_reconnecting: Vec<String> = Vec::new();
    let t0 = Instant::now();
    for round in 1..=RESTARTS {
        // Steady state first: every service ready, every worker finishing jobs.
        tokio::time::sleep(Duration::from_secs(2)).await;
        drill.supervise(&mut svcs);
        let before = workers(fleet).await;

        rabbit.stop_app();
        let down_at = Instant::now();
        let mut saw_unready: HashMap<String, bool> = HashMap::new();
        let mut saw_reconnecting: HashMap<String, bool> = HashMap::new();
        while down_at.elapsed() < OUTAGE {
            for s in &svcs {
                if !ready(s.port) {
                    saw_unready.insert(s.name.clone(), true);
                }
            }
            for (id, w) in workers(fleet).await {
                if w.state == "reconnecting" {
                    saw_reconnecting.insert(id, true);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // start_app blocks for seconds: poll readiness meanwhile (still an outage).
        let starting = {
            let node = rabbit.clone();
            tokio::task::spawn_blocking(move || node.start_app())
        };
        while !starting.is_finished() {
            for s in &svcs {
                if !ready(s.port) {
                    saw_unready.insert(s.name.clone(), true);
                }
            }
            for (id, w) in workers(fleet).await {
                if w.state == "reconnecting" {
                    saw_reconnecting.insert(id, true);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        starting.await.unwrap();
        let up_at = Instant::now();
        for s in &svcs {
            if !saw_unready.contains_key(&s.name) {
                outage_not_seen.push(format!("round {round}: {} stayed ready", s.name));
            }
            if s.name != "scheduler" && !saw_reconnecting.contains_key(&s.name) {
                registry_not_reconnecting.push(format!("round {round}: {}", s.name));
            }
        }

        // Every service consumes again: ready, the broker sees its consumer, and each worker
        // finishes jobs again (jobs_done grows, or a restarted process has done some).
        let mut pending: Vec<String> = svcs.iter().map(|s| s.name.clone()).collect();
        while !pending.is_empty() && up_at.elapsed() < RESUME_BOUND {
            drill.supervise(&mut svcs);
            let now = workers(fleet).await;
            let submit_consumers = consumers(&url, &submit_queue).await.unwrap_or(0);
            pending.retain(|name| {
                let s = svcs.iter().find(|s| &s.name == name).unwrap();
                if !ready(s.port) {
                    return true;
                }
                let consuming = if name == "scheduler" {
                    submit_consumers >= 1
                } else {
                    now.get(name).is_some_and(|w| {
                        let prev = before.get(name);
                        w.state != "reconnecting"
                            && match prev {
                                Some(p) if p.pid == w.pid => w.jobs_done > p.jobs_done,
                                _ => w.jobs_done > 0,
                            }
                    })
                };
                if consuming {
                    resume_ms.push(up_at.elapsed().as_millis() as u64);
                }
                !consuming
            });
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The broker agrees: a consumer of every worker on the work queue.
        if pending.is_empty() {
            let mut n = 0;
            let seen = Instant::now();
            while seen.elapsed() < Duration::from_secs(10) {
                n = consumers(&url, &work_queue).await.unwrap_or(0);
                if n as usize >= WORKERS {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if (n as usize) < WORKERS {
                consumer_shortfalls.push(format!("round {round}: {n} consumers on {work_queue}"));
            }
        }
        for name in &pending {
            failures.push(format!(
                "round {round}: {name} did not consume again within {RESUME_BOUND:?} of the broker's start"
            ));
            // Unblock the rest of the drill: kill it, the supervisor starts it again.
            let s = svcs.iter_mut().find(|s| &s.name == name).unwrap();
            eprintln!("--- {name} log tail:\n{}", tail(&s.proc.log_text(), 25));
            s.proc.signal(libc::SIGKILL);
            let _ = s.proc.wait_exit(Duration::from_secs(10));
            s.proc = drill.start(&s.name, s.port);
        }
        println!(
            "round {round}: broker down {:.1} s, all services consuming {:.1} s after start ({} stuck)",
            (up_at - down_at).as_secs_f64(),
            up_at.elapsed().as_secs_f64(),
            pending.len()
        );
    }
    let drill_s = t0.elapsed().as_secs_f64();
    stop_feed.store(true, Ordering::SeqCst);
    let ids = feeder.await.unwrap();

    // Every job settles exactly once.
    let mut states: HashMap<String, HashMap<String, String>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while states.len() < ids.len() && Instant::now() < deadline {
        drill.supervise(&mut svcs);
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
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut lost = Vec::new();
    let mut not_once = Vec::new();
    let mut by_state: HashMap<String, usize> = HashMap::new();
    for id in &ids {
        let Some(h) = states.get(id) else {
            lost.push(format!("{id}: {:?}", fleet.store.get(id).await.ok()));
            continue;
        };
        *by_state.entry(h["state"].clone()).or_default() += 1;
        let terminal = h["history"]
            .split_whitespace()
            .filter(|e| {
                e.split('@')
                    .next()
                    .and_then(|s| s.parse::<JobState>().ok())
                    .is_some_and(|s| s.is_terminal())
            })
            .count();
        if terminal != 1 {
            not_once.push(format!("{id}: {}", h["history"]));
        }
    }
    resume_ms.sort_unstable();
    let restarted: Vec<String> = svcs
        .iter()
        .filter(|s| s.restarts > 0)
        .map(|s| format!("{} x{}", s.name, s.restarts))
        .collect();
    println!("broker-restart drill figures:");
    println!("  broker restarts           {RESTARTS} (stop_app, {OUTAGE:?} down, start_app)");
    println!("  services                  1 scheduler + {WORKERS} workers (2 slots, 5 ms steps)");
    println!(
        "  time to consume again     median {} ms, max {} ms after start_app ({} samples)",
        percentile(&resume_ms, 50.0),
        resume_ms.last().copied().unwrap_or(0),
        resume_ms.len()
    );
    println!("  exited and restarted by the supervisor: {restarted:?}");
    println!("  did not consume again within the bound: {}", failures.len());
    println!(
        "  jobs                      {} submitted, {by_state:?}",
        ids.len()
    );
    println!("  drill took                {drill_s:.1} s");

    for s in &svcs {
        s.proc.signal(libc::SIGTERM);
    }
    for s in &mut svcs {
        s.proc.wait_exit(Duration::from_secs(30));
    }
    drop(svcs);
    drill.fleet.teardown().await;
    drop(rabbit);
    let _ = std::fs::remove_dir_all(&root);

    assert!(failures.is_empty(), "services that did not resume: {failures:?}");
    assert!(consumer_shortfalls.is_empty(), "{consumer_shortfalls:?}");
    assert!(
        outage_not_seen.is_empty(),
        "/readyz stayed 200 during an outage: {outage_not_seen:?}"
    );
    assert!(
        registry_not_reconnecting.is_empty(),
        "registry never said reconnecting: {registry_not_reconnecting:?}"
    );
    assert!(lost.is_empty(), "lost jobs: {:?}", &lost[..lost.len().min(10)]);
    assert!(not_once.is_empty(), "{:?}", &not_once[..not_once.len().min(10)]);
    assert_eq!(by_state.get("succeeded"), Some(&ids.len()), "{by_state:?}");
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
