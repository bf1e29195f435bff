//! The simulated engine: a stand-in with the real engine's interface and timing shape, used by the
//! fleet's load and chaos tests where thousands of jobs must run on CPUs. It is named as simulated
//! everywhere it appears (registration, job results, logs) and never serves as the real model.
//!
//! It sleeps `step_ms` per denoising step and draws a deterministic image from the seed: the same
//! request always yields the same bytes. Like a real sampler it carries a state from step to step
//! (a hash chain seeded by the request) that the image depends on, and it checkpoints and resumes
//! that state, so resuming from a wrong step or state gives a different image. It knows each
//! model's samplers as the real engines do (rejecting one the model does not run); the image also
//! depends on the sampler and the LoRA stack (so different stacks give different images), and the
//! timings report both. Faults can be
//! injected ([`SimulatedFaults`]) to exercise the worker's retry and dead-letter paths.
//!
//! LoRA is modelled as the fleet sees it: every adapter of a request must come with the file the
//! worker resolved (`LoraRef::path`), which is read (a missing or unreadable file, or one that is
//! not safetensors, fails the request) and kept in a byte-bounded LRU cache keyed by name, version
//! and checksum; a request whose stack differs from the one applied sleeps
//! [`SimulatedConfig::lora_apply_ms`] (the merge), and [`Engine::lora_status`] reports the applied
//! stack, the cache and its counters, as the real engines do.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{
    Control, Engine, EngineError, EngineInfo, GenerateRequest, GeneratedImage, StageTimings, StepCheckpoint,
    StepEvent,
};

/// The samplers each model runs, its default first (the fleet contract's `scheduler` values).
fn schedulers(model: &str) -> &'static [&'static str] {
    match model {
        "sdxl-base" => &["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"],
        _ => &["flow_euler"],
    }
}

/// Injected failures.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimulatedFaults {
    /// The first `oom` tries of every request (in this engine) fail with out-of-memory.
    pub oom: u32,
    /// The first `device` tries of every request fail with a device error.
    pub device: u32,
    /// Every request fails with a model-load error (permanent).
    pub bad_weights: bool,
    /// The first `panic` tries of every request panic inside the engine, counted across every
    /// simulated engine of the process (an engine rebuilt after a panic does not start over).
    pub panic: u32,
}

/// Tries per request that met the `panic` fault, process-wide.
static PANIC_TRIES: std::sync::Mutex<Option<HashMap<u64, u32>>> = std::sync::Mutex::new(None);

/// Settings of the simulated engine.
#[derive(Debug, Clone)]
pub struct SimulatedConfig {
    /// Milliseconds slept per denoising step.
    pub step_ms: u64,
    /// Models it pretends to serve.
    pub models: Vec<String>,
    /// Version label advertised for every model.
    pub version: String,
    pub faults: SimulatedFaults,
    /// Milliseconds a switch of the applied LoRA stack takes (merging or unmerging adapters).
    pub lora_apply_ms: u64,
    /// Bound of the adapter cache in bytes (the adapters' file sizes).
    pub lora_cache_bytes: u64,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        Self {
            step_ms: 20,
            models: vec!["flux-dev".into(), "flux-schnell".into(), "sdxl-base".into()],
            version: "sim-1".into(),
            faults: SimulatedFaults::default(),
            lora_apply_ms: 0,
            lora_cache_bytes: 1 << 30,
        }
    }
}

/// An adapter held in the simulated engine's cache.
#[derive(Debug, Clone)]
struct CachedAdapter {
    /// `name@version` and the checksum the worker verified (a re-pushed version is another entry).
    label: String,
    checksum: Option<String>,
    bytes: u64,
    last_use: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct SimulatedEngine {
    config: SimulatedConfig,
    /// Tries seen per request (for injected faults).
    tries: HashMap<u64, u32>,
    /// The LoRA stack merged now (paths dropped), and the adapter cache with its counters.
    applied: Vec<crate::LoraRef>,
    cache: Vec<CachedAdapter>,
    use_clock: u64,
    lora: crate::LoraStatus,
}

/// The tensor names in a safetensors file's header, or why it is not one.
fn safetensors_tensors(path: &std::path::Path) -> Result<usize, String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| "not a safetensors file (too short)".to_string())?;
    let n = u64::from_le_bytes(n);
    if !(2..=(64 << 20)).contains(&n) || n + 8 > len {
        return Err(format!(
            "not a safetensors file (header length {n} in {len} bytes)"
        ));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| e.to_string())?;
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| format!("not a safetensors file ({e})"))?;
    Ok(map.keys().filter(|k| *k != "__metadata__").count())
}

const CHECKPOINT_MAGIC: &[u8; 8] = b"DFSIMCK1";

fn mix(mut z: u64) -> u64 {
    // splitmix64
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl SimulatedEngine {
    pub fn new(config: SimulatedConfig) -> Self {
        let lora = crate::LoraStatus {
            cache_capacity_bytes: config.lora_cache_bytes,
            ..Default::default()
        };
        Self {
            config,
            tries: HashMap::new(),
            applied: Vec::new(),
            cache: Vec::new(),
            use_clock: 0,
            lora,
        }
    }

    /// Brings the request's LoRA stack in: each adapter from the cache or its file (which must be
    /// a readable safetensors file), then, if the stack differs from the applied one, the switch
    /// (`lora_apply_ms`). A failure leaves the applied stack as it was.
    fn apply_loras(&mut self, request: &GenerateRequest) -> Result<(), EngineError> {
        for l in &request.loras {
            let label = format!("{}@{}", l.name, l.version);
            self.use_clock += 1;
            let now = self.use_clock;
            if let Some(c) = self
                .cache
                .iter_mut()
                .find(|c| c.label == label && c.checksum == l.checksum)
            {
                c.last_use = now;
                self.lora.cache_hits += 1;
                continue;
            }
            let path = l.path.as_ref().ok_or_else(|| {
                EngineError::InvalidRequest(format!(
                    "LoRA adapter {label} came without its file (the worker resolves adapters from the registry)"
                ))
            })?;
            let tensors = safetensors_tensors(path)
                .map_err(|e| EngineError::Load(format!("LoRA adapter {label} ({}): {e}", path.display())))?;
            if tensors == 0 {
                return Err(EngineError::Load(format!(
                    "LoRA adapter {label} ({}) holds no tensors",
                    path.display()
                )));
            }
            let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            self.lora.cache_misses += 1;
            self.cache.push(CachedAdapter {
                label,
                checksum: l.checksum.clone(),
                bytes,
                last_use: now,
            });
            // Least recently used first out; the adapters of this request stay.
            let needed: Vec<(String, Option<String>)> = request
                .loras
                .iter()
                .map(|l| (format!("{}@{}", l.name, l.version), l.checksum.clone()))
                .collect();
            while self.cache.iter().map(|c| c.bytes).sum::<u64>() > self.config.lora_cache_bytes {
                let victim = self
                    .cache
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| !needed.contains(&(c.label.clone(), c.checksum.clone())))
                    .min_by_key(|(_, c)| c.last_use)
                    .map(|(i, _)| i);
                match victim {
                    Some(i) => {
                        self.cache.remove(i);
                    }
                    None => break,
                }
            }
        }
        let wanted: Vec<crate::LoraRef> = request
            .loras
            .iter()
            .map(|l| crate::LoraRef {
                path: None,
                ..l.clone()
            })
            .collect();
        if wanted != self.applied {
            let t = Instant::now();
            std::thread::sleep(Duration::from_millis(self.config.lora_apply_ms));
            self.applied = wanted;
            self.lora.last_apply_ms = t.elapsed().as_secs_f64() * 1e3;
        } else {
            self.lora.last_apply_ms = 0.0;
        }
        Ok(())
    }

    /// The sampler the request runs: the named one if the model has it, else an invalid request.
    fn scheduler(request: &GenerateRequest) -> Result<&'static str, EngineError> {
        let known = schedulers(&request.model);
        match &request.scheduler {
            None => Ok(known[0]),
            Some(s) => known.iter().copied().find(|k| k == s).ok_or_else(|| {
                EngineError::InvalidRequest(format!(
                    "model {} has no sampler {s:?} (it runs {})",
                    request.model,
                    known.join(", ")
                ))
            }),
        }
    }

    /// The sampler state before the first step. A non-default sampler and the LoRA stack (each
    /// adapter, its scale and its place) enter it; requests without them keep the images they
    /// had before the simulated engine knew either.
    fn initial_state(request: &GenerateRequest) -> u64 {
        let mut seed = request.seed;
        for b in request.prompt.bytes() {
            seed = seed.rotate_left(5) ^ u64::from(b);
        }
        let scheduler = request
            .scheduler
            .as_deref()
            .filter(|s| *s != schedulers(&request.model)[0]);
        if let Some(s) = scheduler {
            for b in s.bytes() {
                seed = mix(seed ^ u64::from(b));
            }
        }
        for (i, l) in request.loras.iter().enumerate() {
            seed = mix(seed ^ i as u64);
            for b in l.name.bytes().chain([0]).chain(l.version.bytes()) {
                seed = mix(seed ^ u64::from(b));
            }
            seed = mix(seed ^ u64::from(l.scale.to_bits()));
        }
        seed
    }

    /// The state after step `step` (1-based) given the state before it.
    fn advance(state: u64, step: u32) -> u64 {
        mix(state ^ u64::from(step).wrapping_mul(0x2545_f491_4f6c_dd1d))
    }

    fn request_key(request: &GenerateRequest) -> u64 {
        let mut h = Self::initial_state(request);
        for v in [request.width, request.height, request.steps] {
            h = mix(h ^ u64::from(v));
        }
        h
    }

    /// The deterministic image for a request (what [`Engine::generate`] returns): a colour
    /// gradient with noise drawn from the sampler state after the last step.
    pub fn render(request: &GenerateRequest) -> Vec<u8> {
        let mut state = Self::initial_state(request);
        for step in 1..=request.steps {
            state = Self::advance(state, step);
        }
        Self::render_state(request, state)
    }

    fn render_state(request: &GenerateRequest, seed: u64) -> Vec<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let base: [f32; 3] = [rng.random(), rng.random(), rng.random()];
        let tint: [f32; 3] = [rng.random(), rng.random(), rng.random()];
        let (w, h) = (request.width as usize, request.height as usize);
        let mut rgb = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                let fx = x as f32 / w.max(1) as f32;
                let fy = y as f32 / h.max(1) as f32;
                let noise: f32 = rng.random::<f32>() * 0.08;
                for c in 0..3 {
                    let v = base[c] * (1.0 - fx) + tint[c] * fy + noise;
                    rgb[(y * w + x) * 3 + c] = (v.clamp(0.0, 1.0) * 255.0) as u8;
                }
            }
        }
        rgb
    }
}

impl Engine for SimulatedEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            kind: "simulated".into(),
            models: self.config.models.clone(),
            model_versions: self
                .config
                .models
                .iter()
                .map(|m| format!("{m}@{}", self.config.version))
                .collect(),
            devices: vec!["cpu".into()],
            parallel_degree: 1,
            precision: crate::Precision::Bf16,
            note: format!("SIMULATED engine ({} ms/step, no model)", self.config.step_ms),
        }
    }

    fn lora_status(&self) -> crate::LoraStatus {
        let mut cached: Vec<(u64, String)> =
            self.cache.iter().map(|c| (c.last_use, c.label.clone())).collect();
        cached.sort_by_key(|c| std::cmp::Reverse(c.0));
        crate::LoraStatus {
            applied: self.applied.clone(),
            cached: cached.into_iter().map(|(_, l)| l).collect(),
            cache_bytes: self.cache.iter().map(|c| c.bytes).sum(),
            ..self.lora.clone()
        }
    }

    fn generate(
        &mut self,
        request: &GenerateRequest,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<GeneratedImage, EngineError> {
        self.generate_resumable(request, None, 0, &mut |_| {}, on_step)
    }

    fn generate_resumable(
        &mut self,
        request: &GenerateRequest,
        resume: Option<&StepCheckpoint>,
        every: u32,
        on_checkpoint: &mut dyn FnMut(StepCheckpoint),
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<GeneratedImage, EngineError> {
        if !self.config.models.iter().any(|m| m == &request.model) {
            return Err(EngineError::InvalidRequest(format!(
                "simulated engine does not serve model {:?}",
                request.model
            )));
        }
        if request.steps == 0 || request.width == 0 || request.height == 0 {
            return Err(EngineError::InvalidRequest(
                "steps, width and height must be positive".into(),
            ));
        }
        let scheduler = Self::scheduler(request)?;
        let faults = &self.config.faults;
        if faults.bad_weights {
            return Err(EngineError::Load(format!(
                "simulated fault: weights of {}@{} are corrupt",
                request.model, self.config.version
            )));
        }
        if faults.panic > 0 {
            let n = {
                let mut g = PANIC_TRIES.lock().unwrap_or_else(|p| p.into_inner());
                let n = g
                    .get_or_insert_with(HashMap::new)
                    .entry(Self::request_key(request))
                    .or_insert(0);
                *n += 1;
                *n
            };
            assert!(n > faults.panic, "simulated fault: engine panic on try {n}");
        }
        let tries = self.tries.entry(Self::request_key(request)).or_insert(0);
        *tries += 1;
        if *tries <= faults.oom {
            return Err(EngineError::OutOfMemory {
                device: "sim:0".into(),
                message: format!("simulated fault: out of memory on try {tries}"),
            });
        }
        if *tries <= faults.oom + faults.device {
            return Err(EngineError::Device {
                device: "sim:0".into(),
                message: format!("simulated fault: device error on try {tries}"),
            });
        }
        self.apply_loras(request)?;
        let (first, mut state) = match resume {
            None => (1, Self::initial_state(request)),
            Some(c) => {
                let bytes = &c.bytes;
                if bytes.len() != 20 || &bytes[..8] != CHECKPOINT_MAGIC {
                    return Err(EngineError::BadCheckpoint(
                        "not a simulated-engine checkpoint".into(),
                    ));
                }
                let step = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
                let state = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
                if step != c.step || step >= request.steps {
                    return Err(EngineError::BadCheckpoint(format!(
                        "checkpoint at step {step} (pointer says {}) does not fit a {}-step job",
                        c.step, request.steps
                    )));
                }
                (step + 1, state)
            }
        };
        let checkpoint = |step: u32, state: u64| {
            let mut bytes = CHECKPOINT_MAGIC.to_vec();
            bytes.extend(step.to_le_bytes());
            bytes.extend(state.to_le_bytes());
            StepCheckpoint { step, bytes }
        };
        let start = Instant::now();
        for step in first..=request.steps {
            std::thread::sleep(Duration::from_millis(self.config.step_ms));
            state = Self::advance(state, step);
            let control = on_step(StepEvent {
                step,
                total: request.steps,
                elapsed: start.elapsed(),
                host: Duration::ZERO,
            });
            if every > 0 && step < request.steps && (step.is_multiple_of(every) || control == Control::Cancel)
            {
                on_checkpoint(checkpoint(step, state));
            }
            if control == Control::Cancel {
                return Err(EngineError::Cancelled { step });
            }
        }
        self.tries.remove(&Self::request_key(request));
        let denoise_ms = start.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let rgb = Self::render_state(request, state);
        Ok(GeneratedImage {
            width: request.width,
            height: request.height,
            rgb,
            timings: StageTimings {
                encode_ms: 0.0,
                denoise_ms,
                decode_ms: t.elapsed().as_secs_f64() * 1e3,
                plan: Some(request.plan.clone().unwrap_or_else(|| "single".into())),
                scheduler: Some(scheduler.to_string()),
                // As the job named them: no local path or checksum in the job's status.
                loras: request
                    .loras
                    .iter()
                    .map(|l| crate::LoraRef {
                        path: None,
                        checksum: None,
                        ..l.clone()
                    })
                    .collect(),
                ..Default::default()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(seed: u64) -> GenerateRequest {
        GenerateRequest {
            model: "flux-dev".into(),
            prompt: "a lighthouse".into(),
            negative_prompt: None,
            width: 64,
            height: 32,
            steps: 3,
            guidance: 3.5,
            true_cfg_scale: 1.0,
            plan: None,
            seed,
            scheduler: None,
            loras: Vec::new(),
        }
    }

    /// A safetensors file of `n` one-element tensors named like a PEFT adapter's (`pad` extra
    /// bytes of metadata make it bigger).
    fn adapter_file(tag: &str, n: usize, pad: usize) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ditfleet-sim-lora-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut header = serde_json::Map::new();
        for i in 0..n {
            header.insert(
                format!("blocks.{i}.attn.to_q.lora_A.weight"),
                serde_json::json!({"dtype": "F32", "shape": [1], "data_offsets": [i * 4, i * 4 + 4]}),
            );
        }
        header.insert("__metadata__".into(), serde_json::json!({"pad": "x".repeat(pad)}));
        let h = serde_json::to_vec(&header).unwrap();
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend(h);
        bytes.extend(vec![0u8; n * 4]);
        let p = dir.join(format!("{tag}.safetensors"));
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn lora(name: &str, version: &str, scale: f32) -> crate::request::LoraRef {
        crate::request::LoraRef {
            name: name.into(),
            version: version.into(),
            scale,
            path: Some(adapter_file(&format!("{name}-{version}"), 2, 0)),
            checksum: Some(format!("sum-{name}-{version}")),
        }
    }

    #[test]
    fn adapters_must_come_as_readable_safetensors_files_and_failures_are_permanent() {
        let mut e = SimulatedEngine::new(SimulatedConfig {
            step_ms: 0,
            ..Default::default()
        });
        let mut r = request(1);
        let mut l = lora("a", "1", 1.0);
        l.path = None;
        r.loras = vec![l.clone()];
        let err = e.generate(&r, &mut |_| Control::Continue).unwrap_err();
        assert!(
            err.to_string().contains("came without its file") && !err.is_transient(),
            "{err}"
        );
        l.path = Some(std::env::temp_dir().join("ditfleet-no-such-adapter.safetensors"));
        r.loras = vec![l.clone()];
        let err = e.generate(&r, &mut |_| Control::Continue).unwrap_err();
        assert!(
            matches!(err, EngineError::Load(_)) && !err.is_transient(),
            "{err}"
        );
        let junk = std::env::temp_dir().join(format!("ditfleet-junk-{}.safetensors", std::process::id()));
        std::fs::write(&junk, b"definitely not safetensors").unwrap();
        l.path = Some(junk);
        r.loras = vec![l];
        let err = e.generate(&r, &mut |_| Control::Continue).unwrap_err();
        assert!(err.to_string().contains("not a safetensors file"), "{err}");
        assert!(
            e.lora_status().applied.is_empty(),
            "a failed stack is never applied"
        );
    }

    #[test]
    fn a_stack_switch_pays_the_apply_time_a_hot_stack_does_not_and_the_status_reports_it() {
        let mut e = SimulatedEngine::new(SimulatedConfig {
            step_ms: 0,
            lora_apply_ms: 60,
            ..Default::default()
        });
        let a = GenerateRequest {
            loras: vec![lora("a", "1", 0.5)],
            ..request(1)
        };
        let b = GenerateRequest {
            loras: vec![lora("b", "1", 1.0), lora("a", "1", 0.5)],
            ..request(1)
        };
        let t = Instant::now();
        e.generate(&a, &mut |_| Control::Continue).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(60));
        let st = e.lora_status();
        assert_eq!(st.applied.len(), 1);
        assert_eq!(
            (st.applied[0].name.as_str(), st.applied[0].path.as_ref()),
            ("a", None)
        );
        assert_eq!((st.cache_hits, st.cache_misses), (0, 1));
        assert!(st.last_apply_ms >= 60.0);
        let t = Instant::now();
        e.generate(&a, &mut |_| Control::Continue).unwrap();
        assert!(t.elapsed() < Duration::from_millis(60), "hot stack: no apply");
        let st = e.lora_status();
        assert_eq!((st.cache_hits, st.cache_misses, st.last_apply_ms), (1, 1, 0.0));
        e.generate(&b, &mut |_| Control::Continue).unwrap();
        let st = e.lora_status();
        assert_eq!(
            (st.cache_hits, st.cache_misses),
            (2, 2),
            "a from the cache, b read"
        );
        assert_eq!(st.cached, ["a@1", "b@1"], "most recently used first");
        assert_eq!(
            st.applied.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
            ["b", "a"]
        );
        // Back to the base model is a switch too.
        e.generate(&request(1), &mut |_| Control::Continue).unwrap();
        assert!(e.lora_status().applied.is_empty());
        assert!(e.lora_status().last_apply_ms >= 60.0);
    }

    #[test]
    fn the_adapter_cache_stays_within_its_bytes_least_recently_used_out_first() {
        let size = std::fs::metadata(adapter_file("probe", 2, 1000)).unwrap().len();
        let mut e = SimulatedEngine::new(SimulatedConfig {
            step_ms: 0,
            lora_cache_bytes: size * 2,
            ..Default::default()
        });
        let big = |name: &str| crate::request::LoraRef {
            path: Some(adapter_file(&format!("big-{name}"), 2, 1000)),
            ..lora(name, "1", 1.0)
        };
        for n in ["x", "y", "x", "z"] {
            let r = GenerateRequest {
                loras: vec![big(n)],
                ..request(2)
            };
            e.generate(&r, &mut |_| Control::Continue).unwrap();
        }
        let st = e.lora_status();
        assert_eq!(st.cached, ["z@1", "x@1"], "y was least recently used");
        assert!(st.cache_bytes <= st.cache_capacity_bytes);
        assert_eq!((st.cache_hits, st.cache_misses), (1, 3));
    }

    #[test]
    fn sdxl_runs_its_samplers_and_refuses_others_as_invalid_requests() {
        let mut e = SimulatedEngine::new(SimulatedConfig {
            step_ms: 0,
            ..Default::default()
        });
        let mut r = request(1);
        r.model = "sdxl-base".into();
        let img = e.generate(&r, &mut |_| Control::Continue).unwrap();
        assert_eq!(img.timings.scheduler.as_deref(), Some("euler"), "the default");
        let mut images = vec![img.rgb];
        for s in ["euler_a", "dpmpp_2m", "dpmpp_2m_karras"] {
            r.scheduler = Some(s.into());
            let img = e.generate(&r, &mut |_| Control::Continue).unwrap();
            assert_eq!(img.timings.scheduler.as_deref(), Some(s));
            assert!(!images.contains(&img.rgb), "{s} gives its own image");
            images.push(img.rgb);
        }
        r.scheduler = Some("euler".into());
        assert_eq!(
            e.generate(&r, &mut |_| Control::Continue).unwrap().rgb,
            images[0],
            "naming the default is the default"
        );
        for bad in ["flow_euler", "ddim"] {
            r.scheduler = Some(bad.into());
            let err = e.generate(&r, &mut |_| Control::Continue).unwrap_err();
            assert!(
                matches!(&err, EngineError::InvalidRequest(m) if m.contains("sdxl-base has no sampler")),
                "{err}"
            );
        }
        let mut f = request(1);
        f.scheduler = Some("euler".into());
        assert!(matches!(
            e.generate(&f, &mut |_| Control::Continue),
            Err(EngineError::InvalidRequest(_))
        ));
        f.scheduler = Some("flow_euler".into());
        let img = e.generate(&f, &mut |_| Control::Continue).unwrap();
        assert_eq!(
            img.rgb,
            SimulatedEngine::render(&request(1)),
            "Flux images unchanged"
        );
        assert_eq!(img.timings.scheduler.as_deref(), Some("flow_euler"));
    }

    #[test]
    fn the_image_depends_on_the_lora_stack_and_the_timings_report_it() {
        let mut e = SimulatedEngine::new(SimulatedConfig {
            step_ms: 0,
            ..Default::default()
        });
        let base = request(4);
        let stacks = [
            vec![lora("a", "1", 1.0)],
            vec![lora("a", "1", 0.5)],
            vec![lora("a", "2", 1.0)],
            vec![lora("b", "1", 1.0)],
            vec![lora("a", "1", 1.0), lora("b", "1", 1.0)],
            vec![lora("b", "1", 1.0), lora("a", "1", 1.0)],
        ];
        let mut images = vec![SimulatedEngine::render(&base)];
        for stack in stacks {
            let r = GenerateRequest {
                loras: stack.clone(),
                ..base.clone()
            };
            let img = e.generate(&r, &mut |_| Control::Continue).unwrap();
            assert_eq!(
                img.timings
                    .loras
                    .iter()
                    .map(|l| (l.name.clone(), l.version.clone(), l.scale))
                    .collect::<Vec<_>>(),
                stack
                    .iter()
                    .map(|l| (l.name.clone(), l.version.clone(), l.scale))
                    .collect::<Vec<_>>()
            );
            assert!(
                img.timings
                    .loras
                    .iter()
                    .all(|l| l.path.is_none() && l.checksum.is_none())
            );
            assert_eq!(img.rgb, SimulatedEngine::render(&r), "deterministic");
            assert!(!images.contains(&img.rgb), "{stack:?} gives its own image");
            images.push(img.rgb);
        }
        let json = serde_json::to_value(
            e.generate(
                &GenerateRequest {
                    loras: vec![lora("a", "1", 0.8)],
                    ..base.clone()
                },
                &mut |_| Control::Continue,
            )
            .unwrap()
            .timings,
        )
        .unwrap();
        assert_eq!(
            json["loras"],
            serde_json::json!([{"name": "a", "version": "1", "scale": 0.8}])
        );
        assert_eq!(json["scheduler"], "flow_euler");
    }

    #[test]
    fn same_seed_gives_identical_image_and_different_seed_differs() {
        let mut e = SimulatedEngine::new(SimulatedConfig {
            step_ms: 0,
            ..Default::default()
        });
        let a = e.generate(&request(7), &mut |_| Control::Continue).unwrap();
        let b = e.generate(&request(7), &mut |_| Control::Continue).unwrap();
        let c = e.generate(&request(8), &mut |_| Control::Continue).unwrap();
        assert_eq!(a.rgb, b.rgb);
        assert_ne!(a.rgb, c.rgb);
        assert_eq!(a.rgb.len(), 64 * 32 * 3);
        let png = a.to_png().unwrap();
        assert_eq!(&png[1..4], b"PNG");
    }

    #[test]
    fn reports_every_step_and_stops_when_cancelled() {
        let mut e = SimulatedEngine::new(SimulatedConfig {
            step_ms: 0,
            ..Default::default()
        });
        let mut seen = Vec::new();
        e.generate(&request(1), &mut |ev| {
            seen.push(ev.step);
            Control::Continue
        })
        .unwrap();
        assert_eq!(seen, vec![1, 2, 3]);
        let err = e.generate(&request(1), &mut |ev| {
            if ev.step == 2 {
                Control::Cancel
            } else {
                Control::Continue
            }
        });
        assert!(matches!(err, Err(EngineError::Cancelled { step: 2 })));
    }

    #[test]
    fn resuming_from_a_checkpoint_gives_the_uninterrupted_image_and_a_wrong_state_does_not() {
        let mut e = SimulatedEngine::new(SimulatedConfig {
            step_ms: 0,
            ..Default::default()
        });
        let mut r = request(3);
        r.steps = 10;
        let full = e.generate(&r, &mut |_| Control::Continue).unwrap();
        assert_eq!(full.rgb, SimulatedEngine::render(&r));
        let mut saved = Vec::new();
        let err = e.generate_resumable(&r, None, 3, &mut |c| saved.push(c), &mut |ev| {
            if ev.step == 7 {
                Control::Cancel
            } else {
                Control::Continue
            }
        });
        assert!(matches!(err, Err(EngineError::Cancelled { step: 7 })));
        assert_eq!(
            saved.iter().map(|c| c.step).collect::<Vec<_>>(),
            [3, 6, 7],
            "every 3 and at the cancel"
        );
        for c in &saved {
            let mut steps = Vec::new();
            let img = e
                .generate_resumable(&r, Some(c), 3, &mut |_| {}, &mut |ev| {
                    steps.push(ev.step);
                    Control::Continue
                })
                .unwrap();
            assert_eq!(img.rgb, full.rgb, "resumed from step {}", c.step);
            assert_eq!(
                steps.first(),
                Some(&(c.step + 1)),
                "continues after the checkpoint"
            );
        }
        let mut wrong = saved[0].clone();
        wrong.bytes[12] ^= 1;
        let img = e
            .generate_resumable(&r, Some(&wrong), 0, &mut |_| {}, &mut |_| Control::Continue)
            .unwrap();
        assert_ne!(img.rgb, full.rgb, "the image depends on the carried state");
        let mut garbage = saved[0].clone();
        garbage.bytes.truncate(5);
        assert!(matches!(
            e.generate_resumable(&r, Some(&garbage), 0, &mut |_| {}, &mut |_| Control::Continue),
            Err(EngineError::BadCheckpoint(_))
        ));
    }

    #[test]
    fn injected_faults_fail_the_first_tries_then_succeed_or_fail_permanently() {
        let mut e = SimulatedEngine::new(SimulatedConfig {
            step_ms: 0,
            faults: SimulatedFaults {
                oom: 2,
                device: 1,
                ..Default::default()
            },
            ..Default::default()
        });
        let r = request(5);
        let mut go = || e.generate(&r, &mut |_| Control::Continue);
        assert!(matches!(go(), Err(EngineError::OutOfMemory { .. })));
        assert!(matches!(go(), Err(EngineError::OutOfMemory { .. })));
        assert!(matches!(go(), Err(EngineError::Device { .. })));
        assert!(go().is_ok());
        let mut bad = SimulatedEngine::new(SimulatedConfig {
            step_ms: 0,
            faults: SimulatedFaults {
                bad_weights: true,
                ..Default::default()
            },
            ..Default::default()
        });
        let err = bad.generate(&r, &mut |_| Control::Continue).unwrap_err();
        assert!(
            matches!(err, EngineError::Load(_)) && !err.is_transient(),
            "{err}"
        );
    }

    #[test]
    fn an_injected_panic_hits_the_first_tries_across_engines_then_the_request_succeeds() {
        let cfg = SimulatedConfig {
            step_ms: 0,
            faults: SimulatedFaults {
                panic: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        let r = request(77);
        let mut first = SimulatedEngine::new(cfg.clone());
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = first.generate(&r, &mut |_| Control::Continue);
        }));
        assert!(panicked.is_err());
        // A fresh engine (as the worker builds after a panic) does not panic again.
        let img = SimulatedEngine::new(cfg)
            .generate(&r, &mut |_| Control::Continue)
            .unwrap();
        assert_eq!(img.timings.plan.as_deref(), Some("single"));
    }

    #[test]
    fn unknown_model_is_an_invalid_request() {
        let mut e = SimulatedEngine::new(SimulatedConfig {
            step_ms: 0,
            ..Default::default()
        });
        let mut r = request(1);
        r.model = "sdxl-turbo".into();
        assert!(matches!(
            e.generate(&r, &mut |_| Control::Continue),
            Err(EngineError::InvalidRequest(_))
        ));
    }
}
