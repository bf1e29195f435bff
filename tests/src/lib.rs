//! Harness for end-to-end tests: real RabbitMQ, real Redis, real ditfleet processes.
//!
//! Each [`Fleet`] gets its own namespace (exchanges, queues and Redis keys are prefixed with it),
//! so tests run in parallel against one broker and one Redis without seeing each other. Binaries
//! are taken from the cargo target directory beside the test executable (`make test` builds them
//! first).

pub mod broker;
pub mod otlp;
pub mod services;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ditfleet_common::amqp::{self, Publisher, persistent};
use ditfleet_common::job::{JobEvent, JobSpec, Priority, SCHEMA_VERSION};
use ditfleet_common::state::{JobState, JobStore};
use ditfleet_common::topology::{SUBMIT_KEY, Topology};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::AMQPValue;

/// The longest any `ditfleetctl` run of a test may take (its own `--wait` timeouts are 60 s): a
/// hung command fails its test with its output instead of stalling the whole suite.
pub const CTL_LIMIT: Duration = Duration::from_secs(180);

/// `cmd.output()`, but a command still running after `limit` is killed and the test fails with
/// what it printed so far.
pub fn output_within(cmd: &mut Command, limit: Duration) -> std::process::Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out_t.join().unwrap_or_default();
            let stderr = err_t.join().unwrap_or_default();
            panic!(
                "{cmd:?} still ran after {} s and was killed\nstdout: {}\nstderr: {}",
                limit.as_secs(),
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    std::process::Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    }
}

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const REDIS_URL: &str = "redis://127.0.0.1:6379/0";
pub const CLASSES: [&str; 4] = ["small", "medium", "large", "xlarge"];

/// Directory holding the ditfleet binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("DITFLEET_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`)",
        p.display()
    );
    p
}

/// A running ditfleet process.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends a signal (e.g. `libc::SIGKILL`, `libc::SIGTERM`) to the process.
    pub fn signal(&self, sig: i32) {
        send_signal(self.pid(), sig);
    }

    /// Waits for exit up to `timeout`; returns the exit code (None = killed by a signal / timed out).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status.code());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[allow(unsafe_code)]
fn send_signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid we spawned; no memory is shared or touched.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Events seen on the fleet's events exchange, in arrival order.
#[derive(Clone, Default)]
pub struct EventLog {
    inner: Arc<Mutex<Vec<(String, JobEvent)>>>,
}

impl EventLog {
    pub fn all(&self) -> Vec<(String, JobEvent)> {
        self.inner.lock().unwrap().clone()
    }

    pub fn for_job(&self, job_id: &str) -> Vec<JobEvent> {
        self.all()
            .into_iter()
            .filter(|(_, e)| e.job_id() == job_id)
            .map(|(_, e)| e)
            .collect()
    }

    pub fn count_kind(&self, kind: &str) -> usize {
        self.all().iter().filter(|(_, e)| e.kind() == kind).count()
    }
}

/// One isolated fleet: a namespace, a result directory, processes, and client handles.
pub struct Fleet {
    pub ns: String,
    pub topo: Topology,
    pub result_dir: PathBuf,
    pub log_dir: PathBuf,
    pub conn: lapin::Connection,
    pub publisher: Publisher,
    pub store: JobStore,
    pub events: EventLog,
    pub env: HashMap<String, String>,
    /// Ids of the workers started, whose LoRA affinity queues teardown deletes.
    worker_ids: Mutex<Vec<String>>,
    /// Pids of the services this fleet started: teardown stops them before deleting queues.
    spawned: Mutex<Vec<i32>>,
    _watch: TestWatch,
}

/// The longest one end-to-end test may run. The suite runs its tests one at a time under CI's
/// overall limit; a test hung past this kills its own processes and its test binary, so the
/// other test binaries still run and report.
/// `DITFLEET_TEST_LIMIT_S` sets another (to see the watchdog act).
pub const TEST_LIMIT: Duration = Duration::from_secs(20 * 60);

fn test_limit() -> Duration {
    std::env::var("DITFLEET_TEST_LIMIT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(TEST_LIMIT, Duration::from_secs)
}

/// How long one of the harness's own broker calls (a publish with its confirm, draining a queue,
/// the teardown's deletes) may wait on the broker. A healthy node answers in milliseconds; a
/// wedged RabbitMQ 3.10 node (scripts/heal-rabbitmq.sh) never does, and an unbounded wait would
/// hold the test until [`TEST_LIMIT`] kills its whole binary.
pub const BROKER_CALL_BOUND: Duration = Duration::from_secs(60);

/// Awaits one harness call to the broker (or Redis) within [`BROKER_CALL_BOUND`]; past it the
/// test fails, naming the call, like any other failure (so `make test`'s re-run after a broker
/// heal can retry it).
async fn within_bound<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(BROKER_CALL_BOUND, fut).await {
        Ok(v) => v,
        Err(_) => panic!("no answer to {what} within {BROKER_CALL_BOUND:?}"),
    }
}

/// Writes `line` to the process's stderr past libtest's output capture (which `eprintln!` in a
/// test, and in threads a test spawned, goes to), so the log shows it whatever the test's fate.
fn uncaptured(line: &str) {
    use std::io::Write;
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{line}");
    let _ = e.flush();
}

/// (id, libtest name of the test, namespace, deadline) of every live [`Fleet`].
static DEADLINES: Mutex<Vec<(u64, String, String, Instant)>> = Mutex::new(Vec::new());

/// Registers a [`Fleet`]'s deadline with the process's watchdog thread while it lives.
struct TestWatch(u64);

impl TestWatch {
    fn start(ns: &str) -> TestWatch {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        static WATCHDOG: std::sync::Once = std::sync::Once::new();
        WATCHDOG.call_once(|| {
            std::thread::spawn(|| {
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let overdue = DEADLINES
                        .lock()
                        .unwrap()
                        .iter()
                        .find(|(_, _, _, d)| Instant::now() > *d)
                        .map(|(_, test, ns, _)| (test.clone(), ns.clone()));
                    if let Some((test, ns)) = overdue {
                        // scripts/e2e-retry-after-heal.sh reads this line (the test's name is
                        // the second field) to re-run the test and the ones this exit skips.
                        // Written to fd 2 itself: this thread inherited the first test's output
                        // capture, whose buffer dies with the process.
                        uncaptured(&format!(
                            "e2e-watchdog: {test} (namespace {ns}) still ran after {} s: killing its processes and this test binary",
                            test_limit().as_secs()
                        ));
                        kill_children();
                        std::process::exit(101);
                    }
                }
            });
        });
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // libtest runs each test on a thread named after it; a Fleet made elsewhere (a spawned
        // task) is named by its namespace alone.
        let test = std::thread::current()
            .name()
            .filter(|n| *n != "main")
            .unwrap_or("?")
            .to_string();
        DEADLINES
            .lock()
            .unwrap()
            .push((id, test, ns.to_string(), Instant::now() + test_limit()));
        TestWatch(id)
    }
}

impl Drop for TestWatch {
    fn drop(&mut self) {
        if let Ok(mut d) = DEADLINES.lock() {
            d.retain(|(id, _, _, _)| *id != self.0);
        }
    }
}

/// The state letter of process `pid` if it is a child of this process (`Z`: exited, not yet
/// reaped), else `None`.
fn child_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid …`; comm may hold spaces, so read after its closing paren.
    let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
    let state = rest.next()?.chars().next()?;
    (rest.next()? == std::process::id().to_string()).then_some(state)
}

/// SIGKILLs those of `pids` that are live children of this process and waits (up to `bound`)
/// until each has exited: their sockets are closed once they are zombies. The zombies are reaped
/// by their [`Proc`]s' drops.
async fn kill_and_wait(pids: &[i32], bound: Duration) {
    let live = |p: &i32| child_state(*p).is_some_and(|s| s != 'Z');
    let live_pids: Vec<i32> = pids.iter().copied().filter(live).collect();
    for &p in &live_pids {
        send_signal(p, libc::SIGKILL);
    }
    let start = Instant::now();
    while live_pids.iter().any(live) && start.elapsed() < bound {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGKILLs every direct child of this process (services, ditfleetctl runs, private brokers).
fn kill_children() {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if child_state(pid).is_some() {
            send_signal(pid, libc::SIGKILL);
        }
    }
}

/// Model versions the tests pin jobs to; teardown deletes their pinned queues.
pub const TEST_VERSIONS: [&str; 4] = [
    "flux-dev@sim-1",
    "flux-dev@v2",
    "flux-dev@v3",
    "flux-schnell@sim-1",
];

/// Connects to `url`; when that is the shared broker, it does not answer and
/// `DITFLEET_TEST_HEAL_BROKER=1` (set by `make test`), restarts it with scripts/heal-rabbitmq.sh
/// and tries once more, so that one wedged RabbitMQ 3.10 node (see that script) fails at most the
/// test that was running, not every test after it. Loud on stderr whenever it heals.
async fn connect_healing(url: &str, name: &str) -> lapin::Connection {
    match amqp::connect(url, name).await {
        Ok(c) => return c,
        Err(e) if url == AMQP_URL && std::env::var("DITFLEET_TEST_HEAL_BROKER").as_deref() == Ok("1") => {
            heal_shared_broker(&format!("failed ({e})")).await
        }
        Err(e) => panic!("RabbitMQ at {url} (make test starts it): {e}"),
    }
    amqp::connect(url, name)
        .await
        .expect("RabbitMQ at 127.0.0.1:5672 after scripts/heal-rabbitmq.sh")
}

/// How long a test's own channel, topology declaration and publisher may take on a broker that
/// accepted its connection (seconds on a healthy node).
const BROKER_SETUP_BOUND: Duration = Duration::from_secs(30);

/// Connects ([`connect_healing`]), opens the test's channel, declares the namespace's topology,
/// subscribes to its events and opens its publisher, all within [`BROKER_SETUP_BOUND`] (a node
/// was seen to wedge right after the declarations, with the subscription then unbounded). A
/// wedged RabbitMQ 3.10 node can accept the connection and then answer nothing: on the shared
/// broker with `DITFLEET_TEST_HEAL_BROKER=1` that is healed and set up once more, loudly, instead
/// of leaving the test waiting forever.
async fn broker_setup_healing(
    url: &str,
    ns: &str,
    topo: &Topology,
) -> (lapin::Connection, lapin::Consumer, Publisher) {
    let setup = || async {
        let conn = connect_healing(url, &format!("test {ns}")).await;
        let ch = conn.create_channel().await?;
        topo.declare(&ch, &CLASSES).await?;
        let events = topo.subscribe_events(&ch, "#").await?;
        let publisher = Publisher::new(&conn).await?;
        Ok::<_, lapin::Error>((conn, events, publisher))
    };
    match tokio::time::timeout(BROKER_SETUP_BOUND, setup()).await {
        Ok(Ok(v)) => return v,
        Ok(Err(e)) if url != AMQP_URL => panic!("broker setup at {url}: {e}"),
        Err(_) if url != AMQP_URL => panic!("broker setup at {url}: no answer within {BROKER_SETUP_BOUND:?}"),
        Ok(Err(e)) => heal_shared_broker(&format!("setup failed: {e}")).await,
        Err(_) => heal_shared_broker(&format!("setup unanswered within {BROKER_SETUP_BOUND:?}")).await,
    }
    tokio::time::timeout(BROKER_SETUP_BOUND, setup())
        .await
        .expect("broker setup after scripts/heal-rabbitmq.sh: no answer")
        .expect("broker setup after scripts/heal-rabbitmq.sh")
}

/// Restarts the shared broker with scripts/heal-rabbitmq.sh where `make test` allows it
/// (`DITFLEET_TEST_HEAL_BROKER=1`); fails the test otherwise.
async fn heal_shared_broker(why: &str) {
    if std::env::var("DITFLEET_TEST_HEAL_BROKER").as_deref() != Ok("1") {
        panic!("shared RabbitMQ on 127.0.0.1:5672: {why}");
    }
    eprintln!("!!! shared RabbitMQ on 127.0.0.1:5672: {why}; restarting it (scripts/heal-rabbitmq.sh)");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/heal-rabbitmq.sh");
    let ok = tokio::process::Command::new("bash")
        .arg(script)
        .status()
        .await
        .is_ok_and(|s| s.success());
    assert!(ok, "scripts/heal-rabbitmq.sh could not bring RabbitMQ back");
}

impl Fleet {
    /// Creates the namespace's topology and starts recording its events.
    pub async fn new(test: &str) -> Fleet {
        Self::with_urls(test, AMQP_URL, REDIS_URL).await
    }

    /// [`Fleet::new`] against another broker and Redis (e.g. private ones a test restarts); the
    /// same as [`Fleet::with_urls`].
    pub async fn new_on(test: &str, amqp_url: &str, redis_url: &str) -> Fleet {
        Self::with_urls(test, amqp_url, redis_url).await
    }

    /// [`Fleet::new`] on another broker and Redis (e.g. private instances).
    pub async fn with_urls(test: &str, amqp_url: &str, redis_url: &str) -> Fleet {
        let ns = format!(
            "t-{}-{}",
            test.replace('_', "-").chars().take(40).collect::<String>(),
            &uuid::Uuid::new_v4().to_string()[..8]
        );
        let watch = TestWatch::start(&ns);
        let root = std::env::temp_dir().join("ditfleet-tests").join(&ns);
        let result_dir = root.join("results");
        let log_dir = root.join("logs");
        std::fs::create_dir_all(&result_dir).unwrap();
        std::fs::create_dir_all(&log_dir).unwrap();
        let topo = Topology::new(&ns);
        let (conn, mut consumer, publisher) = broker_setup_healing(amqp_url, &ns, &topo).await;
        let store = within_bound(
            "connecting the job store to Redis",
            JobStore::connect(redis_url, &ns, Duration::from_secs(3600)),
        )
        .await
        .expect("Redis at 127.0.0.1:6379");
        let events = EventLog::default();
        let sink = events.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                if let Ok(ev) = serde_json::from_slice::<JobEvent>(&d.data) {
                    sink.inner.lock().unwrap().push((d.routing_key.to_string(), ev));
                }
            }
        });
        let mut env = HashMap::new();
        for (k, v) in [
            ("DITFLEET_AMQP_URL", amqp_url.to_string()),
            ("DITFLEET_REDIS_URL", redis_url.to_string()),
            ("DITFLEET_NAMESPACE", ns.clone()),
            ("DITFLEET_RESULT_DIR", result_dir.display().to_string()),
            ("DITFLEET_ENGINE", "simulated".into()),
            ("DITFLEET_SIM_STEP_MS", "10".into()),
            ("DITFLEET_HEARTBEAT_S", "1".into()),
            ("DITFLEET_JOB_LEASE_S", "2".into()),
            ("DITFLEET_SHUTDOWN_GRACE_S", "20".into()),
            ("DITFLEET_LOG", "info".into()),
            ("DITFLEET_JOB_TTL_S", "3600".into()),
            // The LoRA registry: a folder of this test's own (tests on S3 set their own).
            (
                "DITFLEET_LORA_REGISTRY",
                format!("file://{}", root.join("lora-registry").display()),
            ),
        ] {
            env.insert(k.to_string(), v);
        }
        Fleet {
            ns,
            topo,
            result_dir,
            log_dir,
            conn,
            publisher,
            store,
            events,
            env,
            worker_ids: Mutex::new(Vec::new()),
            spawned: Mutex::new(Vec::new()),
            _watch: watch,
        }
    }

    fn spawn(&self, binary: &str, name: &str, extra: &[(&str, &str)], args: &[&str]) -> Proc {
        let log = self.log_dir.join(format!("{name}-{}.log", uuid::Uuid::new_v4()));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin(binary));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {binary}: {e}"));
        self.spawned.lock().unwrap().push(child.id() as i32);
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// Starts any ditfleet binary with extra environment.
    pub fn spawn_with(&self, binary: &str, name: &str, extra: &[(&str, &str)]) -> Proc {
        self.spawn(binary, name, extra, &[])
    }

    pub fn start_scheduler(&self) -> Proc {
        self.spawn("ditfleet-scheduler", "scheduler", &[], &[])
    }

    /// Starts a worker with id `id` (simulated engine unless `extra` says otherwise).
    pub fn start_worker(&self, id: &str, extra: &[(&str, &str)]) -> Proc {
        // Each worker has its own LoRA download cache, as on separate machines.
        let cache = self
            .log_dir
            .parent()
            .expect("the test's folder")
            .join("lora-cache")
            .join(id)
            .display()
            .to_string();
        self.worker_ids.lock().unwrap().push(id.to_string());
        let mut e = vec![
            ("DITFLEET_WORKER_ID", id),
            ("DITFLEET_LORA_CACHE_DIR", cache.as_str()),
        ];
        e.extend_from_slice(extra);
        self.spawn("ditfleet-worker", id, &e, &[])
    }

    /// Pushes a small LoRA adapter (a PEFT-named safetensors file, its bytes depending on the
    /// name) as `name@version` for `base_model` with `ditfleetctl lora push`; panics on failure.
    pub fn push_lora(&self, name: &str, version: &str, base_model: &str) -> std::process::Output {
        let keys = [
            format!("{name}.blocks.0.attn.to_q.lora_A.weight"),
            format!("{name}.blocks.0.attn.to_q.lora_B.weight"),
        ];
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        self.push_lora_bytes(
            name,
            version,
            base_model,
            &ditfleet_common::lora::tiny_safetensors(&refs),
        )
    }

    /// [`Fleet::push_lora`] with the adapter's tensors given: `(key, shape, values)`, F32.
    pub fn push_lora_tensors(
        &self,
        name: &str,
        version: &str,
        base_model: &str,
        tensors: &[(&str, Vec<usize>, Vec<f32>)],
    ) -> std::process::Output {
        self.push_lora_bytes(
            name,
            version,
            base_model,
            &ditfleet_common::lora::f32_safetensors(tensors),
        )
    }

    fn push_lora_bytes(
        &self,
        name: &str,
        version: &str,
        base_model: &str,
        bytes: &[u8],
    ) -> std::process::Output {
        let dir = self.log_dir.parent().expect("the test's folder").join("lora-src");
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(format!("{name}-{version}.safetensors"));
        std::fs::write(&file, bytes).unwrap();
        let out = self.ctl(&[
            "lora",
            "push",
            file.to_str().unwrap(),
            "--name",
            name,
            "--version",
            version,
            "--base-model",
            base_model,
        ]);
        assert!(
            out.status.success(),
            "lora push {name}@{version}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs `ditfleetctl` to completion with the fleet's environment.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        self.ctl_with(&[], args)
    }

    /// Runs `ditfleetctl` with the fleet's environment plus `extra`.
    pub fn ctl_with(&self, extra: &[(&str, &str)], args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new(bin("ditfleetctl"));
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        output_within(&mut cmd, CTL_LIMIT)
    }

    /// `ditfleetctl submit --wait` of a small job (256², `steps` steps, prompt "a fox") with the
    /// fleet's environment plus `extra` and the flags in `more` (e.g. `--priority high`), waiting
    /// up to 60 s for its result.
    pub fn ctl_submit_wait(
        &self,
        extra: &[(&str, &str)],
        job_id: &str,
        steps: u32,
        more: &[&str],
    ) -> std::process::Output {
        let steps = steps.to_string();
        let mut args = vec![
            "submit",
            "--prompt",
            "a fox",
            "--width",
            "256",
            "--height",
            "256",
            "--steps",
            &steps,
            "--job-id",
            job_id,
            "--wait",
            "--timeout-s",
            "60",
        ];
        args.extend(more);
        self.ctl_with(extra, &args)
    }

    /// Submits `jobs` (ids, `steps` steps each) in the background on a connection of its own,
    /// one every `gap`, each with a publisher confirm, as a backend under steady load would.
    /// The task returns its connection (keep it open until the jobs are consumed).
    pub async fn submit_paced(
        &self,
        name: &str,
        ids: Vec<String>,
        steps: u32,
        gap: Duration,
    ) -> tokio::task::JoinHandle<lapin::Connection> {
        let url = self.env["DITFLEET_AMQP_URL"].clone();
        let (conn, publisher) = within_bound("the paced submitter's connection", async {
            let conn = ditfleet_common::amqp::connect(&url, name).await.unwrap();
            let publisher = ditfleet_common::amqp::Publisher::new(&conn).await.unwrap();
            (conn, publisher)
        })
        .await;
        let topo = self.topo.clone();
        tokio::spawn(async move {
            for id in ids {
                let body = serde_json::to_vec(&job(&id, steps)).unwrap();
                within_bound(
                    "a paced submit's publish and confirm",
                    publisher.publish(
                        &topo.submit_exchange(),
                        ditfleet_common::topology::SUBMIT_KEY,
                        &body,
                        ditfleet_common::amqp::persistent("application/json")
                            .with_message_id(id.as_str().into()),
                        true,
                    ),
                )
                .await
                .unwrap();
                tokio::time::sleep(gap).await;
            }
            conn
        })
    }

    /// Waits until `n` workers are registered.
    pub async fn wait_workers(&self, n: usize, timeout: Duration) {
        let start = Instant::now();
        loop {
            let w = self.store.workers().await.unwrap();
            if w.len() >= n {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "only {} of {n} workers registered after {timeout:?}",
                w.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Publishes a raw body to the submit exchange (with publisher confirm).
    pub async fn submit_raw(&self, body: &[u8], message_id: &str) {
        let props = persistent("application/json").with_message_id(message_id.into());
        within_bound(
            "a submit's publish and confirm",
            self.publisher
                .publish(&self.topo.submit_exchange(), SUBMIT_KEY, body, props, true),
        )
        .await
        .expect("submit publish");
    }

    pub async fn submit(&self, spec: &JobSpec) {
        self.submit_raw(&serde_json::to_vec(spec).unwrap(), &spec.job_id)
            .await;
    }

    pub async fn state(&self, job_id: &str) -> Option<JobState> {
        self.store.state(job_id).await.unwrap()
    }

    /// Waits until the job reaches `want` (panics with its status on timeout).
    pub async fn wait_state(
        &self,
        job_id: &str,
        want: JobState,
        timeout: Duration,
    ) -> HashMap<String, String> {
        let start = Instant::now();
        loop {
            let h = self.store.get(job_id).await.unwrap();
            if h.get("state").map(String::as_str) == Some(want.as_str()) {
                return h;
            }
            assert!(
                start.elapsed() < timeout,
                "job {job_id} did not reach {want} within {timeout:?}; status: {h:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Drains the DLQ: (job id header, reason header, body).
    pub async fn dead_letters(&self) -> Vec<(String, String, Vec<u8>)> {
        within_bound("draining the dead-letter queue", self.dead_letters_unbounded()).await
    }

    async fn dead_letters_unbounded(&self) -> Vec<(String, String, Vec<u8>)> {
        let ch = self.conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(self.topo.dead_queue().as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let h = m.delivery.properties.headers().clone().unwrap_or_default();
            let get = |k: &str| match h.inner().get(k) {
                Some(AMQPValue::LongString(s)) => s.to_string(),
                _ => String::new(),
            };
            out.push((
                get("x-ditfleet-job-id"),
                get("x-ditfleet-reason"),
                m.delivery.data.clone(),
            ));
            m.delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        out
    }

    /// Declares a durable quorum queue `name` (no dead-letter exchange) on `ch`.
    pub async fn declare_quorum_queue(ch: &lapin::Channel, name: &str) {
        let mut args = lapin::types::FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        ch.queue_declare(
            name.into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    }

    /// Records every terminal event (`done`, `failed`, `cancelled`) in a durable quorum queue that
    /// outlives broker restarts; read it with [`Fleet::terminal_events`].
    pub async fn record_terminal_events_durably(&self) {
        within_bound(
            "declaring the terminal-event queue",
            self.record_terminal_events_durably_unbounded(),
        )
        .await
    }

    async fn record_terminal_events_durably_unbounded(&self) {
        let ch = self.conn.create_channel().await.unwrap();
        let q = format!("{}.test-terminal", self.ns);
        Self::declare_quorum_queue(&ch, &q).await;
        for kind in ["done", "failed", "cancelled"] {
            ch.queue_bind(
                q.as_str().into(),
                self.topo.events_exchange().as_str().into(),
                format!("job.#.{kind}").as_str().into(),
                Default::default(),
                Default::default(),
            )
            .await
            .unwrap();
        }
    }

    /// Drains the durable terminal-event queue: (routing key, event).
    /// Drains the terminal events: (AMQP `message_id`, event).
    pub async fn terminal_events(&self) -> Vec<(String, JobEvent)> {
        within_bound("draining the terminal events", self.terminal_events_unbounded()).await
    }

    async fn terminal_events_unbounded(&self) -> Vec<(String, JobEvent)> {
        let ch = self.conn.create_channel().await.unwrap();
        let q = format!("{}.test-terminal", self.ns);
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(q.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            if let Ok(ev) = serde_json::from_slice::<JobEvent>(&m.delivery.data) {
                let id = m
                    .delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                out.push((id, ev));
            }
            m.delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        out
    }

    /// Deletes the namespace's queues and exchanges (Redis keys expire with their TTL). The test
    /// has passed by now: a broker that stops answering here leaves the namespace's queues
    /// behind (loudly) rather than failing it; the next test's setup heals the broker.
    pub async fn teardown(self) {
        let ns = self.ns.clone();
        if tokio::time::timeout(BROKER_CALL_BOUND, self.teardown_unbounded())
            .await
            .is_err()
        {
            uncaptured(&format!(
                "!!! teardown of namespace {ns}: the broker did not answer within {BROKER_CALL_BOUND:?}; its queues are left"
            ));
        }
    }

    async fn teardown_unbounded(self) {
        // The fleet's services go first (their Procs' drops would kill them only after this), so
        // no consumer is live when its queues are deleted: as in production, where queues
        // outlive their consumers. Fewer odd sequences for the RabbitMQ 3.10 test node, which
        // wedges now and then (docs/operations.md).
        let pids = self.spawned.lock().unwrap().clone();
        kill_and_wait(&pids, Duration::from_secs(5)).await;
        let Ok(ch) = self.conn.create_channel().await else {
            return;
        };
        let mut queues = vec![
            self.topo.submit_queue(),
            self.topo.dead_queue(),
            format!("{}.test-terminal", self.ns),
        ];
        queues.extend(CLASSES.iter().flat_map(|c| self.topo.routed_queues(c)));
        for q in queues {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        // Pinned queues exist only if used; a failed delete closes its channel, so one each.
        for c in CLASSES {
            for mv in TEST_VERSIONS {
                if let Ok(ch) = self.conn.create_channel().await {
                    let _ = ch
                        .queue_delete(
                            self.topo.pin_queue(c, mv).as_str().into(),
                            QueueDeleteOptions::default(),
                        )
                        .await;
                    let _ = ch.close(200, "".into()).await;
                }
            }
        }
        // Each worker's LoRA affinity queue (one channel each, as above).
        let ids = self.worker_ids.lock().unwrap().clone();
        for id in ids {
            if let Ok(ch) = self.conn.create_channel().await {
                let _ = ch
                    .queue_delete(
                        self.topo.affinity_queue(&id).as_str().into(),
                        QueueDeleteOptions::default(),
                    )
                    .await;
                let _ = ch.close(200, "".into()).await;
            }
        }
        for x in [
            self.topo.affinity_exchange(),
            self.topo.return_exchange(),
            self.topo.submit_exchange(),
            self.topo.work_exchange(),
            self.topo.events_exchange(),
            self.topo.dlx(),
        ] {
            let _ = ch
                .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        let _ = self.conn.close(200, "test done".into()).await;
    }
}

/// A valid job with the given id.
pub fn job(job_id: &str, steps: u32) -> JobSpec {
    JobSpec {
        schema_version: SCHEMA_VERSION,
        job_id: job_id.to_string(),
        tenant: "test".into(),
        model: "flux-dev".into(),
        model_version: None,
        prompt: "a lighthouse on a cliff at dusk".into(),
        negative_prompt: None,
        true_cfg_scale: None,
        plan: None,
        width: 256,
        height: 256,
        steps: Some(steps),
        guidance: None,
        scheduler: None,
        loras: Vec::new(),
        seed: Some(7),
        priority: Priority::Normal,
        deadline: None,
        reply_to: None,
        labels: Default::default(),
    }
}

/// History of a job's states, without the times: `["queued", "routed", ...]`.
pub fn history(h: &HashMap<String, String>) -> Vec<String> {
    h.get("history")
        .map(|s| {
            s.split_whitespace()
                .map(|e| e.split('@').next().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Percentile of sorted values (nearest rank).
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A free TCP port on 127.0.0.1 (bound and released; the caller binds it again right away).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Minimal HTTP/1.1 GET: (status code, body). Errors while the server is not up yet are `None`.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The value of one sample line `name{labels} value` in Prometheus text, if present.
pub fn metric_value(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name_and_labels)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}
