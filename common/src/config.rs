//! Typed configuration from environment variables.
//!
//! Every service reads its settings from `DITFLEET_*` variables (the same names the Helm chart
//! sets). A bad value is a [`ConfigError`] naming the variable; binaries exit with code 64
//! (`EX_USAGE`) on it. The loaders take a lookup function so tests need not touch the process
//! environment.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::cost::ClassTable;

/// Exit code for a bad configuration (sysexits `EX_USAGE`).
pub const EXIT_BAD_CONFIG: i32 = 64;

/// A variable had a value that could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {var}={value:?}: {reason}")]
pub struct ConfigError {
    pub var: String,
    pub value: String,
    pub reason: String,
}

/// One documented variable (for `--help` and the docs).
#[derive(Debug, Clone, Copy)]
pub struct VarDoc {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

/// Variables every service reads.
pub const COMMON_VARS: &[VarDoc] = &[
    VarDoc {
        name: "DITFLEET_AMQP_URL",
        default: "amqp://guest:guest@127.0.0.1:5672/%2f",
        help: "RabbitMQ URL (amqp:// or amqps://)",
    },
    VarDoc {
        name: "DITFLEET_REDIS_URL",
        default: "redis://127.0.0.1:6379/0",
        help: "Redis URL (redis:// or rediss://)",
    },
    VarDoc {
        name: "DITFLEET_NAMESPACE",
        default: "ditfleet",
        help: "prefix of every exchange, queue and Redis key",
    },
    VarDoc {
        name: "DITFLEET_LOG",
        default: "info",
        help: "tracing filter, e.g. info,ditfleet_worker=debug",
    },
    VarDoc {
        name: "DITFLEET_LOG_FORMAT",
        default: "text",
        help: "log format: text or json",
    },
    VarDoc {
        name: "DITFLEET_JOB_TTL_S",
        default: "604800",
        help: "seconds a job's status is kept in Redis after its last change",
    },
    VarDoc {
        name: "DITFLEET_HTTP_ADDR",
        default: "unset (not served)",
        help: "address of /healthz, /readyz and /metrics, e.g. 0.0.0.0:9090",
    },
    VarDoc {
        name: "DITFLEET_AMQP_CA_FILE",
        default: "system roots",
        help: "PEM file of CA certificates trusted for amqps:// (e.g. a private CA)",
    },
    VarDoc {
        name: "DITFLEET_REDIS_CA_FILE",
        default: "system roots",
        help: "PEM file of CA certificates trusted for rediss:// (e.g. a private CA)",
    },
    VarDoc {
        name: "DITFLEET_BROKER_RECOVERY_TIMEOUT_MS",
        default: "60000",
        help: "a worker or scheduler without a working RabbitMQ connection, channels and consumers for this long exits with code 1 (for its supervisor to restart it); shorter outages are ridden out by reconnecting",
    },
    VarDoc {
        name: "OTEL_EXPORTER_OTLP_ENDPOINT",
        default: "unset (traces off)",
        help: "OTLP/HTTP collector base URL, e.g. http://otel-collector:4318; setting it turns traces on",
    },
    VarDoc {
        name: "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        default: "<endpoint>/v1/traces",
        help: "full OTLP/HTTP traces URL (instead of OTEL_EXPORTER_OTLP_ENDPOINT)",
    },
    VarDoc {
        name: "OTEL_EXPORTER_OTLP_PROTOCOL",
        default: "http/protobuf",
        help: "only http/protobuf is built in (no gRPC: use the collector's HTTP port 4318)",
    },
    VarDoc {
        name: "OTEL_EXPORTER_OTLP_HEADERS",
        default: "unset",
        help: "extra export headers, k1=v1,k2=v2 (e.g. an API key)",
    },
    VarDoc {
        name: "OTEL_SERVICE_NAME",
        default: "the binary's name",
        help: "service.name of the exported spans",
    },
    VarDoc {
        name: "OTEL_TRACES_SAMPLER",
        default: "parentbased_always_on",
        help: "sampler, e.g. parentbased_traceidratio with OTEL_TRACES_SAMPLER_ARG=0.1",
    },
    VarDoc {
        name: "OTEL_BSP_SCHEDULE_DELAY",
        default: "5000",
        help: "milliseconds between span batch exports",
    },
    VarDoc {
        name: "OTEL_SDK_DISABLED",
        default: "false",
        help: "true turns traces off even with an endpoint set",
    },
];

/// Variables the scheduler reads (besides [`COMMON_VARS`]).
pub const SCHEDULER_VARS: &[VarDoc] = &[
    VarDoc {
        name: "DITFLEET_SCHEDULER_PREFETCH",
        default: "64",
        help: "submit messages handled concurrently",
    },
    VarDoc {
        name: "DITFLEET_CLASSES",
        default: "small=50000,medium=250000,large=1500000,xlarge",
        help: "job classes by cost (image tokens x steps x model factor), ascending upper bounds; the last has none",
    },
    VarDoc {
        name: "DITFLEET_MAX_PROMPT_CHARS",
        default: "2000",
        help: "longest accepted prompt and negative prompt, in characters",
    },
    VarDoc {
        name: "DITFLEET_SERVED_MODELS",
        default: "(the models workers of the fleet ever held)",
        help: "comma list of the models this fleet serves: jobs for other models are rejected; unset, a job is rejected only for a model no worker ever held once some worker has registered (a fleet that never had a worker accepts jobs, so scale-from-zero works)",
    },
    VarDoc {
        name: "DITFLEET_QUEUE_POLL_S",
        default: "5",
        help: "seconds between reads of the queue depths for ditfleet_queue_depth",
    },
    VarDoc {
        name: "DITFLEET_TENANT_RATE",
        default: "0",
        help: "jobs per second each tenant may submit (token bucket refill rate); 0 = unlimited",
    },
    VarDoc {
        name: "DITFLEET_TENANT_BURST",
        default: "20",
        help: "token bucket size per tenant: jobs a tenant may submit at once after idling",
    },
    VarDoc {
        name: "DITFLEET_TENANT_LIMITS",
        default: "none",
        help: "per-tenant overrides as tenant=rate:burst, comma-separated, e.g. acme=5:50,trial=0.1:3 (rate 0 = unlimited)",
    },
    VarDoc {
        name: "DITFLEET_BALANCE_INTERVAL_MS",
        default: "1000",
        help: "how often the scheduler refreshes live load (workers, queue depths, step-time calibration)",
    },
    VarDoc {
        name: "DITFLEET_SPILL",
        default: "1",
        help: "1: a job whose class has a backlog goes to an idle bigger class; 0: always its cost class",
    },
    VarDoc {
        name: "DITFLEET_LORA_REGISTRY",
        default: "unset (jobs naming LoRA adapters are rejected)",
        help: "the LoRA registry: s3://bucket[/prefix] (the result store's bucket; AWS_* variables as for DITFLEET_RESULT_URL) or file:///dir (e.g. the model root); adapters are <prefix>/loras/<name>/<version>/ (docs/message-contract.md)",
    },
    VarDoc {
        name: "DITFLEET_LORA_MANIFEST_CACHE_MS",
        default: "5000",
        help: "how long the scheduler reuses an adapter's manifest (or its absence) when admitting jobs",
    },
    VarDoc {
        name: "DITFLEET_AFFINITY_WAIT_MS",
        default: "3000",
        help: "LoRA affinity: longest time a job waits in the queue of a worker that holds its adapter stack applied before any worker of its class may take it; 0 = no affinity",
    },
];

/// Variables the worker reads (besides [`COMMON_VARS`]).
pub const WORKER_VARS: &[VarDoc] = &[
    VarDoc {
        name: "DITFLEET_WORKER_ID",
        default: "<hostname>-<pid>",
        help: "unique id of this worker in the fleet",
    },
    VarDoc {
        name: "DITFLEET_WORKER_CLASSES",
        default: "all classes",
        help: "comma list of job classes this worker consumes",
    },
    VarDoc {
        name: "DITFLEET_WORKER_SLOTS",
        default: "1",
        help: "jobs run concurrently (the consumer prefetch)",
    },
    VarDoc {
        name: "DITFLEET_ENGINE",
        default: "flux",
        help: "engine: flux (the real pipelines, Flux.1 or SDXL by the model directory; tiny random-weight Flux and SDXL configs when no model directory is set) or simulated",
    },
    VarDoc {
        name: "DITFLEET_SIM_STEP_MS",
        default: "20",
        help: "simulated engine: milliseconds per denoising step",
    },
    VarDoc {
        name: "DITFLEET_SIM_LOAD_MS",
        default: "0",
        help: "simulated engine: milliseconds its model load takes (start-up probe and SIGTERM-while-loading tests)",
    },
    VarDoc {
        name: "DITFLEET_MODEL_DIR",
        default: "unset",
        help: "diffusers-layout model directory, Flux.1 or SDXL (told apart by its model_index.json); an SDXL folder may hold the single-file checkpoint instead of per-component weights",
    },
    VarDoc {
        name: "FLUX_MODEL_DIR",
        default: "unset",
        help: "the model directory when DITFLEET_MODEL_DIR is unset (its older name)",
    },
    VarDoc {
        name: "DITFLEET_LOW_MEMORY",
        default: "0",
        help: "1: Flux text encoders are loaded per request and freed after encoding (less device memory, slower encode)",
    },
    VarDoc {
        name: "DITFLEET_PLAN",
        default: "single",
        help: "Flux: how one image is split over DITFLEET_DEVICES, e.g. ulysses=4, ring=2,ulysses=2, cfg=2,ulysses=2, dp=2,ulysses=2, or auto: measure every plan on first start and run each job with the fastest for its size (docs/parallel.md)",
    },
    VarDoc {
        name: "DITFLEET_PLAN_CACHE",
        default: "$XDG_CACHE_HOME/ditfleet/plans.json",
        help: "with DITFLEET_PLAN=auto: where the measured plan table is kept (measured again when the devices, model or engine version change); falls back to ~/.cache, then /tmp",
    },
    VarDoc {
        name: "DITFLEET_AUTOTUNE_SIZES",
        default: "1024x1024,2048x2048",
        help: "with DITFLEET_PLAN=auto: image sizes the plans are measured at; a job runs the fastest plan of the nearest size",
    },
    VarDoc {
        name: "DITFLEET_CUDA_GRAPHS",
        default: "on",
        help: "multi-GPU Flux plans: on = each rank's step runs as a CUDA graph (plans without Ring), all = Ring plans too, off = eager launches (docs/parallel.md)",
    },
    VarDoc {
        name: "DITFLEET_CUDA_GRAPHS_MAX",
        default: "2",
        help: "CUDA graphs kept per GPU (one per image size; each holds one forward's activations)",
    },
    VarDoc {
        name: "DITFLEET_FLUX_OPT",
        default: "all",
        help: "Flux transformer formulations: all (fused CUDA kernels, GELU epilogues, split single blocks, copy-free Ulysses all-to-alls, single blocks' MLP matmuls overlapping the all-to-alls, each block's residual carried into the next block's LayerNorm kernel), none (the op-for-op port), or a list such as all,-qkv or all,-overlap (docs/benchmarks-flux-1gpu.md, docs/parallel.md)",
    },
    VarDoc {
        name: "DITFLEET_NCCL_STREAM",
        default: "side",
        help: "where NCCL runs: side (a stream of its own, ordered with the compute stream by events; needed for overlap) or legacy (the compute stream itself)",
    },
    VarDoc {
        name: "DITFLEET_OVERLAP_CHUNKS",
        default: "2",
        help: "parts the double blocks' image q/k/v go out in under a pure Ulysses plan (each part's projection runs while the previous part travels)",
    },
    VarDoc {
        name: "DITFLEET_RING",
        default: "",
        help: "Ring/USP A/B switches, comma-separated: stacked (pure Ring stacks q/k/v instead of taking the joint buffer as it lies), blocking (wait for each K/V block before attending over the one held)",
    },
    VarDoc {
        name: "DITFLEET_RELAYOUT",
        default: "wide",
        help: "how a Ulysses rank re-lays the attention output it gets back from head groups to tokens: wide (one copy in 16-byte elements) or elementwise (the same copy element by element; for A/B runs)",
    },
    VarDoc {
        name: "DITFLEET_NCCL_A2A",
        default: "p2p",
        help: "how an even Ulysses all-to-all goes over NCCL: p2p (grouped send/recv per peer) or collective (one ncclAlltoAll per tensor; not yet measured on several GPUs)",
    },
    VarDoc {
        name: "DITFLEET_FAULT_GPU",
        default: "",
        help: "fault injection for GPU-isolation drills: <slot>:<step> makes the device in that slot of DITFLEET_DEVICES fail at that step, <slot>:<step>:hang makes it stop answering there (with DITFLEET_PLAN)",
    },
    VarDoc {
        name: "DITFLEET_STEP_TIMEOUT_S",
        default: "300",
        help: "multi-GPU Flux: a job that finishes no step for this long is aborted (a GPU stopped answering); the device NVML reports unhealthy is quarantined",
    },
    VarDoc {
        name: "DITFLEET_DEVICES",
        default: "auto",
        help: "devices to compute on, e.g. cuda:0,cuda:1 or cpu",
    },
    VarDoc {
        name: "DITFLEET_RESULT_DIR",
        default: "./results",
        help: "directory of the local result store",
    },
    VarDoc {
        name: "DITFLEET_RESULT_URL",
        default: "unset (local directory)",
        help: "s3://bucket/prefix: results go to S3 or an S3-compatible server (credentials, region and endpoint from the standard AWS_* variables: AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or IRSA, AWS_ALLOW_HTTP=true for plain HTTP)",
    },
    VarDoc {
        name: "DITFLEET_RESULT_PRESIGN_S",
        default: "0 (off)",
        help: "S3 store: the result URL is a presigned GET URL valid this many seconds (at most 604800) instead of s3://bucket/key",
    },
    VarDoc {
        name: "DITFLEET_RESULT_PUBLIC_URL",
        default: "unset",
        help: "S3 store: the result URL is <this>/<key> (a public bucket or CDN) instead of s3://bucket/key",
    },
    VarDoc {
        name: "DITFLEET_SHUTDOWN_GRACE_S",
        default: "300",
        help: "on SIGTERM, seconds in-flight jobs may take before they are requeued",
    },
    VarDoc {
        name: "DITFLEET_HEARTBEAT_S",
        default: "5",
        help: "seconds between worker heartbeats in Redis",
    },
    VarDoc {
        name: "DITFLEET_JOB_LEASE_S",
        default: "15",
        help: "seconds a running job's lease lasts without renewal (a redelivered job waits for it)",
    },
    VarDoc {
        name: "DITFLEET_MAX_ATTEMPTS",
        default: "3",
        help: "deliveries of one job before it is dead-lettered",
    },
    VarDoc {
        name: "DITFLEET_WORKER_PREFETCH",
        default: "slots+1",
        help: "messages buffered per consumed queue (one more than the slots lets a higher-priority job overtake)",
    },
    VarDoc {
        name: "DITFLEET_ENGINE_RETRIES",
        default: "2",
        help: "in-process retries of a transient engine failure (out of memory after freeing caches, device error), with exponential back-off and jitter",
    },
    VarDoc {
        name: "DITFLEET_RETRY_BASE_MS",
        default: "200",
        help: "first back-off of engine and storage retries; doubles per retry, with jitter, capped at 32x",
    },
    VarDoc {
        name: "DITFLEET_CHECKPOINT_EVERY",
        default: "5",
        help: "save the running job's latents every this many steps (a retried job resumes there); 0 = off",
    },
    VarDoc {
        name: "DITFLEET_CONTROL_POLL_MS",
        default: "1000",
        help: "how often the worker reads operator control (ditfleetctl drain, model load/unload)",
    },
    VarDoc {
        name: "DITFLEET_MODEL_ROOT",
        default: "parent of the model directory",
        help: "directory of model versions (Flux.1 or SDXL folders): version v of a model is <root>/<v>",
    },
    VarDoc {
        name: "DITFLEET_SWAP_MODE",
        default: "alongside",
        help: "model version swap: alongside (load the new version next to the old, then switch) or drain (finish running jobs and unload the old first: less memory)",
    },
    VarDoc {
        name: "DITFLEET_SIM_VERSION",
        default: "sim-1",
        help: "simulated engine: the model version it starts with",
    },
    VarDoc {
        name: "DITFLEET_SIM_MODELS",
        default: "every known model (flux-dev,flux-schnell,sdxl-base)",
        help: "simulated engine: the models it serves (a worker consumes only its models' queues)",
    },
    VarDoc {
        name: "DITFLEET_LORA_REGISTRY",
        default: "file://<DITFLEET_MODEL_ROOT> when that is set",
        help: "the LoRA registry the worker downloads adapters from (as the scheduler's)",
    },
    VarDoc {
        name: "DITFLEET_LORA_CACHE_DIR",
        default: "$XDG_CACHE_HOME/ditfleet/loras",
        help: "where downloaded and verified adapters are kept (falls back to ~/.cache, then /tmp)",
    },
    VarDoc {
        name: "DITFLEET_LORA_DISK_CACHE_BYTES",
        default: "8589934592",
        help: "bound of the adapter download cache in bytes; least recently used adapters are removed beyond it",
    },
    VarDoc {
        name: "DITFLEET_AFFINITY_POLL_MS",
        default: "100",
        help: "how often a worker with a free slot takes a job from its LoRA affinity queue",
    },
    VarDoc {
        name: "DITFLEET_SIM_LORA_APPLY_MS",
        default: "0",
        help: "simulated engine: milliseconds a switch of the applied LoRA stack takes",
    },
    VarDoc {
        name: "DITFLEET_SIM_FAULTS",
        default: "none",
        help: "simulated engine fault injection, comma list: oom=N (first N tries of every job run out of memory), device=N, panic=N (first N tries panic inside the engine), bad-weights (every job fails permanently)",
    },
];

/// The model directory: `DITFLEET_MODEL_DIR`, else its older name `FLUX_MODEL_DIR`.
pub fn model_dir(env: &Env<'_>) -> Option<PathBuf> {
    env.raw("DITFLEET_MODEL_DIR")
        .or_else(|| env.raw("FLUX_MODEL_DIR"))
        .map(PathBuf::from)
}

/// Renders variable docs for `--help`.
/// `<slot>:<step>[:hang]` (step >= 1): the device in that slot fails at that step, or with
/// `hang` stops answering there (see `DITFLEET_FAULT_GPU`).
fn parse_fault_gpu(v: &str) -> Option<(usize, u32, bool)> {
    let mut parts = v.split(':').map(str::trim);
    let slot = parts.next()?.parse().ok()?;
    let step: u32 = parts.next()?.parse().ok()?;
    let hang = match parts.next() {
        None => false,
        Some("hang") => true,
        Some(_) => return None,
    };
    (step > 0 && parts.next().is_none()).then_some((slot, step, hang))
}

pub fn help_text(groups: &[&[VarDoc]]) -> String {
    let mut s = String::from("Environment variables:\n");
    for g in groups {
        for v in *g {
            s.push_str(&format!("  {:<28} {} [default: {}]\n", v.name, v.help, v.default));
        }
    }
    s
}

/// A variable lookup (the process environment, or a map in tests).
type Lookup<'a> = Box<dyn Fn(&str) -> Option<String> + 'a>;

/// Reads variables through a lookup function, with typed parsing and errors naming the variable.
pub struct Env<'a> {
    lookup: Lookup<'a>,
}

impl<'a> Env<'a> {
    /// The process environment.
    pub fn process() -> Env<'static> {
        Env {
            lookup: Box::new(|k| std::env::var(k).ok()),
        }
    }

    /// A fixed map (tests).
    pub fn from_map(map: BTreeMap<String, String>) -> Env<'static> {
        Env {
            lookup: Box::new(move |k| map.get(k).cloned()),
        }
    }

    /// Raw value; empty counts as unset.
    pub fn raw(&self, var: &str) -> Option<String> {
        (self.lookup)(var).filter(|v| !v.is_empty())
    }

    pub fn string(&self, var: &str, default: &str) -> String {
        self.raw(var).unwrap_or_else(|| default.to_string())
    }

    /// Parses with `FromStr`, falling back to `default` when unset.
    pub fn parse<T>(&self, var: &str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.raw(var) {
            None => Ok(default),
            Some(v) => v.trim().parse::<T>().map_err(|e| err(var, &v, e.to_string())),
        }
    }

    /// A positive integer.
    pub fn positive(&self, var: &str, default: u64) -> Result<u64, ConfigError> {
        let v = self.parse(var, default)?;
        if v == 0 {
            return Err(err(var, "0", "must be at least 1".into()));
        }
        Ok(v)
    }

    pub fn seconds(&self, var: &str, default: u64) -> Result<Duration, ConfigError> {
        Ok(Duration::from_secs(self.positive(var, default)?))
    }

    /// One of a fixed set of words.
    pub fn choice(&self, var: &str, default: &str, allowed: &[&str]) -> Result<String, ConfigError> {
        let v = self.string(var, default);
        if allowed.contains(&v.as_str()) {
            Ok(v)
        } else {
            Err(err(var, &v, format!("must be one of {}", allowed.join(", "))))
        }
    }

    /// An optional path to a file that must exist.
    pub fn file(&self, var: &str) -> Result<Option<PathBuf>, ConfigError> {
        match self.raw(var) {
            None => Ok(None),
            Some(v) if std::path::Path::new(&v).is_file() => Ok(Some(PathBuf::from(v))),
            Some(v) => Err(err(var, &v, "no such file".into())),
        }
    }

    /// A URL whose scheme is one of `schemes`.
    pub fn url(&self, var: &str, default: &str, schemes: &[&str]) -> Result<String, ConfigError> {
        let v = self.string(var, default);
        match v.split_once("://") {
            Some((scheme, rest)) if schemes.contains(&scheme) && !rest.is_empty() => Ok(v),
            _ => Err(err(
                var,
                &redact_url(&v),
                format!(
                    "must be a URL starting with {}",
                    schemes
                        .iter()
                        .map(|s| format!("{s}://"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                ),
            )),
        }
    }
}

fn err(var: &str, value: &str, reason: String) -> ConfigError {
    ConfigError {
        var: var.to_string(),
        value: value.to_string(),
        reason,
    }
}

/// Hides the password of a URL for logs and errors.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
    {
        let user = userinfo.split(':').next().unwrap_or("");
        return format!("{scheme}://{user}:***@{host}");
    }
    url.to_string()
}

/// OpenTelemetry trace export (the exporter reads the standard `OTEL_*` variables itself; this
/// checks them up front so a typo is a configuration error rather than silently missing traces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtelConfig {
    /// The traces URL as configured (base endpoint or the traces-specific one).
    pub endpoint: String,
}

impl OtelConfig {
    /// `None` (traces off) unless an OTLP endpoint is set and `OTEL_SDK_DISABLED` is not true.
    pub fn from_env(env: &Env<'_>) -> Result<Option<Self>, ConfigError> {
        if env
            .raw("OTEL_SDK_DISABLED")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        {
            return Ok(None);
        }
        let var = if env.raw("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some() {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        } else if env.raw("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        } else {
            return Ok(None);
        };
        let endpoint = env.url(var, "", &["http", "https"])?;
        for p in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(v) = env.raw(p).filter(|v| v.trim() != "http/protobuf") {
                return Err(err(
                    p,
                    &v,
                    "this build exports OTLP over http/protobuf only (the collector's port 4318)".into(),
                ));
            }
        }
        Ok(Some(Self { endpoint }))
    }

    /// The endpoint with any password hidden.
    pub fn endpoint_for_logs(&self) -> String {
        redact_url(&self.endpoint)
    }
}

/// A tenant's token bucket settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TenantLimit {
    /// Jobs per second; 0 = unlimited.
    pub rate: f64,
    pub burst: f64,
}

/// Per-tenant rate limits: a default and overrides.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantLimits {
    pub default: TenantLimit,
    pub overrides: BTreeMap<String, TenantLimit>,
}

impl TenantLimits {
    /// The limit of `tenant`; `None` when it is unlimited.
    pub fn for_tenant(&self, tenant: &str) -> Option<TenantLimit> {
        let l = self.overrides.get(tenant).copied().unwrap_or(self.default);
        (l.rate > 0.0).then_some(l)
    }

    /// Parses `acme=5:50,trial=0.1:3`.
    pub fn parse_overrides(s: &str) -> Result<BTreeMap<String, TenantLimit>, String> {
        let mut out = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (tenant, spec) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not tenant=rate:burst"))?;
            let (rate, burst) = spec
                .split_once(':')
                .ok_or_else(|| format!("{part:?} is not tenant=rate:burst"))?;
            let rate: f64 = rate
                .trim()
                .parse()
                .map_err(|_| format!("rate of {tenant:?} is not a number"))?;
            let burst: f64 = burst
                .trim()
                .parse()
                .map_err(|_| format!("burst of {tenant:?} is not a number"))?;
            if !rate.is_finite() || rate < 0.0 || !burst.is_finite() || (rate > 0.0 && burst < 1.0) {
                return Err(format!("{tenant:?}: rate must be >= 0 and burst >= 1"));
            }
            out.insert(tenant.trim().to_string(), TenantLimit { rate, burst });
        }
        Ok(out)
    }
}

/// Settings shared by every service.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    pub amqp_url: String,
    pub redis_url: String,
    pub namespace: String,
    pub log: String,
    pub log_json: bool,
    pub job_ttl: Duration,
    /// Health/metrics endpoint; `None` = not served.
    pub http_addr: Option<std::net::SocketAddr>,
    /// Extra CA certificates (PEM) for amqps:// and rediss://.
    pub amqp_ca_file: Option<PathBuf>,
    pub redis_ca_file: Option<PathBuf>,
    /// How long a service may be without a working broker link (connection, channels,
    /// consumers) before it gives up and exits non-zero (`DITFLEET_BROKER_RECOVERY_TIMEOUT_MS`).
    pub broker_recovery_timeout: Duration,
    /// Trace export; `None` = off.
    pub otel: Option<OtelConfig>,
}

impl CommonConfig {
    pub fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let namespace = env.string("DITFLEET_NAMESPACE", "ditfleet");
        if namespace.is_empty()
            || namespace.len() > 64
            || !namespace
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        {
            return Err(err(
                "DITFLEET_NAMESPACE",
                &namespace,
                "must be 1-64 characters of [A-Za-z0-9_-]".into(),
            ));
        }
        Ok(Self {
            amqp_url: env.url("DITFLEET_AMQP_URL", COMMON_VARS[0].default, &["amqp", "amqps"])?,
            redis_url: env.url("DITFLEET_REDIS_URL", COMMON_VARS[1].default, &["redis", "rediss"])?,
            namespace,
            log: env.string("DITFLEET_LOG", "info"),
            log_json: env.choice("DITFLEET_LOG_FORMAT", "text", &["text", "json"])? == "json",
            job_ttl: env.seconds("DITFLEET_JOB_TTL_S", 604_800)?,
            http_addr: match env.raw("DITFLEET_HTTP_ADDR") {
                None => None,
                Some(v) => Some(v.parse().map_err(|_| {
                    err(
                        "DITFLEET_HTTP_ADDR",
                        &v,
                        "must be host:port with an IP, e.g. 0.0.0.0:9090".into(),
                    )
                })?),
            },
            amqp_ca_file: env.file("DITFLEET_AMQP_CA_FILE")?,
            redis_ca_file: env.file("DITFLEET_REDIS_CA_FILE")?,
            broker_recovery_timeout: Duration::from_millis(
                env.positive("DITFLEET_BROKER_RECOVERY_TIMEOUT_MS", 60_000)?,
            ),
            otel: OtelConfig::from_env(env)?,
        })
    }
}

/// Scheduler settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub common: CommonConfig,
    pub prefetch: u16,
    pub classes: ClassTable,
    pub max_prompt_chars: usize,
    /// How often the queue depths are read for the metrics.
    pub queue_poll: Duration,
    pub tenant_limits: TenantLimits,
    pub balance_interval: Duration,
    pub spill: bool,
    /// `DITFLEET_SERVED_MODELS`: the models jobs may name (`None`: those workers ever held).
    pub served_models: Option<Vec<String>>,
    /// `DITFLEET_LORA_REGISTRY` (`None`: jobs naming adapters are rejected).
    pub lora_registry: Option<String>,
    /// How long a manifest lookup is reused.
    pub lora_manifest_cache: Duration,
    /// LoRA affinity's bound on a job's wait for a hot worker; `None` = no affinity.
    pub affinity_wait: Option<Duration>,
}

/// `DITFLEET_LORA_REGISTRY`, checked: `s3://bucket[/prefix]`, `file:///dir` or `/dir`.
fn lora_registry(env: &Env<'_>) -> Result<Option<String>, ConfigError> {
    match env.raw("DITFLEET_LORA_REGISTRY").filter(|v| !v.trim().is_empty()) {
        None => Ok(None),
        Some(v) => {
            let ok = v
                .strip_prefix("s3://")
                .is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
                || v.strip_prefix("file://").unwrap_or(&v).starts_with('/');
            if ok {
                Ok(Some(v))
            } else {
                Err(err(
                    "DITFLEET_LORA_REGISTRY",
                    &redact_url(&v),
                    "must be s3://bucket[/prefix], file:///absolute/dir or /absolute/dir".into(),
                ))
            }
        }
    }
}

impl SchedulerConfig {
    pub fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let prefetch = env.positive("DITFLEET_SCHEDULER_PREFETCH", 64)?;
        let prefetch = u16::try_from(prefetch).map_err(|_| {
            err(
                "DITFLEET_SCHEDULER_PREFETCH",
                &prefetch.to_string(),
                "must be at most 65535".into(),
            )
        })?;
        let classes_raw = env.string("DITFLEET_CLASSES", SCHEDULER_VARS[1].default);
        let classes =
            ClassTable::parse(&classes_raw).map_err(|e| err("DITFLEET_CLASSES", &classes_raw, e))?;
        let rate: f64 = env.parse("DITFLEET_TENANT_RATE", 0.0)?;
        if !rate.is_finite() || rate < 0.0 {
            return Err(err(
                "DITFLEET_TENANT_RATE",
                &rate.to_string(),
                "must be >= 0".into(),
            ));
        }
        let burst: f64 = env.parse("DITFLEET_TENANT_BURST", 20.0)?;
        if !burst.is_finite() || burst < 1.0 {
            return Err(err(
                "DITFLEET_TENANT_BURST",
                &burst.to_string(),
                "must be >= 1".into(),
            ));
        }
        let raw = env.string("DITFLEET_TENANT_LIMITS", "");
        let overrides =
            TenantLimits::parse_overrides(&raw).map_err(|e| err("DITFLEET_TENANT_LIMITS", &raw, e))?;
        Ok(Self {
            common: CommonConfig::from_env(env)?,
            prefetch,
            classes,
            max_prompt_chars: env.positive("DITFLEET_MAX_PROMPT_CHARS", 2000)? as usize,
            queue_poll: env.seconds("DITFLEET_QUEUE_POLL_S", 5)?,
            tenant_limits: TenantLimits {
                default: TenantLimit { rate, burst },
                overrides,
            },
            balance_interval: Duration::from_millis(env.positive("DITFLEET_BALANCE_INTERVAL_MS", 1000)?),
            spill: env.choice("DITFLEET_SPILL", "1", &["0", "1"])? == "1",
            lora_registry: lora_registry(env)?,
            lora_manifest_cache: Duration::from_millis(
                env.parse("DITFLEET_LORA_MANIFEST_CACHE_MS", 5000u64)?,
            ),
            affinity_wait: match env.parse("DITFLEET_AFFINITY_WAIT_MS", 3000u64)? {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            served_models: match env.raw("DITFLEET_SERVED_MODELS").filter(|v| !v.trim().is_empty()) {
                None => None,
                Some(raw) => {
                    let list: Vec<String> = raw.split(',').map(|m| m.trim().to_string()).collect();
                    if let Some(bad) = list
                        .iter()
                        .find(|m| !crate::job::KNOWN_MODELS.contains(&m.as_str()))
                    {
                        return Err(err(
                            "DITFLEET_SERVED_MODELS",
                            &raw,
                            format!(
                                "{bad:?} is not a known model ({})",
                                crate::job::KNOWN_MODELS.join(", ")
                            ),
                        ));
                    }
                    Some(list)
                }
            },
        })
    }
}

/// Which engine a worker runs.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineChoice {
    /// The real pipelines: the model in `model_dir` (`DITFLEET_MODEL_DIR`, else `FLUX_MODEL_DIR`;
    /// Flux.1 or SDXL, as its `model_index.json` says), or the tiny random-weight Flux and SDXL
    /// configs. `low_memory`: Flux's text encoders are loaded for each request and freed after
    /// encoding.
    /// `plan`: how one image is split over `DITFLEET_DEVICES` (`ulysses=2`, `ring=2,ulysses=2`,
    /// `cfg=2`, ...; parsed and validated by the engine); `None` = one device.
    Flux {
        model_dir: Option<PathBuf>,
        low_memory: bool,
        plan: Option<String>,
        /// With `plan` `auto`: where the measured plan table is kept and the sizes measured.
        autotune: Autotune,
        /// Fault injection for isolation tests and drills (`DITFLEET_FAULT_GPU=<slot>:<step>[:hang]`):
        /// the device in that slot of `DITFLEET_DEVICES` fails at that step until quarantined.
        fault_gpu: Option<(usize, u32, bool)>,
    },
    /// The simulated engine (fleet load and chaos tests).
    Simulated {
        step_ms: u64,
        /// `DITFLEET_SIM_LOAD_MS`: how long loading the simulated model takes.
        load_ms: u64,
        version: String,
        faults: SimFaults,
        /// `DITFLEET_SIM_MODELS`: the models it serves (default: every known model).
        models: Vec<String>,
        /// `DITFLEET_SIM_LORA_APPLY_MS`: how long a switch of the applied LoRA stack takes.
        lora_apply_ms: u64,
    },
}

/// Plan autotuning (`DITFLEET_PLAN=auto`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Autotune {
    /// `DITFLEET_PLAN_CACHE`.
    pub cache: PathBuf,
    /// `DITFLEET_AUTOTUNE_SIZES`: `WxH` pairs.
    pub sizes: Vec<(u32, u32)>,
}

impl Autotune {
    pub fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let cache = match env.raw("DITFLEET_PLAN_CACHE").filter(|v| !v.trim().is_empty()) {
            Some(v) => PathBuf::from(v),
            None => env
                .raw("XDG_CACHE_HOME")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .or_else(|| {
                    env.raw("HOME")
                        .filter(|v| !v.is_empty())
                        .map(|h| PathBuf::from(h).join(".cache"))
                })
                .unwrap_or_else(std::env::temp_dir)
                .join("ditfleet")
                .join("plans.json"),
        };
        let raw = env.string("DITFLEET_AUTOTUNE_SIZES", "1024x1024,2048x2048");
        let sizes = raw
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .map(|x| {
                let (w, h) = x.split_once('x')?;
                let side = |v: &str| v.trim().parse::<u32>().ok().filter(|n| *n > 0 && n % 16 == 0 && *n <= 4096);
                Some((side(w)?, side(h)?))
            })
            .collect::<Option<Vec<_>>>()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                err(
                    "DITFLEET_AUTOTUNE_SIZES",
                    &raw,
                    "must be WIDTHxHEIGHT pairs separated by commas, sides multiples of 16 up to 4096, e.g. 1024x1024,2048x2048".into(),
                )
            })?;
        Ok(Self { cache, sizes })
    }
}

/// Faults the simulated engine injects (`DITFLEET_SIM_FAULTS`), to test retries and dead-lettering.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimFaults {
    /// The first `oom` tries of every job fail with out-of-memory (transient).
    pub oom: u32,
    /// The first `device` tries of every job fail with a device error (transient).
    pub device: u32,
    /// Every job fails with a model-load error (permanent).
    pub bad_weights: bool,
    /// The first `panic` tries of every job panic inside the engine (the worker rebuilds it).
    pub panic: u32,
}

impl SimFaults {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut f = SimFaults::default();
        for part in s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty() && *p != "none")
        {
            match part.split_once('=') {
                Some(("oom", n)) => f.oom = n.parse().map_err(|_| format!("oom={n:?} is not a count"))?,
                Some(("device", n)) => {
                    f.device = n.parse().map_err(|_| format!("device={n:?} is not a count"))?
                }
                Some(("panic", n)) => {
                    f.panic = n.parse().map_err(|_| format!("panic={n:?} is not a count"))?
                }
                None if part == "bad-weights" => f.bad_weights = true,
                _ => {
                    return Err(format!(
                        "unknown fault {part:?} (oom=N, device=N, panic=N, bad-weights)"
                    ));
                }
            }
        }
        Ok(f)
    }
}

/// How a worker swaps model versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwapMode {
    /// Load the new version next to the old one, switch between jobs, unload the old one.
    Alongside,
    /// Stop starting jobs, let running ones finish, unload the old version, load the new one.
    Drain,
}

/// Worker settings.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub common: CommonConfig,
    pub worker_id: String,
    /// Classes consumed; empty means every class of the class table.
    pub classes: Vec<String>,
    pub slots: u16,
    pub engine: EngineChoice,
    pub devices: Option<Vec<String>>,
    pub result_dir: PathBuf,
    /// `s3://bucket/prefix` (S3-compatible store) or `file:///dir`; `None` = `result_dir`.
    pub result_url: Option<String>,
    /// S3 store: report presigned GET URLs valid this long instead of `s3://` URLs.
    pub result_presign: Option<Duration>,
    /// S3 store: report `<this>/<key>` (public bucket, CDN) instead of `s3://` URLs.
    pub result_public_url: Option<String>,
    pub shutdown_grace: Duration,
    pub heartbeat: Duration,
    pub job_lease: Duration,
    pub max_attempts: u32,
    /// Messages buffered per consumed queue.
    pub prefetch: u16,
    pub engine_retries: u32,
    pub retry_base: Duration,
    /// Steps between checkpoints; 0 = off.
    pub checkpoint_every: u32,
    pub control_poll: Duration,
    /// Directory of model versions (`<root>/<version>`, Flux.1 or SDXL folders).
    pub model_root: Option<PathBuf>,
    pub swap_mode: SwapMode,
    /// `DITFLEET_LORA_REGISTRY`, else `file://<model_root>`; `None`: jobs naming adapters fail.
    pub lora_registry: Option<String>,
    /// Where verified adapters are kept, and the bound in bytes.
    pub lora_cache_dir: PathBuf,
    pub lora_cache_bytes: u64,
    /// How often a worker with a free slot polls its LoRA affinity queue.
    pub affinity_poll: Duration,
}

impl WorkerConfig {
    pub fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let host = hostname_fallback();
        let worker_id = env.string("DITFLEET_WORKER_ID", &format!("{host}-{}", std::process::id()));
        // The id is a Redis key part (`<ns>:worker:<id>`, `<ns>:control:<id>`) and a consumer
        // tag; `fleet` is the fleet-wide control key's own name.
        if !crate::ident::is_name(&worker_id, 128, &['-', '_', '.']) || worker_id == "fleet" {
            return Err(err(
                "DITFLEET_WORKER_ID",
                &worker_id,
                "must be 1-128 characters of [A-Za-z0-9._-] starting with a letter or digit, and not `fleet` (reserved)".into(),
            ));
        }
        let classes: Vec<String> = env
            .raw("DITFLEET_WORKER_CLASSES")
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        for c in &classes {
            if !crate::cost::valid_class_name(c) {
                return Err(err(
                    "DITFLEET_WORKER_CLASSES",
                    c,
                    "class names are 1-32 characters of [a-z0-9_-]".into(),
                ));
            }
        }
        let slots = env.positive("DITFLEET_WORKER_SLOTS", 1)?;
        let slots = u16::try_from(slots).ok().filter(|s| *s <= 64).ok_or_else(|| {
            err(
                "DITFLEET_WORKER_SLOTS",
                &slots.to_string(),
                "must be between 1 and 64".into(),
            )
        })?;
        let engine = match env
            .choice("DITFLEET_ENGINE", "flux", &["flux", "simulated"])?
            .as_str()
        {
            "simulated" => EngineChoice::Simulated {
                step_ms: env.parse("DITFLEET_SIM_STEP_MS", 20u64)?,
                load_ms: env.parse("DITFLEET_SIM_LOAD_MS", 0u64)?,
                lora_apply_ms: env.parse("DITFLEET_SIM_LORA_APPLY_MS", 0u64)?,
                version: {
                    let v = env.string("DITFLEET_SIM_VERSION", "sim-1");
                    if !crate::job::valid_version(&v) {
                        return Err(err(
                            "DITFLEET_SIM_VERSION",
                            &v,
                            "must be 1-64 characters of [A-Za-z0-9._-]".into(),
                        ));
                    }
                    v
                },
                faults: {
                    let raw = env.string("DITFLEET_SIM_FAULTS", "");
                    SimFaults::parse(&raw).map_err(|e| err("DITFLEET_SIM_FAULTS", &raw, e))?
                },
                models: {
                    let raw = env.string("DITFLEET_SIM_MODELS", &crate::job::KNOWN_MODELS.join(","));
                    let models: Vec<String> = raw
                        .split(',')
                        .map(str::trim)
                        .filter(|m| !m.is_empty())
                        .map(str::to_string)
                        .collect();
                    if models.is_empty()
                        || models
                            .iter()
                            .any(|m| !crate::job::KNOWN_MODELS.contains(&m.as_str()))
                    {
                        return Err(err(
                            "DITFLEET_SIM_MODELS",
                            &raw,
                            format!(
                                "must be a comma list of known models ({})",
                                crate::job::KNOWN_MODELS.join(", ")
                            ),
                        ));
                    }
                    models
                },
            },
            _ => EngineChoice::Flux {
                model_dir: model_dir(env),
                low_memory: env.choice("DITFLEET_LOW_MEMORY", "0", &["0", "1"])? == "1",
                plan: match env.raw("DITFLEET_PLAN").filter(|p| p != "single") {
                    Some(p)
                        if p.is_empty()
                            || !p
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '=' | ',')) =>
                    {
                        return Err(err(
                            "DITFLEET_PLAN",
                            &p,
                            "a plan is name=value pairs separated by commas, e.g. ulysses=2,ring=2".into(),
                        ));
                    }
                    p => p,
                },
                autotune: Autotune::from_env(env)?,
                fault_gpu: match env.raw("DITFLEET_FAULT_GPU") {
                    None => None,
                    Some(v) => Some(parse_fault_gpu(&v).ok_or_else(|| {
                        err(
                            "DITFLEET_FAULT_GPU",
                            &v,
                            "must be <device slot>:<step>[:hang], e.g. 2:3 or 2:3:hang".into(),
                        )
                    })?),
                },
            },
        };
        let devices = env.raw("DITFLEET_DEVICES").filter(|v| v != "auto").map(|v| {
            v.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        });
        if let Some(ds) = &devices {
            for d in ds {
                let ok = d == "cpu"
                    || d.strip_prefix("cuda:")
                        .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
                if !ok {
                    return Err(err(
                        "DITFLEET_DEVICES",
                        d,
                        "devices are cpu or cuda:<index>".into(),
                    ));
                }
            }
        }
        let result_url = match env.raw("DITFLEET_RESULT_URL") {
            None => None,
            Some(url) => {
                let ok = url
                    .strip_prefix("s3://")
                    .is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
                    || url.strip_prefix("file://").is_some_and(|p| p.starts_with('/'));
                if !ok {
                    return Err(err(
                        "DITFLEET_RESULT_URL",
                        &redact_url(&url),
                        "must be s3://bucket[/prefix] or file:///absolute/dir".into(),
                    ));
                }
                Some(url)
            }
        };
        let max_attempts = env.positive("DITFLEET_MAX_ATTEMPTS", 3)?;
        let prefetch = env.positive("DITFLEET_WORKER_PREFETCH", u64::from(slots) + 1)?;
        let prefetch = u16::try_from(prefetch)
            .ok()
            .filter(|p| *p <= 1000)
            .ok_or_else(|| {
                err(
                    "DITFLEET_WORKER_PREFETCH",
                    &prefetch.to_string(),
                    "must be between 1 and 1000".into(),
                )
            })?;
        let model_root = env
            .raw("DITFLEET_MODEL_ROOT")
            .map(PathBuf::from)
            .or_else(|| model_dir(env).and_then(|d| d.parent().map(|p| p.to_path_buf())));
        let swap_mode = match env
            .choice("DITFLEET_SWAP_MODE", "alongside", &["alongside", "drain"])?
            .as_str()
        {
            "drain" => SwapMode::Drain,
            _ => SwapMode::Alongside,
        };
        let engine_retries: u32 = env.parse("DITFLEET_ENGINE_RETRIES", 2u32)?;
        let checkpoint_every: u32 = env.parse("DITFLEET_CHECKPOINT_EVERY", 5u32)?;
        Ok(Self {
            prefetch,
            engine_retries,
            retry_base: Duration::from_millis(env.positive("DITFLEET_RETRY_BASE_MS", 200)?),
            checkpoint_every,
            control_poll: Duration::from_millis(env.positive("DITFLEET_CONTROL_POLL_MS", 1000)?),
            lora_registry: match lora_registry(env)? {
                Some(r) => Some(r),
                None => model_root
                    .as_ref()
                    .filter(|r| r.is_absolute())
                    .map(|r| format!("file://{}", r.display())),
            },
            lora_cache_dir: match env
                .raw("DITFLEET_LORA_CACHE_DIR")
                .filter(|v| !v.trim().is_empty())
            {
                Some(v) => PathBuf::from(v),
                None => env
                    .raw("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| env.raw("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .unwrap_or_else(std::env::temp_dir)
                    .join("ditfleet")
                    .join("loras"),
            },
            lora_cache_bytes: env.positive("DITFLEET_LORA_DISK_CACHE_BYTES", 8 << 30)?,
            affinity_poll: Duration::from_millis(env.positive("DITFLEET_AFFINITY_POLL_MS", 100)?),
            model_root,
            swap_mode,
            common: CommonConfig::from_env(env)?,
            worker_id,
            classes,
            slots,
            engine,
            devices,
            result_dir: PathBuf::from(env.string("DITFLEET_RESULT_DIR", "./results")),
            result_url,
            result_presign: match env.parse("DITFLEET_RESULT_PRESIGN_S", 0u64)? {
                0 => None,
                s if s <= 604_800 => Some(Duration::from_secs(s)),
                s => {
                    return Err(err(
                        "DITFLEET_RESULT_PRESIGN_S",
                        &s.to_string(),
                        "presigned S3 URLs last at most 604800 s (7 days)".into(),
                    ));
                }
            },
            result_public_url: match env.raw("DITFLEET_RESULT_PUBLIC_URL") {
                None => None,
                Some(_) => Some(env.url("DITFLEET_RESULT_PUBLIC_URL", "", &["https", "http"])?),
            },
            shutdown_grace: env.seconds("DITFLEET_SHUTDOWN_GRACE_S", 300)?,
            heartbeat: env.seconds("DITFLEET_HEARTBEAT_S", 5)?,
            job_lease: env.seconds("DITFLEET_JOB_LEASE_S", 15)?,
            max_attempts: u32::try_from(max_attempts).unwrap_or(u32::MAX),
        })
    }
}

/// The machine's host name, or `localhost` when it cannot be read.
pub fn hostname_fallback() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env<'static> {
        Env::from_map(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn plan_is_read_and_malformed_plans_are_refused() {
        let c = WorkerConfig::from_env(&env(&[("DITFLEET_PLAN", "ring=2,ulysses=2")])).unwrap();
        assert!(matches!(c.engine, EngineChoice::Flux { plan: Some(ref p), .. } if p == "ring=2,ulysses=2"));
        let c = WorkerConfig::from_env(&env(&[("DITFLEET_PLAN", "single")])).unwrap();
        assert!(matches!(c.engine, EngineChoice::Flux { plan: None, .. }));
        let e = WorkerConfig::from_env(&env(&[("DITFLEET_PLAN", "ulysses=2; rm -rf")])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_PLAN");
        let c = WorkerConfig::from_env(&env(&[("DITFLEET_FAULT_GPU", "2:3")])).unwrap();
        assert!(matches!(
            c.engine,
            EngineChoice::Flux {
                fault_gpu: Some((2, 3, false)),
                ..
            }
        ));
        let c = WorkerConfig::from_env(&env(&[("DITFLEET_FAULT_GPU", "1:4:hang")])).unwrap();
        assert!(matches!(
            c.engine,
            EngineChoice::Flux {
                fault_gpu: Some((1, 4, true)),
                ..
            }
        ));
        for bad in ["2", "x:3", "2:0", "2:3:melt", "2:3:hang:x"] {
            let e = WorkerConfig::from_env(&env(&[("DITFLEET_FAULT_GPU", bad)])).unwrap_err();
            assert_eq!(e.var, "DITFLEET_FAULT_GPU");
        }
    }

    #[test]
    fn autotune_cache_and_sizes_are_read_and_bad_sizes_refused() {
        let tune = |pairs: &[(&str, &str)]| match WorkerConfig::from_env(&env(pairs)).unwrap().engine {
            EngineChoice::Flux { autotune, .. } => autotune,
            other => panic!("{other:?}"),
        };
        let t = tune(&[("DITFLEET_PLAN", "auto"), ("HOME", "/home/w")]);
        assert_eq!(t.cache, PathBuf::from("/home/w/.cache/ditfleet/plans.json"));
        let t = tune(&[("XDG_CACHE_HOME", "/xdg"), ("HOME", "/home/w")]);
        assert_eq!(t.cache, PathBuf::from("/xdg/ditfleet/plans.json"));
        let t = tune(&[
            ("DITFLEET_PLAN_CACHE", "/var/cache/plans.json"),
            ("DITFLEET_AUTOTUNE_SIZES", "512x512, 1024x2048"),
        ]);
        assert_eq!(t.cache, PathBuf::from("/var/cache/plans.json"));
        assert_eq!(t.sizes, vec![(512, 512), (1024, 2048)]);
        for bad in ["1024", "1000x1024", "0x16", "8192x8192", ","] {
            let e = WorkerConfig::from_env(&env(&[("DITFLEET_AUTOTUNE_SIZES", bad)])).unwrap_err();
            assert_eq!(e.var, "DITFLEET_AUTOTUNE_SIZES", "{bad:?}");
        }
    }

    #[test]
    fn the_model_dir_is_ditfleet_model_dir_else_flux_model_dir_and_its_parent_the_root() {
        let dir = |pairs: &[(&str, &str)]| {
            let c = WorkerConfig::from_env(&env(pairs)).unwrap();
            match c.engine {
                EngineChoice::Flux { model_dir, .. } => (model_dir, c.model_root),
                other => panic!("{other:?}"),
            }
        };
        let p = |s: &str| Some(PathBuf::from(s));
        assert_eq!(
            dir(&[("FLUX_MODEL_DIR", "/m/FLUX.1-dev")]),
            (p("/m/FLUX.1-dev"), p("/m"))
        );
        assert_eq!(
            dir(&[
                ("DITFLEET_MODEL_DIR", "/models/sdxl-base-1.0"),
                ("FLUX_MODEL_DIR", "/m/FLUX.1-dev")
            ]),
            (p("/models/sdxl-base-1.0"), p("/models"))
        );
        assert_eq!(
            dir(&[
                ("DITFLEET_MODEL_DIR", "/models/sdxl"),
                ("DITFLEET_MODEL_ROOT", "/versions")
            ]),
            (p("/models/sdxl"), p("/versions"))
        );
        assert_eq!(dir(&[]), (None, None));
    }

    #[test]
    fn low_memory_is_parsed() {
        let c = WorkerConfig::from_env(&env(&[("DITFLEET_LOW_MEMORY", "1")])).unwrap();
        assert!(matches!(c.engine, EngineChoice::Flux { low_memory: true, .. }));
        assert!(WorkerConfig::from_env(&env(&[("DITFLEET_LOW_MEMORY", "yes")])).is_err());
    }

    #[test]
    fn defaults_load_without_any_variable() {
        let c = WorkerConfig::from_env(&env(&[])).unwrap();
        assert_eq!(c.slots, 1);
        assert_eq!(c.common.namespace, "ditfleet");
        assert_eq!(
            c.engine,
            EngineChoice::Flux {
                model_dir: None,
                low_memory: false,
                plan: None,
                autotune: Autotune {
                    cache: std::env::temp_dir().join("ditfleet").join("plans.json"),
                    sizes: vec![(1024, 1024), (2048, 2048)],
                },
                fault_gpu: None
            }
        );
        let s = SchedulerConfig::from_env(&env(&[])).unwrap();
        assert_eq!(s.prefetch, 64);
        assert_eq!(s.classes.names(), vec!["small", "medium", "large", "xlarge"]);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = WorkerConfig::from_env(&env(&[("DITFLEET_WORKER_SLOTS", "many")])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_WORKER_SLOTS");
        assert!(e.to_string().contains("DITFLEET_WORKER_SLOTS"), "{e}");
        let e = WorkerConfig::from_env(&env(&[("DITFLEET_ENGINE", "gpu")])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_ENGINE");
        let e = WorkerConfig::from_env(&env(&[("DITFLEET_AMQP_URL", "http://x")])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_AMQP_URL");
        let e = WorkerConfig::from_env(&env(&[("DITFLEET_RESULT_URL", "http://bucket/p")])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_RESULT_URL");
        let c = WorkerConfig::from_env(&env(&[("DITFLEET_RESULT_URL", "s3://bucket/p")])).unwrap();
        assert_eq!(c.result_url.as_deref(), Some("s3://bucket/p"));
        let e = WorkerConfig::from_env(&env(&[("DITFLEET_DEVICES", "cuda:x")])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_DEVICES");
        let e = SchedulerConfig::from_env(&env(&[("DITFLEET_CLASSES", "a=5,b=3,c")])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_CLASSES");
        let e = CommonConfig::from_env(&env(&[("DITFLEET_NAMESPACE", "a b")])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_NAMESPACE");
        let e = CommonConfig::from_env(&env(&[("DITFLEET_HTTP_ADDR", "localhost")])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_HTTP_ADDR");
        let e = CommonConfig::from_env(&env(&[("DITFLEET_BROKER_RECOVERY_TIMEOUT_MS", "0")])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_BROKER_RECOVERY_TIMEOUT_MS");
        let c = CommonConfig::from_env(&env(&[("DITFLEET_BROKER_RECOVERY_TIMEOUT_MS", "1500")])).unwrap();
        assert_eq!(c.broker_recovery_timeout, Duration::from_millis(1500));
    }

    #[test]
    fn tenant_limits_and_faults_parse_and_bad_ones_name_the_variable() {
        let s = SchedulerConfig::from_env(&env(&[
            ("DITFLEET_TENANT_RATE", "2"),
            ("DITFLEET_TENANT_LIMITS", "acme=5:50, trial=0.1:3,free=0:1"),
        ]))
        .unwrap();
        let l = &s.tenant_limits;
        assert_eq!(
            l.for_tenant("other"),
            Some(TenantLimit {
                rate: 2.0,
                burst: 20.0
            })
        );
        assert_eq!(
            l.for_tenant("trial"),
            Some(TenantLimit {
                rate: 0.1,
                burst: 3.0
            })
        );
        assert_eq!(l.for_tenant("free"), None, "rate 0 = unlimited");
        assert_eq!(
            SchedulerConfig::from_env(&env(&[]))
                .unwrap()
                .tenant_limits
                .for_tenant("x"),
            None,
            "unlimited by default"
        );
        for (var, value) in [
            ("DITFLEET_TENANT_LIMITS", "acme=fast:1"),
            ("DITFLEET_TENANT_LIMITS", "acme"),
            ("DITFLEET_TENANT_LIMITS", "acme=1:0"),
            ("DITFLEET_TENANT_RATE", "-1"),
            ("DITFLEET_SPILL", "maybe"),
        ] {
            assert_eq!(
                SchedulerConfig::from_env(&env(&[(var, value)])).unwrap_err().var,
                var
            );
        }
        let w = WorkerConfig::from_env(&env(&[
            ("DITFLEET_ENGINE", "simulated"),
            ("DITFLEET_SIM_FAULTS", "oom=2,bad-weights"),
            ("DITFLEET_WORKER_SLOTS", "3"),
        ]))
        .unwrap();
        assert_eq!(w.prefetch, 4, "slots + 1 by default");
        assert!(matches!(
            w.engine,
            EngineChoice::Simulated {
                faults: SimFaults {
                    oom: 2,
                    device: 0,
                    bad_weights: true,
                    panic: 0
                },
                ..
            }
        ));
        for (var, value) in [
            ("DITFLEET_SIM_FAULTS", "meteor"),
            ("DITFLEET_SWAP_MODE", "yolo"),
            ("DITFLEET_SIM_VERSION", "v 2"),
        ] {
            let e =
                WorkerConfig::from_env(&env(&[("DITFLEET_ENGINE", "simulated"), (var, value)])).unwrap_err();
            assert_eq!(e.var, var);
        }
    }

    #[test]
    fn url_errors_do_not_leak_passwords() {
        let e =
            CommonConfig::from_env(&env(&[("DITFLEET_REDIS_URL", "http://user:s3cret@host")])).unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }
}
