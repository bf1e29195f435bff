//! Per-job LoRA in an engine: a job's [`LoraRef`]s resolved into adapters ([`LoraHub`], one per
//! engine: the host cache and what the engine reports in [`LoraStatus`]) and merged into the
//! weights one model copy holds ([`LoraSlot`], one per rank: its [`Applier`]).
//!
//! Per job, [`LoraSlot::prepare`]:
//!
//! 1. names the stack: `(name, version, checksum, scale)` of each entry, in job order. If it is
//!    the stack applied now, nothing else happens (no cache lookup, no file read, no GPU work);
//! 2. otherwise reads each adapter from the cache, or from the file the worker verified
//!    (`LoraRef::path`, required) and keeps it there;
//! 3. validates the whole stack against the model family's mapping and merges it
//!    ([`Applier::apply`]: the weights only the previous stack touched go back to base first);
//! 4. on ANY failure (no file, corrupt file, unknown or partial keys, shapes that do not fit,
//!    NaN/Inf in the adapter or in the merged weights) puts every weight back to base and fails
//!    the job with the reason; the engine goes on serving.
//!
//! After the job the stack stays merged ("hot"): the next job with the same stack pays nothing,
//! one with another stack starts from the exact base weights.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tch::Device;

use super::{Adapter, AdapterKey, Applier, ApplyOptions, ApplyReport, Family, LoraCache, Weights};
use crate::{EngineError, LoraRef, LoraStatus};

/// Whether `s` is a well-formed adapter name or version: 1-64 characters of `[A-Za-z0-9._-]`
/// starting with a letter or digit (the registry's rule; such a value cannot name another
/// folder, hold a separator, or be mistaken for another key's parts).
pub fn valid_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Whether `s` is a well-formed checksum: 1-128 ASCII letters or digits (a SHA-256 in hex).
fn valid_checksum(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn invalid(r: &LoraRef, message: impl std::fmt::Display) -> EngineError {
    EngineError::InvalidRequest(format!(
        "lora {:?}@{:?}: {message}",
        truncate(&r.name),
        truncate(&r.version)
    ))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The cache key of a job's entry: its name, version and checksum (the worker gives the file's
/// SHA-256; without one, the file's length and modification time stand in, so a file rewritten
/// in place is not served from a stale entry).
pub fn adapter_key(r: &LoraRef) -> Result<AdapterKey, EngineError> {
    for (what, v) in [("name", &r.name), ("version", &r.version)] {
        if !valid_ident(v) {
            return Err(invalid(
                r,
                format!("{what} must be 1-64 characters of [A-Za-z0-9._-] starting with a letter or digit"),
            ));
        }
    }
    if !r.scale.is_finite() {
        return Err(invalid(r, format!("scale {} is not finite", r.scale)));
    }
    let checksum = match (&r.checksum, &r.path) {
        (Some(c), _) if valid_checksum(c) => c.clone(),
        (Some(_), _) => {
            return Err(invalid(
                r,
                "checksum must be 1-128 letters or digits (hex SHA-256)",
            ));
        }
        (None, Some(p)) => unverified_checksum(p),
        (None, None) => String::new(),
    };
    Ok(AdapterKey::new(&r.name, &r.version, checksum))
}

fn unverified_checksum(path: &Path) -> String {
    let meta = std::fs::metadata(path).ok();
    let len = meta.as_ref().map_or(0, |m| m.len());
    let mtime = meta
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("unverified{len}x{mtime}")
}

/// A stack's identity for step checkpoints: `name@version#checksum*scale` per entry (the scale's
/// f32 bits in hex, so it reads back exactly), `,`-separated, in job order; `""` for no LoRA.
pub fn stack_id(loras: &[LoraRef]) -> String {
    loras
        .iter()
        .map(|r| {
            format!(
                "{}@{}#{}*{:08x}",
                r.name,
                r.version,
                r.checksum.as_deref().unwrap_or("-"),
                r.scale.to_bits()
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What the engine reports (the stack applied now, the last switch's time).
#[derive(Debug, Default)]
struct Reported {
    applied: Vec<LoraRef>,
    last_apply_ms: f64,
    /// Adapters the reporting slot's jobs found in the cache / read from their files (the other
    /// ranks of a plan resolve the same stack through the same cache and are not counted again).
    hits: u64,
    misses: u64,
}

/// One engine's adapters: the host cache every rank reads through, and the status it reports.
#[derive(Debug)]
pub struct LoraHub {
    cache: LoraCache,
    reported: Mutex<Reported>,
    apply_options: ApplyOptions,
    /// Bumped by [`LoraHub::invalidate`]: every slot puts its base weights back before its next
    /// job.
    epoch: AtomicU64,
}

impl LoraHub {
    /// A hub whose cache holds at most `max_bytes` of adapters; `pin`: page-locked host copies
    /// (adapters merged on a GPU).
    pub fn new(max_bytes: usize, pin: bool) -> Arc<Self> {
        Self::with_options(max_bytes, pin, ApplyOptions::default())
    }

    /// [`LoraHub::new`] whose slots merge with `options`.
    pub fn with_options(max_bytes: usize, pin: bool, options: ApplyOptions) -> Arc<Self> {
        Arc::new(Self {
            cache: LoraCache::new(max_bytes).pinned(pin),
            reported: Mutex::default(),
            apply_options: options,
            epoch: AtomicU64::new(0),
        })
    }

    /// A hub sized by the engine settings ([`crate::settings::EngineSettings::lora_cache_bytes`])
    /// for weights on `device`.
    pub fn from_settings(device: Device) -> Arc<Self> {
        Self::with_options(
            crate::settings::get().lora_cache_bytes,
            device.is_cuda(),
            Self::settings_options(device),
        )
    }

    /// How an engine's slots merge on `device`: the engine settings' device cache on a GPU, none
    /// on the CPU.
    pub fn settings_options(device: Device) -> ApplyOptions {
        ApplyOptions {
            device_cache_bytes: if device.is_cuda() {
                crate::settings::get().lora_device_cache_bytes
            } else {
                0
            },
            ..ApplyOptions::default()
        }
    }

    /// How the slots of this hub merge (each rank's applier gets a copy).
    pub fn apply_options(&self) -> &ApplyOptions {
        &self.apply_options
    }

    pub fn cache(&self) -> &LoraCache {
        &self.cache
    }

    /// Makes every slot of the engine restore its base weights before its next job, and reports
    /// no stack applied: after a multi-GPU job failed, some ranks may have merged its stack and
    /// others not.
    pub fn invalidate(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.reported().applied.clear();
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    fn reported(&self) -> std::sync::MutexGuard<'_, Reported> {
        self.reported.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The adapters of a job's stack with their scales, from the cache or read from their files.
    pub fn resolve(&self, loras: &[LoraRef]) -> Result<Vec<(Arc<Adapter>, f64)>, EngineError> {
        self.resolve_counted(loras, false)
    }

    /// [`LoraHub::resolve`], counting the hits and misses in the engine's status when `count`.
    fn resolve_counted(
        &self,
        loras: &[LoraRef],
        count: bool,
    ) -> Result<Vec<(Arc<Adapter>, f64)>, EngineError> {
        let mut stack = Vec::with_capacity(loras.len());
        for r in loras {
            let key = adapter_key(r)?;
            let cached = self.cache.get(&key);
            if count {
                let mut rep = self.reported();
                if cached.is_some() {
                    rep.hits += 1;
                } else {
                    rep.misses += 1;
                }
            }
            let adapter = match cached {
                Some(a) => a,
                None => {
                    // (The wording keeps what engines said before they applied LoRAs: a worker
                    // that does not fetch adapters gets the same failure as then.)
                    let path = r.path.as_deref().ok_or_else(|| {
                        EngineError::InvalidRequest(format!(
                            "this engine was given LoRA adapters it cannot apply: {:?}@{:?} has no \
                             local file (the worker fetches and verifies adapters before the engine runs)",
                            truncate(&r.name),
                            truncate(&r.version)
                        ))
                    })?;
                    self.cache.get_or_load(&key, path)?.0
                }
            };
            stack.push((adapter, f64::from(r.scale)));
        }
        Ok(stack)
    }

    /// Reads a multi-GPU job's adapters into the cache once, before its ranks resolve them (so
    /// the file is read once and the job counted once in the status, not once per rank). A stack
    /// the engine reports applied is skipped (a hot job counts nothing). Errors are the ranks' to
    /// report: they meet the same ones, and put their base weights back.
    pub fn prefetch(&self, loras: &[LoraRef]) -> Result<(), EngineError> {
        let hot = {
            let r = self.reported();
            r.applied.len() == loras.len()
                && r.applied.iter().zip(loras).all(|(a, l)| {
                    adapter_key(l).is_ok_and(|k| {
                        a.name == k.name
                            && a.version == k.version
                            && a.checksum.as_deref() == Some(k.checksum.as_str())
                            && a.scale.to_bits() == l.scale.to_bits()
                    })
                })
        };
        if hot {
            return Ok(());
        }
        self.resolve_counted(loras, true).map(|_| ())
    }

    /// See [`LoraStatus`].
    pub fn status(&self) -> LoraStatus {
        let s = self.cache.stats();
        let r = self.reported();
        LoraStatus {
            applied: r.applied.clone(),
            cached: self.cache.keys().iter().map(|k| k.to_string()).collect(),
            cache_hits: r.hits,
            cache_misses: r.misses,
            cache_bytes: s.bytes as u64,
            cache_capacity_bytes: self.cache.capacity() as u64,
            last_apply_ms: r.last_apply_ms,
        }
    }
}

/// The stack merged into one model copy's weights (see the module docs).
pub struct LoraSlot {
    hub: Arc<LoraHub>,
    family: Arc<dyn Family>,
    /// Built on the first stack, bound to the weights of that moment; `None`: base weights.
    applier: Option<Applier>,
    /// Whether this slot's applies are what the engine reports (the group leader's).
    reports: bool,
    /// Whether this slot's cache hits and misses are counted in the status (a one-device
    /// engine's; a multi-GPU engine counts in [`LoraHub::prefetch`]).
    counts: bool,
    /// The hub's epoch the applied stack was merged in ([`LoraHub::invalidate`]).
    epoch: u64,
}

impl std::fmt::Debug for LoraSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraSlot")
            .field("family", &self.family.name())
            .field("applied", &self.applied())
            .field("reports", &self.reports)
            .finish()
    }
}

impl LoraSlot {
    /// The slot of a model whose LoRA mapping is `family`, reading adapters through `hub`.
    pub fn new(hub: Arc<LoraHub>, family: Arc<dyn Family>) -> Self {
        Self {
            epoch: hub.epoch(),
            hub,
            family,
            applier: None,
            reports: true,
            counts: true,
        }
    }

    /// A slot for another rank's copy of the model: same hub and mapping, nothing applied, not
    /// reporting.
    pub fn follower(&self) -> Self {
        self.another(false)
    }

    /// A slot for another copy of the model (same hub and mapping, nothing applied) that reports
    /// its applies as the engine's or not; it counts no cache hits (see [`LoraHub::prefetch`]).
    pub fn another(&self, reports: bool) -> Self {
        Self {
            reports,
            counts: false,
            ..Self::new(self.hub.clone(), self.family.clone())
        }
    }

    pub fn hub(&self) -> &Arc<LoraHub> {
        &self.hub
    }

    pub fn family(&self) -> &Arc<dyn Family> {
        &self.family
    }

    /// Reads adapters through `hub` from now on (the engines of one worker share one).
    pub fn set_hub(&mut self, hub: Arc<LoraHub>) {
        self.epoch = hub.epoch();
        self.hub = hub;
    }

    /// The stack applied now (empty: base weights).
    pub fn applied(&self) -> &[(AdapterKey, f64)] {
        self.applier.as_ref().map_or(&[], |a| a.applied())
    }

    /// Whether `loras` is the stack applied now (what a job's run checks, so that a request whose
    /// stack was not applied never silently gets another model's image).
    pub fn is_applied(&self, loras: &[LoraRef]) -> bool {
        let applied = self.applied();
        loras.len() == applied.len()
            && loras.iter().zip(applied).all(|(r, (k, s))| {
                adapter_key(r).is_ok_and(|key| key == *k) && f64::from(r.scale).to_bits() == s.to_bits()
            })
    }

    /// An error unless `loras` is the stack applied now (see [`LoraSlot::is_applied`]).
    pub fn check_applied(&self, loras: &[LoraRef]) -> Result<(), EngineError> {
        if self.is_applied(loras) {
            return Ok(());
        }
        Err(EngineError::InvalidRequest(format!(
            "the request's LoRA stack [{}] is not the one merged into the weights [{}]: apply it first \
             (Engine::generate does)",
            stack_id(loras),
            self.applied()
                .iter()
                .map(|(k, s)| format!("{k} x {s}"))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// Makes the job's stack the applied one (see the module docs). `weights`: the variables
    /// this copy of the model holds, asked for only when the first stack is merged.
    pub fn prepare(
        &mut self,
        loras: &[LoraRef],
        weights: impl FnOnce() -> Weights,
    ) -> Result<ApplyReport, EngineError> {
        let epoch = self.hub.epoch();
        if epoch != self.epoch {
            if let Err(e) = self.reset() {
                return Err(self.failed(e));
            }
            self.epoch = epoch;
        }
        let keys = match loras.iter().map(adapter_key).collect::<Result<Vec<_>, _>>() {
            Ok(k) => k,
            Err(e) => return Err(self.failed(e)),
        };
        if self.is_applied(loras) {
            if self.reports {
                self.hub.reported().last_apply_ms = 0.0;
            }
            return Ok(ApplyReport {
                hot: true,
                ..Default::default()
            });
        }
        let stack = match self.hub.resolve_counted(loras, self.counts) {
            Ok(s) => s,
            Err(e) => return Err(self.failed(e)),
        };
        let (family, options) = (self.family.clone(), self.hub.apply_options().clone());
        let applier = self
            .applier
            .get_or_insert_with(|| Applier::new(family, weights(), options));
        match applier.apply(&stack) {
            Ok(report) => {
                tracing::info!(
                    stack = %stack_id(loras),
                    touched = report.touched,
                    elsewhere = report.elsewhere,
                    restored = report.restored,
                    ms = report.ms,
                    "lora stack applied"
                );
                if self.reports {
                    let mut r = self.hub.reported();
                    r.applied = loras
                        .iter()
                        .zip(&keys)
                        .map(|(l, k)| LoraRef {
                            path: None,
                            checksum: Some(k.checksum.clone()),
                            ..l.clone()
                        })
                        .collect();
                    r.last_apply_ms = report.ms;
                }
                Ok(report)
            }
            Err(e) => Err(self.failed(e.into())),
        }
    }

    /// After a failure: every weight back to base (the applier restores on its own errors; this
    /// covers the ones before it ran), reported as such, and the job's error returned (or the
    /// restore's, which is worse: the weights may not be the base ones).
    fn failed(&mut self, e: EngineError) -> EngineError {
        tracing::warn!(error = %e, "lora stack refused; base weights restored");
        match self.reset() {
            Ok(()) => e,
            Err(r) => r,
        }
    }

    /// Puts the base weights back and forgets the weights the applier was bound to (before the
    /// model is split, copied or rebuilt).
    pub fn reset(&mut self) -> Result<(), EngineError> {
        if self.reports {
            self.hub.reported().applied.clear();
        }
        if let Some(mut a) = self.applier.take() {
            a.restore()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(name: &str, version: &str, checksum: Option<&str>) -> LoraRef {
        LoraRef {
            name: name.into(),
            version: version.into(),
            scale: 0.5,
            path: None,
            checksum: checksum.map(str::to_string),
        }
    }

    /// Names, versions and checksums become cache keys and status entries (`name@version`): a
    /// value that could name another folder or read as another key's parts is refused.
    #[test]
    fn adapter_names_versions_and_checksums_that_could_escape_or_collide_are_refused() {
        let key = adapter_key(&r("pixel-art", "v1.2_b", Some("ab12"))).unwrap();
        assert_eq!(key, AdapterKey::new("pixel-art", "v1.2_b", "ab12"));
        for (name, version) in [
            ("..", "1"),
            (".hidden", "1"),
            ("a/b", "1"),
            ("a\\b", "1"),
            ("a@b", "1"),
            ("a", "1@2"),
            ("a", "../1"),
            ("", "1"),
            ("a b", "1"),
            ("a", "v1#x"),
            ("é", "1"),
        ] {
            let e = adapter_key(&r(name, version, Some("ab"))).unwrap_err();
            assert!(
                matches!(e, EngineError::InvalidRequest(_)),
                "{name:?}@{version:?}"
            );
        }
        assert!(adapter_key(&r(&"a".repeat(64), "1", None)).is_ok());
        assert!(adapter_key(&r(&"a".repeat(65), "1", None)).is_err());
        for bad in ["", "ab/cd", "ab cd", "ab@cd", &"f".repeat(129)] {
            assert!(adapter_key(&r("a", "1", Some(bad))).is_err(), "{bad:?}");
        }
        let mut nan = r("a", "1", None);
        nan.scale = f32::NAN;
        assert!(adapter_key(&nan).is_err());
    }

    #[test]
    fn a_stack_id_names_every_entry_in_order_with_its_exact_scale() {
        assert_eq!(stack_id(&[]), "");
        let two = [r("a", "1", Some("c1")), r("b", "2", None)];
        assert_eq!(stack_id(&two), "a@1#c1*3f000000,b@2#-*3f000000");
        let mut swapped = two.clone();
        swapped.reverse();
        assert_ne!(stack_id(&swapped), stack_id(&two));
    }
}
