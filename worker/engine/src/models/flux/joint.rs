//! The joint (text + image) attention as Flux's blocks call it: the per-forward [`Ctx`] with the
//! fused kernel's joint q/k/v buffers, over the attention seam of [`crate::nn::attention`].

use tch::Tensor;

use super::blocks::fused_kernels;
use super::embed::Rope;
use super::layers::Res;
use super::transformer::Opts;
pub use crate::nn::attention::*;

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
    pub(crate) fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        self.attn.attend(&self.pe.apply(q)?, &self.pe.apply(k)?, v)
    }

    /// Whether the fused qkv kernel serves a stream's projection `qkv` (bf16 on CUDA, heads of
    /// 128, RoPE table over `rows` tokens).
    pub(crate) fn fused_qkv(&self, qkv: &Tensor, heads: i64, rows: i64) -> bool {
        self.fused_rows(qkv, rows) && qkv.size().last().is_some_and(|w| *w >= 3 * heads * 128)
    }

    /// Whether the FP8 precision's attention over `rows` tokens like `like` runs in FP8: the fused
    /// kernels apply, the attention is one local op (the sequence-parallel strategies attend in
    /// bf16), and the device has not refused cuDNN's FP8 attention.
    pub(crate) fn fp8_attention(&self, like: &Tensor, rows: i64) -> bool {
        self.fused_rows(like, rows) && self.attn.local() && crate::nn::fp8_attention::usable(like.device())
    }

    /// Whether the fused qkv kernel can write joint buffers of `rows` tokens for tensors like
    /// `like` (bf16 on CUDA with the kernels loaded, RoPE table over `rows` tokens).
    pub(crate) fn fused_rows(&self, like: &Tensor, rows: i64) -> bool {
        self.opts.qkv && fused_kernels(like) && self.pe.freqs.size() == [1, 1, rows, 64]
    }

    /// The fused kernel's joint q/k/v buffers for `rows` tokens: `(b, rows, heads, 128)`, or
    /// `(g, b, rows, heads / g, 128)` when the attention op takes them in `g` head groups. The
    /// three are consecutive slices of one `(3, ...)` allocation, so k and v together are one
    /// contiguous K/V block (what Ring passes around without stacking them;
    /// [`crate::parallel::attention::stacked_bshd`]).
    pub(crate) fn joint_buffers(
        &self,
        like: &Tensor,
        b: i64,
        rows: i64,
        heads: i64,
    ) -> Res<(Tensor, Tensor, Tensor)> {
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
    pub(crate) fn attend_bshd_with(
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
    pub(crate) fn attend_bshd(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
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
/// (2; the benchmark switch `DITFLEET_OVERLAP_CHUNKS` of [`crate::settings::bench`] compares
/// others): each part's projection runs while the previous part travels.
pub fn overlap_chunks() -> i64 {
    crate::settings::bench().overlap_chunks.unwrap_or(2)
}
