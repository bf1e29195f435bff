//! The joint (text + image) attention as the blocks call it: the [`JointAttention`] interface the
//! sequence-parallel strategies implement, its split-phase form ([`GroupedSession`]), and the
//! per-forward [`Ctx`] with the fused kernel's joint q/k/v buffers.

use std::sync::OnceLock;

use tch::Tensor;

use super::blocks::fused_kernels;
use super::embed::Rope;
use super::layers::{Res, sdpa};
use super::transformer::Opts;

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
    pub(crate) fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        self.attn.attend(&self.pe.apply(q)?, &self.pe.apply(k)?, v)
    }

    /// Whether the fused qkv kernel serves a stream's projection `qkv` (bf16 on CUDA, heads of
    /// 128, RoPE table over `rows` tokens).
    pub(crate) fn fused_qkv(&self, qkv: &Tensor, heads: i64, rows: i64) -> bool {
        self.fused_rows(qkv, rows) && qkv.size().last().is_some_and(|w| *w >= 3 * heads * 128)
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
