//! Engine settings, parsed once and handed in.
//!
//! [`EngineSettings`] are what an operator sets (the worker's configuration parses them with the
//! rest of its environment, `ditfleet-worker generate` and the benchmarks from theirs) and
//! installs once per process with [`install`]; engine code reads them with [`get`], never from the
//! environment. [`BenchSwitches`] are the A/B switches benchmarks use to compare formulations:
//! they exist only with the `bench` cargo feature (read once from the environment then); a build
//! without it always runs the defaults.

use std::sync::OnceLock;
use std::time::Duration;

/// When multi-GPU steps run as CUDA graphs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CudaGraphs {
    Off,
    /// Every plan but those with a Ring degree (measured slower as graphs than eager).
    NoRing,
    All,
}

/// [`EngineSettings::lora_cache_bytes`]'s default: 4 GiB, a dozen rank-64 Flux adapters in bf16.
pub const DEFAULT_LORA_CACHE_BYTES: usize = 4 << 30;

/// [`EngineSettings::lora_device_cache_bytes`]'s default: 2 GiB, about three rank-64 Flux
/// adapters prepared for merging.
pub const DEFAULT_LORA_DEVICE_CACHE_BYTES: usize = 2 << 30;

/// What an operator may set for the engine.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSettings {
    /// `DITFLEET_STEP_TIMEOUT_S` (default 300): how long a multi-GPU job may go without finishing
    /// a step before the watchdog aborts its groups (a GPU that stopped answering leaves its peers
    /// waiting in collectives forever otherwise). The first step of a new image size includes
    /// loading kernels and capturing its CUDA graph.
    pub step_timeout: Duration,
    /// `DITFLEET_CUDA_GRAPHS` = `off` | `all` (default: graphs for plans without Ring).
    pub cuda_graphs: CudaGraphs,
    /// `DITFLEET_CUDA_GRAPHS_MAX` (default 2): captured step graphs kept per rank (one per image
    /// size and text length seen; the oldest is dropped).
    pub cuda_graphs_max: usize,
    /// `DITFLEET_LORA_CACHE_BYTES` (default 4 GiB): host memory an engine keeps parsed LoRA
    /// adapters in (least recently used out first); 0 keeps none (every stack switch reads its
    /// files again).
    pub lora_cache_bytes: usize,
    /// `DITFLEET_LORA_DEVICE_CACHE_BYTES` (default 2 GiB): GPU memory each rank keeps adapters in,
    /// prepared for merging (least recently used out first), so switching to a stack of recent
    /// adapters copies nothing from the host; 0 keeps none. Unused on the CPU.
    pub lora_device_cache_bytes: usize,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            step_timeout: Duration::from_secs(300),
            cuda_graphs: CudaGraphs::NoRing,
            cuda_graphs_max: 2,
            lora_cache_bytes: DEFAULT_LORA_CACHE_BYTES,
            lora_device_cache_bytes: DEFAULT_LORA_DEVICE_CACHE_BYTES,
        }
    }
}

impl EngineSettings {
    /// Parses the settings from `var` (e.g. `|k| std::env::var(k).ok()`); an error names the
    /// variable, its value and what it must be.
    pub fn parse(var: &dyn Fn(&str) -> Option<String>) -> Result<Self, String> {
        let mut s = Self::default();
        if let Some(v) = var("DITFLEET_STEP_TIMEOUT_S") {
            let secs: f64 = v
                .trim()
                .parse()
                .ok()
                .filter(|x: &f64| x.is_finite() && *x > 0.0)
                .ok_or_else(|| {
                    format!("DITFLEET_STEP_TIMEOUT_S={v:?}: must be a positive number of seconds")
                })?;
            s.step_timeout = Duration::from_secs_f64(secs);
        }
        if let Some(v) = var("DITFLEET_CUDA_GRAPHS") {
            s.cuda_graphs = match v.trim() {
                "off" | "0" | "false" => CudaGraphs::Off,
                "all" => CudaGraphs::All,
                "" | "on" | "auto" | "default" => CudaGraphs::NoRing,
                _ => {
                    return Err(format!(
                        "DITFLEET_CUDA_GRAPHS={v:?}: must be on (the default), off or all"
                    ));
                }
            };
        }
        if let Some(v) = var("DITFLEET_CUDA_GRAPHS_MAX") {
            s.cuda_graphs_max = v.trim().parse().ok().filter(|n: &usize| *n >= 1).ok_or_else(|| {
                format!("DITFLEET_CUDA_GRAPHS_MAX={v:?}: must be a whole number of at least 1")
            })?;
        }
        for (name, field) in [
            ("DITFLEET_LORA_CACHE_BYTES", &mut s.lora_cache_bytes),
            ("DITFLEET_LORA_DEVICE_CACHE_BYTES", &mut s.lora_device_cache_bytes),
        ] {
            if let Some(v) = var(name) {
                *field = v
                    .trim()
                    .parse()
                    .map_err(|_| format!("{name}={v:?}: must be a whole number of bytes (0 = keep none)"))?;
            }
        }
        Ok(s)
    }
}

static SETTINGS: OnceLock<EngineSettings> = OnceLock::new();

/// Installs the process's settings; the first call wins (a later one with other settings is
/// refused, so no part of the engine runs with settings another part does not see).
pub fn install(settings: EngineSettings) -> Result<(), String> {
    let want = settings.clone();
    let got = SETTINGS.get_or_init(|| settings);
    if *got == want {
        Ok(())
    } else {
        Err(format!(
            "engine settings were already installed as {got:?}; refusing {want:?}"
        ))
    }
}

/// The installed settings (the defaults when none were installed).
pub fn get() -> &'static EngineSettings {
    SETTINGS.get_or_init(EngineSettings::default)
}

/// Benchmark A/B switches (see the module docs). Each names the measured question it answers;
/// the defaults are the formulations the engine ships.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BenchSwitches {
    /// `DITFLEET_FLUX_OPT`: Flux's fused formulations, e.g. `all,-a2a` or `none`.
    pub flux_opt: String,
    /// `DITFLEET_OVERLAP_CHUNKS`: parts the double blocks' image q/k/v go out in (default 2).
    pub overlap_chunks: Option<i64>,
    /// `DITFLEET_RING=stacked,blocking`: Ring's old K/V layout / no send-while-attending.
    pub ring_stacked: bool,
    pub ring_blocking: bool,
    /// `DITFLEET_RING_MERGE=reference`: Ring's log-sum-exp merge through reference ops.
    pub ring_reference_merge: bool,
    /// `DITFLEET_RELAYOUT=elementwise`: the Ulysses output re-layout as an elementwise copy.
    pub relayout_elementwise: bool,
    /// `DITFLEET_LOOPBACK_COPIES=own`: the loopback exchange copies only the rank's own pieces.
    pub loopback_own_copies: bool,
    /// `DITFLEET_NCCL_STREAM=legacy`: NCCL on libtorch's current stream instead of its own.
    pub nccl_legacy_stream: bool,
    /// `DITFLEET_NCCL_A2A=collective`: `ncclAlltoAll` instead of grouped send/recv.
    pub nccl_collective_a2a: bool,
    /// `DITFLEET_ATTN_LSE=flash|efficient`: the first attention-with-LSE kernel tried.
    pub attn_lse: Option<String>,
    /// `DITFLEET_FP8_ACCUM=exact`: FP8 GEMMs without cuBLASLt's fast accumulation.
    pub fp8_exact_accum: bool,
    /// `DITFLEET_FP8_FUSED=off`: FP8 activations quantised by a pass of their own before each
    /// GEMM instead of by the kernel that produces them.
    pub fp8_unfused: bool,
    /// `DITFLEET_FP8_ATTN=off`: the FP8 precision's attention in bf16 instead of cuDNN's FP8.
    pub fp8_attention_off: bool,
    /// `DITFLEET_GELU=exact`: the FP8 GELU + quantise kernel's tanh through `tanhf`, as ATen.
    pub gelu_exact: bool,
    /// `DITFLEET_FP8_ATTN_TUNE=off`: cuDNN's FP8 attention runs heuristics' first plan instead
    /// of the fastest one timed on the first call of a shape.
    pub fp8_attention_untuned: bool,
}

impl BenchSwitches {
    #[cfg(feature = "bench")]
    fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok();
        let ring = var("DITFLEET_RING").unwrap_or_default();
        let has = |w: &str| ring.split(',').any(|x| x.trim() == w);
        Self {
            flux_opt: var("DITFLEET_FLUX_OPT").unwrap_or_default(),
            overlap_chunks: var("DITFLEET_OVERLAP_CHUNKS")
                .and_then(|v| v.parse().ok())
                .filter(|n| *n >= 1),
            ring_stacked: has("stacked"),
            ring_blocking: has("blocking"),
            ring_reference_merge: var("DITFLEET_RING_MERGE").is_some_and(|v| v == "reference"),
            relayout_elementwise: var("DITFLEET_RELAYOUT").is_some_and(|v| v == "elementwise"),
            loopback_own_copies: var("DITFLEET_LOOPBACK_COPIES").is_some_and(|v| v == "own"),
            nccl_legacy_stream: var("DITFLEET_NCCL_STREAM").is_some_and(|v| v == "legacy"),
            nccl_collective_a2a: var("DITFLEET_NCCL_A2A").is_some_and(|v| v == "collective"),
            attn_lse: var("DITFLEET_ATTN_LSE"),
            fp8_exact_accum: var("DITFLEET_FP8_ACCUM").is_some_and(|v| v == "exact"),
            fp8_unfused: var("DITFLEET_FP8_FUSED").is_some_and(|v| v == "off"),
            fp8_attention_off: var("DITFLEET_FP8_ATTN").is_some_and(|v| v == "off"),
            gelu_exact: var("DITFLEET_GELU").is_some_and(|v| v == "exact"),
            fp8_attention_untuned: var("DITFLEET_FP8_ATTN_TUNE").is_some_and(|v| v == "off"),
        }
    }
}

/// The benchmark switches: read once from the environment with the `bench` feature, the
/// defaults without it.
pub fn bench() -> &'static BenchSwitches {
    static B: OnceLock<BenchSwitches> = OnceLock::new();
    B.get_or_init(|| {
        #[cfg(feature = "bench")]
        {
            BenchSwitches::from_env()
        }
        #[cfg(not(feature = "bench"))]
        {
            BenchSwitches::default()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_parse_with_defaults_and_bad_values_name_the_variable() {
        let none = |_: &str| None;
        assert_eq!(EngineSettings::parse(&none).unwrap(), EngineSettings::default());
        let set = |k: &str| match k {
            "DITFLEET_STEP_TIMEOUT_S" => Some("12.5".to_string()),
            "DITFLEET_CUDA_GRAPHS" => Some("all".to_string()),
            "DITFLEET_CUDA_GRAPHS_MAX" => Some("4".to_string()),
            "DITFLEET_LORA_CACHE_BYTES" => Some("1048576".to_string()),
            "DITFLEET_LORA_DEVICE_CACHE_BYTES" => Some("0".to_string()),
            _ => None,
        };
        let s = EngineSettings::parse(&set).unwrap();
        assert_eq!(s.step_timeout, Duration::from_millis(12_500));
        assert_eq!(s.cuda_graphs, CudaGraphs::All);
        assert_eq!(s.cuda_graphs_max, 4);
        assert_eq!(s.lora_cache_bytes, 1 << 20);
        assert_eq!(s.lora_device_cache_bytes, 0);
        for (k, v) in [
            ("DITFLEET_STEP_TIMEOUT_S", "-1"),
            ("DITFLEET_STEP_TIMEOUT_S", "soon"),
            ("DITFLEET_CUDA_GRAPHS", "sometimes"),
            ("DITFLEET_CUDA_GRAPHS_MAX", "0"),
            ("DITFLEET_LORA_CACHE_BYTES", "4G"),
            ("DITFLEET_LORA_CACHE_BYTES", "-1"),
            ("DITFLEET_LORA_DEVICE_CACHE_BYTES", "2GiB"),
        ] {
            let one = |q: &str| (q == k).then(|| v.to_string());
            let e = EngineSettings::parse(&one).unwrap_err();
            assert!(e.starts_with(k) && e.contains(v), "{e}");
        }
    }

    #[cfg(not(feature = "bench"))]
    #[test]
    fn without_the_bench_feature_the_switches_are_the_shipped_defaults() {
        assert_eq!(*bench(), BenchSwitches::default());
    }
}
