//! `ditfleetctl`: submit jobs and watch them, inspect status and workers, cancel jobs, drain
//! workers, hot-swap model versions.
//! Never links libtorch. Reads the same `DITFLEET_*` variables as the services.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ditfleet_common::amqp::{self, Publisher, now_ms, persistent};
use ditfleet_common::config::{self, COMMON_VARS, CommonConfig, Env};
use ditfleet_common::job::{JobEvent, JobSpec, Limits, LoraRef, LoraSpec, Priority, SCHEMA_VERSION};
use ditfleet_common::state::{JobState, JobStore, WorkerInfo};
use ditfleet_common::topology::Topology;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use tracing::Instrument;

/// `println!` that ends the program quietly (exit 0) when stdout is a closed pipe, as in
/// `ditfleetctl status <id> | head -1`, instead of panicking with a backtrace.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($t)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            eprintln!("ditfleetctl: writing to stdout: {e}");
            std::process::exit(1);
        }
    }};
}

#[derive(Parser)]
#[command(name = "ditfleetctl", version, about = "Submit text-to-image jobs to a ditfleet and operate it.",
          after_help = config::help_text(&[COMMON_VARS]))]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Submit a job (from flags or a JSON file) and optionally wait for its image.
    Submit(Box<SubmitArgs>),
    /// Show a job's status.
    Status {
        job_id: String,
        /// Print the raw status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List live workers.
    Workers {
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job: a queued job never starts; a running one stops at its next step.
    Cancel { job_id: String },
    /// Print the `rabbitmqctl` commands that create least-privilege users for this namespace
    /// (backend, scheduler, worker; docs/operations.md "RabbitMQ users").
    RabbitmqPermissions {
        /// Virtual host of the fleet.
        #[arg(long, default_value = "/")]
        vhost: String,
        /// User name prefix: users are <prefix>-backend, <prefix>-scheduler, <prefix>-worker.
        #[arg(long, default_value = "ditfleet")]
        user_prefix: String,
        /// Print a tenant-scoped backend user <prefix>-backend-<tenant> (repeatable) instead of
        /// the global backend user: it follows only job ids starting with `<tenant>:` and reply
        /// keys under `reply.<tenant>.`.
        #[arg(long = "tenant")]
        tenants: Vec<String>,
    },
    /// Drain a worker: it stops taking jobs, finishes the running ones (within its grace period),
    /// deregisters and exits 0. Waits for that unless --no-wait.
    Drain {
        worker: String,
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
    /// Model versions: load (hot swap) or unload.
    #[command(subcommand)]
    Model(ModelCmd),
    /// LoRA adapters in the fleet's registry (DITFLEET_LORA_REGISTRY, or --registry).
    #[command(subcommand)]
    Lora(LoraCmd),
}

#[derive(Subcommand)]
enum LoraCmd {
    /// Push a LoRA adapter (a safetensors file, PEFT or kohya key names) as NAME@VERSION for a
    /// base model: the file is checked and hashed (SHA-256), uploaded, and its manifest written
    /// last, so jobs can name it only once the push is complete. Pushing a version again
    /// replaces it.
    Push {
        file: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        /// The model it was trained for (flux-dev, flux-schnell, sdxl-base).
        #[arg(long)]
        base_model: String,
        /// Registry URL (s3://bucket[/prefix] or file:///dir); default DITFLEET_LORA_REGISTRY.
        #[arg(long)]
        registry: Option<String>,
    },
    /// List the adapters of the registry.
    List {
        /// Only adapters made for this model.
        #[arg(long)]
        base_model: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(long)]
        registry: Option<String>,
    },
    /// Remove NAME@VERSION from the registry (jobs naming it are rejected from then on; workers
    /// that downloaded it keep their copy until their cache drops it).
    Rm {
        adapter: String,
        #[arg(long)]
        registry: Option<String>,
    },
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Make workers serve MODEL@VERSION (e.g. flux-dev@v2): each loads it next to the current one
    /// (or after draining, with DITFLEET_SWAP_MODE=drain), switches unpinned jobs to it between
    /// jobs, and unloads the previous version unless --keep-old. Waits until every targeted
    /// worker serves it.
    Load {
        model_version: String,
        /// Only these workers (comma-separated ids); default: the whole fleet, including workers
        /// that start later.
        #[arg(long, value_delimiter = ',')]
        workers: Vec<String>,
        /// Keep the versions held now loaded too (jobs pinned to them keep running here).
        #[arg(long)]
        keep_old: bool,
        #[arg(long)]
        no_wait: bool,
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
    },
    /// Stop holding MODEL@VERSION on the targeted workers (not their only version of the model).
    Unload {
        model_version: String,
        #[arg(long, value_delimiter = ',')]
        workers: Vec<String>,
    },
}

#[derive(clap::Args)]
struct SubmitArgs {
    /// A job JSON file (contract v1); flags are ignored when given.
    #[arg(long)]
    file: Option<PathBuf>,
    #[arg(long, required_unless_present = "file")]
    prompt: Option<String>,
    #[arg(long)]
    negative_prompt: Option<String>,
    /// True CFG scale (1..=20; above 1 needs --negative-prompt): every step also runs the model
    /// on the negative prompt.
    #[arg(long)]
    true_cfg_scale: Option<f64>,
    /// Parallel plan for this job, e.g. ulysses=2 (default: the worker's configured or
    /// autotuned plan).
    #[arg(long)]
    plan: Option<String>,
    #[arg(long, default_value = "flux-dev")]
    model: String,
    #[arg(long)]
    model_version: Option<String>,
    #[arg(long, default_value_t = 1024)]
    width: u32,
    #[arg(long, default_value_t = 1024)]
    height: u32,
    #[arg(long)]
    steps: Option<u32>,
    #[arg(long)]
    guidance: Option<f64>,
    /// Sampler: sdxl-base runs euler (default), euler_a, dpmpp_2m, dpmpp_2m_karras; Flux models
    /// flow_euler.
    #[arg(long)]
    scheduler: Option<String>,
    /// LoRA adapter as NAME@VERSION[:SCALE] (scale -4..=4, default 1); repeat for a stack, in
    /// order.
    #[arg(long = "lora", value_parser = parse_lora)]
    loras: Vec<LoraSpec>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, env = "DITFLEET_TENANT", default_value = "default")]
    tenant: String,
    #[arg(long, value_enum, default_value = "normal")]
    priority: PriorityArg,
    /// Job id (default: a new UUID). Resubmitting the same id never runs the job twice.
    #[arg(long)]
    job_id: Option<String>,
    /// RFC 3339 deadline.
    #[arg(long)]
    deadline: Option<String>,
    #[arg(long)]
    reply_to: Option<String>,
    /// Label as key=value (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// Wait for the result, showing progress.
    #[arg(long)]
    wait: bool,
    /// Seconds to wait with --wait.
    #[arg(long, default_value_t = 3600)]
    timeout_s: u64,
    /// Skip the local validation (the scheduler validates anyway).
    #[arg(long)]
    no_validate: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PriorityArg {
    Low,
    Normal,
    High,
}

/// `NAME@VERSION[:SCALE]`: the syntax only; the contract's rules for names, versions and scales
/// are checked with the rest of the job ([`JobSpec::validate`]).
fn parse_lora(s: &str) -> Result<LoraSpec, String> {
    let (name, rest) = s
        .split_once('@')
        .ok_or_else(|| format!("lora {s:?} is not NAME@VERSION[:SCALE], e.g. pixel-art@v1:0.8"))?;
    let (version, scale) = match rest.split_once(':') {
        Some((v, scale)) => (
            v,
            Some(
                scale
                    .parse::<f64>()
                    .map_err(|_| format!("lora {s:?}: scale {scale:?} is not a number"))?,
            ),
        ),
        None => (rest, None),
    };
    Ok(LoraSpec {
        name: name.to_string(),
        version: version.to_string(),
        scale,
    })
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label {s:?} is not key=value"))
}

fn main() {
    let cli = Cli::parse();
    let cfg = match CommonConfig::from_env(&Env::process()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ditfleetctl: {e}");
            std::process::exit(config::EXIT_BAD_CONFIG);
        }
    };
    let telemetry = ditfleet_common::telemetry::init_with_traces(
        &std::env::var("DITFLEET_LOG").unwrap_or_else(|_| "warn".into()),
        false,
        cfg.otel.as_ref(),
        "ditfleetctl",
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let code = rt.block_on(async move {
        match dispatch(cli.cmd, cfg).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("ditfleetctl: {e:#}");
                1
            }
        }
    });
    drop(rt);
    telemetry.shutdown();
    std::process::exit(code);
}

async fn dispatch(cmd: Cmd, cfg: CommonConfig) -> Result<i32> {
    match cmd {
        Cmd::Submit(args) => submit(*args, &cfg).await,
        Cmd::Status { job_id, json } => status(&job_id, json, &cfg).await,
        Cmd::Workers { json } => workers(json, &cfg).await,
        Cmd::Cancel { job_id } => cancel(&job_id, &cfg).await,
        Cmd::RabbitmqPermissions {
            vhost,
            user_prefix,
            tenants,
        } => Ok(rabbitmq_permissions(&vhost, &user_prefix, &tenants, &cfg)),
        Cmd::Drain {
            worker,
            no_wait,
            timeout_s,
        } => drain(&worker, !no_wait, Duration::from_secs(timeout_s), &cfg).await,
        Cmd::Model(ModelCmd::Load {
            model_version,
            workers,
            keep_old,
            no_wait,
            timeout_s,
        }) => {
            model_load(
                &model_version,
                &workers,
                keep_old,
                !no_wait,
                Duration::from_secs(timeout_s),
                &cfg,
            )
            .await
        }
        Cmd::Model(ModelCmd::Unload {
            model_version,
            workers,
        }) => model_unload(&model_version, &workers, &cfg).await,
        Cmd::Lora(cmd) => lora(cmd).await,
    }
}

/// The registry named by `--registry`, else `DITFLEET_LORA_REGISTRY`.
fn open_registry(flag: Option<String>) -> Result<ditfleet_common::lora::Registry> {
    let url = match flag.or_else(|| Env::process().raw("DITFLEET_LORA_REGISTRY")) {
        Some(u) => u,
        None => bail!(
            "no LoRA registry: set DITFLEET_LORA_REGISTRY (s3://bucket[/prefix] or file:///dir) or pass --registry"
        ),
    };
    ditfleet_common::lora::Registry::open(&url).map_err(|e| anyhow::anyhow!("{e}"))
}

async fn lora(cmd: LoraCmd) -> Result<i32> {
    match cmd {
        LoraCmd::Push {
            file,
            name,
            version,
            base_model,
            registry,
        } => {
            let reg = open_registry(registry)?;
            let len = std::fs::metadata(&file)
                .with_context(|| format!("reading {}", file.display()))?
                .len();
            let bar = if std::io::stderr().is_terminal() {
                let b = ProgressBar::new(len);
                b.set_style(
                    ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                b.set_message(format!("pushing {name}@{version}"));
                Some(b)
            } else {
                None
            };
            let b2 = bar.clone();
            let m = reg
                .push(&file, &name, &version, &base_model, &mut move |done, _| {
                    if let Some(b) = &b2 {
                        b.set_position(done);
                    }
                })
                .await
                .map_err(|e| anyhow::anyhow!("lora push {name}@{version}: {e}"))?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            out!(
                "pushed {} for {} ({} format, {} bytes, sha256 {}) to {}",
                m.label(),
                m.base_model,
                m.format,
                m.bytes,
                m.sha256,
                reg.describe()
            );
            Ok(0)
        }
        LoraCmd::List {
            base_model,
            json,
            registry,
        } => {
            let reg = open_registry(registry)?;
            let list: Vec<_> = reg
                .list()
                .await
                .map_err(|e| anyhow::anyhow!("lora list: {e}"))?
                .into_iter()
                .filter(|m| base_model.as_ref().is_none_or(|b| &m.base_model == b))
                .collect();
            if json {
                out!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            if list.is_empty() {
                out!("no adapters in {}", reg.describe());
                return Ok(0);
            }
            out!(
                "{:<40} {:<12} {:<6} {:>12} {:<16} {:<20}",
                "ADAPTER",
                "BASE MODEL",
                "FORMAT",
                "BYTES",
                "SHA256",
                "CREATED"
            );
            for m in list {
                out!(
                    "{:<40} {:<12} {:<6} {:>12} {:<16} {:<20}",
                    m.label(),
                    m.base_model,
                    m.format,
                    m.bytes,
                    m.sha256.get(..16).unwrap_or(&m.sha256),
                    m.created
                );
            }
            Ok(0)
        }
        LoraCmd::Rm { adapter, registry } => {
            let (name, version) = adapter
                .split_once('@')
                .ok_or_else(|| anyhow::anyhow!("lora rm: {adapter:?} is not NAME@VERSION"))?;
            let reg = open_registry(registry)?;
            if reg
                .remove(name, version)
                .await
                .map_err(|e| anyhow::anyhow!("lora rm {adapter}: {e}"))?
            {
                out!("removed {adapter} from {}", reg.describe());
                Ok(0)
            } else {
                eprintln!("ditfleetctl: {adapter} is not in {}", reg.describe());
                Ok(1)
            }
        }
    }
}

async fn live_workers(s: &JobStore) -> Result<Vec<WorkerInfo>> {
    Ok(s.workers()
        .await?
        .iter()
        .filter_map(|(_, v)| serde_json::from_str(v).ok())
        .collect())
}

async fn drain(worker: &str, wait: bool, timeout: Duration, cfg: &CommonConfig) -> Result<i32> {
    let s = store(cfg).await?;
    let Some(w) = live_workers(&s).await?.into_iter().find(|w| w.id == worker) else {
        eprintln!("no live worker {worker:?} (ditfleetctl workers lists them)");
        return Ok(3);
    };
    s.control_set(Some(worker), "drain", "1").await?;
    out!(
        "draining worker {worker} ({} of {} slots busy); it finishes its running jobs and exits",
        w.slots.saturating_sub(w.free_slots),
        w.slots
    );
    if !wait {
        return Ok(0);
    }
    let start = Instant::now();
    let mut last_state = String::new();
    loop {
        match live_workers(&s).await?.into_iter().find(|w| w.id == worker) {
            None => {
                out!("worker {worker} drained and deregistered");
                return Ok(0);
            }
            Some(w) if w.state != last_state => {
                eprintln!(
                    "  {worker}: {} ({} of {} slots busy)",
                    w.state,
                    w.slots.saturating_sub(w.free_slots),
                    w.slots
                );
                last_state = w.state;
            }
            Some(_) => {}
        }
        if start.elapsed() > timeout {
            eprintln!(
                "worker {worker} is still registered after {} s",
                timeout.as_secs()
            );
            return Ok(2);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn model_load(
    model_version: &str,
    targets: &[String],
    keep_old: bool,
    wait: bool,
    timeout: Duration,
    cfg: &CommonConfig,
) -> Result<i32> {
    let (model, _) = ditfleet_common::job::parse_model_version(model_version).map_err(anyhow::Error::msg)?;
    let s = store(cfg).await?;
    let live = live_workers(&s).await?;
    let unknown: Vec<&String> = targets
        .iter()
        .filter(|t| !live.iter().any(|w| &w.id == *t))
        .collect();
    if !unknown.is_empty() {
        eprintln!("no live worker {unknown:?} (ditfleetctl workers lists them)");
        return Ok(3);
    }
    // The desired list: the new version first (the default), then what stays.
    let desired = |current: &[String]| -> String {
        let mut v = vec![model_version.to_string()];
        if keep_old {
            v.extend(
                current
                    .iter()
                    .filter(|mv| mv.split('@').next() == Some(model.as_str()) && mv.as_str() != model_version)
                    .cloned(),
            );
        }
        serde_json::to_string(&v).expect("list serialises")
    };
    let scope: Vec<&WorkerInfo> = if targets.is_empty() {
        let all_held: Vec<String> = live.iter().flat_map(|w| w.model_versions.clone()).collect();
        s.control_set(None, "models", &desired(&all_held)).await?;
        // Per-worker overrides of this model would win over the fleet setting: drop them.
        for w in &live {
            let own = s.control(&w.id).await?;
            if own.contains_key("models") {
                s.control_del(Some(&w.id), "models").await?;
            }
        }
        live.iter().collect()
    } else {
        let mut v = Vec::new();
        for w in live.iter().filter(|w| targets.contains(&w.id)) {
            s.control_set(Some(&w.id), "models", &desired(&w.model_versions))
                .await?;
            v.push(w);
        }
        v
    };
    let ids: Vec<String> = scope.iter().map(|w| w.id.clone()).collect();
    out!(
        "{model_version} requested on {}",
        if targets.is_empty() {
            "the whole fleet".to_string()
        } else {
            ids.join(", ")
        }
    );
    if !wait {
        return Ok(0);
    }
    let start = Instant::now();
    loop {
        let now = live_workers(&s).await?;
        let mut pending = Vec::new();
        for id in &ids {
            match now.iter().find(|w| &w.id == id) {
                None => {} // gone (drained or died): nothing to wait for
                Some(w) if w.default_versions.iter().any(|d| d == model_version) => {}
                Some(w) => {
                    if let Some(err) = w.load_error.as_ref().filter(|e| e.starts_with(model_version)) {
                        out!("worker {id} failed to load {model_version}: {err}");
                        return Ok(1);
                    }
                    pending.push(id.clone());
                }
            }
        }
        if pending.is_empty() {
            out!("{model_version} serves on {}", ids.join(", "));
            return Ok(0);
        }
        if start.elapsed() > timeout {
            eprintln!(
                "still loading after {} s on: {}",
                timeout.as_secs(),
                pending.join(", ")
            );
            return Ok(2);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn model_unload(model_version: &str, targets: &[String], cfg: &CommonConfig) -> Result<i32> {
    let (model, _) = ditfleet_common::job::parse_model_version(model_version).map_err(anyhow::Error::msg)?;
    let s = store(cfg).await?;
    let live = live_workers(&s).await?;
    let mut changed = 0;
    for w in live
        .iter()
        .filter(|w| targets.is_empty() || targets.contains(&w.id))
    {
        let keep: Vec<String> = w
            .default_versions
            .iter()
            .chain(w.model_versions.iter())
            .filter(|mv| mv.split('@').next() == Some(model.as_str()) && mv.as_str() != model_version)
            .fold(Vec::new(), |mut acc, mv| {
                if !acc.contains(mv) {
                    acc.push(mv.clone());
                }
                acc
            });
        if !w.model_versions.iter().any(|mv| mv == model_version) {
            continue;
        }
        if keep.is_empty() {
            eprintln!(
                "worker {}: {model_version} is its only version of {model}; load another first",
                w.id
            );
            return Ok(1);
        }
        s.control_set(Some(&w.id), "models", &serde_json::to_string(&keep)?)
            .await?;
        changed += 1;
    }
    out!("{model_version} unloaded on {changed} worker(s)");
    Ok(0)
}

async fn store(cfg: &CommonConfig) -> Result<JobStore> {
    JobStore::connect_cfg(cfg)
        .await
        .with_context(|| format!("connecting to Redis at {}", config::redact_url(&cfg.redis_url)))
}

fn build_spec(a: &SubmitArgs) -> Result<(JobSpec, Vec<u8>)> {
    if let Some(path) = &a.file {
        let body = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let spec = JobSpec::parse(&body).with_context(|| format!("{} is not a v1 job", path.display()))?;
        return Ok((spec, body));
    }
    let spec = JobSpec {
        schema_version: SCHEMA_VERSION,
        job_id: a
            .job_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        tenant: a.tenant.clone(),
        model: a.model.clone(),
        model_version: a.model_version.clone(),
        prompt: a.prompt.clone().unwrap_or_default(),
        negative_prompt: a.negative_prompt.clone(),
        true_cfg_scale: a.true_cfg_scale,
        plan: a.plan.clone(),
        width: a.width,
        height: a.height,
        steps: a.steps,
        guidance: a.guidance,
        scheduler: a.scheduler.clone(),
        loras: a.loras.clone(),
        seed: a.seed,
        priority: match a.priority {
            PriorityArg::Low => Priority::Low,
            PriorityArg::Normal => Priority::Normal,
            PriorityArg::High => Priority::High,
        },
        deadline: a.deadline.clone(),
        reply_to: a.reply_to.clone(),
        labels: a.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
    };
    let body = serde_json::to_vec(&spec)?;
    Ok((spec, body))
}

async fn submit(a: SubmitArgs, cfg: &CommonConfig) -> Result<i32> {
    let (spec, body) = build_spec(&a)?;
    // The job's trace starts here; its context travels in the submit message's headers.
    let span = tracing::info_span!(
        "submit",
        job_id = %spec.job_id,
        tenant = %spec.tenant,
        model = %spec.model,
        otel.kind = "producer",
        messaging.system = "rabbitmq",
    );
    submit_in_span(a, cfg, spec, body).instrument(span).await
}

/// How long ditfleetctl waits for the broker to finish a submission or an announcement.
const BROKER_RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// Declares the topology only when it is missing, which makes a first submission safe before any
/// scheduler ran. A passive check needs no permission; a least-privileged backend user may not
/// declare, and when the topology is missing the mandatory publish after this says so.
async fn ensure_topology(conn: &lapin::Connection, topo: &Topology) -> Result<()> {
    let probe = conn.create_channel().await?;
    match amqp::passive_declare(&probe, &topo.submit_queue()).await {
        Ok(_) => {
            let _ = probe.close(200, "ok".into()).await;
        }
        // A failed passive declare closed the probe channel; declare on a fresh one.
        Err(_) => {
            let ch = conn.create_channel().await?;
            if let Err(e) = topo.declare(&ch, &[]).await {
                tracing::debug!(error = %e, "not declaring the topology (no configure permission?); using the existing one");
            }
        }
    }
    Ok(())
}

async fn submit_in_span(a: SubmitArgs, cfg: &CommonConfig, spec: JobSpec, body: Vec<u8>) -> Result<i32> {
    if !a.no_validate {
        spec.validate(&Limits {
            max_prompt_chars: ditfleet_common::job::SCHEMA_MAX_PROMPT_CHARS,
        })
        .context("the job is invalid (use --no-validate to let the scheduler record the rejection)")?;
    }
    let topo = Topology::new(&cfg.namespace);
    // Everything up to the confirmed publish is bounded: a broker that stops answering fails the
    // command with a reason instead of leaving it (and a backend's script) waiting forever.
    let setup = async {
        let conn = amqp::connect_cfg_once(cfg, "ditfleetctl")
            .await
            .with_context(|| format!("connecting to RabbitMQ at {}", config::redact_url(&cfg.amqp_url)))?;
        ensure_topology(&conn, &topo).await?;
        let ch = conn.create_channel().await?;
        // Subscribe before publishing so no event can be missed.
        let events = if a.wait {
            Some(
                topo.subscribe_events(&ch, &format!("job.{}.*", spec.job_id))
                    .await?,
            )
        } else {
            None
        };
        let publisher = Publisher::new(&conn).await?;
        let submitted = Instant::now();
        let mut headers = amqp::headers(&[("x-submitted-ms", now_ms().to_string())]);
        ditfleet_common::telemetry::inject_current(&mut headers);
        let props = persistent("application/json")
            .with_message_id(spec.job_id.as_str().into())
            .with_headers(headers);
        publisher
            .publish(
                &topo.submit_exchange(),
                ditfleet_common::topology::SUBMIT_KEY,
                &body,
                props,
                true,
            )
            .await
            .context("publishing the job")?;
        anyhow::Ok((conn, ch, events, submitted))
    };
    let (_conn, _ch, events, submitted) = tokio::time::timeout(BROKER_RPC_TIMEOUT, setup)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "RabbitMQ did not complete the submission within {} s; the job may or may not be queued (`ditfleetctl status {}` says)",
                BROKER_RPC_TIMEOUT.as_secs(),
                spec.job_id
            )
        })??;
    let Some(mut events) = events else {
        out!("{}", spec.job_id);
        return Ok(0);
    };
    eprintln!(
        "submitted job {} ({}x{}, model {})",
        spec.job_id, spec.width, spec.height, spec.model
    );
    let bar = ProgressBar::new(u64::from(
        spec.steps.unwrap_or_else(|| JobSpec::default_steps(&spec.model)),
    ));
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg:<12} [{bar:30}] {pos}/{len} steps  {elapsed}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_message("queued");
    let tty = std::io::stderr().is_terminal();
    let own_hash = format!("{:016x}", ditfleet_common::job::fnv1a(&body));
    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::sleep(Duration::from_secs(a.timeout_s));
    tokio::pin!(deadline);
    loop {
        let delivery = tokio::select! {
            _ = &mut deadline => {
                bar.abandon_with_message("timed out");
                eprintln!("no result after {} s; `ditfleetctl status {}` shows where it is", a.timeout_s, spec.job_id);
                return Ok(2);
            }
            d = events.next() => match d {
                Some(Ok(d)) => d,
                Some(Err(e)) => bail!("event stream failed: {e}"),
                None => bail!("event stream closed"),
            }
        };
        let ev: JobEvent = match serde_json::from_slice(&delivery.data) {
            Ok(ev) => ev,
            Err(e) => {
                eprintln!("ignoring an unreadable event: {e}");
                continue;
            }
        };
        // Only the fleet's own events about this job count: the routing key the fleet gives
        // them, the job's id in the body, and for a rejection, this very submission's body.
        if ev.job_id() != spec.job_id || delivery.routing_key.as_str() != ev.routing_key() {
            tracing::warn!(routing_key = %delivery.routing_key, event_job_id = %ev.job_id(), "ignoring an event that is not this job's");
            continue;
        }
        if let Some(id) = delivery.properties.message_id().as_ref()
            && ev.is_terminal()
            && !seen.insert(id.to_string())
        {
            continue;
        }
        match ev {
            JobEvent::Rejected {
                reason, body_hash, ..
            } => {
                if body_hash != own_hash {
                    // Another submission under this id was rejected; ours is the existing job.
                    continue;
                }
                bar.abandon_with_message("rejected");
                out!("job {} rejected: {reason}", spec.job_id);
                return Ok(1);
            }
            JobEvent::Progress {
                step, total, worker, ..
            } => {
                bar.set_length(u64::from(total));
                bar.set_position(u64::from(step));
                bar.set_message("running");
                if !tty && (step == 1 || step == total || step % 10 == 0) {
                    eprintln!("  step {step}/{total} on {worker}");
                }
            }
            JobEvent::Done {
                result_url,
                worker,
                engine,
                attempts,
                queue_wait_ms,
                generate_ms,
                store_ms,
                end_to_end_ms,
                timings,
                gpu_seconds,
                ..
            } => {
                bar.finish_with_message("done");
                let path = result_url.strip_prefix("file://").unwrap_or(&result_url);
                let f = |k: &str| timings.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
                out!(
                    "job {} succeeded on worker {worker} (engine: {engine}, attempt {attempts})",
                    spec.job_id
                );
                out!("image: {path}");
                out!(
                    "stages: queue wait {queue_wait_ms} ms | generate {generate_ms} ms (text encode {:.0} ms, denoise {:.0} ms, decode {:.0} ms) | store {store_ms} ms | end to end {end_to_end_ms} ms",
                    f("encode_ms"),
                    f("denoise_ms"),
                    f("decode_ms")
                );
                let sampler = timings.get("scheduler").and_then(|v| v.as_str());
                let loras = timings
                    .get("loras")
                    .and_then(|v| serde_json::from_value::<Vec<LoraRef>>(v.clone()).ok())
                    .unwrap_or_default();
                if sampler.is_some() || !loras.is_empty() {
                    let loras: Vec<String> = loras.iter().map(LoraRef::label).collect();
                    out!(
                        "sampler: {} | loras: {}",
                        sampler.unwrap_or("-"),
                        if loras.is_empty() {
                            "none".into()
                        } else {
                            loras.join(", ")
                        }
                    );
                }
                out!("cost: {gpu_seconds:.3} GPU-seconds");
                if let Some(tp) = ditfleet_common::telemetry::current_traceparent() {
                    out!("trace: {tp}");
                }
                out!("client round trip: {} ms", submitted.elapsed().as_millis());
                return Ok(0);
            }
            JobEvent::Failed { state, reason, .. } => {
                bar.abandon_with_message(state.clone());
                out!("job {} {state}: {reason}", spec.job_id);
                return Ok(1);
            }
            JobEvent::Cancelled { at_step, .. } => {
                bar.abandon_with_message("cancelled");
                out!(
                    "job {} cancelled{}",
                    spec.job_id,
                    at_step.map(|s| format!(" at step {s}")).unwrap_or_default()
                );
                return Ok(1);
            }
        }
    }
}

async fn status(job_id: &str, json: bool, cfg: &CommonConfig) -> Result<i32> {
    let s = store(cfg).await?;
    let mut h = s.get(job_id).await?;
    if h.is_empty() {
        eprintln!("no job {job_id:?} (never submitted, or its status expired)");
        return Ok(3);
    }
    if json {
        out!("{}", serde_json::to_string_pretty(&h)?);
        return Ok(0);
    }
    h.remove("spec");
    let mut keys: Vec<_> = h.keys().cloned().collect();
    keys.sort_by_key(|k| (k != "state", k.clone()));
    for k in keys {
        out!("{k:<16} {}", h[&k]);
    }
    Ok(0)
}

/// The `MODEL VERSIONS` cell of `workers`: each held version, `*` marking a model's default and
/// its precision in parentheses (`*flux-dev@v2(fp8)`; none from workers that predate the field),
/// then the versions being loaded.
fn version_list(w: &WorkerInfo) -> String {
    w.model_versions
        .iter()
        .map(|mv| {
            let default = if w.default_versions.contains(mv) { "*" } else { "" };
            match w.model_precisions.get(mv) {
                Some(p) => format!("{default}{mv}({p})"),
                None => format!("{default}{mv}"),
            }
        })
        .chain(w.loading.iter().map(|mv| format!("{mv}(loading)")))
        .collect::<Vec<_>>()
        .join(",")
}

async fn workers(json: bool, cfg: &CommonConfig) -> Result<i32> {
    let s = store(cfg).await?;
    let list = s.workers().await?;
    let infos: Vec<WorkerInfo> = list
        .iter()
        .filter_map(|(_, v)| serde_json::from_str(v).ok())
        .collect();
    if json {
        out!("{}", serde_json::to_string_pretty(&infos)?);
        return Ok(0);
    }
    if infos.is_empty() {
        out!("no live workers");
        return Ok(0);
    }
    out!(
        "{:<24} {:<9} {:<22} {:>5} {:<34} {:<18} {:>6} {:>9}",
        "WORKER",
        "STATE",
        "CLASSES",
        "FREE",
        "MODEL VERSIONS (*dflt)(precision)",
        "GPUS",
        "DEGREE",
        "HEARTBEAT"
    );
    let now = now_ms();
    for w in infos {
        let gpus = if w.gpus.is_empty() {
            w.devices.join(",")
        } else {
            format!("{}x {}", w.gpus.len(), w.gpus[0].name.replace("NVIDIA ", ""))
        };
        let versions = version_list(&w);
        out!(
            "{:<24} {:<9} {:<22} {:>2}/{:<2} {:<34} {:<18} {:>6} {:>7}ms",
            w.id,
            w.state,
            w.classes.join(","),
            w.free_slots,
            w.slots,
            versions,
            gpus,
            w.parallel_degree,
            now.saturating_sub(w.heartbeat_ms)
        );
        if !w.engine_note.is_empty() {
            out!("  {} engine: {}", w.engine, w.engine_note);
        }
        if let Some(r) = &w.degraded_reason {
            out!("  degraded: {r}");
        }
        if let Some(e) = &w.load_error {
            out!("  last model load failed: {e}");
        }
        if !w.lora_stacks.is_empty() {
            out!("  lora applied: {}", w.lora_stacks.join(" | "));
        }
        if !w.lora_cached.is_empty() {
            out!("  lora cached: {}", w.lora_cached.join(","));
        }
    }
    Ok(0)
}

async fn cancel(job_id: &str, cfg: &CommonConfig) -> Result<i32> {
    let s = store(cfg).await?;
    let (applied, prev) = s
        .transition(
            job_id,
            &[
                Some(JobState::Queued),
                Some(JobState::Routed),
                Some(JobState::Running),
            ],
            JobState::Cancelled,
            None,
            &[
                ("finished_ms", now_ms().to_string()),
                ("error", "cancelled by operator".into()),
            ],
        )
        .await?;
    match (applied, prev) {
        (true, Some(JobState::Running)) => {
            out!("job {job_id} cancelled; its worker stops it at the next step");
        }
        (true, _) => {
            // Nobody runs it: announce the cancellation here.
            let topo = Topology::new(&cfg.namespace);
            let conn = amqp::connect_cfg_once(cfg, "ditfleetctl").await?;
            ensure_topology(&conn, &topo).await?;
            let p = Publisher::new(&conn).await?;
            let ev = JobEvent::Cancelled {
                job_id: job_id.to_string(),
                at_step: None,
            };
            p.publish(
                &topo.events_exchange(),
                &ev.routing_key(),
                &serde_json::to_vec(&ev)?,
                persistent("application/json"),
                false,
            )
            .await?;
            out!("job {job_id} cancelled before it started");
        }
        (false, None) => {
            eprintln!("no job {job_id:?}");
            return Ok(3);
        }
        (false, Some(st)) => {
            eprintln!("job {job_id} is already {st}; nothing to cancel");
            return Ok(4);
        }
    }
    Ok(0)
}

fn rabbitmq_permissions(vhost: &str, prefix: &str, tenants: &[String], cfg: &CommonConfig) -> i32 {
    use ditfleet_common::topology::{Role, TopicPermissions};
    let topo = Topology::new(&cfg.namespace);
    let q = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let mut backends: Vec<(String, String, TopicPermissions)> = Vec::new();
    if tenants.is_empty() {
        let tp = topo
            .topic_permissions(Role::Backend)
            .expect("a backend has topic permissions");
        backends.push((format!("{prefix}-backend"), "BACKEND".into(), tp));
    }
    for tenant in tenants {
        match topo.tenant_topic_permissions(tenant) {
            Ok(tp) => backends.push((
                format!("{prefix}-backend-{tenant}"),
                format!("BACKEND_{}", tenant.to_uppercase().replace('-', "_")),
                tp,
            )),
            Err(e) => {
                eprintln!("{e}");
                return 2;
            }
        }
    }
    out!(
        "# least-privilege RabbitMQ users of namespace {:?}: set_permissions <configure> <write> <read>,",
        cfg.namespace
    );
    out!("# set_topic_permissions <exchange> <write> <read> (docs/operations.md \"RabbitMQ users\")");
    let print_user = |user: &str, password_var: &str, role: Role, topic: Option<&TopicPermissions>| {
        let p = topo.permissions(role);
        out!("rabbitmqctl add_user {} \"$PASSWORD_{password_var}\"", q(user));
        out!(
            "rabbitmqctl set_permissions -p {} {} {} {} {}",
            q(vhost),
            q(user),
            q(&p.configure),
            q(&p.write),
            q(&p.read)
        );
        if let Some(t) = topic {
            out!(
                "rabbitmqctl set_topic_permissions -p {} {} {} {} {}",
                q(vhost),
                q(user),
                q(&t.exchange),
                q(&t.write),
                q(&t.read)
            );
        }
    };
    for (user, var, tp) in &backends {
        print_user(user, var, Role::Backend, Some(tp));
    }
    for (role, name) in [(Role::Scheduler, "scheduler"), (Role::Worker, "worker")] {
        print_user(
            &format!("{prefix}-{name}"),
            &name.to_uppercase(),
            role,
            topo.topic_permissions(role).as_ref(),
        );
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_shows_each_held_versions_precision_and_older_workers_without_one() {
        // A registration as a worker writes it: two versions of one checkpoint, bf16 and fp8.
        let json = r#"{"id":"w-1","host":"h","pid":1,"state":"ready","classes":["large"],
            "slots":1,"free_slots":1,"engine":"flux","engine_note":"","models":["flux-dev"],
            "model_versions":["flux-dev@v2","flux-dev@v2-fp8"],
            "model_precisions":{"flux-dev@v2":"bf16","flux-dev@v2-fp8":"fp8"},
            "default_versions":["flux-dev@v2-fp8"],"loading":["flux-dev@v3"],
            "devices":["cuda:0"],"gpus":[],"parallel_degree":1,"jobs_done":0,"started_ms":0,
            "heartbeat_ms":0}"#;
        let w: WorkerInfo = serde_json::from_str(json).unwrap();
        assert_eq!(
            version_list(&w),
            "flux-dev@v2(bf16),*flux-dev@v2-fp8(fp8),flux-dev@v3(loading)"
        );
        // A worker from before the field: no precision shown, nothing fails.
        let old = json.replace(
            r#""model_precisions":{"flux-dev@v2":"bf16","flux-dev@v2-fp8":"fp8"},"#,
            "",
        );
        let w: WorkerInfo = serde_json::from_str(&old).unwrap();
        assert!(w.model_precisions.is_empty());
        assert_eq!(
            version_list(&w),
            "flux-dev@v2,*flux-dev@v2-fp8,flux-dev@v3(loading)"
        );
        // And a registration without precisions is written without the field.
        assert!(!serde_json::to_string(&w).unwrap().contains("model_precisions"));
    }

    #[test]
    fn lora_flags_parse_name_version_and_an_optional_scale() {
        let l = parse_lora("pixel-art@v1.2:0.8").unwrap();
        assert_eq!(
            (l.name.as_str(), l.version.as_str(), l.scale),
            ("pixel-art", "v1.2", Some(0.8))
        );
        let l = parse_lora("a@1").unwrap();
        assert_eq!((l.name.as_str(), l.version.as_str(), l.scale), ("a", "1", None));
        assert_eq!(parse_lora("a@1:-2").unwrap().scale, Some(-2.0));
        assert!(
            parse_lora("a")
                .unwrap_err()
                .contains("is not NAME@VERSION[:SCALE]")
        );
        assert!(
            parse_lora("a@1:lots")
                .unwrap_err()
                .contains("scale \"lots\" is not a number")
        );
        // Names and versions are the contract's to judge: `..` parses, and validation rejects it.
        let l = parse_lora("..@1").unwrap();
        assert_eq!(l.name, "..");
    }

    #[test]
    fn submit_flags_build_a_job_that_the_contract_then_checks() {
        let cli = Cli::try_parse_from([
            "ditfleetctl",
            "submit",
            "--prompt",
            "a fox",
            "--model",
            "sdxl-base",
            "--scheduler",
            "dpmpp_2m_karras",
            "--lora",
            "b@2:0.5",
            "--lora",
            "a@1",
            "--job-id",
            "j-1",
        ])
        .unwrap();
        let Cmd::Submit(a) = cli.cmd else {
            panic!("not a submit")
        };
        let (spec, body) = build_spec(&a).unwrap();
        assert_eq!(spec.scheduler.as_deref(), Some("dpmpp_2m_karras"));
        assert_eq!(
            spec.loras.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
            ["b", "a"],
            "stack order as given"
        );
        spec.validate(&Limits::default()).unwrap();
        assert_eq!(JobSpec::parse(&body).unwrap(), spec);
        let cli = Cli::try_parse_from([
            "ditfleetctl",
            "submit",
            "--prompt",
            "a fox",
            "--scheduler",
            "euler",
            "--lora",
            "../x@1",
        ])
        .unwrap();
        let Cmd::Submit(a) = cli.cmd else {
            panic!("not a submit")
        };
        let e = build_spec(&a)
            .unwrap()
            .0
            .validate(&Limits::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("scheduler: \"euler\" is not a sampler of flux-dev")
                && e.contains("loras: entry 0: name \"../x\""),
            "{e}"
        );
    }
}
