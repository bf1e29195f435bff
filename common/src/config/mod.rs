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

mod vars;
pub use vars::{COMMON_VARS, SCHEDULER_VARS, VarDoc, WORKER_VARS, help_text};

/// The values of `DITFLEET_PRECISION` (and of `precision` in a version folder's
/// `ditfleet.json`): the transformer's numeric format.
pub const PRECISIONS: &[&str] = &["bf16", "fp8"];

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

/// The model directory: `DITFLEET_MODEL_DIR`, else its older name `FLUX_MODEL_DIR`.
pub fn model_dir(env: &Env<'_>) -> Option<PathBuf> {
    env.raw("DITFLEET_MODEL_DIR")
        .or_else(|| env.raw("FLUX_MODEL_DIR"))
        .map(PathBuf::from)
}

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
        /// `DITFLEET_PRECISION`: `bf16` or `fp8` (checked here, parsed by the worker as the
        /// engine's `Precision`): the numeric format of the transformer of `model_dir`, and the
        /// default of every version under the model root (a version folder's `ditfleet.json`
        /// may say otherwise).
        precision: String,
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
                precision: env.choice("DITFLEET_PRECISION", "bf16", PRECISIONS)?,
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
mod tests;
