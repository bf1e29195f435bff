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

mod fleet;
mod inspect;
mod lora;
mod permissions;
mod submit;

use fleet::*;
use inspect::*;
use lora::*;
use permissions::*;
use submit::*;

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

pub(crate) async fn live_workers(s: &JobStore) -> Result<Vec<WorkerInfo>> {
    Ok(s.workers()
        .await?
        .iter()
        .filter_map(|(_, v)| serde_json::from_str(v).ok())
        .collect())
}

pub(crate) async fn store(cfg: &CommonConfig) -> Result<JobStore> {
    JobStore::connect_cfg(cfg)
        .await
        .with_context(|| format!("connecting to Redis at {}", config::redact_url(&cfg.redis_url)))
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
