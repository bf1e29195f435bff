//! Parsed adapters kept in host memory, least recently used first out, bounded in bytes. Shared
//! by the ranks of a worker (`&self` methods; adapters handed out as `Arc`s, so an evicted adapter
//! stays alive while a rank still merges it).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{Adapter, AdapterKey, LoraError};

/// Counters for the worker's metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// Host bytes held now.
    pub bytes: usize,
    pub adapters: usize,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<AdapterKey, (Arc<Adapter>, u64)>,
    tick: u64,
    stats: CacheStats,
}

/// See the module docs.
#[derive(Debug)]
pub struct LoraCache {
    max_bytes: usize,
    pin: bool,
    inner: Mutex<Inner>,
}

impl LoraCache {
    /// A cache holding at most `max_bytes` of adapter tensors (an adapter larger than that is
    /// still returned, but not kept).
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            pin: false,
            inner: Mutex::default(),
        }
    }

    /// Page-locks the host copies of adapters loaded from now on (GPU workers: full-speed
    /// host-to-device copies when merging).
    pub fn pinned(mut self, pin: bool) -> Self {
        self.pin = pin;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The adapter `key`, from the cache (`true`: a hit) or read from `path` and kept. The file
    /// is read without holding the cache's lock, so other ranks' hits are not held up by a read.
    /// `key.checksum` is trusted: the caller checked the file against it.
    pub fn get_or_load(&self, key: &AdapterKey, path: &Path) -> Result<(Arc<Adapter>, bool), LoraError> {
        if let Some(a) = self.get(key) {
            return Ok((a, true));
        }
        let adapter = Adapter::load(key.clone(), path, self.pin);
        let mut inner = self.lock();
        inner.stats.misses += 1;
        let adapter = Arc::new(adapter?);
        // Another rank may have read the same file meanwhile: keep the first.
        if let Some(a) = Self::touch(&mut inner, key) {
            return Ok((a, false));
        }
        self.insert_locked(&mut inner, adapter.clone());
        Ok((adapter, false))
    }

    /// The adapter `key` if held (counts a hit), marked most recently used.
    pub fn get(&self, key: &AdapterKey) -> Option<Arc<Adapter>> {
        let mut inner = self.lock();
        let hit = Self::touch(&mut inner, key);
        if hit.is_some() {
            inner.stats.hits += 1;
        }
        hit
    }

    /// Keeps an adapter built elsewhere (e.g. from tensors), evicting as needed.
    pub fn insert(&self, adapter: Arc<Adapter>) {
        let mut inner = self.lock();
        self.insert_locked(&mut inner, adapter);
    }

    pub fn contains(&self, key: &AdapterKey) -> bool {
        self.lock().map.contains_key(key)
    }

    /// Drops one adapter (e.g. removed from the registry).
    pub fn remove(&self, key: &AdapterKey) {
        let mut inner = self.lock();
        if let Some((a, _)) = inner.map.remove(key) {
            inner.stats.bytes -= a.bytes();
            inner.stats.adapters -= 1;
        }
    }

    pub fn stats(&self) -> CacheStats {
        self.lock().stats
    }

    /// The bound on the bytes held.
    pub fn capacity(&self) -> usize {
        self.max_bytes
    }

    /// The keys held, most recently used first.
    pub fn keys(&self) -> Vec<AdapterKey> {
        let inner = self.lock();
        let mut held: Vec<(&AdapterKey, u64)> = inner.map.iter().map(|(k, (_, used))| (k, *used)).collect();
        held.sort_by_key(|(_, used)| std::cmp::Reverse(*used));
        held.into_iter().map(|(k, _)| k.clone()).collect()
    }

    fn touch(inner: &mut Inner, key: &AdapterKey) -> Option<Arc<Adapter>> {
        inner.tick += 1;
        let tick = inner.tick;
        inner.map.get_mut(key).map(|(a, used)| {
            *used = tick;
            a.clone()
        })
    }

    fn insert_locked(&self, inner: &mut Inner, adapter: Arc<Adapter>) {
        let size = adapter.bytes();
        if size > self.max_bytes {
            return;
        }
        if let Some((old, _)) = inner.map.remove(&adapter.key) {
            inner.stats.bytes -= old.bytes();
            inner.stats.adapters -= 1;
        }
        while inner.stats.bytes + size > self.max_bytes {
            let Some(oldest) = inner
                .map
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((a, _)) = inner.map.remove(&oldest) {
                inner.stats.bytes -= a.bytes();
                inner.stats.adapters -= 1;
                inner.stats.evictions += 1;
            }
        }
        inner.tick += 1;
        let tick = inner.tick;
        inner.stats.bytes += size;
        inner.stats.adapters += 1;
        inner.map.insert(adapter.key.clone(), (adapter, tick));
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;

    /// An adapter of one rank-1 module `(4, 1) @ (1, 4)`: 32 bytes.
    fn adapter(name: &str) -> Arc<Adapter> {
        let t = |s: &[i64]| Tensor::ones(s, (Kind::Float, Device::Cpu));
        Arc::new(
            Adapter::from_tensors(
                AdapterKey::new(name, "1", "c"),
                vec![
                    ("m.lora_A.weight".into(), t(&[1, 4])),
                    ("m.lora_B.weight".into(), t(&[4, 1])),
                ],
            )
            .unwrap(),
        )
    }

    #[test]
    fn the_least_recently_used_adapter_goes_first_and_bytes_stay_bounded() {
        let cache = LoraCache::new(100);
        let (a, b, c, d) = (adapter("a"), adapter("b"), adapter("c"), adapter("d"));
        assert_eq!(a.bytes(), 32);
        cache.insert(a.clone());
        cache.insert(b.clone());
        cache.insert(c.clone());
        assert!(cache.get(&a.key).is_some()); // b is now the oldest
        cache.insert(d.clone());
        assert!(!cache.contains(&b.key));
        assert!(cache.contains(&a.key) && cache.contains(&c.key) && cache.contains(&d.key));
        let s = cache.stats();
        assert_eq!((s.bytes, s.adapters, s.evictions, s.hits), (96, 3, 1, 1));
        cache.remove(&a.key);
        assert_eq!(cache.stats().bytes, 64);
        let tiny = LoraCache::new(16);
        tiny.insert(a);
        assert_eq!(tiny.stats().adapters, 0, "an adapter over the bound is not kept");
    }

    #[test]
    fn a_second_load_of_the_same_key_is_a_hit_and_reads_nothing() {
        let dir = std::env::temp_dir().join(format!("ditfleet-lora-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.safetensors");
        let t = |s: &[i64]| Tensor::ones(s, (Kind::Float, Device::Cpu));
        Tensor::write_safetensors(
            &[("m.lora_A.weight", t(&[1, 4])), ("m.lora_B.weight", t(&[4, 1]))],
            &path,
        )
        .unwrap();
        let cache = LoraCache::new(1 << 20);
        let key = AdapterKey::new("a", "1", "c");
        let (first, hit) = cache.get_or_load(&key, &path).unwrap();
        assert!(!hit);
        std::fs::remove_file(&path).unwrap();
        let (second, hit) = cache.get_or_load(&key, &path).unwrap();
        assert!(hit && Arc::ptr_eq(&first, &second));
        let other = AdapterKey::new("a", "1", "other-bytes");
        assert!(
            cache.get_or_load(&other, &path).is_err(),
            "another checksum is another adapter"
        );
        assert_eq!((cache.stats().hits, cache.stats().misses), (1, 2));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
