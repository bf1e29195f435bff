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
/// Models the fleet knows (the one list: the schema's `model` enum, validation, the simulated
/// engine's default models and the per-model queues all follow it). Each has a [`ModelFamily`].
pub const KNOWN_MODELS: &[&str] = &["flux-dev", "flux-schnell", "sdxl-base"];
/// Flux.1's one sampler: diffusers' `FlowMatchEulerDiscreteScheduler`.
pub const FLUX_SCHEDULERS: &[&str] = &["flow_euler"];
/// SDXL's samplers, its default first: diffusers' `EulerDiscreteScheduler` (`euler`),
/// `EulerAncestralDiscreteScheduler` (`euler_a`), `DPMSolverMultistepScheduler` (DPM++ 2M,
/// `dpmpp_2m`) and the same with Karras sigmas (`dpmpp_2m_karras`).
pub const SDXL_SCHEDULERS: &[&str] = &["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"];
/// Most LoRA adapters one job may stack.
pub const MAX_LORAS: usize = 8;
/// Largest magnitude of a LoRA `scale` (the range is -4..=4; 0 leaves the adapter out in effect).
pub const MAX_LORA_SCALE: f64 = 4.0;

/// The denoiser family behind a model name: what the job's options mean for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// Flux.1 (a flow-matching DiT): guidance distilled into the model, one sampler, optional
    /// "true" CFG (`true_cfg_scale` with a `negative_prompt`: a second pass per step).
    Flux,
    /// Stable Diffusion XL (a UNet): classic CFG whenever `guidance` > 1 (the model runs on a
    /// batch of 2, the prompt and the negative prompt or the empty one), several samplers.
    Sdxl,
}

impl ModelFamily {
    /// Every family, in the order the schema lists their rules.
    pub const ALL: [ModelFamily; 2] = [ModelFamily::Flux, ModelFamily::Sdxl];

    /// The family of a known model (`None` for an unknown one).
    pub fn of(model: &str) -> Option<ModelFamily> {
        match model {
            "flux-dev" | "flux-schnell" => Some(ModelFamily::Flux),
            "sdxl-base" => Some(ModelFamily::Sdxl),
            _ => None,
        }
    }

    /// The `scheduler` values the family runs, its default first.
    pub fn schedulers(self) -> &'static [&'static str] {
        match self {
            ModelFamily::Flux => FLUX_SCHEDULERS,
            ModelFamily::Sdxl => SDXL_SCHEDULERS,
        }
    }

    pub fn default_scheduler(self) -> &'static str {
        self.schedulers()[0]
    }

    /// Whether `true_cfg_scale` above 1 is an option (Flux only: SDXL's CFG is the classic one,
    /// set by `guidance`).
    pub fn has_true_cfg(self) -> bool {
        self == ModelFamily::Flux
    }

    /// The known models of this family.
    pub fn models(self) -> Vec<&'static str> {
        KNOWN_MODELS
            .iter()
            .copied()
            .filter(|m| ModelFamily::of(m) == Some(self))
            .collect()
    }
}
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
    transform = cross_field_rules
)]
pub struct JobSpec {
    /// Contract version; must be 1.
    #[serde(deserialize_with = "integral::u32")]
    #[schemars(range(min = 1, max = 1))]
    pub schema_version: u32,
    /// Client-chosen id, also the idempotency key: a second job with the same id is not run again.
    /// Starts with a letter or digit (so it is never `.`, `..` or a hidden name where it becomes
    /// a file name or object key).
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._:-]*$"))]
    pub job_id: String,
    /// Who pays for the job; rate limits and quotas apply per tenant.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    pub tenant: String,
    /// Model name: `flux-dev`, `flux-schnell` (Flux.1) or `sdxl-base` (Stable Diffusion XL).
    #[schemars(extend("enum" = KNOWN_MODELS))]
    pub model: String,
    /// Pin a model version (only workers holding it run the job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    pub model_version: Option<String>,
    /// The prompt: at least one visible character (not only whitespace or zero-width characters).
    #[schemars(length(min = 1, max = 10000), regex(pattern = VISIBLE_PATTERN))]
    pub prompt: String,
    /// Negative prompt. Flux: used only with `true_cfg_scale` above 1 ("true" classifier-free
    /// guidance). sdxl-base: used whenever `guidance` is above 1 (classic CFG; without one the
    /// model guides away from the empty prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 10000))]
    pub negative_prompt: Option<String>,
    /// True CFG scale, 1..=20 (diffusers' `true_cfg_scale`; default 1 = off). Flux only: above 1
    /// (with a `negative_prompt`) every step also runs the model on the negative prompt: twice
    /// the work, and a CFG-parallel plan can run the two branches on different GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 20.0))]
    pub true_cfg_scale: Option<f64>,
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
    #[serde(deserialize_with = "integral::u32")]
    #[schemars(range(min = 256, max = 4096), extend("multipleOf" = 16))]
    pub width: u32,
    /// Image height in pixels: a multiple of 16 in 256..=4096.
    #[serde(deserialize_with = "integral::u32")]
    #[schemars(range(min = 256, max = 4096), extend("multipleOf" = 16))]
    pub height: u32,
    /// Denoising steps, 1..=100 (default: 28 for flux-dev, 4 for flux-schnell, 30 for sdxl-base).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "integral::opt_u32"
    )]
    #[schemars(range(min = 1, max = 100))]
    pub steps: Option<u32>,
    /// Guidance scale, 0..=30 (default: 3.5 for flux-dev; ignored by flux-schnell; 5.0 for
    /// sdxl-base, where above 1 turns on classic CFG).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 30.0))]
    pub guidance: Option<f64>,
    /// Sampler. sdxl-base: `euler` (default; diffusers' EulerDiscreteScheduler), `euler_a`
    /// (EulerAncestralDiscreteScheduler), `dpmpp_2m` (DPMSolverMultistepScheduler, DPM++ 2M) or
    /// `dpmpp_2m_karras` (the same with Karras sigmas). Flux models: `flow_euler` (their one
    /// sampler, the default). Absent = the model's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = nullable(&all_schedulers())))]
    pub scheduler: Option<String>,
    /// LoRA adapters to apply, at most 8, in stack order (kept as given). Each names an adapter
    /// of the fleet's LoRA registry by `name` and `version` (each 1-64 characters of
    /// [A-Za-z0-9._-] starting with a letter or digit) with a `scale` in -4..=4 (default 1). A
    /// (name, version) pair may appear once: the scheduler checks that; this schema, which cannot
    /// compare fields across entries, rejects only identical entries.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_is_default"
    )]
    #[schemars(with = "Option<Vec<LoraSpec>>", extend("maxItems" = MAX_LORAS, "uniqueItems" = true))]
    pub loras: Vec<LoraSpec>,
    /// Noise seed (default: derived from job_id, so a re-run gives the same image).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "integral::opt_u64"
    )]
    #[schemars(extend("maximum" = u64::MAX))]
    pub seed: Option<u64>,
    /// `low`, `normal` (default) or `high`; `null` is `normal`.
    #[serde(default, deserialize_with = "null_is_default")]
    #[schemars(with = "Option<Priority>")]
    pub priority: Priority,
    /// RFC 3339 time after which the job must not start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub deadline: Option<String>,
    /// Extra routing key on the events exchange for this job's terminal events: `reply.` and
    /// then a name (letters, digits, `._-`), so it can never be one of the fleet's own event keys
    /// (`job.<id>.<kind>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 7, max = 200),
        regex(pattern = r"^reply\.[A-Za-z0-9][A-Za-z0-9._-]*$")
    )]
    pub reply_to: Option<String>,
    /// Free-form labels, at most 32; keys 1-64 characters of [A-Za-z0-9._/-], values up to 256.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_is_default"
    )]
    #[schemars(with = "Option<BTreeMap<String, String>>", extend("maxProperties" = 32, "propertyNames" = {"pattern": "^[A-Za-z0-9._/-]{1,64}$"}, "additionalProperties" = {"type": "string", "maxLength": 256}))]
    pub labels: BTreeMap<String, String>,
}

/// One LoRA adapter of a job's stack (contract v1, field `loras`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    /// Adapter name in the fleet's LoRA registry (a folder / object key segment under
    /// `<prefix>/loras/`): 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    pub name: String,
    /// Adapter version, the same rule as `name`.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    pub version: String,
    /// Weight of the adapter in the stack, -4..=4 (default 1; negative values subtract it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -4.0, max = 4.0))]
    pub scale: Option<f64>,
}

/// A LoRA adapter of a work order: the job's entry with its scale resolved (the worker copies it
/// into the engine's request).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraRef {
    pub name: String,
    pub version: String,
    pub scale: f64,
}

impl LoraRef {
    /// `name@version*scale`, how logs and checkpoint plans name an entry of a stack.
    pub fn label(&self) -> String {
        format!("{}@{}*{}", self.name, self.version, self.scale)
    }
}

/// Every sampler name of every family, each once, in family order.
pub fn all_schedulers() -> Vec<&'static str> {
    let mut all: Vec<&'static str> = Vec::new();
    for f in ModelFamily::ALL {
        for s in f.schedulers() {
            if !all.contains(s) {
                all.push(s);
            }
        }
    }
    all
}

/// A JSON Schema `enum` of `values` that also admits `null` (absent), as every optional field does.
fn nullable(values: &[&str]) -> serde_json::Value {
    let mut v: Vec<serde_json::Value> = values.iter().map(|s| serde_json::Value::from(*s)).collect();
    v.push(serde_json::Value::Null);
    serde_json::Value::Array(v)
}

/// The schema's rules across fields (`allOf`), from the same constants as the Rust validation:
/// a `true_cfg_scale` above 1 needs a non-blank `negative_prompt`; per model family, which
/// `scheduler` values are valid and whether `true_cfg_scale` may exceed 1.
fn cross_field_rules(schema: &mut schemars::Schema) {
    use serde_json::json;
    let mut rules = vec![json!({
        "if": {"properties": {"true_cfg_scale": {"type": "number", "exclusiveMinimum": 1}}, "required": ["true_cfg_scale"]},
        "then": {"required": ["negative_prompt"], "properties": {"negative_prompt": {"type": "string", "pattern": VISIBLE_PATTERN}}}
    })];
    for family in ModelFamily::ALL {
        let mut then = json!({"properties": {"scheduler": {"enum": nullable(family.schedulers())}}});
        if !family.has_true_cfg() {
            then["properties"]["true_cfg_scale"] = json!({"maximum": 1});
        }
        rules.push(json!({
            "if": {"properties": {"model": {"enum": family.models()}}, "required": ["model"]},
            "then": then
        }));
    }
    schema.insert("allOf".into(), serde_json::Value::Array(rules));
}

/// JSON Schema pattern of a non-blank text: at least one character that is neither whitespace
/// nor an invisible format character ([`is_blank_char`] lists the same set).
pub const VISIBLE_PATTERN: &str =
    r"[^\t-\r \u0085\u00A0\u1680\u180E\u2000-\u200D\u2028\u2029\u202F\u205F\u2060\u3000\uFEFF]";

/// Whitespace (Unicode `White_Space`) and the invisible characters a prompt of nothing else
/// would consist of (zero-width space/joiners, word joiner, BOM, Mongolian vowel separator).
pub fn is_blank_char(c: char) -> bool {
    matches!(
        c,
        '\u{9}'..='\u{d}'
            | ' '
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{180e}'
            | '\u{2000}'..='\u{200d}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{2060}'
            | '\u{3000}'
            | '\u{feff}'
    )
}

/// Whether `s` has a visible character (the contract's "not blank").
pub fn is_visible(s: &str) -> bool {
    s.chars().any(|c| !is_blank_char(c))
}

/// `null` for a field with a default means "absent", as for every other optional field.
fn null_is_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Integers that JSON may spell as integral floats: JSON Schema's `integer` admits `256.0`, so the
/// contract does too (and rejects `256.5`, negatives and values past the type's range).
mod integral {
    use serde::{Deserialize, Deserializer};

    /// 2^64 as f64: every f64 below it that is integral fits a u64.
    const TWO_POW_64: f64 = 18_446_744_073_709_551_616.0;

    fn to_u64<E: serde::de::Error>(n: &serde_json::Number, max: u64) -> Result<u64, E> {
        let v = match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => Some(u),
            (None, Some(_), _) => None,
            (None, None, Some(f)) if f.fract() == 0.0 && (0.0..TWO_POW_64).contains(&f) => Some(f as u64),
            _ => None,
        };
        match v {
            Some(u) if u <= max => Ok(u),
            _ => Err(E::custom(format!("{n} is not an integer in 0..={max}"))),
        }
    }

    pub fn u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
        let n = serde_json::Number::deserialize(d)?;
        Ok(to_u64(&n, u64::from(u32::MAX))? as u32)
    }

    pub fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        Option::<serde_json::Number>::deserialize(d)?
            .map(|n| to_u64(&n, u64::from(u32::MAX)).map(|v| v as u32))
            .transpose()
    }

    pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Option::<serde_json::Number>::deserialize(d)?
            .map(|n| to_u64(&n, u64::MAX))
            .transpose()
    }
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
        let de = &mut serde_json::Deserializer::from_slice(body);
        let spec: Self = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            // `?` is a position serde could not name (e.g. a syntax error before any field).
            JobError::Malformed(if path == "." || path == "?" || path.is_empty() {
                inner.to_string()
            } else {
                format!("{path}: {inner}")
            })
        })?;
        Ok(spec)
    }

    /// Best-effort job id of a body that may not parse as a job (for recording a rejection).
    pub fn sniff_job_id(body: &[u8]) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let id = v.get("job_id")?.as_str()?;
        valid_job_id(id).then(|| id.to_string())
    }

    /// The `reply_to` of a body that may not parse as a job, when it is a well-formed one (so
    /// a rejection still reaches the backend's reply queue).
    pub fn sniff_reply_to(body: &[u8]) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        let r = v.get("reply_to")?.as_str()?;
        valid_reply_to(r).then(|| r.to_string())
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
        if !valid_job_id(&self.job_id) {
            bad("job_id", JOB_ID_RULE.into());
        }
        if !valid_tenant(&self.tenant) {
            bad("tenant", TENANT_RULE.into());
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
            bad("model_version", VERSION_RULE.into());
        }
        let max = limits.max_prompt_chars.min(SCHEMA_MAX_PROMPT_CHARS);
        if !is_visible(&self.prompt) {
            bad(
                "prompt",
                "must not be blank (only whitespace or invisible characters)".into(),
            );
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
        let family = ModelFamily::of(&self.model);
        if let Some(t) = self.true_cfg_scale {
            if !t.is_finite() || !(1.0..=f64::from(MAX_TRUE_CFG)).contains(&t) {
                bad(
                    "true_cfg_scale",
                    format!("must be between 1 and {MAX_TRUE_CFG}, got {t}"),
                );
            } else if t > 1.0 && family.is_some_and(|f| !f.has_true_cfg()) {
                bad(
                    "true_cfg_scale",
                    format!(
                        "above 1 is a Flux option (true CFG); {} runs classic CFG from `guidance` (above 1) and `negative_prompt`, so leave true_cfg_scale out or at 1",
                        self.model
                    ),
                );
            } else if t > 1.0 && self.negative_prompt.as_deref().is_none_or(|n| !is_visible(n)) {
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
            && (!g.is_finite() || !(0.0..=f64::from(MAX_GUIDANCE)).contains(&g))
        {
            bad(
                "guidance",
                format!("must be between 0 and {MAX_GUIDANCE}, got {g}"),
            );
        }
        if let Some(sched) = &self.scheduler
            && let Err(e) = check_scheduler(&self.model, family, sched)
        {
            bad("scheduler", e);
        }
        if self.loras.len() > MAX_LORAS {
            bad(
                "loras",
                format!("has {} entries, the limit is {MAX_LORAS}", self.loras.len()),
            );
        }
        for (i, l) in self.loras.iter().enumerate() {
            for (what, v) in [("name", &l.name), ("version", &l.version)] {
                if !valid_lora_ident(v) {
                    bad(
                        "loras",
                        format!("entry {i}: {what} {:?} {LORA_IDENT_RULE}", truncate(v, 64)),
                    );
                }
            }
            if let Some(s) = l.scale
                && (!s.is_finite() || !(-MAX_LORA_SCALE..=MAX_LORA_SCALE).contains(&s))
            {
                bad(
                    "loras",
                    format!(
                        "entry {i}: scale must be between -{MAX_LORA_SCALE} and {MAX_LORA_SCALE}, got {s}"
                    ),
                );
            }
            if let Some(j) = self.loras[..i]
                .iter()
                .position(|p| p.name == l.name && p.version == l.version)
            {
                bad(
                    "loras",
                    format!(
                        "entries {j} and {i} are both {}@{}; list an adapter once (its scale sets its weight)",
                        truncate(&l.name, 64),
                        truncate(&l.version, 64)
                    ),
                );
            }
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
            && !valid_reply_to(r)
        {
            bad("reply_to", REPLY_TO_RULE.into());
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
        match model {
            "flux-schnell" => 4,
            "sdxl-base" => 30,
            _ => 28,
        }
    }

    pub fn default_guidance(model: &str) -> f32 {
        match model {
            "flux-schnell" => 0.0,
            "sdxl-base" => 5.0,
            _ => 3.5,
        }
    }

    /// The sampler a job of `model` runs when it names none (Flux's for an unknown model, as the
    /// other defaults fall back to flux-dev's).
    pub fn default_scheduler(model: &str) -> &'static str {
        ModelFamily::of(model)
            .unwrap_or(ModelFamily::Flux)
            .default_scheduler()
    }

    /// The seed used when the job names none: a stable hash of the job id (FNV-1a).
    pub fn derived_seed(job_id: &str) -> u64 {
        fnv1a(job_id.as_bytes())
    }

    /// The job in one canonical form, so that leaving a field out and sending its default are
    /// the same job: `steps`, `guidance`, `seed` and each LoRA's `scale` written out; a
    /// `true_cfg_scale` of 1 and the model's default `scheduler` written as absent (the form
    /// jobs had before those fields existed, so their fingerprints did not change).
    pub fn normalized(&self) -> JobSpec {
        let mut s = self.clone();
        s.steps = Some(s.steps.unwrap_or_else(|| Self::default_steps(&s.model)));
        s.guidance = Some(
            s.guidance
                .unwrap_or_else(|| f64::from(Self::default_guidance(&s.model))),
        );
        s.seed = Some(s.seed.unwrap_or_else(|| Self::derived_seed(&s.job_id)));
        if s.true_cfg_scale == Some(1.0) {
            s.true_cfg_scale = None;
        }
        if s.scheduler.as_deref() == Some(Self::default_scheduler(&s.model)) {
            s.scheduler = None;
        }
        for l in &mut s.loras {
            l.scale = Some(l.scale.unwrap_or(1.0));
        }
        s
    }

    /// Canonical digest of the job's content (after [`JobSpec::normalized`]), to tell an
    /// idempotent resubmission from a reused id.
    pub fn fingerprint(&self) -> String {
        let json = serde_json::to_vec(&self.normalized()).expect("job serialises");
        format!("{:016x}", fnv1a(&json))
    }
}

pub const JOB_ID_RULE: &str = "must be 1-128 characters of [A-Za-z0-9._:-] starting with a letter or digit";
pub const TENANT_RULE: &str = "must be 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit";
pub const VERSION_RULE: &str = "must be 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit";
pub const REPLY_TO_RULE: &str = "must be `reply.` then a name of [A-Za-z0-9._-] starting with a letter or digit, at most 200 characters in all (no wildcards; `job.*` keys are the fleet's own)";
/// The routing-key namespace of `reply_to` keys on the events exchange.
pub const REPLY_PREFIX: &str = "reply.";

/// FNV-1a (64 bit) of raw bytes: job seeds, fingerprints and the `invalid-<hash>` ids of
/// unparseable bodies (over the bytes as received, so bodies differing only in invalid UTF-8
/// get different ids).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

pub const LORA_IDENT_RULE: &str = "must be 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit";

/// Whether `s` is a well-formed LoRA adapter name or version: the model-version rule, since each
/// becomes a folder or object key segment (`<prefix>/loras/<name>/<version>/`).
pub fn valid_lora_ident(s: &str) -> bool {
    valid_version(s)
}

/// `sched` for `model`: one of its family's samplers (any known sampler when the model is
/// unknown, which is reported on its own).
fn check_scheduler(model: &str, family: Option<ModelFamily>, sched: &str) -> Result<(), String> {
    match family {
        Some(f) if f.schedulers().contains(&sched) => Ok(()),
        Some(f) if all_schedulers().contains(&sched) => Err(format!(
            "{sched:?} is not a sampler of {model}; {model} runs {}",
            f.schedulers().join(", ")
        )),
        None if all_schedulers().contains(&sched) => Ok(()),
        _ => Err(format!(
            "unknown sampler {:?}; {}",
            truncate(sched, 32),
            match family {
                Some(f) => format!("{model} runs {}", f.schedulers().join(", ")),
                None => format!("known: {}", all_schedulers().join(", ")),
            }
        )),
    }
}

/// Whether `v` is a well-formed model version (1-64 characters of `[A-Za-z0-9._-]`, the first a
/// letter or digit: it becomes a folder under the model root and part of queue names).
pub fn valid_version(v: &str) -> bool {
    crate::ident::is_name(v, 64, &['.', '_', '-'])
}

/// Whether `t` is a well-formed tenant (1-64 characters of `[A-Za-z0-9._-]`, the first a letter
/// or digit).
pub fn valid_tenant(t: &str) -> bool {
    crate::ident::is_name(t, 64, &['.', '_', '-'])
}

/// Whether `r` is a well-formed `reply_to` key: `reply.<name>`, at most 200 characters.
pub fn valid_reply_to(r: &str) -> bool {
    r.len() <= 200
        && r.strip_prefix(REPLY_PREFIX)
            .is_some_and(|rest| crate::ident::is_name(rest, 200, &['.', '_', '-']))
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
        return Err(format!("version {version:?} {VERSION_RULE}"));
    }
    Ok((model.to_string(), version.to_string()))
}

/// Whether `id` is a well-formed job id (1-128 characters of `[A-Za-z0-9._:-]`, the first a
/// letter or digit: ids become file names and object keys, so `.`, `..` and hidden names are
/// not ids).
pub fn valid_job_id(id: &str) -> bool {
    crate::ident::is_name(id, 128, &['.', '_', ':', '-'])
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
    /// Parallel plan override. Encoded after the version-1 fields (version 2 on).
    #[serde(skip)]
    pub plan: Option<String>,
    /// Sampler, resolved (the model's default when the job names none). Encoded after the
    /// version-2 fields (version 3 only); older orders decode with the model's default.
    #[serde(skip)]
    pub scheduler: String,
    /// LoRA stack in order, scales resolved. Encoded after the version-2 fields (version 3 only).
    #[serde(skip)]
    pub loras: Vec<LoraRef>,
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

/// The fields version 3 appends to version 2's.
#[derive(Serialize, Deserialize)]
struct WorkOrderV3 {
    scheduler: String,
    loras: Vec<LoraRef>,
}

/// Version byte of the work-order encoding: 2 appends `true_cfg_scale` and `plan` to version 1's
/// fields, 3 appends `scheduler` and `loras` to version 2's. An order is written in the lowest
/// version that holds it (one with the default sampler and no LoRAs is at most version 2; one
/// that also has neither true CFG nor a plan is version 1), so workers from before a version
/// still read every order that does not use its fields (a rolling upgrade may run the new
/// scheduler with old workers). Every version is decoded.
pub const WORK_ORDER_VERSION: u8 = 3;
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
                .map_or_else(|| JobSpec::default_guidance(&spec.model), |g| g as f32),
            seed: spec.seed.unwrap_or_else(|| JobSpec::derived_seed(&spec.job_id)),
            priority: spec.priority,
            deadline: spec.deadline.clone(),
            reply_to: spec.reply_to.clone(),
            labels: spec.labels.clone(),
            class: class.to_string(),
            cost,
            submitted_ms,
            true_cfg_scale: spec.true_cfg_scale.map_or(1.0, |t| t as f32),
            plan: spec.plan.clone(),
            scheduler: spec
                .scheduler
                .clone()
                .unwrap_or_else(|| JobSpec::default_scheduler(&spec.model).to_string()),
            loras: spec
                .loras
                .iter()
                .map(|l| LoraRef {
                    name: l.name.clone(),
                    version: l.version.clone(),
                    scale: l.scale.unwrap_or(1.0),
                })
                .collect(),
        }
    }

    /// The job as JSON would submit it, with every default resolved (for a DLQ entry when the
    /// submitted body is no longer known).
    pub fn to_spec(&self) -> JobSpec {
        JobSpec {
            schema_version: SCHEMA_VERSION,
            job_id: self.job_id.clone(),
            tenant: self.tenant.clone(),
            model: self.model.clone(),
            model_version: self.model_version.clone(),
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            true_cfg_scale: (self.true_cfg_scale != 1.0).then_some(f64::from(self.true_cfg_scale)),
            plan: self.plan.clone(),
            width: self.width,
            height: self.height,
            steps: Some(self.steps),
            guidance: Some(f64::from(self.guidance)),
            scheduler: Some(self.scheduler.clone()),
            loras: self
                .loras
                .iter()
                .map(|l| LoraSpec {
                    name: l.name.clone(),
                    version: l.version.clone(),
                    scale: Some(l.scale),
                })
                .collect(),
            seed: Some(self.seed),
            priority: self.priority,
            deadline: self.deadline.clone(),
            reply_to: self.reply_to.clone(),
            labels: self.labels.clone(),
        }
    }

    /// Whether the job runs true CFG (two model passes per step).
    pub fn true_cfg(&self) -> bool {
        self.true_cfg_scale > 1.0 && self.negative_prompt.is_some()
    }

    /// The lowest encoding version that holds this order (see [`WORK_ORDER_VERSION`]).
    pub fn version(&self) -> u8 {
        if self.scheduler != JobSpec::default_scheduler(&self.model) || !self.loras.is_empty() {
            3
        } else if self.true_cfg_scale != 1.0 || self.plan.is_some() {
            2
        } else {
            1
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let version = self.version();
        let mut out = vec![version];
        // The version-1 fields (the later ones are `serde(skip)`), then each later version's.
        out.extend(postcard::to_stdvec(self).expect("work order serialises"));
        if version >= 2 {
            let ext = WorkOrderV2 {
                true_cfg_scale: self.true_cfg_scale,
                plan: self.plan.clone(),
            };
            out.extend(postcard::to_stdvec(&ext).expect("work order serialises"));
        }
        if version >= 3 {
            let ext = WorkOrderV3 {
                scheduler: self.scheduler.clone(),
                loras: self.loras.clone(),
            };
            out.extend(postcard::to_stdvec(&ext).expect("work order serialises"));
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, JobError> {
        let malformed = |e: postcard::Error| JobError::Malformed(format!("work order: {e}"));
        let (version, rest) = match bytes.split_first() {
            Some((&v, rest)) if (1..=WORK_ORDER_VERSION).contains(&v) => (v, rest),
            Some((v, _)) => {
                return Err(JobError::Malformed(format!(
                    "work order version {v} is not supported (expected 1 to {WORK_ORDER_VERSION})"
                )));
            }
            None => return Err(JobError::Malformed("empty work order".into())),
        };
        let (mut order, rest): (WorkOrder, _) = postcard::take_from_bytes(rest).map_err(malformed)?;
        order.scheduler = JobSpec::default_scheduler(&order.model).to_string();
        if version == 1 {
            return Ok(order);
        }
        let (ext, rest): (WorkOrderV2, _) = postcard::take_from_bytes(rest).map_err(malformed)?;
        order.true_cfg_scale = ext.true_cfg_scale;
        order.plan = ext.plan;
        if version == 2 {
            return Ok(order);
        }
        let ext: WorkOrderV3 = postcard::from_bytes(rest).map_err(malformed)?;
        order.scheduler = ext.scheduler;
        order.loras = ext.loras;
        Ok(order)
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
    /// A submission the scheduler rejected whose `job_id` belongs to an existing job (a reuse
    /// with different content, or an invalid body naming a taken id): the existing job is
    /// untouched and still gets its own terminal event; this answers the rejected submission.
    Rejected {
        job_id: String,
        reason: String,
        /// FNV-1a of the rejected body (16 hex digits), telling one rejected copy from another.
        body_hash: String,
    },
}

impl JobEvent {
    pub fn job_id(&self) -> &str {
        match self {
            JobEvent::Progress { job_id, .. }
            | JobEvent::Done { job_id, .. }
            | JobEvent::Failed { job_id, .. }
            | JobEvent::Cancelled { job_id, .. }
            | JobEvent::Rejected { job_id, .. } => job_id,
        }
    }

    /// Routing key suffix: `progress`, `done`, `failed`, `cancelled`, `rejected`.
    pub fn kind(&self) -> &'static str {
        match self {
            JobEvent::Progress { .. } => "progress",
            JobEvent::Done { .. } => "done",
            JobEvent::Failed { .. } => "failed",
            JobEvent::Cancelled { .. } => "cancelled",
            JobEvent::Rejected { .. } => "rejected",
        }
    }

    /// Whether the event ends what its submission asked for (everything but progress); terminal
    /// events also go to the job's `reply_to`.
    pub fn is_terminal(&self) -> bool {
        !matches!(self, JobEvent::Progress { .. })
    }

    pub fn routing_key(&self) -> String {
        format!("job.{}.{}", self.job_id(), self.kind())
    }

    /// AMQP `message_id` of the event: `<job_id>:<kind>` for the job's terminal events, so a
    /// consumer can drop the rare re-published copy; `<job_id>:progress:<step>` for progress and
    /// `<job_id>:rejected:<body hash>` for a rejected submission (see docs/message-contract.md,
    /// Events).
    pub fn message_id(&self) -> String {
        match self {
            JobEvent::Progress { job_id, step, .. } => format!("{job_id}:progress:{step}"),
            JobEvent::Rejected {
                job_id, body_hash, ..
            } => format!("{job_id}:rejected:{body_hash}"),
            _ => format!("{}:{}", self.job_id(), self.kind()),
        }
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
            scheduler: None,
            loras: Vec::new(),
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
                Box::new(|s| s.guidance = Some(f64::NAN)),
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
                "reply_to: must be `reply.` then a name",
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
                .contains("width: invalid type: string \"wide\", expected a JSON number"),
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
                Box::new(|s| s.true_cfg_scale = Some(f64::NAN)),
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
        let e = WorkOrder::decode(&bad).unwrap_err().to_string();
        assert!(e.contains("version 9 is not supported (expected 1 to 3)"), "{e}");
        bad[0] = 0;
        assert!(WorkOrder::decode(&bad).is_err());
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

    fn sdxl() -> JobSpec {
        JobSpec {
            model: "sdxl-base".into(),
            ..valid()
        }
    }

    fn lora(name: &str, version: &str, scale: Option<f64>) -> LoraSpec {
        LoraSpec {
            name: name.into(),
            version: version.into(),
            scale,
        }
    }

    #[test]
    fn every_known_model_has_a_family_and_every_sampler_name_is_listed_once() {
        for m in KNOWN_MODELS {
            let f = ModelFamily::of(m).unwrap_or_else(|| panic!("{m} has no family"));
            assert!(f.models().contains(m));
            assert_eq!(JobSpec::default_scheduler(m), f.schedulers()[0]);
        }
        assert_eq!(ModelFamily::of("sdxl-turbo"), None);
        let all = all_schedulers();
        assert_eq!(
            all,
            ["flow_euler", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"]
        );
        for f in ModelFamily::ALL {
            assert!(!f.models().is_empty(), "{f:?} has no model");
        }
    }

    #[test]
    fn sdxl_base_defaults_to_30_steps_guidance_5_and_euler() {
        let s = sdxl();
        s.validate(&Limits::default()).unwrap();
        let w = WorkOrder::from_spec(&s, "medium", 1, 2);
        assert_eq!((w.steps, w.guidance, w.scheduler.as_str()), (30, 5.0, "euler"));
        let f = WorkOrder::from_spec(&valid(), "medium", 1, 2);
        assert_eq!(f.scheduler, "flow_euler");
    }

    #[test]
    fn samplers_are_checked_against_the_jobs_model_family() {
        for (model, sched, want) in [
            ("sdxl-base", "euler", None),
            ("sdxl-base", "euler_a", None),
            ("sdxl-base", "dpmpp_2m", None),
            ("sdxl-base", "dpmpp_2m_karras", None),
            ("flux-dev", "flow_euler", None),
            ("flux-schnell", "flow_euler", None),
            (
                "flux-dev",
                "euler",
                Some("scheduler: \"euler\" is not a sampler of flux-dev; flux-dev runs flow_euler"),
            ),
            (
                "flux-schnell",
                "dpmpp_2m_karras",
                Some("scheduler: \"dpmpp_2m_karras\" is not a sampler of flux-schnell"),
            ),
            (
                "sdxl-base",
                "flow_euler",
                Some(
                    "scheduler: \"flow_euler\" is not a sampler of sdxl-base; sdxl-base runs euler, euler_a, dpmpp_2m, dpmpp_2m_karras",
                ),
            ),
            (
                "sdxl-base",
                "ddim",
                Some("scheduler: unknown sampler \"ddim\"; sdxl-base runs euler"),
            ),
            (
                "flux-dev",
                "Euler",
                Some("scheduler: unknown sampler \"Euler\"; flux-dev runs flow_euler"),
            ),
            ("flux-dev", "", Some("scheduler: unknown sampler \"\"")),
        ] {
            let mut s = valid();
            s.model = model.into();
            s.scheduler = Some(sched.into());
            match (s.validate(&Limits::default()), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{model}/{sched}: {e}"),
                (got, want) => panic!("{model}/{sched}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn true_cfg_above_1_is_rejected_for_sdxl_with_the_field_named() {
        let mut s = sdxl();
        s.negative_prompt = Some("blurry".into());
        s.true_cfg_scale = Some(4.0);
        let r = reasons(&s);
        assert!(
            r.contains("true_cfg_scale: above 1 is a Flux option (true CFG); sdxl-base runs classic CFG"),
            "{r}"
        );
        // Without a negative prompt the Flux-only reason is the one given, not the Flux rule's.
        s.negative_prompt = None;
        let r = reasons(&s);
        assert!(
            r.contains("is a Flux option") && !r.contains("needs a non-blank"),
            "{r}"
        );
        // 1 is "off" and null is absent, for SDXL as for Flux; classic CFG needs no negative.
        for t in [Some(1.0), None] {
            let mut s = sdxl();
            s.true_cfg_scale = t;
            s.guidance = Some(7.5);
            s.validate(&Limits::default()).unwrap();
        }
        // Out of range is reported as such whatever the model.
        let mut s = sdxl();
        s.true_cfg_scale = Some(0.5);
        assert!(reasons(&s).contains("true_cfg_scale: must be between 1 and 20"));
    }

    #[test]
    fn loras_are_checked_entry_by_entry_with_precise_reasons() {
        let mut ok = valid();
        ok.loras = vec![
            lora("pixel-art", "v1.2", Some(0.8)),
            lora("0style", "2024_01", None),
            lora("pixel-art", "v2", Some(-4.0)),
            lora("a", "1", Some(0.0)),
            lora(&"n".repeat(64), &"v".repeat(64), Some(4.0)),
        ];
        ok.validate(&Limits::default()).unwrap();
        let cases: Vec<Case> = vec![
            (
                Box::new(|s| s.loras = (0..9).map(|i| lora(&format!("l{i}"), "1", None)).collect()),
                "loras: has 9 entries, the limit is 8",
            ),
            (
                Box::new(|s| s.loras = vec![lora("..", "1", None)]),
                "loras: entry 0: name \"..\" must be 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit",
            ),
            (
                Box::new(|s| s.loras = vec![lora("a", "1", None), lora("a/b", "1", None)]),
                "loras: entry 1: name \"a/b\" must be",
            ),
            (
                Box::new(|s| s.loras = vec![lora("a", ".", None)]),
                "loras: entry 0: version \".\" must be",
            ),
            (
                Box::new(|s| s.loras = vec![lora("a", "v\\1", None)]),
                "loras: entry 0: version \"v\\\\1\" must be",
            ),
            (
                Box::new(|s| s.loras = vec![lora(".hidden", "1", None)]),
                "loras: entry 0: name \".hidden\"",
            ),
            (
                Box::new(|s| s.loras = vec![lora("", "1", None)]),
                "loras: entry 0: name \"\" must be",
            ),
            (
                Box::new(|s| s.loras = vec![lora(&"n".repeat(65), "1", None)]),
                "loras: entry 0: name",
            ),
            (
                Box::new(|s| s.loras = vec![lora("a", "1", Some(4.001))]),
                "loras: entry 0: scale must be between -4 and 4, got 4.001",
            ),
            (
                Box::new(|s| s.loras = vec![lora("a", "1", Some(-4.5))]),
                "loras: entry 0: scale must be between -4 and 4, got -4.5",
            ),
            (
                Box::new(|s| s.loras = vec![lora("a", "1", Some(f64::NAN))]),
                "loras: entry 0: scale must be between -4 and 4, got NaN",
            ),
            (
                Box::new(|s| {
                    s.loras = vec![
                        lora("a", "1", Some(0.5)),
                        lora("b", "1", None),
                        lora("a", "1", Some(0.8)),
                    ]
                }),
                "loras: entries 0 and 2 are both a@1; list an adapter once",
            ),
        ];
        for (edit, want) in cases {
            let mut s = valid();
            edit(&mut s);
            let got = reasons(&s);
            assert!(got.contains(want), "want {want:?} in {got:?}");
        }
    }

    #[test]
    fn loras_parse_from_json_with_null_as_absent_and_keep_their_order() {
        let base = r#"{"schema_version":1,"job_id":"a","tenant":"t","model":"sdxl-base","prompt":"p","width":512,"height":512"#;
        let parse = |extra: &str| JobSpec::parse(format!("{base}{extra}}}").as_bytes());
        assert!(parse(r#","loras":null"#).unwrap().loras.is_empty());
        assert_eq!(
            parse(r#","loras":null,"scheduler":null"#).unwrap(),
            parse("").unwrap()
        );
        let s = parse(
            r#","loras":[{"name":"z","version":"1","scale":null},{"name":"a","version":"2","scale":-1}]"#,
        )
        .unwrap();
        assert_eq!(s.loras, [lora("z", "1", None), lora("a", "2", Some(-1.0))]);
        let w = WorkOrder::from_spec(&s, "small", 1, 2);
        assert_eq!(
            w.loras.iter().map(LoraRef::label).collect::<Vec<_>>(),
            ["z@1*1", "a@2*-1"],
            "stack order kept, absent scale is 1"
        );
        let e = parse(r#","loras":[{"name":"a","version":"1","weight":1}]"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `weight`"), "{e}");
        let e = parse(r#","loras":[{"name":"a"}]"#).unwrap_err();
        assert!(e.to_string().contains("missing field `version`"), "{e}");
        let e = parse(r#","loras":{"name":"a","version":"1"}"#).unwrap_err();
        assert!(e.to_string().starts_with("malformed job: loras:"), "{e}");
    }

    #[test]
    fn absent_and_default_sampler_and_lora_scale_are_the_same_job() {
        let mut a = sdxl();
        a.loras = vec![lora("a", "1", None)];
        let mut b = a.clone();
        b.scheduler = Some("euler".into());
        b.loras[0].scale = Some(1.0);
        assert_eq!(a.fingerprint(), b.fingerprint());
        let mut flux = valid();
        let before = flux.fingerprint();
        flux.scheduler = Some("flow_euler".into());
        assert_eq!(flux.fingerprint(), before);
        // A job without the new fields keeps the fingerprint it had before they existed (the
        // canonical JSON has neither field), so a resubmission across the upgrade is absorbed.
        let canonical = String::from_utf8(serde_json::to_vec(&valid().normalized()).unwrap()).unwrap();
        assert!(
            !canonical.contains("scheduler") && !canonical.contains("loras"),
            "{canonical}"
        );
        // Another sampler, scale, adapter or order is another job.
        let mut c = b.clone();
        c.scheduler = Some("dpmpp_2m".into());
        assert_ne!(c.fingerprint(), b.fingerprint());
        let mut d = b.clone();
        d.loras[0].scale = Some(0.9);
        assert_ne!(d.fingerprint(), b.fingerprint());
        let mut e = b.clone();
        e.loras.push(lora("b", "1", None));
        let mut f = b.clone();
        f.loras.insert(0, lora("b", "1", None));
        assert_ne!(e.fingerprint(), f.fingerprint(), "stack order matters");
    }

    /// Work orders as the schedulers of earlier versions wrote them (captured from that code):
    /// version 1 (`old-1`, flux-dev 512x256, seed 7, label k=v, small) and version 2 (the same
    /// with true CFG 4, negative prompt `blur` and plan `ulysses=2`, medium).
    const V1_ORDER: &str = "01056f6c642d310461636d6508666c75782d64657600056120666f7800800480021c000060400701000001016b017605736d616c6c801c80d095ffbc31";
    const V2_ORDER: &str = "02056f6c642d310461636d6508666c75782d64657600056120666f780104626c7572800480021c000060400701000001016b0176066d656469756d803881d095ffbc31000080400109756c79737365733d32";

    fn unhex(h: &str) -> Vec<u8> {
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn orders_of_every_earlier_version_decode_with_the_models_default_sampler_and_no_loras() {
        let v1 = WorkOrder::decode(&unhex(V1_ORDER)).unwrap();
        assert_eq!(
            (
                v1.job_id.as_str(),
                v1.model.as_str(),
                v1.width,
                v1.height,
                v1.seed
            ),
            ("old-1", "flux-dev", 512, 256, 7)
        );
        assert_eq!((v1.true_cfg_scale, v1.plan.as_deref()), (1.0, None));
        assert_eq!((v1.scheduler.as_str(), v1.loras.len()), ("flow_euler", 0));
        assert_eq!(v1.encode(), unhex(V1_ORDER), "still written as version 1");
        let v2 = WorkOrder::decode(&unhex(V2_ORDER)).unwrap();
        assert_eq!(
            (
                v2.true_cfg_scale,
                v2.plan.as_deref(),
                v2.negative_prompt.as_deref()
            ),
            (4.0, Some("ulysses=2"), Some("blur"))
        );
        assert_eq!((v2.scheduler.as_str(), v2.loras.len()), ("flow_euler", 0));
        assert_eq!(v2.encode(), unhex(V2_ORDER), "still written as version 2");
    }

    #[test]
    fn orders_with_a_sampler_or_loras_use_version_3_and_round_trip() {
        let mut s = sdxl();
        s.scheduler = Some("dpmpp_2m_karras".into());
        s.loras = vec![lora("b", "2", Some(-0.5)), lora("a", "1", None)];
        let w = WorkOrder::from_spec(&s, "medium", 1, 2);
        let bytes = w.encode();
        assert_eq!(bytes[0], 3);
        let back = WorkOrder::decode(&bytes).unwrap();
        assert_eq!(back, w);
        assert_eq!(back.scheduler, "dpmpp_2m_karras");
        assert_eq!(
            back.loras.iter().map(LoraRef::label).collect::<Vec<_>>(),
            ["b@2*-0.5", "a@1*1"]
        );
        // The default sampler alone stays version 1; LoRAs alone need version 3; true CFG and a
        // plan ride along in version 3.
        let plain = WorkOrder::from_spec(&sdxl(), "medium", 1, 2);
        assert_eq!(plain.encode()[0], 1);
        assert_eq!(WorkOrder::decode(&plain.encode()).unwrap(), plain);
        let mut only_lora = valid();
        only_lora.loras = vec![lora("a", "1", None)];
        only_lora.true_cfg_scale = Some(3.0);
        only_lora.negative_prompt = Some("x".into());
        only_lora.plan = Some("cfg=2".into());
        let w = WorkOrder::from_spec(&only_lora, "large", 1, 2);
        assert_eq!(w.encode()[0], 3);
        assert_eq!(WorkOrder::decode(&w.encode()).unwrap(), w);
        // Cut after version 2's part, or one byte short: malformed, never silently older.
        let v2_len = 1
            + postcard::to_stdvec(&w).unwrap().len()
            + postcard::to_stdvec(&WorkOrderV2 {
                true_cfg_scale: w.true_cfg_scale,
                plan: w.plan.clone(),
            })
            .unwrap()
            .len();
        let bytes = w.encode();
        assert!(WorkOrder::decode(&bytes[..v2_len]).is_err());
        assert!(WorkOrder::decode(&bytes[..bytes.len() - 1]).is_err());
        // The DLQ rebuild writes both out.
        let spec = w.to_spec();
        assert_eq!(spec.scheduler.as_deref(), Some("flow_euler"));
        assert_eq!(spec.loras, [lora("a", "1", Some(1.0))]);
        assert_eq!(spec.fingerprint(), only_lora.fingerprint());
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
