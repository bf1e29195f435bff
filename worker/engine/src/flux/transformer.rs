//! The Flux.1 rectified-flow transformer (MMDiT: double-stream then single-stream blocks).
//!
//! Variables are named as in the original single-file checkpoint (`flux1-dev.safetensors`):
//! `double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ... Attention projections are
//! FUSED (one qkv matmul per stream; single blocks' `linear1` = qkv + mlp-in). The diffusers layout
//! (`transformer/`, split `to_q`/`to_k`/`to_v`) is mapped onto these names at load time, see
//! [`super::transformer_keys::diffusers_source`].

use std::path::Path;
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor, nn};

use super::layers::{LayerNorm, Linear, Res, RmsNorm, sdpa};
pub use super::part::Part;
use super::transformer_keys::diffusers_source;
use super::weights::{Checkpoint, Source, load_strict};
use crate::EngineError;

/// Which fused formulations the transformer's forward uses. All are on by default; each computes
/// the same function as the op-for-op port of diffusers' eager ops (the reference formulation),
/// rounding to bf16 once where the reference rounds twice. `DITFLEET_FLUX_OPT` (read once per
/// process) selects them for benchmarking: `none` = the reference formulation, or a comma list of
/// `rope` (RoPE as one complex multiply instead of ~8 elementwise passes), `rms` (q/k RMSNorm by
/// the fused `_fused_rms_norm` kernel instead of 6 passes in fp32), `mod` (adaLN modulation folded
/// into the LayerNorm's affine for batch 1, `addcmul` otherwise; gated residuals by `addcmul`),
/// `cat` (single blocks write attention output and GELU(mlp) straight into `linear2`'s input
/// instead of concatenating). Measured on H100 and H200: docs/benchmarks-flux-1gpu.md.
///
/// Three more work on CUDA bf16 tensors only (elsewhere the formulations above run): `qkv` (one
/// fused kernel, `csrc/flux_kernels.cu.inc`, from each stream's qkv projection straight to the
/// attention inputs: q/k RMSNorm, RoPE and the (b, seq, heads, 128) joint layout in one pass, in
/// place of the split, norm, RoPE and concatenation passes), `ln` (the gated residual and the next
/// modulated LayerNorm of a double block in one kernel), `gelu` (the MLP-in matmuls with the tanh
/// GELU in cuBLASLt's epilogue), `split` (single blocks run `linear1` / `linear2` as their qkv and
/// MLP halves, so the GELU can sit in the epilogue and no concatenated activation is written),
/// `a2a` (with `qkv`, under a pure Ulysses plan: the kernel writes q/k/v in the head groups the
/// all-to-all sends, the received chunks land where attention reads them and its output goes back
/// the same way: no stack, split, cat or re-layout copies around the two all-to-alls;
/// `parallel::attention`), `overlap` (with `a2a` and `split`: each single block's MLP-in matmul
/// runs while its q/k/v all-to-all is in flight and its MLP-out matmul while the attention
/// output travels back; [`JointAttention::attend_grouped_with`]), `chain` (with `ln`: each block's
/// closing gated residual `x + gate * y` is added by the next block's first kernel, which also
/// computes its modulated LayerNorm; [`Hidden`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opts {
    pub rope: bool,
    pub rms: bool,
    pub modulation: bool,
    pub cat: bool,
    pub qkv: bool,
    pub ln: bool,
    pub gelu: bool,
    pub split: bool,
    pub a2a: bool,
    pub overlap: bool,
    pub chain: bool,
}

impl Opts {
    pub const ALL: Opts = Opts {
        rope: true,
        rms: true,
        modulation: true,
        cat: true,
        qkv: true,
        ln: true,
        gelu: true,
        split: true,
        a2a: true,
        overlap: true,
        chain: true,
    };
    pub const NONE: Opts = Opts {
        rope: false,
        rms: false,
        modulation: false,
        cat: false,
        qkv: false,
        ln: false,
        gelu: false,
        split: false,
        a2a: false,
        overlap: false,
        chain: false,
    };

    /// Parses `DITFLEET_FLUX_OPT`'s value (see [`Opts`]; `all` in a list = the defaults plus the
    /// others named, `-name` turns one off, e.g. `all,-gelu`); unknown names are ignored.
    pub fn parse(v: &str) -> Opts {
        let v = v.trim();
        if v.is_empty() || v == "all" {
            return Opts::ALL;
        }
        let has = |n: &str| v.split(',').any(|x| x.trim() == n);
        let base = if has("all") { Opts::ALL } else { Opts::NONE };
        let off = |n: &str| v.split(',').any(|x| x.trim() == format!("-{n}"));
        Opts {
            rope: (base.rope || has("rope")) && !off("rope"),
            rms: (base.rms || has("rms")) && !off("rms"),
            modulation: (base.modulation || has("mod")) && !off("mod"),
            cat: (base.cat || has("cat")) && !off("cat"),
            qkv: (base.qkv || has("qkv")) && !off("qkv"),
            ln: (base.ln || has("ln")) && !off("ln"),
            gelu: (base.gelu || has("gelu")) && !off("gelu"),
            split: (base.split || has("split")) && !off("split"),
            a2a: (base.a2a || has("a2a")) && !off("a2a"),
            overlap: (base.overlap || has("overlap")) && !off("overlap"),
            chain: (base.chain || has("chain")) && !off("chain"),
        }
    }

    /// The process-wide setting (`DITFLEET_FLUX_OPT`, default all).
    pub fn get() -> Opts {
        static O: OnceLock<Opts> = OnceLock::new();
        *O.get_or_init(|| Opts::parse(&std::env::var("DITFLEET_FLUX_OPT").unwrap_or_default()))
    }
}

/// Architecture hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Packed latent channels (16 latent channels x 2x2 patch).
    pub in_channels: i64,
    /// Pooled text embedding width (CLIP-L: 768).
    pub vec_in_dim: i64,
    /// Text token width (T5-XXL: 4096).
    pub context_in_dim: i64,
    pub hidden_size: i64,
    pub mlp_ratio: f64,
    pub num_heads: i64,
    pub depth: i64,
    pub depth_single_blocks: i64,
    /// RoPE dims per position axis (text index, row, column); sums to the head dim.
    pub axes_dim: Vec<i64>,
    pub theta: f64,
    pub qkv_bias: bool,
    pub guidance_embed: bool,
}

impl Config {
    pub fn dev() -> Self {
        Self {
            in_channels: 64,
            vec_in_dim: 768,
            context_in_dim: 4096,
            hidden_size: 3072,
            mlp_ratio: 4.0,
            num_heads: 24,
            depth: 19,
            depth_single_blocks: 38,
            axes_dim: vec![16, 56, 56],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    pub fn schnell() -> Self {
        Self {
            guidance_embed: false,
            ..Self::dev()
        }
    }

    /// A tiny config with the Flux architecture (for CPU smoke tests and the fleet demo).
    pub fn tiny() -> Self {
        Self {
            in_channels: 64,
            vec_in_dim: 32,
            context_in_dim: 32,
            hidden_size: 64,
            mlp_ratio: 4.0,
            num_heads: 2,
            depth: 1,
            depth_single_blocks: 2,
            axes_dim: vec![8, 12, 12],
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: true,
        }
    }

    /// From a diffusers `transformer/config.json` (`FluxTransformer2DModel`).
    pub fn from_diffusers_json(path: &Path) -> Result<Self, EngineError> {
        let v = super::read_json(path)?;
        let i = |k: &str| super::json_i64(&v, k, path);
        let heads = i("num_attention_heads")?;
        let axes = v
            .get("axes_dims_rope")
            .and_then(|a| a.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_i64()).collect::<Vec<_>>())
            .unwrap_or_else(|| vec![16, 56, 56]);
        Ok(Self {
            in_channels: i("in_channels")?,
            vec_in_dim: i("pooled_projection_dim")?,
            context_in_dim: i("joint_attention_dim")?,
            hidden_size: heads * i("attention_head_dim")?,
            mlp_ratio: 4.0,
            num_heads: heads,
            depth: i("num_layers")?,
            depth_single_blocks: i("num_single_layers")?,
            axes_dim: axes,
            theta: 10_000.0,
            qkv_bias: true,
            guidance_embed: v
                .get("guidance_embeds")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
        })
    }

    pub fn head_dim(&self) -> i64 {
        self.hidden_size / self.num_heads
    }

    pub fn mlp_hidden(&self) -> i64 {
        (self.hidden_size as f64 * self.mlp_ratio) as i64
    }
}

/// Sinusoidal embedding `(b, dim)` of `t` `(b,)`: `[cos(t f), sin(t f)]`, `f_i = 10000^(-i/half)`.
/// The caller applies the x1000 time factor (as the references do).
pub fn timestep_embedding(t: &Tensor, dim: i64) -> Res<Tensor> {
    let half = dim / 2;
    let freqs = Tensor::f_arange(half, (Kind::Float, t.device()))?
        .f_mul_scalar(-(10_000f64.ln()))?
        .f_div_scalar(half as f64)?
        .f_exp()?;
    let args = t
        .f_to_kind(Kind::Float)?
        .f_unsqueeze(1)?
        .f_mul(&freqs.f_unsqueeze(0)?)?; // (b, half)
    Tensor::f_cat(&[args.f_cos()?, args.f_sin()?], -1)
}

/// RoPE tables for one token layout: `cos`/`sin` `(1, 1, seq, head_dim)`, fp32, each frequency
/// repeated for its (even, odd) pair; `freqs` = `cos + i sin` per pair, `(1, 1, seq, head_dim/2)`
/// complex64.
#[derive(Debug)]
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
    pub freqs: Tensor,
}

impl Rope {
    /// Another handle on the same tables (no copy).
    pub fn shallow_clone(&self) -> Self {
        Self {
            cos: self.cos.shallow_clone(),
            sin: self.sin.shallow_clone(),
            freqs: self.freqs.shallow_clone(),
        }
    }

    /// `ids`: `(seq, n_axes)` positions (text: zeros; image: (0, row, col)).
    pub fn new(ids: &Tensor, axes_dim: &[i64], theta: f64) -> Res<Self> {
        let ids = ids.f_to_kind(Kind::Float)?; // f64 would match the references' fp64 on CPU only
        let mut angles = Vec::with_capacity(axes_dim.len());
        for (i, &d) in axes_dim.iter().enumerate() {
            let scale =
                Tensor::f_arange_start_step(0, d, 2, (Kind::Double, ids.device()))?.f_div_scalar(d as f64)?;
            let omega = scale.f_mul_scalar(theta.ln())?.f_exp()?.f_reciprocal()?; // (d/2,)
            let pos = ids.f_select(1, i as i64)?.f_to_kind(Kind::Double)?; // (seq,)
            angles.push(pos.f_unsqueeze(1)?.f_mul(&omega.f_unsqueeze(0)?)?); // (seq, d/2)
        }
        let ang = Tensor::f_cat(&angles, 1)?; // (seq, head_dim/2)
        let rep = |t: Tensor| -> Res<Tensor> {
            let (s, h) = t.size2()?;
            t.f_unsqueeze(-1)?
                .f_expand([s, h, 2], false)?
                .f_reshape([1, 1, s, h * 2])?
                .f_to_kind(Kind::Float)
        };
        let (s, half) = ang.size2()?;
        let freqs = Tensor::f_complex(
            &ang.f_cos()?.f_to_kind(Kind::Float)?,
            &ang.f_sin()?.f_to_kind(Kind::Float)?,
        )?
        .f_reshape([1, 1, s, half])?;
        Ok(Self {
            cos: rep(ang.f_cos()?)?,
            sin: rep(ang.f_sin()?)?,
            freqs,
        })
    }

    /// Rotates interleaved pairs of `x` `(b, heads, seq, head_dim)` in fp32, returns `x`'s dtype.
    pub fn apply(&self, x: &Tensor) -> Res<Tensor> {
        if Opts::get().rope {
            self.apply_complex(x)
        } else {
            self.apply_reference(x)
        }
    }

    /// [`Rope::apply`] as one complex multiply of (even, odd) pairs (fp32): 3 passes.
    pub fn apply_complex(&self, x: &Tensor) -> Res<Tensor> {
        let kind = x.kind();
        let (b, h, s, d) = x.size4()?;
        x.f_to_kind(Kind::Float)?
            .f_contiguous()?
            .f_view([b, h, s, d / 2, 2])?
            .f_view_as_complex()?
            .f_mul(&self.freqs)?
            .f_view_as_real()?
            .f_reshape([b, h, s, d])?
            .f_to_kind(kind)
    }

    /// [`Rope::apply`] as diffusers' eager ops do it (`x * cos + rotate(x) * sin`).
    pub fn apply_reference(&self, x: &Tensor) -> Res<Tensor> {
        let kind = x.kind();
        let (b, h, s, d) = x.size4()?;
        let xf = x.f_to_kind(Kind::Float)?;
        let pairs = xf.f_reshape([b, h, s, d / 2, 2])?;
        let x0 = pairs.f_select(-1, 0)?;
        let x1 = pairs.f_select(-1, 1)?;
        let rot = Tensor::f_stack(&[x1.f_neg()?, x0], -1)?.f_reshape([b, h, s, d])?; // (-x1, x0)
        xf.f_mul(&self.cos)?
            .f_add(&rot.f_mul(&self.sin)?)?
            .f_to_kind(kind)
    }
}

/// `in_layer -> SiLU -> out_layer`.
#[derive(Debug)]
pub struct MlpEmbedder {
    pub in_layer: Linear,
    pub out_layer: Linear,
}

impl MlpEmbedder {
    pub(crate) fn new(p: nn::Path<'_>, in_dim: i64, hidden: i64) -> Res<Self> {
        Ok(Self {
            in_layer: Linear::new(&p / "in_layer", in_dim, hidden, true)?,
            out_layer: Linear::new(&p / "out_layer", hidden, hidden, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Res<Tensor> {
        self.out_layer.forward(&self.in_layer.forward(x)?.f_silu()?)
    }
}

/// `lin(SiLU(vec))` chunked into (shift, scale, gate) x `n`; each `(b, 1, hidden)`.
#[derive(Debug)]
pub struct Modulation {
    pub lin: Linear,
    pub n: i64,
}

impl Modulation {
    fn new(p: nn::Path<'_>, hidden: i64, n_sets: i64) -> Res<Self> {
        Ok(Self {
            lin: Linear::new(&p / "lin", hidden, 3 * n_sets * hidden, true)?,
            n: 3 * n_sets,
        })
    }

    /// `vec`: the conditioning vector `(b, h)`, or this layer's precomputed output `(b, n * h)`
    /// (a slice of [`Flux::modulation_table`]). Returns `n` chunks `(b, 1, h)`.
    fn forward(&self, vec: &Tensor) -> Res<Vec<Tensor>> {
        precomputed(&self.lin, vec)?.f_unsqueeze(1)?.f_chunk(self.n, -1)
    }
}

/// `lin(SiLU(vec))` for a conditioning vector `(b, in)`, or `vec` itself when it already is that
/// output `(b, out)` (a slice of [`Flux::modulation_table`]).
fn precomputed(lin: &Linear, vec: &Tensor) -> Res<Tensor> {
    let (out, inp) = (lin.weight.size()[0], lin.weight.size()[1]);
    match vec.size().last().copied() {
        Some(w) if w == inp => lin.forward(&vec.f_silu()?),
        Some(w) if w == out => Ok(vec.shallow_clone()),
        w => Err(tch::TchError::Shape(format!(
            "modulation input of width {w:?}: expected the conditioning vector ({inp}) or the \
             precomputed modulation ({out})"
        ))),
    }
}

/// `(1 + scale) * LN(x) + shift` (`norm` has no affine parameters). With [`Opts::modulation`]:
/// for batch 1 the LayerNorm's own affine does the modulation (one pass), else one `addcmul`.
fn modulate(norm: &LayerNorm, x: &Tensor, shift: &Tensor, scale: &Tensor) -> Res<Tensor> {
    if !Opts::get().modulation || norm.weight.is_some() || norm.bias.is_some() {
        return norm.forward(x)?.f_mul(&scale.f_add_scalar(1.0)?)?.f_add(shift);
    }
    let scale1 = scale.f_add_scalar(1.0)?;
    if x.size()[0] == 1 && shift.numel() as i64 == norm.dim && scale.numel() as i64 == norm.dim {
        let w = scale1.f_reshape([norm.dim])?;
        let b = shift.f_reshape([norm.dim])?;
        return x.f_layer_norm([norm.dim], Some(&w), Some(&b), norm.eps, true);
    }
    shift.f_addcmul(&norm.forward(x)?, &scale1)
}

/// `x + gate * y` (one `addcmul` with [`Opts::modulation`]).
fn gated_add(x: &Tensor, gate: &Tensor, y: &Tensor) -> Res<Tensor> {
    if Opts::get().modulation {
        x.f_addcmul(gate, y)
    } else {
        x.f_add(&gate.f_mul(y)?)
    }
}

/// A block's output stream: ready, or `x + gate * y` with the addition still to do, so that the
/// next block adds it in the kernel that computes its modulated LayerNorm
/// ([`gated_add_modulate`]: one pass over the activations where an `addcmul`, a LayerNorm and a
/// small add ran; [`Opts::chain`]).
pub enum Hidden {
    Ready(Tensor),
    Deferred { x: Tensor, gate: Tensor, y: Tensor },
}

impl Hidden {
    /// `x + gate * y` as `opts` has it: deferred with [`Opts::chain`], else added now.
    fn close(x: Tensor, gate: &Tensor, y: Tensor, opts: Opts) -> Res<Hidden> {
        Ok(if opts.chain {
            Hidden::Deferred {
                x,
                gate: gate.shallow_clone(),
                y,
            }
        } else {
            Hidden::Ready(gated_add(&x, gate, &y)?)
        })
    }

    /// The stream as a tensor.
    pub fn materialize(self) -> Res<Tensor> {
        match self {
            Hidden::Ready(t) => Ok(t),
            Hidden::Deferred { x, gate, y } => gated_add(&x, &gate, &y),
        }
    }

    /// The stream and its modulated LayerNorm `(1 + scale) * LN(x) + shift`.
    fn modulate(self, norm: &LayerNorm, shift: &Tensor, scale: &Tensor, opts: Opts) -> Res<(Tensor, Tensor)> {
        match self {
            Hidden::Ready(x) => {
                let h = modulate(norm, &x, shift, scale)?;
                Ok((x, h))
            }
            Hidden::Deferred { x, gate, y } => gated_add_modulate(norm, &x, &gate, &y, shift, scale, opts),
        }
    }
}

/// `query_norm` / `key_norm` (RMS over the head dim).
#[derive(Debug)]
pub struct QkNorm {
    pub query_norm: RmsNorm,
    pub key_norm: RmsNorm,
}

impl QkNorm {
    fn new(p: nn::Path<'_>, head_dim: i64) -> Res<Self> {
        Ok(Self {
            query_norm: RmsNorm::new(&p / "query_norm", "scale", head_dim, 1e-6)?,
            key_norm: RmsNorm::new(&p / "key_norm", "scale", head_dim, 1e-6)?,
        })
    }
}

/// One stream's attention projections: fused `qkv`, q/k norms, output `proj`.
#[derive(Debug)]
pub struct SelfAttention {
    pub qkv: Linear,
    pub norm: QkNorm,
    pub proj: Linear,
}

impl SelfAttention {
    fn new(p: nn::Path<'_>, c: &Config) -> Res<Self> {
        let h = c.hidden_size;
        Ok(Self {
            qkv: Linear::new(&p / "qkv", h, 3 * h, c.qkv_bias)?,
            norm: QkNorm::new(&p / "norm", c.head_dim())?,
            proj: Linear::new(&p / "proj", h, h, true)?,
        })
    }
}

/// Splits a fused `(b, seq, 3 * heads * dim)` projection into normed q, k and v, each
/// `(b, heads, seq, dim)`.
fn split_qkv(qkv: &Tensor, heads: i64, norm: &QkNorm) -> Res<(Tensor, Tensor, Tensor)> {
    let (b, s, w) = qkv.size3()?;
    let d = w / (3 * heads);
    let qkv = qkv.f_reshape([b, s, 3, heads, d])?.f_permute([2, 0, 3, 1, 4])?; // (3, b, heads, seq, d)
    let q = qk_norm(&norm.query_norm, &qkv.f_get(0)?)?;
    let k = qk_norm(&norm.key_norm, &qkv.f_get(1)?)?;
    Ok((q, k, qkv.f_get(2)?))
}

/// q/k RMSNorm: the fused kernel with [`Opts::rms`] (fp32 inside, one rounding), else the
/// reference ops.
fn qk_norm(norm: &RmsNorm, x: &Tensor) -> Res<Tensor> {
    if Opts::get().rms {
        let d = x.size()[x.dim() - 1];
        Ok(x.f_internal_fused_rms_norm([d], Some(&norm.scale), norm.eps)?.0)
    } else {
        norm.forward(x)
    }
}

/// How the joint (text + image) attention of the tokens this rank holds is computed: locally
/// ([`LocalAttention`]) or across ranks (the sequence-parallel strategies in
/// [`crate::parallel`]). Every other op of the model is token-wise, so a rank holding a slice of
/// the tokens runs the model unchanged except for this one call.
pub trait JointAttention {
    /// `q`, `k`, `v`: `(b, heads, seq_local, d)` with RoPE applied, in this rank's token order.
    /// Returns `(b, heads, seq_local, d)`: each local query attended over the WHOLE sequence.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor>;

    /// The number of head groups `g` in which this op takes q/k/v from the fused attention-input
    /// kernel for a batch of `batch`: `(g, b, rows, heads / g, d)`, group `j` holding heads `j *
    /// heads / g..` (Ulysses: exactly what peer `j` is sent, so the all-to-all reads the kernel's
    /// output in place). 1 = `(b, rows, heads, d)`.
    fn head_groups(&self, _heads: i64, _batch: i64) -> i64 {
        1
    }

    /// Attention over q/k/v laid out in head groups (see [`JointAttention::head_groups`]),
    /// normed and rotated; returns `(b, rows, heads, d)` in this rank's token order. The default
    /// regroups them and calls [`JointAttention::attend`].
    fn attend_grouped(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        attend_ungrouped(self, q, k, v)
    }

    /// [`JointAttention::attend_grouped`] with the caller's work interleaved: `during` runs once
    /// with [`Overlap::Inbound`], then once with [`Overlap::Outbound`]. An op that exchanges
    /// asynchronously runs them while its exchange before / after the attention is in flight
    /// (Ulysses over NCCL: on the communicator's side stream), so they overlap it; the default
    /// runs them before and after the attention. The work must not touch q/k/v or the result.
    fn attend_grouped_with(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        during: &mut dyn FnMut(Overlap) -> Res<()>,
    ) -> Res<Tensor> {
        around(during, || self.attend_grouped(q, k, v))
    }

    /// A [`GroupedSession`] over head-grouped q/k/v buffers (written piece by piece after this
    /// call), each piece's exchange started asynchronously with `overlap` (else complete when
    /// sent: the same work in the same order, for A/B runs); `None` where the op takes no pieces
    /// (the caller writes everything and calls [`JointAttention::attend_grouped`]).
    fn session<'s>(
        &'s self,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
        _overlap: bool,
    ) -> Res<Option<Box<dyn GroupedSession + 's>>> {
        Ok(None)
    }
}

/// Which of a rank's rows `[text; image]` a piece of a split-phase exchange covers
/// ([`GroupedSession`]). Every rank cuts its own rows the same way, so the pieces match across
/// ranks even where the ranks hold different numbers of image tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    All,
    Txt,
    /// Part `part` of `of` balanced parts of the image rows.
    Img {
        part: i64,
        of: i64,
    },
}

/// A split-phase attention over head-grouped q/k/v (the copy-free Ulysses path): the caller
/// sends q/k/v in row pieces as it writes them, so each piece travels while it computes the next
/// ones, and takes the output back in row pieces, so it can compute on one piece while the
/// others travel. Order: [`GroupedSession::send`] pieces that tile the rows, then
/// [`GroupedSession::attend`], then [`GroupedSession::give_back`] pieces that tile the rows, then
/// [`GroupedSession::take`] each of them. Every rank of the group must make the same calls.
pub trait GroupedSession {
    /// This rank's rows `(start, len)` of `piece`.
    fn local_rows(&self, piece: Rows) -> (i64, i64);
    /// Starts sending q/k/v rows of `piece` (written by then) to the ranks attending over them.
    fn send(&mut self, piece: Rows) -> Res<()>;
    /// Waits for every piece sent and received, then attends.
    fn attend(&mut self) -> Res<()>;
    /// Starts returning the output rows of `piece` to this rank.
    fn give_back(&mut self, piece: Rows) -> Res<()>;
    /// The output rows of `piece` (given back before), `(b, len, heads, d)`, waiting for them.
    fn take(&mut self, piece: Rows) -> Res<Tensor>;
}

/// When a caller's independent work runs during [`JointAttention::attend_grouped_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// While q/k/v travel to the ranks that attend over them (before the attention).
    Inbound,
    /// While the attention output travels back (after it).
    Outbound,
}

/// `attend()` with `during`'s work run before it ([`Overlap::Inbound`]) and after it
/// ([`Overlap::Outbound`]): where nothing is exchanged asynchronously.
pub fn around(
    during: &mut dyn FnMut(Overlap) -> Res<()>,
    attend: impl FnOnce() -> Res<Tensor>,
) -> Res<Tensor> {
    during(Overlap::Inbound)?;
    let o = attend()?;
    during(Overlap::Outbound)?;
    Ok(o)
}

/// `op`'s [`JointAttention::attend`] over head-grouped q/k/v `(g, b, rows, heads / g, d)`:
/// regrouped to `(b, heads, rows, d)` (a copy each); returns `(b, rows, heads, d)`.
pub fn attend_ungrouped<A: JointAttention + ?Sized>(
    op: &A,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Res<Tensor> {
    let ungroup = |t: &Tensor| -> Res<Tensor> {
        let (g, b, rows, hg, d) = t.size5()?;
        t.f_permute([1, 0, 3, 2, 4])?.f_reshape([b, g * hg, rows, d])
    };
    op.attend(&ungroup(q)?, &ungroup(k)?, &ungroup(v)?)?
        .f_transpose(1, 2)
}

/// All tokens are on this rank: one SDPA call.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalAttention;

impl JointAttention for LocalAttention {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        sdpa(q, k, v, None, false, None)
    }
}

/// Per-forward context of the blocks: RoPE tables of the local tokens, the attention op and the
/// formulations to use.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub pe: &'a Rope,
    pub attn: &'a dyn JointAttention,
    pub opts: Opts,
}

impl<'a> Ctx<'a> {
    /// A context with the process-wide formulations ([`Opts::get`]).
    pub fn new(pe: &'a Rope, attn: &'a dyn JointAttention) -> Self {
        Self {
            pe,
            attn,
            opts: Opts::get(),
        }
    }

    /// RoPE + attention; returns `(b, heads, seq, d)`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        self.attn.attend(&self.pe.apply(q)?, &self.pe.apply(k)?, v)
    }

    /// Whether the fused qkv kernel serves a stream's projection `qkv` (bf16 on CUDA, heads of
    /// 128, RoPE table over `rows` tokens).
    fn fused_qkv(&self, qkv: &Tensor, heads: i64, rows: i64) -> bool {
        self.fused_rows(qkv, rows) && qkv.size().last().is_some_and(|w| *w >= 3 * heads * 128)
    }

    /// Whether the fused qkv kernel can write joint buffers of `rows` tokens for tensors like
    /// `like` (bf16 on CUDA with the kernels loaded, RoPE table over `rows` tokens).
    fn fused_rows(&self, like: &Tensor, rows: i64) -> bool {
        self.opts.qkv && fused_kernels(like) && self.pe.freqs.size() == [1, 1, rows, 64]
    }

    /// The fused kernel's joint q/k/v buffers for `rows` tokens: `(b, rows, heads, 128)`, or
    /// `(g, b, rows, heads / g, 128)` when the attention op takes them in `g` head groups. The
    /// three are consecutive slices of one `(3, ...)` allocation, so k and v together are one
    /// contiguous K/V block (what Ring passes around without stacking them;
    /// [`crate::parallel::attention::stacked_bshd`]).
    fn joint_buffers(&self, like: &Tensor, b: i64, rows: i64, heads: i64) -> Res<(Tensor, Tensor, Tensor)> {
        let g = if self.opts.a2a {
            self.attn.head_groups(heads, b)
        } else {
            1
        };
        let shape: Vec<i64> = if g > 1 {
            vec![3, g, b, rows, heads / g, 128]
        } else {
            vec![3, b, rows, heads, 128]
        };
        let all = Tensor::f_empty(shape.as_slice(), (like.kind(), like.device()))?;
        Ok((all.f_get(0)?, all.f_get(1)?, all.f_get(2)?))
    }

    /// [`Ctx::attend_bshd`] with `during`'s work interleaved (see
    /// [`JointAttention::attend_grouped_with`]): overlapped with the exchanges under
    /// [`Opts::overlap`] and head-grouped buffers, else before and after the attention.
    fn attend_bshd_with(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        during: &mut dyn FnMut(Overlap) -> Res<()>,
    ) -> Res<Tensor> {
        if self.opts.overlap && q.dim() == 5 {
            return self.attn.attend_grouped_with(q, k, v, during);
        }
        around(during, || self.attend_bshd(q, k, v))
    }

    /// Attention over joint buffers from [`Ctx::joint_buffers`] that already hold normed,
    /// rotated q/k (see [`fused_qkv`]); returns `(b, rows, heads, d)`, contiguous where the
    /// attention kernel wrote its output in that layout (cuDNN does).
    fn attend_bshd(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        if q.dim() == 5 {
            return self.attn.attend_grouped(q, k, v);
        }
        self.attn
            .attend(
                &q.f_transpose(1, 2)?,
                &k.f_transpose(1, 2)?,
                &v.f_transpose(1, 2)?,
            )? // (b, heads, rows, d)
            .f_transpose(1, 2)
    }
}

/// Parts the double blocks' image q/k/v go out in under [`Opts::overlap`]
/// (`DITFLEET_OVERLAP_CHUNKS`, default 2): each part's projection runs while the previous part
/// travels.
pub fn overlap_chunks() -> i64 {
    static N: OnceLock<i64> = OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("DITFLEET_OVERLAP_CHUNKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n >= 1)
            .unwrap_or(2)
    })
}

/// bf16 on a CUDA device: where the fused kernels and cuBLASLt epilogues apply.
fn cuda_bf16(x: &Tensor) -> bool {
    x.device().is_cuda() && x.kind() == Kind::BFloat16
}

/// [`cuda_bf16`] and the fused kernels are loaded on that device.
fn fused_kernels(x: &Tensor) -> bool {
    match x.device() {
        Device::Cuda(i) => cuda_bf16(x) && crate::aten::fused_kernels_available(i),
        _ => false,
    }
}

/// Writes one stream's normed, rotated q/k and v at rows `row_offset..` of the joint buffers
/// (the fused kernel, [`crate::aten::qkv_norm_rope`]); `pe` covers the buffers' rows.
fn fused_qkv(
    qkv: &Tensor,
    norm: &QkNorm,
    pe: &Rope,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    row_offset: i64,
) -> Res<()> {
    crate::aten::qkv_norm_rope(
        qkv,
        &norm.query_norm.scale,
        &norm.key_norm.scale,
        &pe.freqs,
        q,
        k,
        v,
        row_offset,
        norm.query_norm.eps,
    )
}

/// `GELU_tanh(x W^T + b)`; on CUDA in bf16 as one cuBLASLt matmul with the GELU in its epilogue.
fn linear_gelu(x: &Tensor, weight: &Tensor, bias: &Tensor, fused: bool) -> Res<Tensor> {
    if !(fused && cuda_bf16(x)) {
        return x.f_linear(weight, Some(bias))?.f_gelu("tanh");
    }
    let size = x.size();
    let (lead, in_dim) = size.split_at(size.len() - 1);
    let out = crate::aten::addmm_gelu(bias, &x.f_reshape([-1, in_dim[0]])?, &weight.f_transpose(0, 1)?)?;
    let mut shape = lead.to_vec();
    shape.push(weight.size()[0]);
    out.f_reshape(shape.as_slice())
}

/// `x' = x + gate * y` and `LN(x') * (1 + scale) + shift`: one kernel with [`Opts::ln`] on CUDA
/// bf16, else [`gated_add`] and [`modulate`].
#[allow(clippy::too_many_arguments)]
fn gated_add_modulate(
    norm: &LayerNorm,
    x: &Tensor,
    gate: &Tensor,
    y: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    opts: Opts,
) -> Res<(Tensor, Tensor)> {
    if opts.ln && x.dim() == 3 && x.is_contiguous() && norm.weight.is_none() && fused_kernels(x) {
        let x_out = x.f_empty_like()?;
        let h_out = x.f_empty_like()?;
        crate::aten::gate_residual_ln(x, gate, y, scale, shift, &x_out, &h_out, norm.eps)?;
        return Ok((x_out, h_out));
    }
    let x = gated_add(x, gate, y)?;
    let h = modulate(norm, &x, shift, scale)?;
    Ok((x, h))
}

/// RoPE + attention; returns `(b, seq, heads * dim)`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor, ctx: Ctx<'_>) -> Res<Tensor> {
    let (b, h, s, d) = q.size4()?;
    let out = ctx.attend(q, k, v)?; // (b, heads, seq, d)
    out.f_transpose(1, 2)?.f_reshape([b, s, h * d])
}

/// `Linear(h, 4h) -> GELU(tanh) -> Linear(4h, h)` stored as `.0` / `.2`.
#[derive(Debug)]
pub struct Mlp {
    pub fc0: Linear,
    pub fc2: Linear,
}

impl Mlp {
    fn new(p: nn::Path<'_>, h: i64, mlp: i64) -> Res<Self> {
        Ok(Self {
            fc0: Linear::new(&p / "0", h, mlp, true)?,
            fc2: Linear::new(&p / "2", mlp, h, true)?,
        })
    }

    fn forward(&self, x: &Tensor, opts: Opts) -> Res<Tensor> {
        let h = match &self.fc0.bias {
            Some(b) => linear_gelu(x, &self.fc0.weight, b, opts.gelu)?,
            None => self.fc0.forward(x)?.f_gelu("tanh")?,
        };
        self.fc2.forward(&h)
    }
}

/// Double-stream block: separate weights for image and text tokens, joint attention.
#[derive(Debug)]
pub struct DoubleBlock {
    pub img_mod: Modulation,
    pub img_attn: SelfAttention,
    pub img_mlp: Mlp,
    pub txt_mod: Modulation,
    pub txt_attn: SelfAttention,
    pub txt_mlp: Mlp,
    norm: LayerNorm,
    heads: i64,
}

impl DoubleBlock {
    pub(crate) fn new(p: nn::Path<'_>, c: &Config) -> Res<Self> {
        let (h, m) = (c.hidden_size, c.mlp_hidden());
        Ok(Self {
            img_mod: Modulation::new(&p / "img_mod", h, 2)?,
            img_attn: SelfAttention::new(&p / "img_attn", c)?,
            img_mlp: Mlp::new(&p / "img_mlp", h, m)?,
            txt_mod: Modulation::new(&p / "txt_mod", h, 2)?,
            txt_attn: SelfAttention::new(&p / "txt_attn", c)?,
            txt_mlp: Mlp::new(&p / "txt_mlp", h, m)?,
            norm: LayerNorm::plain(h, 1e-6),
            heads: c.num_heads,
        })
    }

    /// img `(b, img_seq, h)`, txt `(b, txt_seq, h)`, vec `(b, h)` or this block's slice of the
    /// modulation table `(b, 12h)` (img then txt); `ctx.pe` covers txt then img.
    pub fn forward(&self, img: &Tensor, txt: &Tensor, vec: &Tensor, ctx: Ctx<'_>) -> Res<(Tensor, Tensor)> {
        let (img, txt) = self.forward_chained(
            Hidden::Ready(img.shallow_clone()),
            Hidden::Ready(txt.shallow_clone()),
            vec,
            ctx,
        )?;
        Ok((img.materialize()?, txt.materialize()?))
    }

    /// [`DoubleBlock::forward`] on streams that may still carry the previous block's residual
    /// ([`Hidden`]); returns its own streams the same way.
    pub fn forward_chained(
        &self,
        img: Hidden,
        txt: Hidden,
        vec: &Tensor,
        ctx: Ctx<'_>,
    ) -> Res<(Hidden, Hidden)> {
        let h = self.img_mod.lin.weight.size()[1];
        let (iv, tv) = if vec.size()[1] == 12 * h {
            (vec.f_narrow(1, 0, 6 * h)?, vec.f_narrow(1, 6 * h, 6 * h)?)
        } else {
            (vec.shallow_clone(), vec.shallow_clone())
        };
        let im = self.img_mod.forward(&iv)?; // 6 x (b, 1, h)
        let tm = self.txt_mod.forward(&tv)?;
        let (img, img_in) = img.modulate(&self.norm, &im[0], &im[1], ctx.opts)?;
        let (txt, txt_in) = txt.modulate(&self.norm, &tm[0], &tm[1], ctx.opts)?;
        let (img, txt) = (&img, &txt);
        if let Some(out) = self.forward_in_pieces(img, txt, &img_in, &txt_in, (&im, &tm), ctx)? {
            return Ok(out);
        }
        let img_qkv = self.img_attn.qkv.forward(&img_in)?; // (b, img, 3h)
        let txt_qkv = self.txt_attn.qkv.forward(&txt_in)?; // (b, txt, 3h)
        let (b, img_len, _) = img_qkv.size3()?;
        let txt_len = txt.size()[1];
        let rows = txt_len + img_len;
        let attn = if ctx.fused_qkv(&img_qkv, self.heads, rows) && ctx.fused_qkv(&txt_qkv, self.heads, rows) {
            let (q, k, v) = ctx.joint_buffers(&img_qkv, b, rows, self.heads)?; // (b, txt+img, heads, d)
            fused_qkv(&txt_qkv, &self.txt_attn.norm, ctx.pe, (&q, &k, &v), 0)?;
            fused_qkv(&img_qkv, &self.img_attn.norm, ctx.pe, (&q, &k, &v), txt_len)?;
            ctx.attend_bshd(&q, &k, &v)?.f_reshape([b, rows, -1])?
        } else {
            let (iq, ik, iv) = split_qkv(&img_qkv, self.heads, &self.img_attn.norm)?;
            let (tq, tk, tv) = split_qkv(&txt_qkv, self.heads, &self.txt_attn.norm)?;
            let q = Tensor::f_cat(&[tq, iq], 2)?; // (b, heads, txt+img, d)
            let k = Tensor::f_cat(&[tk, ik], 2)?;
            let v = Tensor::f_cat(&[tv, iv], 2)?;
            attention(&q, &k, &v, ctx)? // (b, txt+img, h)
        };
        let txt_attn = attn.f_narrow(1, 0, txt_len)?;
        let img_attn = attn.f_narrow(1, txt_len, img_len)?;

        let img = self.stream_out(img, &im, &self.img_attn, &self.img_mlp, &img_attn, ctx.opts)?;
        let txt = self.stream_out(txt, &tm, &self.txt_attn, &self.txt_mlp, &txt_attn, ctx.opts)?;
        Ok((img, txt))
    }

    /// The rest of [`DoubleBlock::forward_chained`] where the attention takes q/k/v in pieces
    /// ([`JointAttention::session`]: pure Ulysses, copy-free layout): the image rows' q/k/v in
    /// [`overlap_chunks`] parts, each projected, normed and rotated and then sent while the next
    /// is computed, then the text rows'; after the attention the text rows come back first and
    /// the text stream's projection and MLP run while the image rows travel. `None` where the
    /// pieces do not apply (the caller takes the one-exchange path).
    #[allow(clippy::too_many_arguments)]
    fn forward_in_pieces(
        &self,
        img: &Tensor,
        txt: &Tensor,
        img_in: &Tensor,
        txt_in: &Tensor,
        (im, tm): (&[Tensor], &[Tensor]),
        ctx: Ctx<'_>,
    ) -> Res<Option<(Hidden, Hidden)>> {
        let (b, img_len, h) = img_in.size3()?;
        let txt_len = txt_in.size()[1];
        let rows = txt_len + img_len;
        if !(ctx.opts.a2a
            && ctx.fused_rows(img_in, rows)
            && h == self.heads * 128
            && ctx.attn.head_groups(self.heads, b) > 1)
        {
            return Ok(None);
        }
        let (q, k, v) = ctx.joint_buffers(img_in, b, rows, self.heads)?; // (g, b, rows, heads / g, d)
        let Some(mut s) = ctx.attn.session(&q, &k, &v, ctx.opts.overlap)? else {
            return Ok(None);
        };
        let parts = overlap_chunks().min(img_len.max(1));
        for part in 0..parts {
            let piece = Rows::Img { part, of: parts };
            let (start, len) = s.local_rows(piece); // rows of [txt; img]
            let qkv = self
                .img_attn
                .qkv
                .forward(&img_in.f_narrow(1, start - txt_len, len)?)?; // (b, len, 3h)
            fused_qkv(&qkv, &self.img_attn.norm, ctx.pe, (&q, &k, &v), start)?;
            s.send(piece)?;
        }
        let txt_qkv = self.txt_attn.qkv.forward(txt_in)?; // (b, txt, 3h)
        fused_qkv(&txt_qkv, &self.txt_attn.norm, ctx.pe, (&q, &k, &v), 0)?;
        s.send(Rows::Txt)?;
        s.attend()?;
        let all_img = Rows::Img { part: 0, of: 1 };
        s.give_back(Rows::Txt)?;
        s.give_back(all_img)?;
        let txt_attn = s.take(Rows::Txt)?.f_reshape([b, txt_len, h])?;
        let txt = self.stream_out(txt, tm, &self.txt_attn, &self.txt_mlp, &txt_attn, ctx.opts)?;
        let img_attn = s.take(all_img)?.f_reshape([b, img_len, h])?;
        let img = self.stream_out(img, im, &self.img_attn, &self.img_mlp, &img_attn, ctx.opts)?;
        Ok(Some((img, txt)))
    }

    /// One stream after the joint attention: `x += gate1 * proj(attn)`, then
    /// `x += gate2 * mlp(modulate(x))`; `m` is the stream's 6 modulation chunks.
    fn stream_out(
        &self,
        x: &Tensor,
        m: &[Tensor],
        attn: &SelfAttention,
        mlp: &Mlp,
        attn_out: &Tensor,
        opts: Opts,
    ) -> Res<Hidden> {
        let (x, x_mod) = gated_add_modulate(
            &self.norm,
            x,
            &m[2],
            &attn.proj.forward(attn_out)?,
            &m[3],
            &m[4],
            opts,
        )?;
        let y = mlp.forward(&x_mod, opts)?;
        Hidden::close(x, &m[5], y, opts)
    }
}

/// Single-stream block over the joint sequence; `linear1` = fused qkv + mlp-in,
/// `linear2` = fused attn-out + mlp-out.
#[derive(Debug)]
pub struct SingleBlock {
    pub linear1: Linear,
    pub linear2: Linear,
    pub norm: QkNorm,
    pub modulation: Modulation,
    pre_norm: LayerNorm,
    heads: i64,
    hidden: i64,
    mlp_hidden: i64,
}

impl SingleBlock {
    pub(crate) fn new(p: nn::Path<'_>, c: &Config) -> Res<Self> {
        let (h, m) = (c.hidden_size, c.mlp_hidden());
        Ok(Self {
            linear1: Linear::new(&p / "linear1", h, 3 * h + m, true)?,
            linear2: Linear::new(&p / "linear2", h + m, h, true)?,
            norm: QkNorm::new(&p / "norm", c.head_dim())?,
            modulation: Modulation::new(&p / "modulation", h, 1)?,
            pre_norm: LayerNorm::plain(h, 1e-6),
            heads: c.num_heads,
            hidden: h,
            mlp_hidden: m,
        })
    }

    /// x `(b, txt+img, h)`.
    pub fn forward(&self, x: &Tensor, vec: &Tensor, ctx: Ctx<'_>) -> Res<Tensor> {
        self.forward_chained(Hidden::Ready(x.shallow_clone()), vec, ctx)?
            .materialize()
    }

    /// [`SingleBlock::forward`] on a stream that may still carry the previous block's residual
    /// ([`Hidden`]); returns its own the same way.
    pub fn forward_chained(&self, x: Hidden, vec: &Tensor, ctx: Ctx<'_>) -> Res<Hidden> {
        let m = self.modulation.forward(vec)?; // 3 x (b, 1, h)
        let (x, x_mod) = x.modulate(&self.pre_norm, &m[0], &m[1], ctx.opts)?;
        if ctx.opts.split && cuda_bf16(&x) {
            let out = self.halves_out(&x, &x_mod, ctx)?;
            return Hidden::close(x, &m[2], out, ctx.opts);
        }
        let x = &x;
        let fused = self.linear1.forward(&x_mod)?; // (b, seq, 3h + mlp)
        let mlp = fused.f_narrow(-1, 3 * self.hidden, self.mlp_hidden)?;
        let o = self.attend_qkv(&fused, ctx)?; // (b, seq, heads, d)
        let (b, s, heads, d) = o.size4()?;
        let hidden = if ctx.opts.cat {
            // linear2's input (b, seq, h + mlp), written in place: attention output, GELU(mlp).
            let buf = Tensor::f_empty([b, s, self.hidden + self.mlp_hidden], (x.kind(), x.device()))?;
            let mut dst = buf.f_narrow(-1, 0, self.hidden)?.f_view([b, s, heads, d])?;
            dst.f_copy_(&o)?;
            let _ = mlp.f_gelu_out(&buf.f_narrow(-1, self.hidden, self.mlp_hidden)?, "tanh")?;
            buf
        } else {
            Tensor::f_cat(&[o.f_reshape([b, s, heads * d])?, mlp.f_gelu("tanh")?], -1)?
        };
        let out = self.linear2.forward(&hidden)?;
        Hidden::close(x.shallow_clone(), &m[2], out, ctx.opts)
    }

    /// The joint attention of the block's tokens from their projection `qkv` `(b, seq, >= 3h)`
    /// (q|k|v first, as `linear1` lays them out): the fused kernel where it applies, else split,
    /// norm and RoPE. Returns `(b, seq, heads, d)` (a transposed view on the split path).
    fn attend_qkv(&self, qkv: &Tensor, ctx: Ctx<'_>) -> Res<Tensor> {
        let (b, s, _) = qkv.size3()?;
        if ctx.fused_qkv(qkv, self.heads, s) {
            let (q, k, v) = ctx.joint_buffers(qkv, b, s, self.heads)?; // (b, seq, heads, d)
            fused_qkv(qkv, &self.norm, ctx.pe, (&q, &k, &v), 0)?;
            return ctx.attend_bshd(&q, &k, &v);
        }
        let (q, k, v) = split_qkv(&qkv.f_narrow(-1, 0, 3 * self.hidden)?, self.heads, &self.norm)?;
        ctx.attend(&q, &k, &v)?.f_transpose(1, 2)
    }

    /// [`SingleBlock::attend_qkv`] with `during`'s work interleaved (see
    /// [`Ctx::attend_bshd_with`]).
    fn attend_qkv_with(
        &self,
        qkv: &Tensor,
        ctx: Ctx<'_>,
        during: &mut dyn FnMut(Overlap) -> Res<()>,
    ) -> Res<Tensor> {
        let (b, s, _) = qkv.size3()?;
        if ctx.fused_qkv(qkv, self.heads, s) {
            let (q, k, v) = ctx.joint_buffers(qkv, b, s, self.heads)?; // (b, seq, heads, d) or grouped
            fused_qkv(qkv, &self.norm, ctx.pe, (&q, &k, &v), 0)?;
            return ctx.attend_bshd_with(&q, &k, &v, during);
        }
        around(during, || self.attend_qkv(qkv, ctx))
    }

    /// [`SingleBlock::forward`] with `linear1` / `linear2` run as their attention and MLP halves
    /// (CUDA bf16, [`Opts::split`]): `qkv = x W1[:3h]`, `g = GELU(x W1[3h:])` (one cuBLASLt matmul
    /// with [`Opts::gelu`]),
    /// `out = g W2[:, h:]^T + b2 + attn W2[:, :h]^T` accumulated in place, so neither the GELU
    /// pass nor the concatenated `(seq, h + mlp)` activation is needed. The two MLP matmuls do
    /// not depend on the attention: they run while its exchanges are in flight
    /// ([`Opts::overlap`], [`SingleBlock::attend_qkv_with`]).
    #[cfg(test)]
    fn forward_halves(&self, x: &Tensor, x_mod: &Tensor, gate: &Tensor, ctx: Ctx<'_>) -> Res<Tensor> {
        gated_add(x, gate, &self.halves_out(x, x_mod, ctx)?)
    }

    /// The block's output before its gated residual (`out` of [`SingleBlock::forward_halves`]).
    fn halves_out(&self, x: &Tensor, x_mod: &Tensor, ctx: Ctx<'_>) -> Res<Tensor> {
        let (h, mh) = (self.hidden, self.mlp_hidden);
        let (w1, w2) = (&self.linear1.weight, &self.linear2.weight); // (3h + mlp, h), (h, h + mlp)
        let b1 = self
            .linear1
            .bias
            .as_ref()
            .ok_or_else(|| tch::TchError::Torch("single block linear1 has no bias".into()))?;
        let qkv = x_mod.f_linear(&w1.f_narrow(0, 0, 3 * h)?, Some(&b1.f_narrow(0, 0, 3 * h)?))?; // (b, seq, 3h)
        let (b, s, _) = x.size3()?;
        let (mut g, mut out) = (None, None);
        let mut mlp = |phase: Overlap| -> Res<()> {
            match phase {
                Overlap::Inbound => {
                    g = Some(linear_gelu(
                        x_mod,
                        &w1.f_narrow(0, 3 * h, mh)?,
                        &b1.f_narrow(0, 3 * h, mh)?,
                        ctx.opts.gelu,
                    )?); // (b, seq, mlp)
                }
                Overlap::Outbound => {
                    let g = g
                        .as_ref()
                        .ok_or_else(|| tch::TchError::Torch("MLP-out before MLP-in".into()))?;
                    out = Some(g.f_linear(&w2.f_narrow(1, h, mh)?, self.linear2.bias.as_ref())?); // (b, seq, h)
                }
            }
            Ok(())
        };
        let attn = self.attend_qkv_with(&qkv, ctx, &mut mlp)?.f_reshape([b * s, h])?; // (b * seq, h)
        let out = out.ok_or_else(|| tch::TchError::Torch("attention skipped the MLP-out matmul".into()))?;
        let _ = out
            .f_view([b * s, h])?
            .f_addmm_(&attn, &w2.f_narrow(1, 0, h)?.f_transpose(0, 1)?)?;
        Ok(out)
    }
}

/// `adaLN_modulation.1` (shift, scale) then `linear` back to packed latent channels.
#[derive(Debug)]
pub struct LastLayer {
    pub linear: Linear,
    pub ada_ln_modulation: Linear,
    norm: LayerNorm,
}

impl LastLayer {
    pub(crate) fn new(p: nn::Path<'_>, c: &Config) -> Res<Self> {
        let h = c.hidden_size;
        Ok(Self {
            linear: Linear::new(&p / "linear", h, c.in_channels, true)?,
            ada_ln_modulation: Linear::new(&p / "adaLN_modulation" / "1", h, 2 * h, true)?,
            norm: LayerNorm::plain(h, 1e-6),
        })
    }

    /// x `(b, img_seq, h)` -> `(b, img_seq, in_channels)`.
    pub fn forward(&self, x: &Tensor, vec: &Tensor) -> Res<Tensor> {
        let m = precomputed(&self.ada_ln_modulation, vec)?
            .f_unsqueeze(1)?
            .f_chunk(2, -1)?;
        self.linear.forward(&modulate(&self.norm, x, &m[0], &m[1])?)
    }
}

/// [`Flux::modulation_table`] of a run of blocks (and a final layer, if given): `vecs` `(steps,
/// h)` -> `(steps, 12h per double + 3h per single block [+ 2h])`, in that order (the blocks a
/// PipeFusion stage runs take theirs this way too).
pub fn modulation_table_of(
    double: &[DoubleBlock],
    single: &[SingleBlock],
    last: Option<&LastLayer>,
    vecs: &Tensor,
) -> Res<Tensor> {
    let s = vecs.f_silu()?;
    let mut cols = Vec::with_capacity(2 * double.len() + single.len() + 1);
    for b in double {
        cols.push(b.img_mod.lin.forward(&s)?);
        cols.push(b.txt_mod.lin.forward(&s)?);
    }
    for b in single {
        cols.push(b.modulation.lin.forward(&s)?);
    }
    if let Some(f) = last {
        cols.push(f.ada_ln_modulation.forward(&s)?);
    }
    Tensor::f_cat(&cols, 1)
}

/// Each block's conditioning from a forward's `vec`, in block order: the conditioning vector
/// itself (width `h`), or the block's slice of a row of a modulation table.
pub struct Conds<'a> {
    vec: &'a Tensor,
    table: bool,
    off: i64,
}

impl<'a> Conds<'a> {
    pub fn new(vec: &'a Tensor, hidden: i64) -> Self {
        Self {
            vec,
            table: vec.size()[1] != hidden,
            off: 0,
        }
    }

    /// The next block's conditioning: `width` columns of the row (12h double, 3h single, 2h
    /// final layer), or the vector.
    pub fn next(&mut self, width: i64) -> Res<Tensor> {
        if !self.table {
            return Ok(self.vec.shallow_clone());
        }
        self.off += width;
        self.vec.f_narrow(1, self.off - width, width)
    }
}

/// The Flux transformer with its variables in `vs`: all of it, or the part one PipeFusion stage
/// holds (see [`Part`]; `img_in`/`txt_in` on the first stage, `final_layer` on the last).
#[derive(Debug)]
pub struct Flux {
    pub config: Config,
    /// Which blocks `double_blocks` / `single_blocks` are (global indices) and which ends it holds.
    pub part: Part,
    pub img_in: Option<Linear>,
    pub txt_in: Option<Linear>,
    pub time_in: MlpEmbedder,
    pub vector_in: MlpEmbedder,
    pub guidance_in: Option<MlpEmbedder>,
    pub double_blocks: Vec<DoubleBlock>,
    pub single_blocks: Vec<SingleBlock>,
    pub final_layer: Option<LastLayer>,
    pub vs: nn::VarStore,
}

impl Flux {
    /// Builds the model with randomly initialised weights on `device` in `kind`.
    pub fn new(config: &Config, device: Device, kind: Kind) -> Result<Self, EngineError> {
        Self::new_part(config, device, kind, &Part::full(config))
    }

    /// The dtype of the weights.
    pub fn kind(&self) -> Kind {
        self.time_in.in_layer.weight.kind()
    }

    /// Builds the model and strictly loads a checkpoint in either layout: a diffusers
    /// `transformer/` folder (single or sharded) or an original single file.
    pub fn load(config: &Config, path: &Path, device: Device, kind: Kind) -> Result<Self, EngineError> {
        let model = {
            let _zero = super::layers::NoRandomInit::new();
            Self::new(config, device, kind)?
        };
        model.load_weights(path)?;
        Ok(model)
    }

    /// Loads weights from `path` (see [`Flux::load`]) into this model.
    pub fn load_weights(&self, path: &Path) -> Result<(), EngineError> {
        if path.is_dir() {
            let ck = Checkpoint::open_dir(path, "diffusion_pytorch_model")?;
            load_strict(
                &self.vs,
                &ck,
                "flux transformer (diffusers layout)",
                &diffusers_source,
                &|_| false,
            )
        } else {
            let ck = Checkpoint::open_file(path)?;
            load_strict(
                &self.vs,
                &ck,
                "flux transformer (original layout)",
                &|n| Source::Key(n.to_string()),
                &|_| false,
            )
        }
    }

    /// Position ids: text `(txt_len, 3)` zeros then image `(h/2 * w/2, 3)` = (0, row, col).
    pub fn position_ids(txt_len: i64, latent_h: i64, latent_w: i64, device: Device) -> Res<Tensor> {
        let (ph, pw) = (latent_h / 2, latent_w / 2);
        let rows = Tensor::f_arange(ph, (Kind::Float, device))?
            .f_unsqueeze(1)?
            .f_expand([ph, pw], false)?;
        let cols = Tensor::f_arange(pw, (Kind::Float, device))?
            .f_unsqueeze(0)?
            .f_expand([ph, pw], false)?;
        let zeros = Tensor::f_zeros([ph, pw], (Kind::Float, device))?;
        let img = Tensor::f_stack(&[zeros, rows, cols], -1)?.f_reshape([ph * pw, 3])?;
        let txt = Tensor::f_zeros([txt_len, 3], (Kind::Float, device))?;
        Tensor::f_cat(&[txt, img], 0)
    }

    /// RoPE tables for `ids` (see [`Flux::position_ids`]); compute once per generation.
    pub fn rope(&self, ids: &Tensor) -> Res<Rope> {
        Rope::new(ids, &self.config.axes_dim, self.config.theta)
    }

    /// Text-side inputs that do not change across steps: `txt_in(txt)`.
    pub fn embed_txt(&self, txt: &Tensor) -> Res<Tensor> {
        self.part.input_layer(&self.txt_in, "txt_in")?.forward(txt)
    }

    /// Conditioning vector `(b, h)` for timesteps `t` and guidance (both as FluxPipeline passes
    /// them: `sigma` and the guidance scale) and pooled CLIP `y`. Like diffusers, `t` and the
    /// guidance are cast to the model dtype BEFORE the x1000 (in bf16, guidance 3.5 becomes 3504).
    pub fn vec(&self, t: &Tensor, y: &Tensor, guidance: Option<&Tensor>) -> Res<Tensor> {
        let kind = self.kind();
        let scaled = |x: &Tensor| x.f_to_kind(kind)?.f_mul_scalar(1000.0);
        let temb = timestep_embedding(&scaled(t)?, 256)?.f_to_kind(kind)?;
        let mut vec = self.time_in.forward(&temb)?;
        if let Some(g_in) = &self.guidance_in {
            let g = match guidance {
                Some(g) => g.shallow_clone(),
                None => Tensor::f_zeros_like(t)?,
            };
            let gemb = timestep_embedding(&scaled(&g)?, 256)?.f_to_kind(kind)?;
            vec = vec.f_add(&g_in.forward(&gemb)?)?;
        }
        vec.f_add(&self.vector_in.forward(&y.f_to_kind(kind)?)?)
    }

    /// One forward pass with precomputed text embedding, vec and RoPE.
    /// img `(b, img_seq, in_channels)`, txt `(b, txt_seq, h)` (already `txt_in`), vec `(b, h)`.
    pub fn forward_prepared(&self, img: &Tensor, txt: &Tensor, vec: &Tensor, pe: &Rope) -> Res<Tensor> {
        self.forward_with(img, txt, vec, pe, &LocalAttention)
    }

    /// [`Flux::forward_prepared`] on the tokens this rank holds (`img` and `txt` may be slices of
    /// the sequence; `pe` covers exactly `txt` then `img`), with `attn` computing the joint
    /// attention over the whole sequence.
    pub fn forward_with(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec: &Tensor,
        pe: &Rope,
        attn: &dyn JointAttention,
    ) -> Res<Tensor> {
        self.forward_opts(img, txt, vec, pe, attn, Opts::get())
    }

    /// [`Flux::forward_with`] with the formulations `opts` instead of the process-wide ones (the
    /// fused paths are checked against the reference formulation with it).
    pub fn forward_opts(
        &self,
        img: &Tensor,
        txt: &Tensor,
        vec: &Tensor,
        pe: &Rope,
        attn: &dyn JointAttention,
        opts: Opts,
    ) -> Res<Tensor> {
        self.part.require_full(&self.config)?;
        let ctx = Ctx { pe, attn, opts };
        let h = self.config.hidden_size;
        // `vec`: the conditioning vector, or a row of the modulation table (each block its slice).
        let table = vec.size()[1] != h;
        if table && vec.size()[1] != self.modulation_width() {
            return Err(tch::TchError::Shape(format!(
                "conditioning of width {}: expected {h} or this model's modulation table ({})",
                vec.size()[1],
                self.modulation_width()
            )));
        }
        let mut conds = Conds::new(vec, h);
        let mut cond = |w: i64| conds.next(w);
        let img = self.part.input_layer(&self.img_in, "img_in")?.forward(img)?; // (b, img_seq, h)
        let (mut img, mut txt) = (Hidden::Ready(img), Hidden::Ready(txt.shallow_clone()));
        for block in &self.double_blocks {
            (img, txt) = block.forward_chained(img, txt, &cond(12 * h)?, ctx)?;
        }
        let (img, txt) = (img.materialize()?, txt.materialize()?);
        let txt_len = txt.size()[1];
        let mut x = Hidden::Ready(Tensor::f_cat(&[txt, img], 1)?); // (b, txt+img, h)
        for block in &self.single_blocks {
            x = block.forward_chained(x, &cond(3 * h)?, ctx)?;
        }
        let x = x.materialize()?;
        let img = x.f_narrow(1, txt_len, x.size()[1] - txt_len)?;
        let last = self
            .final_layer
            .as_ref()
            .ok_or_else(|| self.part.missing("final_layer"))?;
        last.forward(&img, &cond(2 * h)?) // (b, img_seq, in_channels)
    }

    /// Width of one row of [`Flux::modulation_table`]: 12h per double block, 3h per single
    /// block, 2h for the final layer (of the blocks this part holds).
    pub fn modulation_width(&self) -> i64 {
        let h = self.config.hidden_size;
        12 * h * self.double_blocks.len() as i64
            + 3 * h * self.single_blocks.len() as i64
            + if self.final_layer.is_some() { 2 * h } else { 0 }
    }

    /// Every block's adaLN modulation for every step at once: `vecs` `(steps, h)` ->
    /// `(steps, modulation_width)` (double blocks' img then txt, single blocks, final layer).
    /// A row passed as `vec` to the forward replaces 77 matrix-vector products per step (they
    /// read 6.5 GB of weights on Flux.1-dev, ~2 ms/step on an H200) by slices of one matmul per
    /// layer per job.
    pub fn modulation_table(&self, vecs: &Tensor) -> Res<Tensor> {
        modulation_table_of(
            &self.double_blocks,
            &self.single_blocks,
            self.final_layer.as_ref(),
            vecs,
        )
    }

    /// Full forward pass. img `(b, img_seq, in_ch)`, ids `(txt+img, 3)`, txt `(b, txt_seq,
    /// context_in_dim)`, t `(b,)` (sigma), y `(b, vec_in_dim)`, guidance `(b,)`.
    pub fn forward(
        &self,
        img: &Tensor,
        ids: &Tensor,
        txt: &Tensor,
        t: &Tensor,
        y: &Tensor,
        guidance: Option<&Tensor>,
    ) -> Res<Tensor> {
        let pe = self.rope(ids)?;
        let vec = self.vec(t, y, guidance)?;
        self.forward_prepared(img, &self.embed_txt(txt)?, &vec, &pe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Text tokens and latent size of the tiny-model tests (5 text + 2x3 image tokens).
    const TXT: i64 = 5;
    const LH: i64 = 4;
    const LW: i64 = 6;

    /// The tiny config, a model seeded with `seed` (fp32, CPU) and its RoPE table over
    /// `TXT` text tokens and an `LH` x `LW` latent.
    fn tiny_model(seed: i64) -> Res<(Config, Flux, Rope)> {
        tch::manual_seed(seed);
        let cfg = Config::tiny();
        let model =
            Flux::new(&cfg, Device::Cpu, Kind::Float).map_err(|e| tch::TchError::Torch(e.to_string()))?;
        let pe = model.rope(&Flux::position_ids(TXT, LH, LW, Device::Cpu)?)?;
        Ok((cfg, model, pe))
    }

    /// Random packed latent `(1, img, in_channels)` and embedded text `(1, TXT, h)` for an
    /// `LH` x `LW` latent.
    fn random_inputs(cfg: &Config, model: &Flux) -> Res<(Tensor, Tensor)> {
        let img = Tensor::f_randn(
            [1, (LH / 2) * (LW / 2), cfg.in_channels],
            (Kind::Float, Device::Cpu),
        )?;
        let txt = model.embed_txt(&Tensor::f_randn(
            [1, TXT, cfg.context_in_dim],
            (Kind::Float, Device::Cpu),
        )?)?;
        Ok((img, txt))
    }

    #[test]
    fn opts_parse() {
        assert_eq!(Opts::parse(""), Opts::ALL);
        assert_eq!(Opts::parse("all"), Opts::ALL);
        assert_eq!(Opts::parse("none"), Opts::NONE);
        assert_eq!(
            Opts::parse("all,-gelu"),
            Opts {
                gelu: false,
                ..Opts::ALL
            }
        );
        assert_eq!(
            Opts::parse("all,-overlap"),
            Opts {
                overlap: false,
                ..Opts::ALL
            }
        );
        assert_eq!(
            Opts::parse("rope, rms"),
            Opts {
                rope: true,
                rms: true,
                ..Opts::NONE
            }
        );
    }

    /// The forward fed rows of the modulation table (every block's modulation for every step,
    /// computed once per job) computes what it computes from the conditioning vectors; a row of
    /// the wrong width is refused with the widths it accepts.
    #[test]
    fn the_modulation_table_gives_the_forward_of_the_conditioning_vectors() -> Res<()> {
        let _g = tch::no_grad_guard();
        let (cfg, model, pe) = tiny_model(4)?;
        let steps = 3;
        let (img, txt) = random_inputs(&cfg, &model)?;
        let vecs = Tensor::f_randn([steps, cfg.hidden_size], (Kind::Float, Device::Cpu))?;
        let table = model.modulation_table(&vecs)?;
        assert_eq!(table.size(), vec![steps, model.modulation_width()]);
        for i in 0..steps {
            let want = model.forward_prepared(&img, &txt, &vecs.f_narrow(0, i, 1)?, &pe)?;
            let got = model.forward_prepared(&img, &txt, &table.f_narrow(0, i, 1)?, &pe)?;
            let diff = f64::try_from(got.f_sub(&want)?.f_abs()?.f_max()?)?;
            assert!(diff < 1e-5, "step {i}: max abs diff {diff}");
        }
        let bad = Tensor::f_zeros([1, 7], (Kind::Float, Device::Cpu))?;
        let err = model
            .forward_prepared(&img, &txt, &bad, &pe)
            .unwrap_err()
            .to_string();
        assert!(err.contains("width 7"), "{err}");
        Ok(())
    }

    /// Carrying each block's closing residual into the next block ([`Opts::chain`], [`Hidden`])
    /// computes the same forward: across double -> double, double -> single (the streams are
    /// joined), single -> single and single -> final layer. On the CPU the carried residual is
    /// added by the same ops as without, so the result is bit-identical; a dropped or doubled
    /// residual anywhere would not be.
    #[test]
    fn carrying_each_blocks_residual_into_the_next_block_computes_the_same_forward() -> Res<()> {
        let _g = tch::no_grad_guard();
        tch::manual_seed(5);
        let mut cfg = Config::tiny();
        cfg.depth = 2; // two of each block: every kind of boundary
        let model =
            Flux::new(&cfg, Device::Cpu, Kind::Float).map_err(|e| tch::TchError::Torch(e.to_string()))?;
        let pe = model.rope(&Flux::position_ids(TXT, LH, LW, Device::Cpu)?)?;
        assert!(cfg.depth_single_blocks >= 2);
        let (img, txt) = random_inputs(&cfg, &model)?;
        let vec = Tensor::f_randn([1, cfg.hidden_size], (Kind::Float, Device::Cpu))?;
        let chained = Opts {
            chain: true,
            ..Opts::NONE
        };
        let want = model.forward_opts(&img, &txt, &vec, &pe, &LocalAttention, Opts::NONE)?;
        let got = model.forward_opts(&img, &txt, &vec, &pe, &LocalAttention, chained)?;
        assert!(
            bool::try_from(got.f_eq_tensor(&want)?.f_all()?)?,
            "chained forward differs"
        );
        // And against the blocks one by one, each closing its own residual.
        let ctx = Ctx {
            pe: &pe,
            attn: &LocalAttention,
            opts: Opts::NONE,
        };
        let table = model.modulation_table(&vec)?;
        let h = cfg.hidden_size;
        let mut off = 0;
        let mut cond = |w: i64| {
            off += w;
            table.narrow(1, off - w, w)
        };
        let (mut i, mut t) = (model.img_in.as_ref().unwrap().forward(&img)?, txt.shallow_clone());
        for b in &model.double_blocks {
            (i, t) = b.forward(&i, &t, &cond(12 * h), ctx)?;
        }
        let mut x = Tensor::f_cat(&[t, i], 1)?;
        for b in &model.single_blocks {
            x = b.forward(&x, &cond(3 * h), ctx)?;
        }
        let by_block = model
            .final_layer
            .as_ref()
            .unwrap()
            .forward(&x.f_narrow(1, TXT, x.size()[1] - TXT)?, &cond(2 * h))?;
        let diff = f64::try_from(by_block.f_sub(&want)?.f_abs()?.f_max()?)?;
        assert!(diff < 1e-5, "block by block vs forward: max abs diff {diff}");
        Ok(())
    }

    /// A single block run as its attention and MLP halves (split `linear1` / `linear2`, in-place
    /// accumulation: what [`Opts::split`] runs on CUDA) computes the block's function.
    #[test]
    fn single_block_halves_match_the_fused_linear_layers() -> Res<()> {
        let _g = tch::no_grad_guard();
        let (cfg, model, pe) = tiny_model(3)?;
        let (txt_len, lh, lw) = (TXT, LH, LW);
        let seq = txt_len + (lh / 2) * (lw / 2);
        let x = Tensor::f_randn([1, seq, cfg.hidden_size], (Kind::Float, Device::Cpu))?;
        let vec = Tensor::f_randn([1, cfg.hidden_size], (Kind::Float, Device::Cpu))?;
        let block = &model.single_blocks[0];
        let ctx = Ctx {
            pe: &pe,
            attn: &LocalAttention,
            opts: Opts::NONE,
        };
        let reference = block.forward(&x, &vec, ctx)?;
        let m = block.modulation.forward(&vec)?;
        let x_mod = modulate(&block.pre_norm, &x, &m[0], &m[1])?;
        let halves = block.forward_halves(&x, &x_mod, &m[2], ctx)?;
        let diff = f64::try_from(halves.f_sub(&reference)?.f_abs()?.f_max()?)?;
        let scale = f64::try_from(reference.f_abs()?.f_max()?)?;
        assert!(
            diff < 1e-5 * scale.max(1.0),
            "max abs diff {diff} (scale {scale})"
        );
        Ok(())
    }

    /// The fused formulations compute the reference ops' function (fp32, CPU).
    #[test]
    fn fused_ops_match_reference() -> Res<()> {
        tch::manual_seed(7);
        let ids = Flux::position_ids(5, 4, 6, Device::Cpu)?; // 5 txt + 2x3 img tokens
        let rope = Rope::new(&ids, &[4, 6, 6], 10_000.0)?;
        let x = Tensor::f_randn([2, 3, 11, 16], (Kind::Float, Device::Cpu))?;
        let a = rope.apply_complex(&x)?;
        let b = rope.apply_reference(&x)?;
        assert!(f64::try_from(a.f_sub(&b)?.f_abs()?.f_max()?)? < 1e-5);

        let norm = RmsNorm {
            scale: Tensor::f_randn([16], (Kind::Float, Device::Cpu))?,
            eps: 1e-6,
        };
        let fused = x.f_internal_fused_rms_norm([16], Some(&norm.scale), norm.eps)?.0;
        assert!(f64::try_from(fused.f_sub(&norm.forward(&x)?)?.f_abs()?.f_max()?)? < 1e-5);

        let ln = LayerNorm::plain(16, 1e-6);
        let (shift, scale) = (
            Tensor::f_randn([1, 1, 16], (Kind::Float, Device::Cpu))?,
            Tensor::f_randn([1, 1, 16], (Kind::Float, Device::Cpu))?,
        );
        let x1 = x.f_reshape([1, 66, 16])?;
        let reference = ln.forward(&x1)?.f_mul(&scale.f_add_scalar(1.0)?)?.f_add(&shift)?;
        let got = modulate(&ln, &x1, &shift, &scale)?; // batch 1: LayerNorm affine (if enabled)
        assert!(f64::try_from(got.f_sub(&reference)?.f_abs()?.f_max()?)? < 1e-5);
        let x2 = x.f_reshape([2, 33, 16])?;
        let (shift2, scale2) = (
            shift.f_expand([2, 1, 16], false)?,
            scale.f_expand([2, 1, 16], false)?,
        );
        let reference = ln
            .forward(&x2)?
            .f_mul(&scale2.f_add_scalar(1.0)?)?
            .f_add(&shift2)?;
        let got = modulate(&ln, &x2, &shift2, &scale2)?; // batch 2: addcmul (if enabled)
        assert!(f64::try_from(got.f_sub(&reference)?.f_abs()?.f_max()?)? < 1e-5);
        Ok(())
    }
}
