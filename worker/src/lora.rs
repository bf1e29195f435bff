//! The worker's side of the LoRA registry: before a job runs, each adapter of its stack is looked
//! up (manifest), downloaded once into a local cache folder (bounded in bytes, least recently used
//! out first), verified against the manifest's SHA-256, and handed to the engine by path.
//!
//! Files are named by their SHA-256 (`<cache>/<sha256>.safetensors`), so no adapter name or
//! version ever becomes a local path, and a version pushed again with other bytes is another file.
//! Files found at start-up are adopted and hashed again on first use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ditfleet_common::lora::{Manifest, Registry, RegistryError, sha256_file};
use tracing::{debug, info, warn};

/// Why a job's adapters could not be made ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// The job cannot run anywhere as it is (adapter removed, made for another model, corrupt,
    /// no registry): fail it with this reason.
    Permanent(String),
    /// The registry could not be read now (network, S3 outage): requeue the job.
    Transient(String),
}

/// Whether an adapter came from the cache or had to be downloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched {
    Hit,
    Miss,
}

/// One resolved adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub path: PathBuf,
    pub sha256: String,
    pub fetched: Fetched,
}

#[derive(Debug)]
struct Entry {
    bytes: u64,
    last_use: u64,
    /// Adopted from an earlier run: hashed again before its first use.
    verified: bool,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<String, Entry>,
    clock: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct LoraCache {
    registry: Option<Registry>,
    dir: PathBuf,
    capacity: u64,
    state: tokio::sync::Mutex<State>,
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl LoraCache {
    /// Opens the cache folder (created if missing) and adopts the adapter files already in it.
    pub fn open(registry: Option<Registry>, dir: &Path, capacity: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut st = State::default();
        for e in std::fs::read_dir(dir)?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let p = e.path();
            match name.strip_suffix(".safetensors") {
                Some(sha) if is_sha256(sha) => {
                    let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
                    st.entries.insert(
                        sha.to_string(),
                        Entry {
                            bytes,
                            last_use: 0,
                            verified: false,
                        },
                    );
                }
                // Leftovers of downloads that stopped half way.
                _ if name.starts_with(".fetch.") => {
                    let _ = std::fs::remove_file(&p);
                }
                _ => {}
            }
        }
        let cache = Self {
            registry,
            dir: dir.to_path_buf(),
            capacity,
            state: tokio::sync::Mutex::new(st),
        };
        info!(dir = %dir.display(), capacity_bytes = capacity, adopted = cache.state.try_lock().map(|s| s.entries.len()).unwrap_or(0), registry = %cache.registry.as_ref().map_or("none".into(), |r| r.describe()), "LoRA adapter cache ready");
        Ok(cache)
    }

    /// Bytes held now.
    pub async fn bytes(&self) -> u64 {
        self.state.lock().await.entries.values().map(|e| e.bytes).sum()
    }

    fn path_of(&self, sha: &str) -> PathBuf {
        self.dir.join(format!("{sha}.safetensors"))
    }

    /// Makes `name@version` ready for a job of `model`: its manifest (it must be made for
    /// `model`), its verified file in the cache. `keep` are the checksums of the job's other
    /// adapters, never evicted for this one.
    pub async fn resolve(
        &self,
        name: &str,
        version: &str,
        model: &str,
        keep: &[String],
    ) -> Result<Resolved, ResolveError> {
        let label = format!("{name}@{version}");
        let registry = self.registry.as_ref().ok_or_else(|| {
            ResolveError::Permanent(format!(
                "LoRA adapter {label}: this worker has no LoRA registry (set DITFLEET_LORA_REGISTRY or DITFLEET_MODEL_ROOT)"
            ))
        })?;
        let m: Manifest = match registry.manifest(name, version).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(ResolveError::Permanent(format!(
                    "LoRA adapter {label} is not in the LoRA registry ({}): it was removed after the job was admitted",
                    registry.describe()
                )));
            }
            Err(
                e @ (RegistryError::BadManifest { .. }
                | RegistryError::BadIdent { .. }
                | RegistryError::UnsafeName(_)),
            ) => {
                return Err(ResolveError::Permanent(format!("LoRA adapter {label}: {e}")));
            }
            Err(e) => return Err(ResolveError::Transient(format!("LoRA adapter {label}: {e}"))),
        };
        if m.base_model != model {
            return Err(ResolveError::Permanent(format!(
                "LoRA adapter {label} was made for {}, not {model}",
                m.base_model
            )));
        }
        if !is_sha256(&m.sha256) {
            return Err(ResolveError::Permanent(format!(
                "LoRA adapter {label}: its manifest's sha256 {:?} is not a SHA-256",
                m.sha256.chars().take(80).collect::<String>()
            )));
        }
        let path = self.path_of(&m.sha256);
        // A hit: known and verified (an adopted file is hashed once first).
        let adopted = {
            let mut st = self.state.lock().await;
            st.clock += 1;
            let now = st.clock;
            match st.entries.get_mut(&m.sha256) {
                Some(e) if e.verified && path.is_file() => {
                    e.last_use = now;
                    return Ok(Resolved {
                        path,
                        sha256: m.sha256,
                        fetched: Fetched::Hit,
                    });
                }
                Some(e) if !e.verified => true,
                _ => false,
            }
        };
        if adopted {
            let p = path.clone();
            let ok = tokio::task::spawn_blocking(move || sha256_file(&p))
                .await
                .ok()
                .and_then(|r| r.ok())
                .is_some_and(|(sha, bytes)| sha == m.sha256 && bytes == m.bytes);
            let mut st = self.state.lock().await;
            st.clock += 1;
            let now = st.clock;
            if ok {
                if let Some(e) = st.entries.get_mut(&m.sha256) {
                    e.verified = true;
                    e.last_use = now;
                }
                return Ok(Resolved {
                    path,
                    sha256: m.sha256,
                    fetched: Fetched::Hit,
                });
            }
            warn!(adapter = %label, path = %path.display(), "cached adapter file does not match its checksum; downloading it again");
            st.entries.remove(&m.sha256);
            let _ = std::fs::remove_file(&path);
        }
        let t = std::time::Instant::now();
        match registry.fetch(&m, &path).await {
            Ok(()) => {}
            Err(e @ (RegistryError::Checksum { .. } | RegistryError::NotFound { .. })) => {
                return Err(ResolveError::Permanent(format!("LoRA adapter {label}: {e}")));
            }
            Err(e) => return Err(ResolveError::Transient(format!("LoRA adapter {label}: {e}"))),
        }
        debug!(adapter = %label, bytes = m.bytes, download_ms = t.elapsed().as_millis() as u64, "adapter downloaded and verified");
        let mut st = self.state.lock().await;
        st.clock += 1;
        let now = st.clock;
        st.entries.insert(
            m.sha256.clone(),
            Entry {
                bytes: m.bytes,
                last_use: now,
                verified: true,
            },
        );
        // Least recently used out while over the bound; never this job's adapters.
        while st.entries.values().map(|e| e.bytes).sum::<u64>() > self.capacity {
            let victim = st
                .entries
                .iter()
                .filter(|(sha, _)| **sha != m.sha256 && !keep.contains(*sha))
                .min_by_key(|(_, e)| e.last_use)
                .map(|(sha, _)| sha.clone());
            let Some(v) = victim else { break };
            st.entries.remove(&v);
            let _ = std::fs::remove_file(self.path_of(&v));
            debug!(sha256 = %v, "adapter evicted from the download cache");
        }
        Ok(Resolved {
            path,
            sha256: m.sha256,
            fetched: Fetched::Miss,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ditfleet-wlora-{tag}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    async fn push(reg: &Registry, root: &Path, name: &str, base: &str, pad: usize) -> Manifest {
        let keys: Vec<String> = (0..(1 + pad))
            .map(|i| format!("{name}{i}.lora_A.weight"))
            .collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let f = root.join(format!("{name}.in"));
        std::fs::write(&f, ditfleet_common::lora::tiny_safetensors(&refs)).unwrap();
        reg.push(&f, name, "1", base, &mut |_, _| {}).await.unwrap()
    }

    #[tokio::test]
    async fn adapters_are_downloaded_once_verified_and_evicted_least_recently_used_first() {
        let root = tmp("reg");
        let reg = Registry::open(root.to_str().unwrap()).unwrap();
        let a = push(&reg, &root, "a", "flux-dev", 40).await;
        let b = push(&reg, &root, "b", "flux-dev", 40).await;
        let c = push(&reg, &root, "c", "flux-dev", 40).await;
        let dir = tmp("cache");
        let cache = LoraCache::open(Some(reg.clone()), &dir, a.bytes + b.bytes + 10).unwrap();
        let r = cache.resolve("a", "1", "flux-dev", &[]).await.unwrap();
        assert_eq!((r.fetched, r.sha256.as_str()), (Fetched::Miss, a.sha256.as_str()));
        assert_eq!(r.path, dir.join(format!("{}.safetensors", a.sha256)));
        assert_eq!(
            cache.resolve("a", "1", "flux-dev", &[]).await.unwrap().fetched,
            Fetched::Hit
        );
        assert_eq!(
            cache.resolve("b", "1", "flux-dev", &[]).await.unwrap().fetched,
            Fetched::Miss
        );
        cache.resolve("a", "1", "flux-dev", &[]).await.unwrap();
        // c pushes the cache over its bound: b (least recently used) goes.
        cache.resolve("c", "1", "flux-dev", &[]).await.unwrap();
        assert!(cache.bytes().await <= a.bytes + b.bytes + 10);
        assert!(!dir.join(format!("{}.safetensors", b.sha256)).exists());
        assert!(dir.join(format!("{}.safetensors", a.sha256)).exists());
        assert_eq!(
            cache
                .resolve("b", "1", "flux-dev", std::slice::from_ref(&a.sha256))
                .await
                .unwrap()
                .fetched,
            Fetched::Miss
        );
        assert!(
            dir.join(format!("{}.safetensors", a.sha256)).exists(),
            "kept: the job needs it"
        );
        assert!(!dir.join(format!("{}.safetensors", c.sha256)).exists());
        // A restart adopts the files and checks them before their first use.
        drop(cache);
        std::fs::write(dir.join(format!("{}.safetensors", a.sha256)), b"tampered").unwrap();
        let cache = LoraCache::open(Some(reg.clone()), &dir, 1 << 20).unwrap();
        let r = cache.resolve("a", "1", "flux-dev", &[]).await.unwrap();
        assert_eq!(
            r.fetched,
            Fetched::Miss,
            "a tampered cached file is downloaded again"
        );
        assert_eq!(sha256_file(&r.path).unwrap().0, a.sha256);
        assert_eq!(
            cache.resolve("b", "1", "flux-dev", &[]).await.unwrap().fetched,
            Fetched::Hit
        );
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn missing_foreign_and_corrupt_adapters_fail_the_job_with_the_reason() {
        let root = tmp("reg2");
        let reg = Registry::open(root.to_str().unwrap()).unwrap();
        push(&reg, &root, "x", "sdxl-base", 0).await;
        let dir = tmp("cache2");
        let cache = LoraCache::open(Some(reg.clone()), &dir, 1 << 20).unwrap();
        let e = cache.resolve("nope", "1", "sdxl-base", &[]).await.unwrap_err();
        assert!(
            matches!(&e, ResolveError::Permanent(r) if r.contains("nope@1 is not in the LoRA registry")),
            "{e:?}"
        );
        let e = cache.resolve("x", "1", "flux-dev", &[]).await.unwrap_err();
        assert!(
            matches!(&e, ResolveError::Permanent(r) if r.contains("was made for sdxl-base, not flux-dev")),
            "{e:?}"
        );
        std::fs::write(root.join("loras/x/1/adapter.safetensors"), b"bit rot").unwrap();
        let e = cache.resolve("x", "1", "sdxl-base", &[]).await.unwrap_err();
        assert!(
            matches!(&e, ResolveError::Permanent(r) if r.contains("does not match its manifest")),
            "{e:?}"
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "nothing corrupt is kept"
        );
        for bad in ["..", "a/b", ".x", "x\\y"] {
            assert!(
                matches!(
                    cache.resolve(bad, "1", "sdxl-base", &[]).await,
                    Err(ResolveError::Permanent(_))
                ),
                "{bad:?}"
            );
        }
        let none = LoraCache::open(None, &dir, 1).unwrap();
        assert!(
            matches!(none.resolve("x", "1", "sdxl-base", &[]).await, Err(ResolveError::Permanent(r)) if r.contains("no LoRA registry"))
        );
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
