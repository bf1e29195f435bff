//! The attention seam model code calls and the sequence-parallel strategies implement: the
//! attention of the tokens a rank holds ([`JointAttention`]: locally with [`LocalAttention`], or
//! across ranks with `crate::parallel::UspAttention`), and its split-phase form
//! ([`GroupedSession`]) that overlaps the exchange with the caller's own work.

use tch::Tensor;

use super::{Res, sdpa};

/// How the joint (text + image) attention of the tokens this rank holds is computed: locally
/// ([`LocalAttention`]) or across ranks (the sequence-parallel strategies in
/// [`crate::parallel`]). Every other op of the model is token-wise, so a rank holding a slice of
/// the tokens runs the model unchanged except for this one call.
pub trait JointAttention {
    /// `q`, `k`, `v`: `(b, heads, seq_local, d)` with RoPE applied, in this rank's token order.
    /// Returns `(b, heads, seq_local, d)`: each local query attended over the WHOLE sequence.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor>;

    /// Whether this op is one attention over tokens all held here ([`LocalAttention`]): the
    /// model may then run it through another kernel (the FP8 precision's FP8 attention).
    fn local(&self) -> bool {
        false
    }

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

    fn local(&self) -> bool {
        true
    }
}
