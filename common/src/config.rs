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
        help: "engine: flux (real pipeline; tiny random-weight config when FLUX_MODEL_DIR is unset) or simulated",
    },
    VarDoc {
        name: "DITFLEET_SIM_STEP_MS",
        default: "20",
        help: "simulated engine: milliseconds per denoising step",
    },
    VarDoc {
        name: "FLUX_MODEL_DIR",
        default: "unset",
        help: "diffusers-layout Flux.1 checkpoint directory",
    },
    VarDoc {
        name: "DITFLEET_LOW_MEMORY",
        default: "0",
        help: "1: Flux text encoders are loaded per request and freed after encoding (less device memory, slower encode)",
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
];

/// Renders variable docs for `--help`.
pub fn help_text(groups: &[&[VarDoc]]) -> String {
    let mut s = String::from("Environment variables:\n");
    for g in groups {
        for v in *g {
            s.push_str(&format!("  {:<28} {} [default: {}]\n", v.name, v.help, v.default));
        }
    }
    s
}

/// Reads variables through a lookup function, with typed parsing and errors naming the variable.
pub struct Env<'a> {
    lookup: Box<dyn Fn(&str) -> Option<String> + 'a>,
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
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@') {
            let user = userinfo.split(':').next().unwrap_or("");
            return format!("{scheme}://{user}:***@{host}");
        }
    }
    url.to_string()
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
        Ok(Self {
            common: CommonConfig::from_env(env)?,
            prefetch,
            classes,
            max_prompt_chars: env.positive("DITFLEET_MAX_PROMPT_CHARS", 2000)? as usize,
        })
    }
}

/// Which engine a worker runs.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineChoice {
    /// The Flux.1 pipeline: the checkpoint in `model_dir`, or the tiny random-weight config.
    /// `low_memory`: the text encoders are loaded for each request and freed after encoding.
    Flux {
        model_dir: Option<PathBuf>,
        low_memory: bool,
    },
    /// The simulated engine (fleet load and chaos tests).
    Simulated { step_ms: u64 },
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
    pub shutdown_grace: Duration,
    pub heartbeat: Duration,
    pub job_lease: Duration,
    pub max_attempts: u32,
}

impl WorkerConfig {
    pub fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let host = hostname_fallback();
        let worker_id = env.string("DITFLEET_WORKER_ID", &format!("{host}-{}", std::process::id()));
        if worker_id.len() > 128
            || !worker_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(err(
                "DITFLEET_WORKER_ID",
                &worker_id,
                "must be 1-128 characters of [A-Za-z0-9._-]".into(),
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
            },
            _ => EngineChoice::Flux {
                model_dir: env.raw("FLUX_MODEL_DIR").map(PathBuf::from),
                low_memory: env.choice("DITFLEET_LOW_MEMORY", "0", &["0", "1"])? == "1",
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
        if let Some(url) = env.raw("DITFLEET_RESULT_URL") {
            // The Helm chart targets S3-compatible storage; refuse rather than silently writing
            // results to a local directory nobody else can read.
            return Err(err(
                "DITFLEET_RESULT_URL",
                &redact_url(&url),
                "the S3-compatible result store is not implemented in this build; unset it and use DITFLEET_RESULT_DIR on a shared volume".into(),
            ));
        }
        let max_attempts = env.positive("DITFLEET_MAX_ATTEMPTS", 3)?;
        Ok(Self {
            common: CommonConfig::from_env(env)?,
            worker_id,
            classes,
            slots,
            engine,
            devices,
            result_dir: PathBuf::from(env.string("DITFLEET_RESULT_DIR", "./results")),
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
                low_memory: false
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
        let e = WorkerConfig::from_env(&env(&[("DITFLEET_RESULT_URL", "s3://bucket/p")])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_RESULT_URL");
        let e = WorkerConfig::from_env(&env(&[("DITFLEET_DEVICES", "cuda:x")])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_DEVICES");
        let e = SchedulerConfig::from_env(&env(&[("DITFLEET_CLASSES", "a=5,b=3,c")])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_CLASSES");
        let e = CommonConfig::from_env(&env(&[("DITFLEET_NAMESPACE", "a b")])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_NAMESPACE");
        let e = CommonConfig::from_env(&env(&[("DITFLEET_HTTP_ADDR", "localhost")])).unwrap_err();
        assert_eq!(e.var, "DITFLEET_HTTP_ADDR");
    }

    #[test]
    fn url_errors_do_not_leak_passwords() {
        let e =
            CommonConfig::from_env(&env(&[("DITFLEET_REDIS_URL", "http://user:s3cret@host")])).unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }
}
