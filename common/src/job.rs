//! The public job contract, v1, and the internal messages derived from it.
//!
//! Backends publish a [`JobSpec`] as JSON to the submit exchange (see `docs/message-contract.md`
//! and `docs/job-v1.schema.json`). The scheduler validates it ([`JobSpec::validate`]), fills in
//! defaults, and forwards a [`WorkOrder`] (postcard behind a version byte) to a class queue.
//! Progress and outcomes are published as [`JobEvent`] JSON on the events exchange.

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The contract version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;
/// Models the fleet knows.
pub const KNOWN_MODELS: &[&str] = &["flux-dev", "flux-schnell"];
/// Largest prompt the schema admits; the scheduler's `DITFLEET_MAX_PROMPT_CHARS` may lower it.
pub const SCHEMA_MAX_PROMPT_CHARS: usize = 10_000;
pub const MIN_SIDE: u32 = 256;
pub const MAX_SIDE: u32 = 4096;
pub const MAX_STEPS: u32 = 100;
pub const MAX_GUIDANCE: f32 = 30.0;
/// Largest accepted `true_cfg_scale`.
pub const MAX_TRUE_CFG: f32 = 20.0;
pub const MAX_LABELS: usize = 32;

/// Scheduling priority.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Low,
    #[default]
    Normal,
    High,
}

impl Priority {
    /// Every level, highest first (the order workers take queued jobs in).
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// AMQP message priority (0-9 scale; see docs/architecture.md for broker differences).
    pub fn amqp(self) -> u8 {
        match self {
            Priority::Low => 1,
            Priority::Normal => 5,
            Priority::High => 9,
        }
    }

    /// The level an AMQP priority stands for (missing = normal).
    pub fn from_amqp(p: Option<u8>) -> Self {
        match p {
            Some(p) if p >= 7 => Priority::High,
            Some(p) if p <= 2 => Priority::Low,
            _ => Priority::Normal,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

/// The deadline of a job as milliseconds since the Unix epoch (`None` when absent or unreadable;
/// validation rejects unreadable ones before a job is routed).
pub fn deadline_ms(deadline: Option<&str>) -> Option<u64> {
    let t = humantime::parse_rfc3339_weak(deadline?).ok()?;
    Some(
        t.duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    )
}

/// A text-to-image job as a backend submits it (contract v1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(
    title = "ditfleet job v1",
    description = "A text-to-image job published to the ditfleet submit exchange.",
    extend(
        "if" = {"properties": {"true_cfg_scale": {"exclusiveMinimum": 1}}, "required": ["true_cfg_scale"]},
        "then" = {"required": ["negative_prompt"], "properties": {"negative_prompt": {"type": "string", "pattern": "\\S"}}}
    )
)]
pub struct JobSpec {
    /// Contract version; must be 1.
    #[schemars(range(min = 1, max = 1))]
    pub schema_version: u32,
    /// Client-chosen id, also the idempotency key: a second job with the same id is not run again.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9._:-]+$"))]
    pub job_id: String,
    /// Who pays for the job; rate limits and quotas apply per tenant.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9._-]+$"))]
    pub tenant: String,
    /// Model name: `flux-dev` or `flux-schnell`.
    #[schemars(extend("enum" = ["flux-dev", "flux-schnell"]))]
    pub model: String,
    /// Pin a model version (only workers holding it run the job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9._-]+$"))]
    pub model_version: Option<String>,
    /// The prompt (non-blank).
    #[schemars(length(min = 1, max = 10000))]
    pub prompt: String,
    /// Negative prompt, used with `true_cfg_scale` above 1 ("true" classifier-free guidance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 10000))]
    pub negative_prompt: Option<String>,
    /// True CFG scale, 1..=20 (diffusers' `true_cfg_scale`; default 1 = off). Above 1 (with a
    /// `negative_prompt`) every step also runs the model on the negative prompt: twice the work,
    /// and a CFG-parallel plan can run the two branches on different GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 20.0))]
    pub true_cfg_scale: Option<f32>,
    /// Parallel plan override, e.g. `ulysses=2` or `pipefusion=2` (default: the worker's
    /// configured or autotuned plan). Comma-separated `name=value` items of dp, cfg, ulysses,
    /// ring, pipefusion, patches, warmup, text, vae; checked against the worker's devices when it
    /// runs (a plan the worker cannot run fails the job with the reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 100),
        regex(
            pattern = r"^(single|((dp|cfg|ulysses|ring|pipefusion|patches|warmup)=([1-9]|[1-5][0-9]|6[0-4])|text=(split|replicated)|vae=(parallel|single))(,((dp|cfg|ulysses|ring|pipefusion|patches|warmup)=([1-9]|[1-5][0-9]|6[0-4])|text=(split|replicated)|vae=(parallel|single)))*)$"
        )
    )]
    pub plan: Option<String>,
    /// Image width in pixels: a multiple of 16 in 256..=4096.
    #[schemars(range(min = 256, max = 4096), extend("multipleOf" = 16))]
    pub width: u32,
    /// Image height in pixels: a multiple of 16 in 256..=4096.
    #[schemars(range(min = 256, max = 4096), extend("multipleOf" = 16))]
    pub height: u32,
    /// Denoising steps, 1..=100 (default: 28 for flux-dev, 4 for flux-schnell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub steps: Option<u32>,
    /// Guidance scale, 0..=30 (default: 3.5 for flux-dev; ignored by flux-schnell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 30.0))]
    pub guidance: Option<f32>,
    /// Noise seed (default: derived from job_id, so a re-run gives the same image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default)]
    pub priority: Priority,
    /// RFC 3339 time after which the job must not start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub deadline: Option<String>,
    /// Extra routing key on the events exchange for this job's terminal event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 200), regex(pattern = r"^[A-Za-z0-9._-]+$"))]
    pub reply_to: Option<String>,
    /// Free-form labels, at most 32; keys 1-64 characters of [A-Za-z0-9._/-], values up to 256.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32, "propertyNames" = {"pattern": "^[A-Za-z0-9._/-]{1,64}$"}, "additionalProperties" = {"type": "string", "maxLength": 256}))]
    pub labels: BTreeMap<String, String>,
}

/// Why a job was rejected. `field` is `None` for problems with the message as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: Option<&'static str>,
    pub reason: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field {
            Some(field) => write!(f, "{field}: {}", self.reason),
            None => f.write_str(&self.reason),
        }
    }
}

/// A rejected job: every problem found, in field order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The body is not a v1 job (not JSON, wrong types, unknown fields, missing fields).
    #[error("malformed job: {0}")]
    Malformed(String),
    /// Parsed, but values are out of range.
    #[error("invalid job: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
}

/// Validation limits that depend on configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_prompt_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_prompt_chars: 2000,
        }
    }
}

fn charset_ok(s: &str, extra: &[char]) -> bool {
    s.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(&c))
}

impl JobSpec {
    /// Parses a submitted body. Errors name the offending field or position.
    pub fn parse(body: &[u8]) -> Result<Self, JobError> {
        serde_json::from_slice(body).map_err(|e| JobError::Malformed(e.to_string()))
    }

    /// Best-effort job id of a body that may not parse as a job (for recording a rejection).
    pub fn sniff_job_id(body: &[u8]) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let id = v.get("job_id")?.as_str()?;
        valid_job_id(id).then(|| id.to_string())
    }

    /// Checks every rule of the contract; returns all violations.
    pub fn validate(&self, limits: &Limits) -> Result<(), JobError> {
        let mut errs = Vec::new();
        let mut bad = |field: &'static str, reason: String| {
            errs.push(FieldError {
                field: Some(field),
                reason,
            })
        };
        if self.schema_version != SCHEMA_VERSION {
            bad(
                "schema_version",
                format!(
                    "unsupported version {}, this fleet reads version {SCHEMA_VERSION}",
                    self.schema_version
                ),
            );
        }
        if self.job_id.is_empty()
            || self.job_id.len() > 128
            || !charset_ok(&self.job_id, &['.', '_', ':', '-'])
        {
            bad("job_id", "must be 1-128 characters of [A-Za-z0-9._:-]".into());
        }
        if self.tenant.is_empty() || self.tenant.len() > 64 || !charset_ok(&self.tenant, &['.', '_', '-']) {
            bad("tenant", "must be 1-64 characters of [A-Za-z0-9._-]".into());
        }
        if !KNOWN_MODELS.contains(&self.model.as_str()) {
            bad(
                "model",
                format!(
                    "unknown model {:?}; known models: {}",
                    truncate(&self.model, 64),
                    KNOWN_MODELS.join(", ")
                ),
            );
        }
        if let Some(v) = &self.model_version
            && !valid_version(v)
        {
            bad(
                "model_version",
                "must be 1-64 characters of [A-Za-z0-9._-]".into(),
            );
        }
        let max = limits.max_prompt_chars.min(SCHEMA_MAX_PROMPT_CHARS);
        if self.prompt.trim().is_empty() {
            bad("prompt", "must not be blank".into());
        }
        let n = self.prompt.chars().count();
        if n > max {
            bad("prompt", format!("is {n} characters, the limit is {max}"));
        }
        if let Some(neg) = &self.negative_prompt {
            let n = neg.chars().count();
            if n > max {
                bad(
                    "negative_prompt",
                    format!("is {n} characters, the limit is {max}"),
                );
            }
        }
        if let Some(t) = self.true_cfg_scale {
            if !t.is_finite() || !(1.0..=MAX_TRUE_CFG).contains(&t) {
                bad(
                    "true_cfg_scale",
                    format!("must be between 1 and {MAX_TRUE_CFG}, got {t}"),
                );
            } else if t > 1.0
                && self
                    .negative_prompt
                    .as_deref()
                    .is_none_or(|n| n.trim().is_empty())
            {
                bad(
                    "true_cfg_scale",
                    "above 1 needs a non-blank negative_prompt (true CFG guides away from it)".into(),
                );
            }
        }
        if let Some(p) = &self.plan
            && let Err(e) = check_plan_syntax(p)
        {
            bad("plan", e);
        }
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if !(MIN_SIDE..=MAX_SIDE).contains(&v) || v % 16 != 0 {
                bad(
                    field,
                    format!("must be a multiple of 16 between {MIN_SIDE} and {MAX_SIDE}, got {v}"),
                );
            }
        }
        if let Some(s) = self.steps
            && !(1..=MAX_STEPS).contains(&s)
        {
            bad("steps", format!("must be between 1 and {MAX_STEPS}, got {s}"));
        }
        if let Some(g) = self.guidance
            && (!g.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&g))
        {
            bad(
                "guidance",
                format!("must be between 0 and {MAX_GUIDANCE}, got {g}"),
            );
        }
        if let Some(d) = &self.deadline
            && (humantime::parse_rfc3339_weak(d).is_err() || !d.contains('T'))
        {
            bad(
                "deadline",
                format!(
                    "must be an RFC 3339 time such as 2026-01-31T12:00:00Z, got {:?}",
                    truncate(d, 64)
                ),
            );
        }
        if let Some(r) = &self.reply_to
            && (r.is_empty() || r.len() > 200 || !charset_ok(r, &['.', '_', '-']))
        {
            bad(
                "reply_to",
                "must be 1-200 characters of [A-Za-z0-9._-] (no wildcards)".into(),
            );
        }
        if self.labels.len() > MAX_LABELS {
            bad(
                "labels",
                format!("has {} entries, the limit is {MAX_LABELS}", self.labels.len()),
            );
        }
        for (k, v) in &self.labels {
            if k.is_empty() || k.len() > 64 || !charset_ok(k, &['.', '_', '/', '-']) {
                bad(
                    "labels",
                    format!(
                        "key {:?} must be 1-64 characters of [A-Za-z0-9._/-]",
                        truncate(k, 64)
                    ),
                );
            }
            if v.chars().count() > 256 {
                bad(
                    "labels",
                    format!("value of {:?} is longer than 256 characters", truncate(k, 64)),
                );
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(JobError::Invalid(errs))
        }
    }

    pub fn default_steps(model: &str) -> u32 {
        if model == "flux-schnell" { 4 } else { 28 }
    }

    pub fn default_guidance(model: &str) -> f32 {
        if model == "flux-schnell" { 0.0 } else { 3.5 }
    }

    /// The seed used when the job names none: a stable hash of the job id (FNV-1a).
    pub fn derived_seed(job_id: &str) -> u64 {
        job_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    /// Canonical digest of the job's content, to tell an idempotent resubmission from a reused id.
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_vec(self).expect("job serialises");
        format!("{:016x}", Self::derived_seed(&String::from_utf8_lossy(&json)))
    }
}

/// Whether `v` is a well-formed model version (1-64 characters of `[A-Za-z0-9._-]`).
pub fn valid_version(v: &str) -> bool {
    !v.is_empty() && v.len() <= 64 && charset_ok(v, &['.', '_', '-'])
}

/// Splits `flux-dev@v2` into a known model and a valid version.
pub fn parse_model_version(s: &str) -> Result<(String, String), String> {
    let (model, version) = s
        .split_once('@')
        .ok_or_else(|| format!("{s:?} is not <model>@<version>, e.g. flux-dev@v2"))?;
    if !KNOWN_MODELS.contains(&model) {
        return Err(format!(
            "unknown model {model:?}; known models: {}",
            KNOWN_MODELS.join(", ")
        ));
    }
    if !valid_version(version) {
        return Err(format!(
            "version {version:?} must be 1-64 characters of [A-Za-z0-9._-]"
        ));
    }
    Ok((model.to_string(), version.to_string()))
}

/// Whether `id` is a well-formed job id (1-128 characters of `[A-Za-z0-9._:-]`).
pub fn valid_job_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && charset_ok(id, &['.', '_', ':', '-'])
}

/// Items a parallel plan may set (the engine's `Plan` grammar; the worker checks the values
/// against its devices and the model).
const PLAN_ITEMS: &[&str] = &[
    "dp",
    "cfg",
    "ulysses",
    "ring",
    "pipefusion",
    "patches",
    "warmup",
    "text",
    "vae",
];

/// The syntax of a plan override: `single`, or comma-separated `name=value` items with known
/// names, numbers 1..=64 (`text` and `vae` take words).
fn check_plan_syntax(p: &str) -> Result<(), String> {
    if p.is_empty() || p.len() > 100 {
        return Err(format!("must be 1-100 characters, got {}", p.len()));
    }
    if p == "single" {
        return Ok(());
    }
    for item in p.split(',') {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("item {:?} is not name=value (e.g. ulysses=2)", truncate(item, 32)))?;
        if !PLAN_ITEMS.contains(&k) {
            return Err(format!(
                "unknown item {:?}; known: {}",
                truncate(k, 32),
                PLAN_ITEMS.join(", ")
            ));
        }
        let ok = match k {
            "text" => matches!(v, "split" | "replicated"),
            "vae" => matches!(v, "parallel" | "single"),
            _ => {
                !v.starts_with('0')
                    && v.bytes().all(|b| b.is_ascii_digit())
                    && v.parse::<u32>().is_ok_and(|n| (1..=64).contains(&n))
            }
        };
        if !ok {
            return Err(format!(
                "{k}={:?}: {}",
                truncate(v, 32),
                match k {
                    "text" => "must be split or replicated",
                    "vae" => "must be parallel or single",
                    _ => "must be a number in 1..=64",
                }
            ));
        }
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}

/// What the scheduler sends to a class queue: a validated job with every default resolved.
/// Internal; encoded with postcard behind a version byte ([`WorkOrder::encode`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkOrder {
    pub job_id: String,
    pub tenant: String,
    pub model: String,
    pub model_version: Option<String>,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: u32,
    pub guidance: f32,
    pub seed: u64,
    pub priority: Priority,
    pub deadline: Option<String>,
    pub reply_to: Option<String>,
    pub labels: BTreeMap<String, String>,
    /// Class queue it was routed to, and its cost in token-steps.
    pub class: String,
    pub cost: u64,
    /// When the backend's message reached the scheduler, ms since the Unix epoch.
    pub submitted_ms: u64,
    /// True CFG scale (1 = off). Encoded after the version-1 fields (version 2 only).
    #[serde(skip, default = "one")]
    pub true_cfg_scale: f32,
    /// Parallel plan override. Encoded after the version-1 fields (version 2 only).
    #[serde(skip)]
    pub plan: Option<String>,
}

fn one() -> f32 {
    1.0
}

/// The fields version 2 of the work-order encoding appends to version 1's.
#[derive(Serialize, Deserialize)]
struct WorkOrderV2 {
    true_cfg_scale: f32,
    plan: Option<String>,
}

/// Version byte of the work-order encoding: 2 appends `true_cfg_scale` and `plan` to version 1's
/// fields. An order that uses neither is encoded as version 1, which workers from before
/// version 2 still read (a rolling upgrade may run the new scheduler with old workers).
pub const WORK_ORDER_VERSION: u8 = 2;
pub const WORK_ORDER_CONTENT_TYPE: &str = "application/x-ditfleet-work-order";

impl WorkOrder {
    pub fn from_spec(spec: &JobSpec, class: &str, cost: u64, submitted_ms: u64) -> Self {
        Self {
            job_id: spec.job_id.clone(),
            tenant: spec.tenant.clone(),
            model: spec.model.clone(),
            model_version: spec.model_version.clone(),
            prompt: spec.prompt.clone(),
            negative_prompt: spec.negative_prompt.clone(),
            width: spec.width,
            height: spec.height,
            steps: spec.steps.unwrap_or_else(|| JobSpec::default_steps(&spec.model)),
            guidance: spec
                .guidance
                .unwrap_or_else(|| JobSpec::default_guidance(&spec.model)),
            seed: spec.seed.unwrap_or_else(|| JobSpec::derived_seed(&spec.job_id)),
            priority: spec.priority,
            deadline: spec.deadline.clone(),
            reply_to: spec.reply_to.clone(),
            labels: spec.labels.clone(),
            class: class.to_string(),
            cost,
            submitted_ms,
            true_cfg_scale: spec.true_cfg_scale.unwrap_or(1.0),
            plan: spec.plan.clone(),
        }
    }

    /// Whether the job runs true CFG (two model passes per step).
    pub fn true_cfg(&self) -> bool {
        self.true_cfg_scale > 1.0 && self.negative_prompt.is_some()
    }

    pub fn encode(&self) -> Vec<u8> {
        let v2 = self.true_cfg_scale != 1.0 || self.plan.is_some();
        let mut out = vec![if v2 { 2 } else { 1 }];
        // The version-1 fields (the version-2 ones are `serde(skip)`), then version 2's.
        out.extend(postcard::to_stdvec(self).expect("work order serialises"));
        if v2 {
            let ext = WorkOrderV2 {
                true_cfg_scale: self.true_cfg_scale,
                plan: self.plan.clone(),
            };
            out.extend(postcard::to_stdvec(&ext).expect("work order serialises"));
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, JobError> {
        let malformed = |e: postcard::Error| JobError::Malformed(format!("work order: {e}"));
        match bytes.split_first() {
            Some((&1, rest)) => postcard::from_bytes(rest).map_err(malformed),
            Some((&2, rest)) => {
                let (mut order, rest): (WorkOrder, _) = postcard::take_from_bytes(rest).map_err(malformed)?;
                let ext: WorkOrderV2 = postcard::from_bytes(rest).map_err(malformed)?;
                order.true_cfg_scale = ext.true_cfg_scale;
                order.plan = ext.plan;
                Ok(order)
            }
            Some((v, _)) => Err(JobError::Malformed(format!(
                "work order version {v} is not supported (expected 1 or {WORK_ORDER_VERSION})"
            ))),
            None => Err(JobError::Malformed("empty work order".into())),
        }
    }
}

/// Events on the events exchange, routing key `job.<id>.<kind>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    Progress {
        job_id: String,
        step: u32,
        total: u32,
        elapsed_ms: u64,
        worker: String,
    },
    Done {
        job_id: String,
        result_url: String,
        worker: String,
        engine: String,
        attempts: u32,
        queue_wait_ms: u64,
        generate_ms: u64,
        store_ms: u64,
        end_to_end_ms: u64,
        timings: serde_json::Value,
        /// The model version that made the image (`flux-dev@v2`); absent from older workers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model_version: Option<String>,
        /// The step the last attempt resumed from (a step checkpoint); absent when it ran from
        /// the start.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resumed_from_step: Option<u32>,
        /// GPU-seconds: devices of the job's plan x its generation wall time (what the image cost;
        /// a CPU-only worker counts its CPU device alike).
        #[serde(default)]
        gpu_seconds: f64,
    },
    Failed {
        job_id: String,
        state: String,
        reason: String,
    },
    Cancelled {
        job_id: String,
        at_step: Option<u32>,
    },
}

impl JobEvent {
    pub fn job_id(&self) -> &str {
        match self {
            JobEvent::Progress { job_id, .. }
            | JobEvent::Done { job_id, .. }
            | JobEvent::Failed { job_id, .. }
            | JobEvent::Cancelled { job_id, .. } => job_id,
        }
    }

    /// Routing key suffix: `progress`, `done`, `failed`, `cancelled`.
    pub fn kind(&self) -> &'static str {
        match self {
            JobEvent::Progress { .. } => "progress",
            JobEvent::Done { .. } => "done",
            JobEvent::Failed { .. } => "failed",
            JobEvent::Cancelled { .. } => "cancelled",
        }
    }

    pub fn routing_key(&self) -> String {
        format!("job.{}.{}", self.job_id(), self.kind())
    }

    /// AMQP `message_id` of the event: `<job_id>:<kind>` for terminal events, so a consumer can
    /// drop the rare re-published copy (see docs/message-contract.md, Events).
    pub fn message_id(&self) -> String {
        format!("{}:{}", self.job_id(), self.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn valid() -> JobSpec {
        JobSpec {
            schema_version: 1,
            job_id: "job-1".into(),
            tenant: "acme".into(),
            model: "flux-dev".into(),
            model_version: None,
            prompt: "a red fox in the snow".into(),
            negative_prompt: None,
            true_cfg_scale: None,
            plan: None,
            width: 1024,
            height: 768,
            steps: None,
            guidance: None,
            seed: None,
            priority: Priority::Normal,
            deadline: None,
            reply_to: None,
            labels: BTreeMap::new(),
        }
    }

    /// An edit that breaks a valid job, and the reason it must produce.
    type Case = (Box<dyn Fn(&mut JobSpec)>, &'static str);

    fn reasons(spec: &JobSpec) -> String {
        spec.validate(&Limits::default()).unwrap_err().to_string()
    }

    #[test]
    fn a_valid_job_passes_and_defaults_resolve_per_model() {
        let s = valid();
        s.validate(&Limits::default()).unwrap();
        let w = WorkOrder::from_spec(&s, "medium", 1, 2);
        assert_eq!((w.steps, w.guidance), (28, 3.5));
        assert_eq!(w.seed, JobSpec::derived_seed("job-1"));
        let mut s2 = valid();
        s2.model = "flux-schnell".into();
        let w2 = WorkOrder::from_spec(&s2, "small", 1, 2);
        assert_eq!(w2.steps, 4);
    }

    #[test]
    fn each_rule_gives_a_precise_reason() {
        let cases: Vec<Case> = vec![
            (
                Box::new(|s| s.schema_version = 2),
                "schema_version: unsupported version 2",
            ),
            (Box::new(|s| s.job_id = "a b".into()), "job_id: must be 1-128"),
            (Box::new(|s| s.tenant = String::new()), "tenant: must be 1-64"),
            (
                Box::new(|s| s.model = "sdxl-turbo".into()),
                "model: unknown model \"sdxl-turbo\"",
            ),
            (
                Box::new(|s| s.model_version = Some("v 1".into())),
                "model_version:",
            ),
            (Box::new(|s| s.prompt = "   ".into()), "prompt: must not be blank"),
            (
                Box::new(|s| s.prompt = "x".repeat(2001)),
                "prompt: is 2001 characters, the limit is 2000",
            ),
            (
                Box::new(|s| s.negative_prompt = Some("y".repeat(3000))),
                "negative_prompt: is 3000 characters",
            ),
            (
                Box::new(|s| s.width = 1000),
                "width: must be a multiple of 16 between 256 and 4096, got 1000",
            ),
            (
                Box::new(|s| s.height = 8192),
                "height: must be a multiple of 16 between 256 and 4096, got 8192",
            ),
            (
                Box::new(|s| s.width = 128),
                "width: must be a multiple of 16 between 256 and 4096, got 128",
            ),
            (
                Box::new(|s| s.steps = Some(0)),
                "steps: must be between 1 and 100, got 0",
            ),
            (
                Box::new(|s| s.steps = Some(101)),
                "steps: must be between 1 and 100, got 101",
            ),
            (
                Box::new(|s| s.guidance = Some(f32::NAN)),
                "guidance: must be between 0 and 30",
            ),
            (
                Box::new(|s| s.guidance = Some(31.0)),
                "guidance: must be between 0 and 30, got 31",
            ),
            (
                Box::new(|s| s.deadline = Some("tomorrow".into())),
                "deadline: must be an RFC 3339 time",
            ),
            (
                Box::new(|s| s.reply_to = Some("a.*".into())),
                "reply_to: must be 1-200",
            ),
            (
                Box::new(|s| s.labels = (0..33).map(|i| (format!("k{i}"), "v".into())).collect()),
                "labels: has 33 entries",
            ),
            (
                Box::new(|s| s.labels = [("bad key".to_string(), "v".to_string())].into()),
                "labels: key \"bad key\"",
            ),
            (
                Box::new(|s| s.labels = [("k".to_string(), "v".repeat(257))].into()),
                "labels: value of \"k\"",
            ),
        ];
        for (mutate, expected) in cases {
            let mut s = valid();
            mutate(&mut s);
            let r = reasons(&s);
            assert!(r.contains(expected), "expected {expected:?} in {r:?}");
        }
    }

    #[test]
    fn several_problems_are_all_reported() {
        let mut s = valid();
        s.width = 100;
        s.steps = Some(500);
        let r = reasons(&s);
        assert!(r.contains("width:") && r.contains("steps:"), "{r}");
    }

    #[test]
    fn malformed_bodies_are_rejected_with_the_parser_position() {
        let e = JobSpec::parse(b"{not json").unwrap_err();
        assert!(matches!(e, JobError::Malformed(_)));
        let e = JobSpec::parse(br#"{"schema_version":1,"job_id":"a","tenant":"t","model":"flux-dev","prompt":"p","width":"wide","height":512}"#).unwrap_err();
        assert!(
            e.to_string()
                .contains("invalid type: string \"wide\", expected u32"),
            "{e}"
        );
        let e = JobSpec::parse(br#"{"schema_version":1,"job_id":"a","tenant":"t","model":"flux-dev","prompt":"p","width":512,"height":512,"colour":"red"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
        let e = JobSpec::parse(
            br#"{"schema_version":1,"job_id":"a","tenant":"t","model":"flux-dev","prompt":"p","width":512}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("missing field `height`"), "{e}");
        let e = JobSpec::parse(br#"{"schema_version":1,"job_id":"a","tenant":"t","model":"flux-dev","prompt":"p","width":512,"height":512,"priority":"urgent"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `urgent`"), "{e}");
        assert_eq!(
            JobSpec::sniff_job_id(br#"{"job_id":"j-9","width":"x"}"#).as_deref(),
            Some("j-9")
        );
        assert_eq!(JobSpec::sniff_job_id(b"garbage"), None);
    }

    #[test]
    fn true_cfg_and_plan_overrides_are_checked_with_precise_reasons() {
        let mut s = valid();
        s.true_cfg_scale = Some(4.0);
        s.negative_prompt = Some("blurry".into());
        s.plan = Some("cfg=2,ulysses=2".into());
        s.validate(&Limits::default()).unwrap();
        let cases: Vec<Case> = vec![
            (
                Box::new(|s| s.true_cfg_scale = Some(0.5)),
                "true_cfg_scale: must be between 1 and 20, got 0.5",
            ),
            (
                Box::new(|s| s.true_cfg_scale = Some(f32::NAN)),
                "true_cfg_scale: must be between 1 and 20",
            ),
            (
                Box::new(|s| s.negative_prompt = None),
                "true_cfg_scale: above 1 needs a non-blank negative_prompt",
            ),
            (
                Box::new(|s| s.plan = Some("ulysses".into())),
                "plan: item \"ulysses\" is not name=value",
            ),
            (
                Box::new(|s| s.plan = Some("warp=2".into())),
                "plan: unknown item \"warp\"; known: dp, cfg",
            ),
            (
                Box::new(|s| s.plan = Some("ulysses=0".into())),
                "plan: ulysses=\"0\": must be a number in 1..=64",
            ),
            (
                Box::new(|s| s.plan = Some("text=both".into())),
                "plan: text=\"both\": must be split or replicated",
            ),
            (
                Box::new(|s| s.plan = Some(String::new())),
                "plan: must be 1-100 characters",
            ),
        ];
        for (edit, want) in cases {
            let mut t = s.clone();
            edit(&mut t);
            let got = reasons(&t);
            assert!(got.contains(want), "want {want:?} in {got:?}");
        }
        // Scale 1 is off and needs no negative prompt; `single` is a plan.
        let mut t = valid();
        t.true_cfg_scale = Some(1.0);
        t.plan = Some("single".into());
        t.validate(&Limits::default()).unwrap();
    }

    #[test]
    fn work_orders_with_true_cfg_or_a_plan_use_version_2_and_others_stay_readable_by_version_1_workers() {
        // Without the new fields: version 1, byte for byte what a version-1 scheduler wrote.
        let plain = WorkOrder::from_spec(&valid(), "medium", 123, 456);
        let bytes = plain.encode();
        assert_eq!(bytes[0], 1);
        assert_eq!(WorkOrder::decode(&bytes).unwrap(), plain);
        let mut s = valid();
        s.true_cfg_scale = Some(4.0);
        s.negative_prompt = Some("blurry".into());
        s.plan = Some("ulysses=2".into());
        let w = WorkOrder::from_spec(&s, "large", 1, 2);
        assert!(w.true_cfg());
        let bytes = w.encode();
        assert_eq!(bytes[0], 2);
        let back = WorkOrder::decode(&bytes).unwrap();
        assert_eq!(
            (back.true_cfg_scale, back.plan.as_deref()),
            (4.0, Some("ulysses=2"))
        );
        assert_eq!(back, w);
        // A version-2 order cut after its version-1 part is malformed, not silently version 1.
        let v1_len = 1 + postcard::to_stdvec(&w).unwrap().len();
        assert!(WorkOrder::decode(&bytes[..v1_len]).is_err());
        assert!(WorkOrder::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn work_orders_round_trip_and_reject_unknown_versions() {
        let w = WorkOrder::from_spec(&valid(), "medium", 123, 456);
        let bytes = w.encode();
        assert_eq!(WorkOrder::decode(&bytes).unwrap(), w);
        let mut bad = bytes.clone();
        bad[0] = 9;
        assert!(
            WorkOrder::decode(&bad)
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
        assert!(WorkOrder::decode(&bytes[..5]).is_err());
    }

    #[test]
    fn deadlines_parse_to_epoch_ms_and_priorities_round_trip_through_amqp() {
        assert_eq!(deadline_ms(Some("1970-01-01T00:00:01Z")), Some(1000));
        assert_eq!(deadline_ms(Some("2026-01-31T12:00:00Z")), Some(1_769_860_800_000));
        assert_eq!(deadline_ms(Some("soon")), None);
        assert_eq!(deadline_ms(None), None);
        for p in Priority::ALL {
            assert_eq!(Priority::from_amqp(Some(p.amqp())), p);
        }
        assert_eq!(Priority::from_amqp(None), Priority::Normal);
    }

    #[test]
    fn fingerprint_tells_resubmission_from_reuse() {
        let a = valid();
        let mut b = valid();
        assert_eq!(a.fingerprint(), b.fingerprint());
        b.prompt = "something else".into();
        assert_ne!(a.fingerprint(), b.fingerprint());
    }
}
