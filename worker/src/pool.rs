//! The worker's engines by model version, and hot swaps between versions.
//!
//! Every loaded engine serves one `model@version`. A job takes an idle engine of its pinned version,
//! or of its model's *default* version when unpinned, and gives it back when done. A swap
//! ([`EnginePool::reconcile`]) loads the new version (next to the old one, or, in
//! [`SwapMode::Drain`], after the old one's running jobs finished and it was unloaded), switches
//! the default under the pool's lock — so every job runs entirely on one version and none fails —
//! and unloads the old version: idle engines at once, busy ones when their job gives them back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use ditfleet_common::config::SwapMode;
use ditfleet_engine::{Engine, EngineError, EngineInfo, Precision};
use tokio::sync::Notify;
use tracing::{info, warn};

/// Builds the engines of one model version (on a blocking thread).
pub type Builder = Arc<dyn Fn(&str, &str) -> Result<Vec<Box<dyn Engine>>, EngineError> + Send + Sync>;

/// An engine taken from the pool for one job.
pub struct Taken {
    pub model: String,
    pub version: String,
    pub engine: Box<dyn Engine>,
}

impl Taken {
    pub fn model_version(&self) -> String {
        format!("{}@{}", self.model, self.version)
    }
}

/// Why no engine can be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    #[error("this worker holds no version of model {0:?}")]
    ModelNotServed(String),
    #[error("this worker does not hold {0} (it was unloaded)")]
    VersionNotHeld(String),
}

#[derive(Default)]
struct State {
    idle: Vec<Taken>,
    in_use: HashMap<String, usize>,
    held: BTreeSet<String>,
    /// The precision each held version's engines report.
    precisions: BTreeMap<String, Precision>,
    default: BTreeMap<String, String>,
    loading: BTreeSet<String>,
    load_error: Option<String>,
}

/// Model versions a worker holds, as it advertises them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Holdings {
    pub held: Vec<String>,
    /// Each held version's precision (`flux-dev@v2` → `fp8`).
    pub precisions: BTreeMap<String, String>,
    pub defaults: Vec<String>,
    pub loading: Vec<String>,
    pub load_error: Option<String>,
}

/// See the module docs.
pub struct EnginePool {
    state: Mutex<State>,
    notify: Notify,
    builder: Builder,
    mode: SwapMode,
    /// Engine description of the first engine loaded (kind, devices, note).
    pub info: EngineInfo,
}

fn split(mv: &str) -> (&str, &str) {
    mv.split_once('@').unwrap_or((mv, ""))
}

impl EnginePool {
    /// A pool of already-built engines; the first version seen per model is its default.
    pub fn new(engines: Vec<Box<dyn Engine>>, builder: Builder, mode: SwapMode) -> Self {
        let info = engines.first().map(|e| e.info()).unwrap_or_else(|| EngineInfo {
            kind: "none".into(),
            models: vec![],
            model_versions: vec![],
            devices: vec![],
            parallel_degree: 1,
            precision: ditfleet_engine::Precision::Bf16,
            note: String::new(),
        });
        let mut st = State::default();
        for engine in engines {
            let i = engine.info();
            let mv = i.model_versions.first().cloned().unwrap_or_default();
            let (model, version) = split(&mv);
            st.held.insert(mv.clone());
            st.precisions.insert(mv.clone(), i.precision);
            st.default
                .entry(model.to_string())
                .or_insert_with(|| version.to_string());
            st.idle.push(Taken {
                model: model.to_string(),
                version: version.to_string(),
                engine,
            });
        }
        Self {
            state: Mutex::new(st),
            notify: Notify::new(),
            builder,
            mode,
            info,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the worker holds now.
    pub fn holdings(&self) -> Holdings {
        let st = self.lock();
        Holdings {
            held: st.held.iter().cloned().collect(),
            precisions: st
                .held
                .iter()
                .filter_map(|mv| Some((mv.clone(), st.precisions.get(mv)?.to_string())))
                .collect(),
            defaults: st.default.iter().map(|(m, v)| format!("{m}@{v}")).collect(),
            loading: st.loading.iter().cloned().collect(),
            load_error: st.load_error.clone(),
        }
    }

    /// The LoRA status of every idle engine (busy ones are advertised by their running job).
    pub fn idle_lora_statuses(&self) -> Vec<ditfleet_engine::LoraStatus> {
        self.lock().idle.iter().map(|t| t.engine.lora_status()).collect()
    }

    /// Whether a job pinned to `mv` can run here (held, or being loaded).
    pub fn serves(&self, mv: &str) -> bool {
        let st = self.lock();
        st.held.contains(mv) || st.loading.contains(mv)
    }

    /// Takes an engine for a job of `model`, pinned to `version` or on the model's default; waits
    /// while every such engine is busy or the version is still loading.
    pub async fn take(&self, model: &str, version: Option<&str>) -> Result<Taken, PoolError> {
        loop {
            let notified = self.notify.notified();
            {
                let mut st = self.lock();
                let v = match version {
                    Some(v) => v.to_string(),
                    None => st
                        .default
                        .get(model)
                        .cloned()
                        .ok_or_else(|| PoolError::ModelNotServed(model.to_string()))?,
                };
                let mv = format!("{model}@{v}");
                if !st.held.contains(&mv) && !st.loading.contains(&mv) {
                    return Err(PoolError::VersionNotHeld(mv));
                }
                if let Some(i) = st.idle.iter().position(|t| t.model == model && t.version == v) {
                    let t = st.idle.swap_remove(i);
                    *st.in_use.entry(mv).or_default() += 1;
                    return Ok(t);
                }
            }
            notified.await;
        }
    }

    /// Returns an engine after its job; an engine of a version unloaded meanwhile is dropped.
    pub fn give_back(&self, t: Taken) {
        let mv = t.model_version();
        let dropped = {
            let mut st = self.lock();
            if let Some(n) = st.in_use.get_mut(&mv) {
                *n = n.saturating_sub(1);
            }
            if st.held.contains(&mv) {
                st.idle.push(t);
                None
            } else {
                Some(t)
            }
        };
        if let Some(t) = dropped {
            info!(model_version = %t.model_version(), "unloading a version that was swapped out while its job ran");
            drop(t);
        }
        self.notify.notify_waiters();
    }

    /// Replaces an engine lost with its job (the engine thread panicked, so its state cannot be
    /// trusted and it was dropped while unwinding): one engine of the version is rebuilt, so the
    /// worker keeps its capacity. A version unloaded meanwhile is not rebuilt. On a build error
    /// the worker serves on with one engine less and the error is returned.
    pub async fn replace_lost(&self, model: &str, version: &str) -> Result<(), String> {
        let mv = format!("{model}@{version}");
        {
            let mut st = self.lock();
            if let Some(n) = st.in_use.get_mut(&mv) {
                *n = n.saturating_sub(1);
            }
            if !st.held.contains(&mv) {
                drop(st);
                self.notify.notify_waiters();
                return Ok(());
            }
        }
        let builder = self.builder.clone();
        let (m, v) = (model.to_string(), version.to_string());
        let built = tokio::task::spawn_blocking(move || builder(&m, &v))
            .await
            .map_err(|e| format!("rebuilding panicked: {e}"))?
            .map_err(|e| e.to_string());
        let r = match built {
            Ok(engines) => match engines.into_iter().next() {
                Some(engine) => {
                    let mut st = self.lock();
                    if st.held.contains(&mv) {
                        st.idle.push(Taken {
                            model: model.to_string(),
                            version: version.to_string(),
                            engine,
                        });
                    }
                    info!(model_version = %mv, "engine rebuilt after a panic");
                    Ok(())
                }
                None => Err("the builder returned no engine".to_string()),
            },
            Err(e) => Err(e),
        };
        self.notify.notify_waiters();
        r
    }

    async fn wait_unused(&self, mv: &str) {
        loop {
            let notified = self.notify.notified();
            if self.lock().in_use.get(mv).copied().unwrap_or(0) == 0 {
                return;
            }
            notified.await;
        }
    }

    fn unload(&self, mv: &str) {
        let (model, version) = split(mv);
        let dropped: Vec<Taken> = {
            let mut st = self.lock();
            st.held.remove(mv);
            st.precisions.remove(mv);
            let (gone, keep): (Vec<Taken>, Vec<Taken>) = std::mem::take(&mut st.idle)
                .into_iter()
                .partition(|t| t.model == model && t.version == version);
            st.idle = keep;
            gone
        };
        info!(model_version = %mv, idle_engines = dropped.len(), "unloaded");
        drop(dropped);
        self.notify.notify_waiters();
    }

    async fn load(&self, mv: &str) -> Result<(), String> {
        let (model, version) = split(mv);
        let builder = self.builder.clone();
        let (m, v) = (model.to_string(), version.to_string());
        info!(model_version = %mv, "loading");
        let t = std::time::Instant::now();
        let built = tokio::task::spawn_blocking(move || builder(&m, &v))
            .await
            .map_err(|e| format!("loader panicked: {e}"))?
            .map_err(|e| e.to_string())?;
        let precision = built.first().map(|e| e.info().precision);
        let mut st = self.lock();
        for engine in built {
            st.idle.push(Taken {
                model: model.to_string(),
                version: version.to_string(),
                engine,
            });
        }
        st.held.insert(mv.to_string());
        if let Some(p) = precision {
            st.precisions.insert(mv.to_string(), p);
        }
        info!(model_version = %mv, precision = ?precision, load_s = t.elapsed().as_secs_f64(), "loaded");
        Ok(())
    }

    /// Brings the held versions of each model named in `desired` (model → versions, the first
    /// being the default) to exactly those versions; models not named are left alone. A version
    /// that fails to load leaves the current ones serving and is reported in `load_error`.
    pub async fn reconcile(&self, desired: &BTreeMap<String, Vec<String>>) {
        for (model, versions) in desired {
            let Some(target) = versions.first() else { continue };
            let wanted: BTreeSet<String> = versions.iter().map(|v| format!("{model}@{v}")).collect();
            let (missing, extra, default_now) = {
                let st = self.lock();
                let missing: Vec<String> = wanted
                    .iter()
                    .filter(|mv| !st.held.contains(*mv))
                    .cloned()
                    .collect();
                let extra: Vec<String> = st
                    .held
                    .iter()
                    .filter(|mv| split(mv).0 == model && !wanted.contains(*mv))
                    .cloned()
                    .collect();
                (missing, extra, st.default.get(model).cloned())
            };
            if missing.is_empty() && extra.is_empty() && default_now.as_ref() == Some(target) {
                continue;
            }
            info!(model = %model, target = %target, load = ?missing, unload = ?extra, mode = ?self.mode, "swapping model versions");
            if self.mode == SwapMode::Drain && !missing.is_empty() {
                // Memory is short: the old versions go first. Jobs wait (not fail) meanwhile.
                {
                    let mut st = self.lock();
                    for mv in &missing {
                        st.loading.insert(mv.clone());
                    }
                    st.default.insert(model.clone(), target.clone());
                    for mv in &extra {
                        st.held.remove(mv);
                    }
                }
                for mv in &extra {
                    self.unload(mv);
                    self.wait_unused(mv).await;
                }
            } else {
                let mut st = self.lock();
                for mv in &missing {
                    st.loading.insert(mv.clone());
                }
            }
            let mut failed = None;
            for mv in &missing {
                let r = self.load(mv).await;
                let mut st = self.lock();
                st.loading.remove(mv);
                if let Err(e) = r {
                    warn!(model_version = %mv, error = %e, "model load failed; the current versions keep serving");
                    failed = Some(format!("{mv}: {e}"));
                }
            }
            {
                let mut st = self.lock();
                st.load_error = failed.clone();
                let target_mv = format!("{model}@{target}");
                if st.held.contains(&target_mv) {
                    // The atomic switch: jobs taking an engine after this line get the new version.
                    st.default.insert(model.clone(), target.clone());
                } else if let Some(old) = default_now
                    .as_ref()
                    .filter(|v| st.held.contains(&format!("{model}@{v}")))
                {
                    let old = old.clone();
                    st.default.insert(model.clone(), old);
                } else if let Some(any) = st.held.iter().find(|mv| split(mv).0 == model).cloned() {
                    st.default.insert(model.clone(), split(&any).1.to_string());
                }
            }
            self.notify.notify_waiters();
            if failed.is_none() {
                for mv in &extra {
                    if self.lock().held.contains(mv) {
                        self.unload(mv);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ditfleet_common::config::{Autotune, EngineChoice};

    #[tokio::test]
    async fn a_hot_swap_to_an_fp8_version_advertises_its_precision_and_drops_the_old_ones() {
        let choice = EngineChoice::Flux {
            model_dir: None,
            low_memory: false,
            plan: None,
            autotune: Autotune {
                cache: std::env::temp_dir().join("ditfleet-pool-test-plans.json"),
                sizes: vec![(256, 256)],
            },
            fault_gpu: None,
            precision: "bf16".into(),
        };
        let engines = crate::engines::build(&choice, 1, None).unwrap();
        let builder: Builder =
            Arc::new(move |m: &str, v: &str| crate::engines::build_version(&choice, m, v, 1, None, None));
        let pool = EnginePool::new(engines, builder, SwapMode::Alongside);
        let precisions = |pool: &EnginePool| {
            pool.holdings()
                .precisions
                .into_iter()
                .map(|(mv, p)| format!("{mv}={p}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            precisions(&pool),
            ["flux-dev@tiny-random-0=bf16", "sdxl-base@tiny-random-0=bf16"]
        );
        let desired: BTreeMap<String, Vec<String>> = [(
            "flux-dev".to_string(),
            vec!["tiny-random-7-fp8".to_string(), "tiny-random-7".to_string()],
        )]
        .into();
        pool.reconcile(&desired).await;
        let h = pool.holdings();
        assert_eq!(h.load_error, None);
        assert!(
            h.defaults.contains(&"flux-dev@tiny-random-7-fp8".to_string()),
            "{h:?}"
        );
        assert_eq!(
            precisions(&pool),
            [
                "flux-dev@tiny-random-7=bf16",
                "flux-dev@tiny-random-7-fp8=fp8",
                "sdxl-base@tiny-random-0=bf16"
            ]
        );
        // A version that cannot be fp8 fails to load and changes nothing.
        let desired: BTreeMap<String, Vec<String>> =
            [("sdxl-base".to_string(), vec!["tiny-random-1-fp8".to_string()])].into();
        pool.reconcile(&desired).await;
        let h = pool.holdings();
        assert!(
            h.load_error
                .as_deref()
                .is_some_and(|e| e.contains("not available for SDXL")),
            "{h:?}"
        );
        assert_eq!(h.precisions.len(), 3);
        // The fp8 job's engine is the one a job on the new default takes.
        let t = pool.take("flux-dev", None).await.unwrap();
        assert_eq!(t.model_version(), "flux-dev@tiny-random-7-fp8");
        assert_eq!(t.engine.info().precision, Precision::Fp8);
        pool.give_back(t);
    }
}
