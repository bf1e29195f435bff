//! Job status and worker registry in Redis.
//!
//! One hash per job, `{ns}:job:{id}`, with a state machine
//! `queued → routed → running → succeeded | failed | dead_lettered | cancelled` enforced by Lua
//! scripts (each transition names the states it may start from, so two processes can never both
//! win). Every change refreshes the key's TTL. Workers keep `{ns}:worker:{id}` (JSON, TTL = three
//! heartbeats) and their id in the set `{ns}:workers`.

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
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Routed,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::DeadLettered,
        JobState::Cancelled,
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
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::DeadLettered | JobState::Cancelled
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
/// max_attempts, then field/value pairs used to recreate a record Redis lost.
/// Returns {"claimed", attempts} | {"terminal", state} | {"busy", owner, lease_until} |
/// {"exhausted", attempts}.
const CLAIM: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if not st then
  for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
  redis.call('HSET', KEYS[1], 'state', 'routed', 'recovered', '1', 'history', 'routed@' .. ARGV[1] .. ' ')
  st = 'routed'
end
if st == 'succeeded' or st == 'failed' or st == 'dead_lettered' or st == 'cancelled' then return {'terminal', st} end
if st == 'running' then
  local owner = redis.call('HGET', KEYS[1], 'worker') or ''
  local lease = tonumber(redis.call('HGET', KEYS[1], 'lease_until_ms') or '0')
  if owner ~= ARGV[3] and lease > tonumber(ARGV[1]) then return {'busy', owner, tostring(lease)} end
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
local h = redis.call('HGET', KEYS[1], 'history') or ''
if attempts > tonumber(ARGV[5]) then
  redis.call('HSET', KEYS[1], 'state', 'dead_lettered', 'updated_ms', ARGV[1], 'finished_ms', ARGV[1],
    'error', 'gave up after ' .. (attempts - 1) .. ' attempts', 'history', h .. 'dead_lettered@' .. ARGV[1] .. ' ')
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return {'exhausted', tostring(attempts - 1)}
end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[3], 'lease_until_ms', ARGV[4],
  'started_ms', ARGV[1], 'updated_ms', ARGV[1], 'history', h .. 'running@' .. ARGV[1] .. ' ')
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {'claimed', tostring(attempts)}
"#;

/// Creates a queued job unless its id exists, and takes the routing claim (a short lease that lets
/// exactly one delivery route the job). KEYS[1] job key. ARGV: now_ms, ttl_s, fingerprint,
/// routing_lease_ms, then field/value pairs. Returns {"created"}, {"resume"} (same job, work order
/// not yet published, claim lapsed: route it), {"routing"} (another delivery holds the claim) or
/// {"exists", state, fingerprint}.
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
redis.call('HSET', KEYS[1], 'state', 'queued', 'fingerprint', ARGV[3], 'attempts', 0,
  'routing_until_ms', tonumber(ARGV[1]) + tonumber(ARGV[4]),
  'queued_ms', ARGV[1], 'updated_ms', ARGV[1], 'history', 'queued@' .. ARGV[1] .. ' ')
for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {'created'}
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

/// Outcome of [`JobStore::create`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Created {
    /// New job: this delivery routes it.
    Created,
    /// Recorded earlier but never routed (that attempt stopped): this delivery routes it.
    Resume,
    /// Another delivery is routing it right now: retry once its claim may have lapsed.
    RoutingElsewhere { remaining_ms: u64 },
    /// The job exists beyond `queued` (or with other content).
    Exists { state: JobState, fingerprint: String },
}

/// Outcome of [`JobStore::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Claimed { attempts: u32 },
    Terminal(JobState),
    Busy { owner: String, lease_until_ms: u64 },
    Exhausted { attempts: u32 },
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
    pub async fn create(
        &self,
        job_id: &str,
        fingerprint: &str,
        fields: &[(&str, String)],
    ) -> redis::RedisResult<Created> {
        let script = Script::new(CREATE);
        let mut inv = script.key(self.job_key(job_id));
        inv.arg(now_ms())
            .arg(self.ttl_s)
            .arg(fingerprint)
            .arg(ROUTING_LEASE_MS);
        pairs_to_args(&mut inv, fields);
        let mut conn = self.conn.clone();
        let out: Vec<String> = inv.invoke_async(&mut conn).await?;
        match out.first().map(String::as_str) {
            Some("created") => Ok(Created::Created),
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

    /// Claims a job for `worker` with a lease (see the CLAIM script).
    pub async fn claim(
        &self,
        job_id: &str,
        worker: &str,
        lease: Duration,
        max_attempts: u32,
        recreate: &[(&str, String)],
    ) -> redis::RedisResult<Claim> {
        let now = now_ms();
        let script = Script::new(CLAIM);
        let mut inv = script.key(self.job_key(job_id));
        inv.arg(now)
            .arg(self.ttl_s)
            .arg(worker)
            .arg(now + lease.as_millis() as u64)
            .arg(max_attempts);
        pairs_to_args(&mut inv, recreate);
        let mut conn = self.conn.clone();
        let out: Vec<String> = inv.invoke_async(&mut conn).await?;
        let num = |i: usize| out.get(i).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        Ok(match out.first().map(String::as_str) {
            Some("claimed") => Claim::Claimed {
                attempts: num(1) as u32,
            },
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
    /// `ready`, `busy`, `draining`.
    pub state: String,
    pub classes: Vec<String>,
    pub slots: u16,
    pub free_slots: u16,
    pub engine: String,
    pub engine_note: String,
    pub models: Vec<String>,
    pub model_versions: Vec<String>,
    pub devices: Vec<String>,
    pub gpus: Vec<GpuInfo>,
    pub parallel_degree: u32,
    pub jobs_done: u64,
    pub started_ms: u64,
    pub heartbeat_ms: u64,
}

/// One GPU as NVML reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
}
