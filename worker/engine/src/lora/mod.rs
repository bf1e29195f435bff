//! Per-job LoRA: adapters read from safetensors files ([`Adapter`]), kept in a host-memory LRU
//! bounded in bytes ([`LoraCache`]), and MERGED into the weights the model's GEMMs read for the
//! length of a job ([`Applier`]), then taken out again bit-exactly.
//!
//! Three layers, so that another model family plugs in at one seam:
//!
//! * **formats** ([`adapter`]): diffusers/PEFT (`<module>.lora_A.weight`, `.lora_B.weight`,
//!   optional `.alpha`, else alpha = rank) and kohya/sd-scripts (`<module>.lora_down.weight`,
//!   `.lora_up.weight`, `.alpha`). Parsing knows the key grammar only, not module names.
//! * **family mapping** ([`Family`]; Flux: [`flux::FluxLora`]): which model variable, and which rows
//!   of it, a module named in a file lands on, and the shapes of every weight of the WHOLE model (so
//!   every rank validates a stack the same way, whatever part of the model it holds).
//! * **application** ([`apply`]): for a stack `[(adapter, scale), …]` every touched weight `W`
//!   becomes `cast(W_fp32 + Σ scale_i · alpha_m / rank_m · B_m @ A_m)`, computed in fp32 and
//!   rounded once, written into `W`'s own storage (in place under no-grad: CUDA graphs captured on
//!   those pointers stay valid). The original of each touched weight is kept (in its own dtype, on
//!   its device up to a byte budget, else in host memory) and copied back on restore, so the base
//!   weights are bit-identical afterwards (merging and then subtracting in bf16 would not be).
//!
//! # Merging vs a run-time low-rank path
//!
//! Flux.1-dev's transformer holds P ≈ 11.9e9 weights, nearly all in its Linear layers (504 of
//! them as diffusers names them, 494 inside the blocks); LoRAs trained on "all linear layers"
//! touch nearly all of P. For a stack of total rank R = Σ r_i:
//!
//! * **merged** (this module): per step, nothing: the GEMMs are the base model's, and the fused
//!   kernels, CUDA graphs and parallel plans are unchanged. Per stack switch: one GEMM `(out × R)
//!   @ (R × in)` per touched weight: 2·P·R flops, which `MergeKernel::Split` runs on the tensor
//!   cores at 3·R (exact bf16 splits; R = 192, three rank-64 adapters: 13.8e12, ~20 ms at an H100's
//!   ~700 TFLOP/s of bf16) where fp32 on CUDA cores would take ~75 ms; plus ~14 bytes of memory
//!   traffic per bf16 weight (write the fp32 ΔW 4, add and round 8, NaN check 2: ~165 GB, ~50 ms
//!   at an H100's 3.35 TB/s; the original is saved once, 4 bytes, and kept). Restore is one copy
//!   (4 bytes per weight). A job whose stack is already applied pays nothing.
//!   Measured: docs/benchmarks.md, "LoRA on Flux.1-dev".
//! * **run-time low-rank**: per step, per touched layer, two skinny GEMMs `x @ Aᵀ` then `@ Bᵀ`:
//!   2·T·R·(in + out) flops for T tokens (a few % of the layer's own 2·T·in·out at R = 64 on
//!   3072-wide layers), but each re-reads the layer's input activation (T × in bf16: 28 MB at
//!   1024², T = 4608) and adds two launches: ~500 layers × 28 MB ≈ 14 GB of extra traffic and
//!   ~1000 extra kernels per adapter per step (several ms per step on an H200), every step of
//!   every job, and the fused paths (qkv → RoPE kernel, GELU epilogues, split single blocks,
//!   graphs) would each need a LoRA variant.
//!
//! A 28-step job pays the run-time path's per-step cost 28 times and 56 times with true CFG,
//! while the merge is paid once per stack switch and never by a job that finds its stack hot
//! (which the scheduler arranges). The run-time path only wins for batches that mix stacks,
//! which this engine does not run. So: merge.
//!
//! # Diffusers
//!
//! Checked against diffusers 0.42.1 (`load_lora_weights`, `set_adapters`, `fuse_lora`) by the
//! goldens of `tests/fixtures/gen_lora_goldens.py`. Where diffusers' kohya reader departs from
//! sd-scripts this module follows sd-scripts: diffusers drops the modules outside the blocks
//! (`lora_unet_img_in`, `…_txt_in`, `…_time_in_*`, `…_vector_in_*`, `…_guidance_in_*`,
//! `…_final_layer_*`: converted without the `transformer.` prefix, so never loaded), ignores the
//! `.alpha` of `final_layer` modules, and splits `linear1` at Flux.1's full widths only. A PEFT
//! file that gives `.alpha` for some modules and not others takes alpha = rank for the others
//! here (diffusers would use the most common alpha).

pub mod adapter;
pub mod apply;
pub mod cache;
pub mod flux;
pub mod sdxl;
pub mod slot;

pub use adapter::{Adapter, Format, Module};
pub use apply::{Applier, ApplyOptions, ApplyReport, MergeKernel, SPLIT_BLOCK_BYTES, Weights, split_bf16};
pub use cache::{CacheStats, LoraCache};
pub use slot::{LoraHub, LoraSlot, stack_id};

use crate::EngineError;

/// Identifies one adapter file: registry name and version, and the checksum of its content (so
/// that a version pushed again with other bytes is never served from a stale cache entry).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdapterKey {
    pub name: String,
    pub version: String,
    pub checksum: String,
}

impl AdapterKey {
    pub fn new(name: impl Into<String>, version: impl Into<String>, checksum: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            version: version.into(),
            checksum: checksum.into(),
        }
    }
}

impl std::fmt::Display for AdapterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// Why an adapter or a stack cannot be applied. Everything but [`LoraError::Torch`] is a property
/// of the adapter or the request (permanent); the weights are the base weights whenever one of
/// these is returned.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// Keys that fit no LoRA key grammar, modules the model has no weight for, and LoRA pairs
    /// with one half missing.
    #[error("adapter {adapter}: {}", unmatched_message(.unknown, .incomplete))]
    Unmatched {
        adapter: String,
        /// Keys of the file that match nothing.
        unknown: Vec<String>,
        /// `lora_A`/`lora_down` keys without their `lora_B`/`lora_up` (or the reverse), and
        /// `.alpha` keys of no module.
        incomplete: Vec<String>,
    },
    /// A tensor holds NaN or Inf, or the merged weights would.
    #[error("adapter {adapter}: {what} contains NaN or Inf")]
    NonFinite { adapter: String, what: String },
    /// A tensor's shape does not fit its partner or its target weight.
    #[error("adapter {adapter}: {key}: {message}")]
    Shape {
        adapter: String,
        key: String,
        message: String,
    },
    /// The file cannot be read (missing, not safetensors, unsupported dtype).
    #[error("adapter {adapter}: {message}")]
    Read { adapter: String, message: String },
    /// A scale that is not a finite number.
    #[error("adapter {adapter}: scale {scale} is not finite")]
    Scale { adapter: String, scale: f64 },
    /// libtorch failed (out of memory, device error) while merging or restoring.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

fn unmatched_message(unknown: &[String], incomplete: &[String]) -> String {
    let mut parts = Vec::new();
    if !unknown.is_empty() {
        parts.push(format!(
            "keys that match nothing in the model: {}",
            unknown.join(", ")
        ));
    }
    if !incomplete.is_empty() {
        parts.push(format!("incomplete LoRA keys: {}", incomplete.join(", ")));
    }
    parts.join("; ")
}

impl From<LoraError> for EngineError {
    fn from(e: LoraError) -> Self {
        match e {
            LoraError::Torch(t) => EngineError::from(t),
            other => EngineError::InvalidRequest(format!("lora: {other}")),
        }
    }
}

/// Where the product `B @ A` of one module lands: rows `src..src + len` of it are added to rows
/// `dst..dst + len` of `var` (a fused projection holds several modules' rows; a swapped layout
/// maps halves crosswise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    /// Qualified variable name, `<component>.<variable>` (`transformer.double_blocks.0.img_attn.qkv.weight`).
    pub var: String,
    pub src: i64,
    pub dst: i64,
    pub len: i64,
}

/// A module's placement: its output width (rows of `B`) and where those rows go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub out: i64,
    pub slices: Vec<Slice>,
}

impl Placement {
    /// All `out` rows of the module onto rows `0..out` of `var`.
    pub fn whole(var: impl Into<String>, out: i64) -> Self {
        Self {
            out,
            slices: vec![Slice {
                var: var.into(),
                src: 0,
                dst: 0,
                len: out,
            }],
        }
    }
}

/// A model family's LoRA key mapping: adapter module names onto the engine's variables.
pub trait Family: Send + Sync {
    /// For errors and logs (`flux`).
    fn name(&self) -> &str;
    /// Where `module` (a key stem as the file names it, e.g. `transformer.transformer_blocks.0.attn.to_q`
    /// or `lora_unet_double_blocks_0_img_attn_qkv`) lands, or `None` if this family has no such
    /// module in `format`.
    fn place(&self, format: Format, module: &str) -> Option<Placement>;
    /// The shape of a qualified variable of the WHOLE model (`None`: no such variable).
    fn shape(&self, var: &str) -> Option<&[i64]>;
}
