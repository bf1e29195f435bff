//! Strategy selection: which plan serves a request fastest on this node.
//!
//! On first start a node measures every valid plan for its devices at a few image sizes
//! ([`autotune`]) and keeps the table on disk ([`PlanTable::save`]), keyed by what the timings
//! depend on (devices, model, engine version: [`PlanTable::node`]). Later starts load it
//! ([`PlanTable::load`]) unless that key changed. Per request, [`PlanTable::best`] picks the
//! fastest measured plan at the nearest measured size that fits the devices still healthy; a job
//! may name its own plan instead, and the configuration may fix one.

use std::path::Path;
use std::time::{Duration, Instant};

use super::plan::Plan;
use super::rank::ParallelLeader;
use super::resilient::ResilientParallel;
use crate::{Control, Engine, EngineError, GenerateRequest};

/// Bumped when the table's meaning changes; older tables are measured again.
pub const TABLE_FORMAT: u32 = 1;

/// One plan's measurement at one size.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Measured {
    /// The plan, in its text form (`ulysses=2`).
    pub plan: String,
    /// Devices the plan uses.
    pub devices: usize,
    /// Median time of a denoising step after the warm-up steps, in ms; `None` if it failed.
    pub ms_per_step: Option<f64>,
    /// Why the plan could not run at this size (e.g. out of memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every plan measured at one image size.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SizeEntry {
    pub width: u32,
    pub height: u32,
    pub results: Vec<Measured>,
}

impl SizeEntry {
    fn tokens(&self) -> f64 {
        f64::from(self.width / 16) * f64::from(self.height / 16)
    }
}

/// The node's measured plans (see the module docs).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlanTable {
    pub format: u32,
    /// What the measurements depend on: a table for another key is measured again.
    pub node: String,
    /// Seconds since the Unix epoch when it was measured.
    pub measured_at: u64,
    /// Denoising steps each measurement ran (the first ones warm up and are not counted).
    pub steps: u32,
    pub sizes: Vec<SizeEntry>,
}

impl PlanTable {
    /// The key of a node: its devices (e.g. `2x NVIDIA H200` or `4x cpu`), the model's identity
    /// and this engine's version.
    pub fn node(devices: &str, model: &str) -> String {
        format!(
            "{devices} | {model} | ditfleet-engine {}",
            env!("CARGO_PKG_VERSION")
        )
    }

    /// Loads the table at `path` if it was measured for `node` in this format. A missing file is
    /// `Ok(None)`; another node's, an older format's or an unreadable one is `Ok(None)` with the
    /// reason logged (it is measured again and replaced).
    pub fn load(path: &Path, node: &str) -> Result<Option<Self>, EngineError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(EngineError::Load(format!("plan table {}: {e}", path.display())));
            }
        };
        let table: PlanTable = match serde_json::from_slice(&bytes) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "plan table unreadable; measuring again");
                return Ok(None);
            }
        };
        if table.format != TABLE_FORMAT || table.node != node {
            tracing::info!(path = %path.display(), cached_node = %table.node, node = %node, cached_format = table.format, "plan table is for another node, model or engine version; measuring again");
            return Ok(None);
        }
        Ok(Some(table))
    }

    /// Writes the table to `path` atomically (a temporary file renamed over it), creating the
    /// directory.
    pub fn save(&self, path: &Path) -> Result<(), EngineError> {
        let io = |e: std::io::Error| EngineError::Load(format!("plan table {}: {e}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let body = serde_json::to_vec_pretty(self).expect("plan table serialises");
        std::fs::write(&tmp, body).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// The fastest measured plan for a `width` x `height` image that uses at most `max_devices`
    /// devices, at the measured size nearest in image tokens (on a log scale); with `true_cfg`
    /// false, plans with a CFG-parallel degree are skipped (their second branch would idle).
    pub fn best(&self, width: u32, height: u32, max_devices: usize, true_cfg: bool) -> Option<Plan> {
        let tokens = (f64::from(width / 16) * f64::from(height / 16)).max(1.0);
        let mut sizes: Vec<&SizeEntry> = self.sizes.iter().collect();
        sizes.sort_by(|a, b| {
            let da = (a.tokens().max(1.0) / tokens).ln().abs();
            let db = (b.tokens().max(1.0) / tokens).ln().abs();
            da.total_cmp(&db)
        });
        for size in sizes {
            let best = size
                .results
                .iter()
                .filter(|m| m.devices <= max_devices)
                .filter_map(|m| Some((m.ms_per_step?, m.plan.parse::<Plan>().ok()?)))
                .filter(|(_, p)| true_cfg || p.cfg == 1)
                .min_by(|a, b| a.0.total_cmp(&b.0));
            if let Some((_, plan)) = best {
                return Some(plan);
            }
        }
        None
    }
}

/// What [`autotune`] reports as it goes.
#[derive(Debug, Clone)]
pub struct TuneProgress<'a> {
    /// 1-based index of this measurement and how many there are.
    pub index: usize,
    pub total: usize,
    pub width: u32,
    pub height: u32,
    pub result: &'a Measured,
}

/// Measures every candidate plan for the engine's healthy devices at each of `sizes`:
/// `warmup + timed` denoising steps of a `model` request per plan and size, the median of the
/// timed steps kept. A plan that fails at a size (e.g. out of memory) is recorded with its error
/// and the next one is measured. Leaves the engine on the plan it started with.
pub fn autotune<L: ParallelLeader>(
    engine: &mut ResilientParallel<L>,
    model: &str,
    node: &str,
    sizes: &[(u32, u32)],
    warmup: u32,
    timed: u32,
    on_progress: &mut dyn FnMut(TuneProgress<'_>),
) -> Result<PlanTable, EngineError> {
    let start_plan = engine.plan();
    let devices = engine.healthy_devices();
    let mut candidates = vec![Plan::SINGLE];
    for n in 2..=devices {
        candidates.extend(engine.splits().candidates(n));
    }
    let total = candidates.len() * sizes.len();
    let mut index = 0;
    let mut table = PlanTable {
        format: TABLE_FORMAT,
        node: node.to_string(),
        measured_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        steps: warmup + timed,
        sizes: Vec::new(),
    };
    // Plan-major: each plan is built once and measured at every size (a switch re-replicates the
    // weights, and after PipeFusion reloads the leader).
    let mut per_size: Vec<Vec<Measured>> = vec![Vec::new(); sizes.len()];
    for plan in &candidates {
        for (k, &(width, height)) in sizes.iter().enumerate() {
            index += 1;
            let steps = warmup.max(plan.warmup_steps as u32) + timed.max(1);
            let request = GenerateRequest {
                model: model.to_string(),
                prompt: "autotune".into(),
                negative_prompt: None,
                width,
                height,
                steps,
                guidance: 3.5,
                true_cfg_scale: 1.0,
                seed: 0,
                plan: Some(plan.to_string()),
                scheduler: None,
                loras: Vec::new(),
            };
            let mut ends = Vec::new();
            let t0 = Instant::now();
            let outcome = engine.generate(&request, &mut |ev| {
                ends.push(ev.elapsed);
                Control::Continue
            });
            let m = match outcome {
                Ok(_) => {
                    let skip = steps.saturating_sub(timed.max(1)) as usize;
                    let mut per: Vec<Duration> = ends
                        .windows(2)
                        .map(|w| w[1].saturating_sub(w[0]))
                        .skip(skip.saturating_sub(1))
                        .collect();
                    per.sort();
                    let ms = per
                        .get(per.len() / 2)
                        .copied()
                        .unwrap_or_else(|| t0.elapsed() / steps)
                        .as_secs_f64()
                        * 1e3;
                    Measured {
                        plan: plan.to_string(),
                        devices: plan.world(),
                        ms_per_step: Some(ms),
                        error: None,
                    }
                }
                Err(e) => Measured {
                    plan: plan.to_string(),
                    devices: plan.world(),
                    ms_per_step: None,
                    error: Some(e.to_string()),
                },
            };
            on_progress(TuneProgress {
                index,
                total,
                width,
                height,
                result: &m,
            });
            per_size[k].push(m);
        }
    }
    for (&(width, height), results) in sizes.iter().zip(per_size) {
        table.sizes.push(SizeEntry {
            width,
            height,
            results,
        });
    }
    if let Some(p) = start_plan {
        engine.set_plan(p)?;
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(plan: &str, ms: Option<f64>) -> Measured {
        let p: Plan = plan.parse().unwrap();
        Measured {
            plan: plan.into(),
            devices: p.world(),
            ms_per_step: ms,
            error: ms.is_none().then(|| "out of memory".into()),
        }
    }

    fn table() -> PlanTable {
        PlanTable {
            format: TABLE_FORMAT,
            node: "n".into(),
            measured_at: 0,
            steps: 4,
            sizes: vec![
                SizeEntry {
                    width: 512,
                    height: 512,
                    results: vec![
                        m("single", Some(10.0)),
                        m("ulysses=2", Some(12.0)),
                        m("cfg=2", Some(6.0)),
                    ],
                },
                SizeEntry {
                    width: 2048,
                    height: 2048,
                    results: vec![
                        m("single", None),
                        m("ulysses=2", Some(90.0)),
                        m("pipefusion=2", Some(70.0)),
                        m("ulysses=4", Some(40.0)),
                    ],
                },
            ],
        }
    }

    #[test]
    fn best_plan_is_the_fastest_at_the_nearest_measured_size_that_fits_the_healthy_devices() {
        let t = table();
        // Small image: single wins (cfg=2 is faster but only for true-CFG requests).
        assert_eq!(t.best(512, 512, 4, false), Some(Plan::SINGLE));
        assert_eq!(t.best(512, 512, 4, true).unwrap().to_string(), "cfg=2");
        // 1536² is nearer 2048² than 512² on a log scale of tokens.
        assert_eq!(t.best(1536, 1536, 4, false).unwrap().to_string(), "ulysses=4");
        // With one device quarantined, the 4-device plan no longer fits.
        assert_eq!(
            t.best(2048, 2048, 3, false).unwrap().to_string(),
            "pipefusion=2,patches=2,warmup=1"
        );
        // Single failed at 2048² (out of memory): with one device left nothing measured fits
        // there, so the nearest size with a fitting result answers.
        assert_eq!(t.best(2048, 2048, 1, false), Some(Plan::SINGLE));
    }

    #[test]
    fn a_table_round_trips_through_disk_and_another_nodes_table_is_ignored() {
        let dir = std::env::temp_dir().join(format!("ditfleet-plan-table-{}", std::process::id()));
        let path = dir.join("sub").join("plans.json");
        let t = table();
        t.save(&path).unwrap();
        assert_eq!(PlanTable::load(&path, "n").unwrap(), Some(t));
        assert_eq!(PlanTable::load(&path, "other node").unwrap(), None);
        std::fs::write(&path, b"{ not json").unwrap();
        assert_eq!(PlanTable::load(&path, "n").unwrap(), None);
        assert_eq!(PlanTable::load(&dir.join("missing.json"), "n").unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
