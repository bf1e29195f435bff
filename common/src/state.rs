//! Job status and worker registry in Redis.
//!
//! One hash per job, `{ns}:job:{id}`, with a state machine
//! `queued → routed → running → succeeded | failed | dead_lettered | cancelled | expired` enforced
//! by Lua scripts (each transition names the states it may start from, so two processes can never
//! both win). Every change refreshes the key's TTL. Workers keep `{ns}:worker:{id}` (JSON, TTL =
//! three heartbeats) and their id in the set `{ns}:workers`. `{ns}:queued:{class}` (sorted set,
//! score = routed time) holds the jobs routed to a class (any priority level or pinned queue) and
//! not yet delivered to a worker, for the queue-age metric.
//!
//! Also here: per-tenant token buckets `{ns}:bucket:{tenant}` (taken atomically with the job's
//! creation), measured step times `{ns}:calib:{model}` (cost-model calibration), the operator's
//! control hashes `{ns}:control:{worker}` / `{ns}:control:fleet` (drain, desired model versions),
//! and the set of model versions ever advertised, `{ns}:model_versions`.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};

use crate::amqp::now_ms;

/// States of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Routed,
    Running,
    Succeeded,
    Failed,
    DeadLettered,
    Cancelled,
    /// Its deadline passed before an attempt could start.
    Expired,
}

impl JobState {
    pub const ALL: [JobState; 8] = [
        JobState::Queued,
        JobState::Routed,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::DeadLettered,
        JobState::Cancelled,
        JobState::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Routed => "routed",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::DeadLettered => "dead_lettered",
            JobState::Cancelled => "cancelled",
            JobState::Expired => "expired",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded
                | JobState::Failed
                | JobState::DeadLettered
                | JobState::Cancelled
                | JobState::Expired
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobState::ALL
            .iter()
            .copied()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown job state {s:?}"))
    }
}

/// Applies a transition if the current state is one of the allowed ones ("-" = key absent).
/// KEYS[1] job key. ARGV: now_ms, ttl_s, to_state, allowed (comma list), required worker ("" = any),
/// then field/value pairs. Returns {applied (0/1), previous state or "-"}.
const TRANSITION: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'state')
local curname = cur or '-'
if not string.find(',' .. ARGV[4] .. ',', ',' .. curname .. ',', 1, true) then return {0, curname} end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[5] then return {0, curname} end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'updated_ms', ARGV[1])
local h = redis.call('HGET', KEYS[1], 'history') or ''
redis.call('HSET', KEYS[1], 'history', h .. ARGV[3] .. '@' .. ARGV[1] .. ' ')
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {1, curname}
"#;

/// Claims a job for a worker. KEYS[1] job key. ARGV: now_ms, ttl_s, worker, lease_until_ms,
/// max_attempts, deadline_ms (0 = none), then field/value pairs used to recreate a record Redis
/// lost. Returns {"claimed", attempts, checkpoint_step, checkpoint_url, checkpoint_plan} |
/// {"terminal", state} | {"busy", owner, lease_until} | {"exhausted", attempts} | {"expired"}.
const CLAIM: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if not st then
  for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('HSET', KEYS[1], 'state', 'routed', 'recovered', '1', 'history', 'routed@' .. ARGV[1] .. ' ')
  st = 'routed'
end
if st == 'succeeded' or st == 'failed' or st == 'dead_lettered' or st == 'cancelled' or st == 'expired' then
  return {'terminal', st}
end
if st == 'running' then
  local owner = redis.call('HGET', KEYS[1], 'worker') or ''
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until_ms') or '0')
  if owner ~= ARGV[3] and lease > tonumber(ARGV[1]) then return {'busy', owner, tostring(lease)} end
end
local h = redis.call('HGET', KEYS[1], 'history') or ''
local deadline = tonumber(ARGV[6])
if deadline > 0 and tonumber(ARGV[1]) > deadline then
  redis.call('HSET', KEYS[1], 'state', 'expired', 'updated_ms', ARGV[1], 'finished_ms', ARGV[1],
    'error', 'deadline passed ' .. (tonumber(ARGV[1]) - deadline) .. ' ms before an attempt could start',
    'history', h .. 'expired@' .. ARGV[1] .. ' ')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {'expired'}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'state', 'dead_lettered', 'updated_ms', ARGV[1], 'finished_ms', ARGV[1],
    'error', 'gave up after ' .. (attempts - 1) .. ' attempts', 'history', h .. 'dead_lettered@' .. ARGV[1] .. ' ')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {'exhausted', tostring(attempts - 1)}
end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[3], 'lease_until_ms', ARGV[4],
  'started_ms', ARGV[1], 'updated_ms', ARGV[1], 'history', h .. 'running@' .. ARGV[1] .. ' ')
redis.call('EXPIRE', KEYS[1], ARGV[2])
local ck = redis.call('HMGET', KEYS[1], 'checkpoint_step', 'checkpoint_url', 'checkpoint_plan')
return {'claimed', tostring(attempts), ck[1] or '', ck[2] or '', ck[3] or ''}
"#;

/// Creates a queued job unless its id exists, and takes the routing claim (a short lease that lets
/// exactly one delivery route the job). A new job first takes a token from its tenant's bucket
/// (KEYS[2]; skipped when the rate is 0); with none left the job is recorded `failed` instead.
/// KEYS[1] job key, KEYS[2] bucket key. ARGV: now_ms, ttl_s, fingerprint, routing_lease_ms,
/// rate (tokens/s), burst, rejection reason prefix, then field/value pairs. Returns {"created"},
/// {"resume"} (same job, work order not yet published, claim lapsed: route it), {"routing"}
/// (another delivery holds the claim), {"exists", state, fingerprint} or
/// {"rate_limited", reason}.
const CREATE: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if st then
  local fp = redis.call('HGET', KEYS[1], 'fingerprint') or ''
  if (st == 'queued' or st == 'routed') and fp == ARGV[3] and redis.call('HGET', KEYS[1], 'published') ~= '1' then
    local ru = tonumber(redis.call('HGET', KEYS[1], 'routing_until_ms') or '0')
    if ru > tonumber(ARGV[1]) then return {'routing', tostring(ru - tonumber(ARGV[1]))} end
    redis.call('HSET', KEYS[1], 'routing_until_ms', tonumber(ARGV[1]) + tonumber(ARGV[4]))
    return {'resume'}
  end
  return {'exists', st, fp}
end
local now = tonumber(ARGV[1])
local rate = tonumber(ARGV[5])
if rate > 0 then
  local burst = tonumber(ARGV[6])
  local b = redis.call('HMGET', KEYS[2], 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate / 1000) end
  local keep = math.ceil(burst / rate) + 60
  if tokens < 1 then
    redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'ts', tostring(now))
    redis.call('EXPIRE', KEYS[2], keep)
    local wait = math.ceil((1 - tokens) * 1000 / rate)
    local reason = ARGV[7] .. '; a token is free again in ' .. wait .. ' ms'
    redis.call('HSET', KEYS[1], 'state', 'failed', 'fingerprint', ARGV[3], 'attempts', 0,
      'error', reason, 'rejected_by', 'scheduler', 'rejection', 'rate_limited',
      'queued_ms', ARGV[1], 'updated_ms', ARGV[1], 'finished_ms', ARGV[1], 'history', 'failed@' .. ARGV[1] .. ' ')
    for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
    redis.call('EXPIRE', KEYS[1], ARGV[2])
    return {'rate_limited', reason}
  end
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - 1), 'ts', tostring(now))
  redis.call('EXPIRE', KEYS[2], keep)
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'fingerprint', ARGV[3], 'attempts', 0,
  'routing_until_ms', tonumber(ARGV[1]) + tonumber(ARGV[4]),
  'queued_ms', ARGV[1], 'updated_ms', ARGV[1], 'history', 'queued@' .. ARGV[1] .. ' ')
for i = 8, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {'created'}
"#;

/// Sets fields of a job only while `worker` runs it. KEYS[1]; ARGV: worker, then field/value
/// pairs. Returns 1 if applied.
const SET_IF_OWNER: &str = r#"
if redis.call('HGET', KEYS[1], 'state') ~= 'running' or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[1] then
  return 0
end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"#;

/// Takes the right to publish a settled job's terminal event. KEYS[1] job key. ARGV: claimant
/// (`<worker>#<n>`, one per delivery being handled, so two deliveries of the same job on one
/// worker do not both publish), now_ms, lease_until_ms, the worker-registration key prefix
/// (`{ns}:worker:`). Returns {"published"} (already out), {"claimed"}, or {"held", owner, until}
/// while another claimant of a live worker holds an unexpired claim (a dead worker's registration
/// expires, and its claims with it).
const CLAIM_EVENT: &str = r#"
if redis.call('HGET', KEYS[1], 'event_published') == '1' then return {'published'} end
local owner = redis.call('HGET', KEYS[1], 'event_owner')
local untl = tonumber(redis.call('HGET', KEYS[1], 'event_until_ms') or '0')
if owner and owner ~= ARGV[1] and untl > tonumber(ARGV[2])
   and redis.call('EXISTS', ARGV[4] .. string.match(owner, '^[^#]*')) == 1 then
  return {'held', owner, tostring(untl)}
end
redis.call('HSET', KEYS[1], 'event_owner', ARGV[1], 'event_until_ms', ARGV[3])
return {'claimed'}
"#;

/// Folds a measurement into an exponentially weighted mean. KEYS[1] hash; ARGV: field, value,
/// weight of the new value. Returns the new mean.
const EWMA: &str = r#"
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]))
local x = tonumber(ARGV[2])
local v = x
if old then v = old * (1 - tonumber(ARGV[3])) + x * tonumber(ARGV[3]) end
redis.call('HSET', KEYS[1], ARGV[1], tostring(v))
return tostring(v)
"#;

/// Renews a running job's lease if this worker still owns it. KEYS[1]; ARGV: worker, lease_until.
/// Returns the job's state.
const RENEW: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if st == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'lease_until_ms', ARGV[2])
end
return st or '-'
"#;

/// How long one delivery may hold the right to route a job before another copy may take over.
pub const ROUTING_LEASE_MS: u64 = 10_000;

/// A tenant's token bucket: `rate` jobs per second refill it up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub rate: f64,
    pub burst: f64,
}

/// Outcome of [`JobStore::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// The tenant's bucket is empty: the job was recorded `failed` with this reason.
    RateLimited { reason: String },
    /// New job: this delivery routes it.
    Created,
    /// Recorded earlier but never routed (that attempt stopped): this delivery routes it.
    Resume,
    /// Another delivery is routing it right now: retry once its claim may have lapsed.
    RoutingElsewhere { remaining_ms: u64 },
    /// The job exists beyond `queued` (or with other content).
    Exists { state: JobState, fingerprint: String },
}

/// A claimant id for [`JobStore::claim_event`] (and the `event_owner` a finishing worker records):
/// `<worker>#<n>`, unique per call in this process, so that the task that finished a job and a
/// redelivered copy of the same job on the same worker are different claimants.
pub fn event_claimant(worker: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    format!(
        "{worker}#{}",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Outcome of [`JobStore::claim_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventClaim {
    Published,
    Claimed,
    Held { owner: String, until_ms: u64 },
}

/// Outcome of [`JobStore::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Claimed {
        attempts: u32,
        /// The job's last step checkpoint, if an earlier attempt saved one.
        checkpoint: Option<CheckpointRef>,
    },
    /// Past its deadline: recorded `expired`.
    Expired,
    Terminal(JobState),
    Busy {
        owner: String,
        lease_until_ms: u64,
    },
    Exhausted {
        attempts: u32,
    },
}

/// Where a job's last step checkpoint is (fields `checkpoint_step`, `checkpoint_url`,
/// `checkpoint_plan` of its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRef {
    pub step: u32,
    pub url: String,
    /// What the checkpoint is valid for (model version, size, steps, seed, prompt digest...): an
    /// attempt resumes from it only with the same plan.
    pub plan: String,
}

/// Redis access for job status and the worker registry.
#[derive(Clone)]
pub struct JobStore {
    conn: ConnectionManager,
    ns: String,
    ttl_s: u64,
}

impl fmt::Debug for JobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobStore").field("ns", &self.ns).finish()
    }
}

fn pairs_to_args(inv: &mut redis::ScriptInvocation<'_>, fields: &[(&str, String)]) {
    for (k, v) in fields {
        inv.arg(*k).arg(v);
    }
}

impl JobStore {
    /// Connects (the connection manager reconnects on its own after Redis restarts).
    pub async fn connect(url: &str, ns: &str, ttl: Duration) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Self {
            conn,
            ns: ns.to_string(),
            ttl_s: ttl.as_secs().max(1),
        })
    }

    /// [`JobStore::connect`] with TLS settings: for `rediss://`, the CA certificates in `ca_file`
    /// (PEM) are trusted instead of the system roots.
    pub async fn connect_tls(
        url: &str,
        ns: &str,
        ttl: Duration,
        ca_file: Option<&std::path::Path>,
    ) -> redis::RedisResult<Self> {
        let Some(ca) = ca_file else {
            return Self::connect(url, ns, ttl).await;
        };
        let root = std::fs::read(ca).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::Io,
                "reading the Redis CA file",
                format!("{}: {e}", ca.display()),
            ))
        })?;
        let client = redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root),
            },
        )?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Self {
            conn,
            ns: ns.to_string(),
            ttl_s: ttl.as_secs().max(1),
        })
    }

    /// Connects with the service's configured URL, namespace, TTL and TLS settings.
    pub async fn connect_cfg(cfg: &crate::config::CommonConfig) -> redis::RedisResult<Self> {
        Self::connect_tls(
            &cfg.redis_url,
            &cfg.namespace,
            cfg.job_ttl,
            cfg.redis_ca_file.as_deref(),
        )
        .await
    }

    pub fn job_key(&self, job_id: &str) -> String {
        format!("{}:job:{job_id}", self.ns)
    }

    fn worker_key(&self, worker_id: &str) -> String {
        format!("{}:worker:{worker_id}", self.ns)
    }

    fn workers_set(&self) -> String {
        format!("{}:workers", self.ns)
    }

    /// Records a new job as `queued`, or reports the existing one (idempotency on `job_id`).
    /// With `limit`, a new job takes a token from `tenant`'s bucket first (see the CREATE script).
    pub async fn create(
        &self,
        job_id: &str,
        fingerprint: &str,
        fields: &[(&str, String)],
        tenant: &str,
        limit: Option<RateLimit>,
    ) -> redis::RedisResult<Created> {
        let script = Script::new(CREATE);
        let mut inv = script.key(self.job_key(job_id));
        let (rate, burst) = limit.map(|l| (l.rate, l.burst)).unwrap_or((0.0, 0.0));
        inv.key(format!("{}:bucket:{tenant}", self.ns))
            .arg(now_ms())
            .arg(self.ttl_s)
            .arg(fingerprint)
            .arg(ROUTING_LEASE_MS)
            .arg(rate.to_string())
            .arg(burst.to_string())
            .arg(format!(
                "rate limited: tenant {tenant:?} is over its limit of {rate} jobs/s (burst {burst})"
            ));
        pairs_to_args(&mut inv, fields);
        let mut conn = self.conn.clone();
        let out: Vec<String> = inv.invoke_async(&mut conn).await?;
        match out.first().map(String::as_str) {
            Some("created") => Ok(Created::Created),
            Some("rate_limited") => Ok(Created::RateLimited {
                reason: out.get(1).cloned().unwrap_or_default(),
            }),
            Some("resume") => Ok(Created::Resume),
            Some("routing") => Ok(Created::RoutingElsewhere {
                remaining_ms: out
                    .get(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(ROUTING_LEASE_MS),
            }),
            _ => Ok(Created::Exists {
                state: out
                    .get(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(JobState::Queued),
                fingerprint: out.get(2).cloned().unwrap_or_default(),
            }),
        }
    }

    /// Moves a job to `to` if it is in one of `from` (`None` in `from` = the job does not exist
    /// yet) and, with `owner`, only if that worker holds it. Returns whether it applied and the
    /// previous state.
    pub async fn transition(
        &self,
        job_id: &str,
        from: &[Option<JobState>],
        to: JobState,
        owner: Option<&str>,
        fields: &[(&str, String)],
    ) -> redis::RedisResult<(bool, Option<JobState>)> {
        let allowed: Vec<&str> = from
            .iter()
            .map(|s| s.map(JobState::as_str).unwrap_or("-"))
            .collect();
        let script = Script::new(TRANSITION);
        let mut inv = script.key(self.job_key(job_id));
        inv.arg(now_ms())
            .arg(self.ttl_s)
            .arg(to.as_str())
            .arg(allowed.join(","))
            .arg(owner.unwrap_or(""));
        pairs_to_args(&mut inv, fields);
        let mut conn = self.conn.clone();
        let (applied, prev): (i64, String) = inv.invoke_async(&mut conn).await?;
        Ok((applied == 1, prev.parse().ok()))
    }

    /// Claims a job for `worker` with a lease (see the CLAIM script). A job past `deadline_ms`
    /// becomes `expired` instead.
    pub async fn claim(
        &self,
        job_id: &str,
        worker: &str,
        lease: Duration,
        max_attempts: u32,
        deadline_ms: Option<u64>,
        recreate: &[(&str, String)],
    ) -> redis::RedisResult<Claim> {
        let now = now_ms();
        let script = Script::new(CLAIM);
        let mut inv = script.key(self.job_key(job_id));
        inv.arg(now)
            .arg(self.ttl_s)
            .arg(worker)
            .arg(now + lease.as_millis() as u64)
            .arg(max_attempts)
            .arg(deadline_ms.unwrap_or(0));
        pairs_to_args(&mut inv, recreate);
        let mut conn = self.conn.clone();
        let out: Vec<String> = inv.invoke_async(&mut conn).await?;
        let num = |i: usize| out.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        Ok(match out.first().map(String::as_str) {
            Some("claimed") => Claim::Claimed {
                attempts: num(1) as u32,
                checkpoint: match (out.get(2), out.get(3), out.get(4)) {
                    (Some(step), Some(url), Some(plan)) if !url.is_empty() => {
                        step.parse().ok().map(|step| CheckpointRef {
                            step,
                            url: url.clone(),
                            plan: plan.clone(),
                        })
                    }
                    _ => None,
                },
            },
            Some("expired") => Claim::Expired,
            Some("terminal") => Claim::Terminal(
                out.get(1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(JobState::Failed),
            ),
            Some("busy") => Claim::Busy {
                owner: out.get(1).cloned().unwrap_or_default(),
                lease_until_ms: num(2),
            },
            _ => Claim::Exhausted {
                attempts: num(1) as u32,
            },
        })
    }

    /// Extends the lease of a job this worker runs; returns the job's current state.
    pub async fn renew(
        &self,
        job_id: &str,
        worker: &str,
        lease: Duration,
    ) -> redis::RedisResult<Option<JobState>> {
        let script = Script::new(RENEW);
        let mut conn = self.conn.clone();
        let st: String = script
            .key(self.job_key(job_id))
            .arg(worker)
            .arg(now_ms() + lease.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(st.parse().ok())
    }

    /// Sets fields only while `worker` runs the job; returns whether it applied.
    pub async fn set_if_owner(
        &self,
        job_id: &str,
        worker: &str,
        fields: &[(&str, String)],
    ) -> redis::RedisResult<bool> {
        let script = Script::new(SET_IF_OWNER);
        let mut inv = script.key(self.job_key(job_id));
        inv.arg(worker);
        pairs_to_args(&mut inv, fields);
        let mut conn = self.conn.clone();
        let applied: i64 = inv.invoke_async(&mut conn).await?;
        Ok(applied == 1)
    }

    /// Takes the right to publish a settled job's terminal event for `lease` (see CLAIM_EVENT):
    /// exactly one claimant (`<worker id>#<n>`, see [`event_claimant`]) of a live worker publishes
    /// it, a dead worker's claim passes on.
    pub async fn claim_event(
        &self,
        job_id: &str,
        worker: &str,
        lease: Duration,
    ) -> redis::RedisResult<EventClaim> {
        let now = now_ms();
        let mut conn = self.conn.clone();
        let out: Vec<String> = Script::new(CLAIM_EVENT)
            .key(self.job_key(job_id))
            .arg(worker)
            .arg(now)
            .arg(now + lease.as_millis() as u64)
            .arg(format!("{}:worker:", self.ns))
            .invoke_async(&mut conn)
            .await?;
        Ok(match out.first().map(String::as_str) {
            Some("published") => EventClaim::Published,
            Some("held") => EventClaim::Held {
                owner: out.get(1).cloned().unwrap_or_default(),
                until_ms: out.get(2).and_then(|s| s.parse().ok()).unwrap_or(0),
            },
            _ => EventClaim::Claimed,
        })
    }

    /// Removes fields (e.g. a checkpoint pointer once the job is done).
    pub async fn del_fields(&self, job_id: &str, fields: &[&str]) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let _: () = conn.hdel(self.job_key(job_id), fields).await?;
        Ok(())
    }

    /// Folds a measured denoising step time (ms) of `model` at `tokens` image tokens into the
    /// fleet's calibration (an exponentially weighted mean, weight 0.2 for the new value).
    pub async fn record_step_time(
        &self,
        model: &str,
        tokens: u64,
        ms_per_step: f64,
    ) -> redis::RedisResult<()> {
        if !ms_per_step.is_finite() || ms_per_step < 0.0 {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let _: String = Script::new(EWMA)
            .key(format!("{}:calib:{model}", self.ns))
            .arg(tokens)
            .arg(ms_per_step.to_string())
            .arg("0.2")
            .invoke_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Measured ms per step of `model` by image tokens, ascending.
    pub async fn step_times(&self, model: &str) -> redis::RedisResult<Vec<(u64, f64)>> {
        let mut conn = self.conn.clone();
        let h: HashMap<String, String> = conn.hgetall(format!("{}:calib:{model}", self.ns)).await?;
        let mut v: Vec<(u64, f64)> = h
            .iter()
            .filter_map(|(k, v)| Some((k.parse().ok()?, v.parse().ok()?)))
            .collect();
        v.sort_by_key(|(t, _)| *t);
        Ok(v)
    }

    fn control_key(&self, worker: Option<&str>) -> String {
        match worker {
            Some(w) => format!("{}:control:{w}", self.ns),
            None => format!("{}:control:fleet", self.ns),
        }
    }

    /// Sets an operator control field for one worker (`Some`) or the whole fleet (`None`).
    pub async fn control_set(
        &self,
        worker: Option<&str>,
        field: &str,
        value: &str,
    ) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let _: () = conn.hset(self.control_key(worker), field, value).await?;
        Ok(())
    }

    pub async fn control_del(&self, worker: Option<&str>, field: &str) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let _: () = conn.hdel(self.control_key(worker), field).await?;
        Ok(())
    }

    /// A worker's control fields merged over the fleet's (the worker's own win).
    pub async fn control(&self, worker: &str) -> redis::RedisResult<HashMap<String, String>> {
        let mut conn = self.conn.clone();
        let (fleet, own): (HashMap<String, String>, HashMap<String, String>) = redis::pipe()
            .hgetall(self.control_key(None))
            .hgetall(self.control_key(Some(worker)))
            .query_async(&mut conn)
            .await?;
        let mut out = fleet;
        out.extend(own);
        Ok(out)
    }

    /// Records model versions a worker holds (`flux-dev@v2`), so pins to them are accepted.
    pub async fn add_known_versions(&self, versions: &[String]) -> redis::RedisResult<()> {
        if versions.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn.clone();
        let _: () = conn.sadd(format!("{}:model_versions", self.ns), versions).await?;
        Ok(())
    }

    /// Whether any worker of the fleet has ever held `model_version`.
    pub async fn is_known_version(&self, model_version: &str) -> redis::RedisResult<bool> {
        let mut conn = self.conn.clone();
        conn.sismember(format!("{}:model_versions", self.ns), model_version)
            .await
    }

    /// The models any worker of the fleet has ever held a version of.
    pub async fn known_models(&self) -> redis::RedisResult<std::collections::BTreeSet<String>> {
        let mut conn = self.conn.clone();
        let all: Vec<String> = conn.smembers(format!("{}:model_versions", self.ns)).await?;
        Ok(all
            .iter()
            .filter_map(|mv| mv.split_once('@').map(|(m, _)| m.to_string()))
            .collect())
    }

    /// Sets fields without a state change (progress, timings).
    pub async fn set_fields(&self, job_id: &str, fields: &[(&str, String)]) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let items: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let _: () = conn.hset_multiple(self.job_key(job_id), &items).await?;
        Ok(())
    }

    /// The job's hash (empty if unknown or expired).
    pub async fn get(&self, job_id: &str) -> redis::RedisResult<HashMap<String, String>> {
        let mut conn = self.conn.clone();
        conn.hgetall(self.job_key(job_id)).await
    }

    pub async fn state(&self, job_id: &str) -> redis::RedisResult<Option<JobState>> {
        let mut conn = self.conn.clone();
        let s: Option<String> = conn.hget(self.job_key(job_id), "state").await?;
        Ok(s.and_then(|s| s.parse().ok()))
    }

    fn queued_key(&self, class: &str) -> String {
        format!("{}:queued:{class}", self.ns)
    }

    /// Notes that `job_id` was routed to `class` at `routed_ms` and waits for a worker (a sorted
    /// set per class, for the age of the oldest waiting job). Call before publishing the order.
    pub async fn mark_queued(&self, class: &str, job_id: &str, routed_ms: u64) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let _: () = conn.zadd(self.queued_key(class), job_id, routed_ms).await?;
        Ok(())
    }

    /// A worker got the job's order: it no longer waits in the queue.
    pub async fn unmark_queued(&self, class: &str, job_id: &str) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let _: () = conn.zrem(self.queued_key(class), job_id).await?;
        Ok(())
    }

    /// When the oldest job still waiting in `class` was routed (ms since the epoch). Entries older
    /// than the job TTL (orders the broker dropped) are pruned first.
    pub async fn oldest_queued(&self, class: &str) -> redis::RedisResult<Option<u64>> {
        let mut conn = self.conn.clone();
        let key = self.queued_key(class);
        let horizon = now_ms().saturating_sub(self.ttl_s * 1000);
        let _: () = conn.zrembyscore(&key, 0, horizon as f64).await?;
        let first: Vec<(String, f64)> = conn.zrange_withscores(&key, 0, 0).await?;
        Ok(first.first().map(|(_, score)| *score as u64))
    }

    /// Writes a worker's registration with a TTL of `ttl`.
    pub async fn register_worker(
        &self,
        worker_id: &str,
        info_json: &str,
        ttl: Duration,
    ) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let _: () = redis::pipe()
            .atomic()
            .set_ex(self.worker_key(worker_id), info_json, ttl.as_secs().max(1))
            .sadd(self.workers_set(), worker_id)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    pub async fn deregister_worker(&self, worker_id: &str) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let _: () = redis::pipe()
            .atomic()
            .del(self.worker_key(worker_id))
            .srem(self.workers_set(), worker_id)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }

    /// Live workers' registrations (JSON); ids whose key expired are pruned from the set.
    pub async fn workers(&self) -> redis::RedisResult<Vec<(String, String)>> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = conn.smembers(self.workers_set()).await?;
        let mut out = Vec::new();
        for id in ids {
            let v: Option<String> = conn.get(self.worker_key(&id)).await?;
            match v {
                Some(v) => out.push((id, v)),
                None => {
                    let _: () = conn.srem(self.workers_set(), &id).await?;
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

/// What a worker advertises in its registration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// `ready`, `busy`, `draining`, `degraded` (serving with reduced capacity).
    pub state: String,
    pub classes: Vec<String>,
    pub slots: u16,
    pub free_slots: u16,
    pub engine: String,
    pub engine_note: String,
    pub models: Vec<String>,
    /// Every model version held (`flux-dev@v2`).
    pub model_versions: Vec<String>,
    /// The numeric precision each held version computes in (`flux-dev@v2` → `fp8`), as its
    /// engine reports it: `bf16` or `fp8`. Empty from workers older than the field (their
    /// versions are bf16).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub model_precisions: std::collections::BTreeMap<String, String>,
    /// The version serving unpinned jobs, per model (`flux-dev@v2`).
    #[serde(default)]
    pub default_versions: Vec<String>,
    /// Versions being loaded now.
    #[serde(default)]
    pub loading: Vec<String>,
    /// The last model load that failed, with its reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_error: Option<String>,
    /// Why the worker is degraded (`state` = `degraded`), e.g. a quarantined GPU; its capacity is
    /// then `free_slots`/`slots` as advertised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub degraded_reason: Option<String>,
    pub devices: Vec<String>,
    pub gpus: Vec<GpuInfo>,
    pub parallel_degree: u32,
    pub jobs_done: u64,
    pub started_ms: u64,
    pub heartbeat_ms: u64,
    /// LoRA stacks its engines hold applied now ([`crate::lora::stack_key`], one per engine that
    /// holds a non-empty stack): the scheduler's affinity prefers this worker for jobs of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lora_stacks: Vec<String>,
    /// Adapters (`name@version`) held in its engines' caches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lora_cached: Vec<String>,
    /// Whether it takes jobs from its LoRA affinity queue (`{ns}.work.affinity.<id>`); the
    /// scheduler sends affinity jobs only to workers that do (older workers do not).
    #[serde(default)]
    pub affinity_queue: bool,
}

/// One GPU as NVML reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
}
