//! Sequence-parallel joint attention: Ulysses (all-to-all over heads), Ring (K/V blocks passed
//! around with log-sum-exp merging) and USP (Ulysses inside, Ring across), all exact.
//!
//! Flux attends over `[text; image]` tokens. Each rank of a sequence-parallel group holds a
//! contiguous slice of the image tokens and, per [`TextMode`], either a slice of the text tokens
//! or all of them. With all of them (the replicated path), the text keys must count ONCE in
//! every softmax: Ulysses takes the text heads locally instead of gathering N copies, Ring adds
//! the text block once instead of passing it around.

use tch::{Kind, Tensor};

use super::comm::{CommResult, Communicator, Pending, balanced_split};
use crate::nn::attention::{GroupedSession, JointAttention, Overlap, Rows, around, attend_ungrouped};
use crate::nn::{Res, sdpa};

mod ulysses;

use ulysses::UlyssesSession;
pub use ulysses::groups_to_tokens;

/// How the text tokens are laid out over the ranks of a sequence-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum TextMode {
    /// Each rank holds a contiguous slice of the text tokens (balanced: slices differ by at most
    /// one token, as the image's do).
    Split,
    /// Every rank holds all text tokens (and computes their updates redundantly).
    Replicated,
}

/// Which tokens each rank of a sequence-parallel group of `n` holds.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqLayout {
    pub n: usize,
    pub txt_len: i64,
    pub img_len: i64,
    pub text: TextMode,
    /// `(start, len)` of each rank's image slice.
    pub img: Vec<(i64, i64)>,
    /// `(start, len)` of each rank's text slice (all `(0, txt_len)` when replicated).
    pub txt: Vec<(i64, i64)>,
}

impl SeqLayout {
    /// Text split in balanced contiguous slices when every rank gets at least one text token,
    /// replicated otherwise (unless `force` picks a mode); image tokens split in balanced
    /// contiguous slices. An uneven text split is as exact as an even one (every exchange takes
    /// per-peer lengths) and spares the ranks the replicated text's redundant work, e.g. 512 text
    /// tokens over 6 or 7 GPUs.
    pub fn new(n: usize, txt_len: i64, img_len: i64, force: Option<TextMode>) -> Self {
        let text = force.unwrap_or(if txt_len >= n as i64 {
            TextMode::Split
        } else {
            TextMode::Replicated
        });
        let txt = match text {
            TextMode::Split => balanced_split(txt_len, n),
            TextMode::Replicated => vec![(0, txt_len); n],
        };
        Self {
            n,
            txt_len,
            img_len,
            text,
            img: balanced_split(img_len, n),
            txt,
        }
    }

    /// Number of tokens rank `r` holds (text then image).
    pub fn local_len(&self, r: usize) -> i64 {
        self.txt[r].1 + self.img[r].1
    }
}

/// The attention op of one rank under a USP plan: `ulysses` = the ranks splitting heads (size
/// `u`), `ring` = the ranks passing K/V blocks (size `r`); `layout` has `u * r` ranks, this rank
/// being `ring.rank() * u + ulysses.rank()`. Pure Ulysses is `r = 1`, pure Ring `u = 1`.
pub struct UspAttention<'a> {
    pub ulysses: &'a dyn Communicator,
    pub ring: &'a dyn Communicator,
    pub layout: &'a SeqLayout,
}

fn sp_rank(u: usize, ring_idx: usize, uly_idx: usize) -> usize {
    ring_idx * u + uly_idx
}

impl UspAttention<'_> {
    fn replicated(&self) -> bool {
        self.layout.text == TextMode::Replicated
    }

    /// Local token counts `(text, image)` of sequence-parallel rank `sp`.
    fn lens(&self, sp: usize) -> (i64, i64) {
        (self.layout.txt[sp].1, self.layout.img[sp].1)
    }

    /// Ulysses forward: `(n, b, H, L, d)` stacked tensors of this rank -> `(n, b, H/u, L', d)` where
    /// `L'` covers the tokens of the whole ulysses group. Split text: peers' `[txt_j; img_j]`
    /// blocks in peer order. Replicated text: `[txt (own heads); img_0; img_1; ...]`.
    fn scatter_heads(&self, x: &Tensor, ring_idx: usize) -> CommResult<Tensor> {
        let u = self.ulysses.size();
        if u == 1 {
            return Ok(x.shallow_clone());
        }
        let me = self.ulysses.rank();
        let (n, b, h, _l, d) = x.size5()?;
        let hu = h / u as i64;
        let own = sp_rank(u, ring_idx, me);
        let (t_loc, _) = self.lens(own);
        let (body, txt) = if self.replicated() {
            let txt = x.f_narrow(3, 0, t_loc)?.f_narrow(2, me as i64 * hu, hu)?;
            (x.f_narrow(3, t_loc, x.size()[3] - t_loc)?, Some(txt))
        } else {
            (x.shallow_clone(), None)
        };
        let parts = body
            .f_split(hu, 2)?
            .into_iter()
            .map(|p| p.f_contiguous())
            .collect::<Result<Vec<_>, _>>()?;
        let shapes: Vec<Vec<i64>> = (0..u)
            .map(|j| {
                let (t, i) = self.lens(sp_rank(u, ring_idx, j));
                let len = if self.replicated() { i } else { t + i };
                vec![n, b, hu, len, d]
            })
            .collect();
        let got = self.ulysses.all_to_all(&parts, &shapes)?;
        let mut seq: Vec<Tensor> = txt.into_iter().collect();
        seq.extend(got);
        Ok(Tensor::f_cat(&seq, 3)?)
    }

    /// Inverse of [`Self::scatter_heads`] for the attention output `(b, H/u, L', d)` ->
    /// `(b, H, L, d)` in this rank's token order.
    fn gather_heads(&self, o: &Tensor, ring_idx: usize) -> CommResult<Tensor> {
        let u = self.ulysses.size();
        if u == 1 {
            return Ok(o.shallow_clone());
        }
        let me = self.ulysses.rank();
        let (b, hu, _l, d) = o.size4()?;
        let own = sp_rank(u, ring_idx, me);
        let (t_loc, i_loc) = self.lens(own);
        let peer_len = |j: usize| {
            let (t, i) = self.lens(sp_rank(u, ring_idx, j));
            if self.replicated() { i } else { t + i }
        };
        let (txt_out, body) = if self.replicated() {
            let t = o.f_narrow(2, 0, t_loc)?;
            let rest = o.f_narrow(2, t_loc, o.size()[2] - t_loc)?;
            (Some(t), rest)
        } else {
            (None, o.shallow_clone())
        };
        let lens: Vec<i64> = (0..u).map(peer_len).collect();
        let parts = body
            .f_split_with_sizes(&lens, 2)?
            .into_iter()
            .map(|p| p.f_contiguous())
            .collect::<Result<Vec<_>, _>>()?;
        let my_len = if self.replicated() { i_loc } else { t_loc + i_loc };
        let shapes: Vec<Vec<i64>> = (0..u).map(|_| vec![b, hu, my_len, d]).collect();
        let got = self.ulysses.all_to_all(&parts, &shapes)?; // head chunk j from peer j
        let body = Tensor::f_cat(&got, 1)?; // (b, H, my_len, d)
        match txt_out {
            None => Ok(body),
            Some(t) => {
                let heads = self.ulysses.all_gather(&t.f_contiguous()?)?;
                let t = Tensor::f_cat(&heads, 1)?; // (b, H, T, d)
                Ok(Tensor::f_cat(&[t, body], 2)?)
            }
        }
    }

    /// Ring attention of `q` `(b, h, Lq, d)` over the keys of the whole ring. `kv`: this rank's
    /// K/V block, `(2, b, h, L', d)`, or `(2, b, L', h, d)` with [`KvLayout::Bshd`] (the fused
    /// kernel's layout, taken as it lies). With replicated text the first `t` tokens of `kv` are
    /// text: they join the first block only, and only image K/V travel. Unless
    /// `DITFLEET_RING=blocking`, each block is sent on while the rank attends over the one it
    /// holds ([`Communicator::start_send_recv`]).
    fn ring_attend(&self, q: &Tensor, kv: &Tensor, t: i64, layout: KvLayout) -> CommResult<Tensor> {
        let r = self.ring.size();
        let seq = layout.seq_dim();
        if r == 1 {
            // Pure Ulysses: every key is here, no log-sum-exp needed, so libtorch's SDPA picks its
            // fastest kernel (cuDNN on H100/H200).
            let (k, v) = layout.k_v(kv)?;
            return Ok(sdpa(q, &k, &v, None, false, None)?);
        }
        let me = self.ring.rank();
        let u = self.ulysses.size();
        // Length of what ring peer j sends around: its ulysses group's tokens (image only when
        // the text is replicated).
        let block_len = |j: usize| -> i64 {
            (0..u)
                .map(|x| {
                    let (tl, il) = self.lens(sp_rank(u, j, x));
                    if self.replicated() { il } else { tl + il }
                })
                .sum()
        };
        let (txt_kv, mut cur) = if t > 0 {
            (
                Some(kv.f_narrow(seq, 0, t)?),
                kv.f_narrow(seq, t, kv.size()[seq as usize] - t)?.f_contiguous()?,
            )
        } else {
            (None, kv.shallow_clone())
        };
        let overlap = !ring_env().blocking;
        let mut acc: Option<(Tensor, Tensor)> = None;
        for step in 0..r {
            let src = (me + r - step) % r; // whose block `cur` is
            let next = if step + 1 < r {
                let from = (me + r - step - 1) % r;
                let mut shape = cur.size();
                shape[seq as usize] = block_len(from);
                let (to, from) = ((me + 1) % r, (me + r - 1) % r);
                Some(if overlap {
                    self.ring.start_send_recv(&cur, to, &shape, cur.kind(), from)?
                } else {
                    (
                        self.ring.send_recv(&cur, to, &shape, cur.kind(), from)?,
                        Pending::done(),
                    )
                })
            } else {
                None
            };
            debug_assert_eq!(cur.size()[seq as usize], block_len(src));
            let block = match (&txt_kv, step) {
                (Some(tkv), 0) => Tensor::f_cat(&[tkv.shallow_clone(), cur.shallow_clone()], seq)?,
                _ => cur.shallow_clone(),
            };
            if block.size()[seq as usize] > 0 {
                let (k, v) = layout.k_v(&block)?;
                let (o, lse) = attention_with_lse(q, &k, &v)?;
                // The first block's output is the accumulator as it is (the first merge reads it
                // in its kind); the last merge writes q's kind.
                acc = Some(match acc {
                    None => (o, lse.f_contiguous()?),
                    Some((ao, al)) => merge_into(ao, al, &o, &lse, step + 1 == r)?,
                });
            }
            if let Some((n, pending)) = next {
                pending.wait()?;
                cur = n;
            }
        }
        let (o, _) = acc.expect("the ring holds at least the query's own tokens");
        Ok(o.f_to_kind(q.kind())?)
    }

    fn attend_inner(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> CommResult<Tensor> {
        let u = self.ulysses.size();
        let ring_idx = self.ring.rank();
        if u == 1
            && !self.replicated()
            && !ring_env().stacked
            && let Some(qkv) = stacked_bshd(q, k, v)
        {
            // Pure Ring over the fused kernel's joint buffers: the K/V block is k and v as they
            // lie, and the output keeps q's layout (no stack, no re-layout).
            return self.ring_attend(q, &qkv.f_narrow(0, 1, 2)?, 0, KvLayout::Bshd);
        }
        let own = sp_rank(u, ring_idx, self.ulysses.rank());
        let (t_loc, _) = self.lens(own);
        let qkv = Tensor::f_stack(&[q, k, v], 0)?; // (3, b, H, L, d)
        let qkv = self.scatter_heads(&qkv, ring_idx)?; // (3, b, H/u, L', d)
        let txt_in_front = if self.replicated() { t_loc } else { 0 };
        let q = qkv.f_get(0)?;
        let kv = qkv.f_narrow(0, 1, 2)?;
        let o = self.ring_attend(&q, &kv, txt_in_front, KvLayout::Bhsd)?; // (b, H/u, L', d)
        self.gather_heads(&o, ring_idx)
    }
}

/// How a K/V block lies in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KvLayout {
    /// `(2, b, heads, seq, d)`.
    Bhsd,
    /// `(2, b, seq, heads, d)`: the fused qkv kernel's joint buffers.
    Bshd,
}

impl KvLayout {
    fn seq_dim(self) -> i64 {
        match self {
            KvLayout::Bhsd => 3,
            KvLayout::Bshd => 2,
        }
    }

    /// k and v of a block as `(b, heads, seq, d)` (views).
    fn k_v(self, kv: &Tensor) -> CommResult<(Tensor, Tensor)> {
        let (k, v) = (kv.f_get(0)?, kv.f_get(1)?);
        Ok(match self {
            KvLayout::Bhsd => (k, v),
            KvLayout::Bshd => (k.f_transpose(1, 2)?, v.f_transpose(1, 2)?),
        })
    }
}

/// Ring's A/B switches, read once. `DITFLEET_RING` (comma-separated): `stacked` makes Ring stack
/// q/k/v (and re-lay its output) even where they lie in one joint buffer; `blocking` makes it wait
/// for each K/V block before attending over the one it holds. `DITFLEET_RING_MERGE=reference`:
/// the merges run as the elementwise ops of [`merge`] instead of the fused kernel.
#[derive(Debug, Clone, Copy, Default)]
struct RingEnv {
    stacked: bool,
    blocking: bool,
    reference_merge: bool,
}

fn ring_env() -> RingEnv {
    let b = crate::settings::bench();
    RingEnv {
        stacked: b.ring_stacked,
        blocking: b.ring_blocking,
        reference_merge: b.ring_reference_merge,
    }
}

/// Where `q`, `k` and `v` `(b, heads, seq, d)` are transposed views of consecutive slices of one
/// `(3, b, seq, heads, d)` buffer (a fused kernel's joint q/k/v buffers):
/// that buffer, as a view. `None` for any other layout.
pub fn stacked_bshd(q: &Tensor, k: &Tensor, v: &Tensor) -> Option<Tensor> {
    let Ok((b, h, s, d)) = q.size4() else {
        return None;
    };
    let block = b * s * h * d;
    let bshd = [s * h * d, d, h * d, 1]; // (b, heads, seq, d) strides of a (b, seq, heads, d) tensor
    let es = q.kind().elt_size_in_bytes() as i64;
    let base = q.data_ptr() as i64;
    let fits = [q, k, v].iter().enumerate().all(|(i, t)| {
        t.size() == q.size()
            && t.kind() == q.kind()
            && t.device() == q.device()
            && t.stride() == bshd
            && t.data_ptr() as i64 == base + i as i64 * block * es
    });
    if !fits || block == 0 {
        return None;
    }
    // From q's own storage offset (`None`): the three lie there in one allocation.
    q.f_as_strided([3, b, s, h, d], [block, s * h * d, h * d, d, 1], None)
        .ok()
}

impl UspAttention<'_> {
    /// Whether q/k/v can come in the all-to-all's head groups: Ulysses (`u > 1`, with or without
    /// Ring around it), split text and one image (the received chunks are then contiguous slices
    /// of the buffers attention reads, which Ring passes on as they lie).
    fn takes_groups(&self, heads: i64, batch: i64) -> bool {
        let u = self.ulysses.size() as i64;
        u > 1 && !self.replicated() && batch == 1 && heads % u == 0
    }

    /// Whether head-grouped `q` `(g, b, rows, heads / g, d)` is in this op's groups (see
    /// [`UspAttention::takes_groups`]).
    fn groups_match(&self, q: &Tensor) -> Res<bool> {
        let (g, b, _, hu, _) = q.size5()?;
        Ok(self.takes_groups(g * hu, b) && g == self.ulysses.size() as i64)
    }

    /// Pure Ulysses over head-grouped q/k/v `(u, 1, rows, H/u, d)` (group `j` = what peer `j`
    /// gets): one all-to-all of the three straight into `(1, L', H/u, d)` buffers (peer `j`'s
    /// `[txt_j; img_j]` tokens at its offset), attention on them as they lie, and the output's
    /// token slices sent back into `(u, 1, rows, H/u, d)`, re-laid as `(1, rows, H, d)`: one copy
    /// in all, where the general path stacks, splits, concatenates and re-lays out.
    ///
    /// With `during`, both all-to-alls are started ([`Communicator::start_all_to_all_into`]) and
    /// `during`'s work is enqueued while they are in flight: `Inbound` before the attention
    /// waits for q/k/v, `Outbound` before the result is waited for.
    fn attend_groups(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        during: Option<&mut dyn FnMut(Overlap) -> Res<()>>,
    ) -> CommResult<Tensor> {
        let overlap = during.is_some();
        let mut s = UlyssesSession::new(self, q, k, v, overlap)?;
        let mut during = during;
        s.send_piece(Rows::All)?;
        if let Some(w) = during.as_mut() {
            w(Overlap::Inbound)?;
        }
        s.attend_all()?;
        s.give_back_piece(Rows::All)?;
        if let Some(w) = during.as_mut() {
            w(Overlap::Outbound)?;
        }
        s.take_piece(Rows::All)
    }

    /// Rows `(start, len)` of `piece` among `txt` text then `img` image rows.
    fn piece_rows(piece: Rows, txt: i64, img: i64) -> (i64, i64) {
        match piece {
            Rows::All => (0, txt + img),
            Rows::Txt => (0, txt),
            Rows::Img { part, of } => {
                let (s, l) = balanced_split(img, of.max(1) as usize)[part.clamp(0, of.max(1) - 1) as usize];
                (txt + s, l)
            }
        }
    }
}

impl JointAttention for UspAttention<'_> {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        Ok(self.attend_inner(q, k, v)?)
    }

    /// One rank in both groups (one GPU, or CFG-parallel ranks that each hold every token): the
    /// attention exchanges nothing.
    fn local(&self) -> bool {
        self.ulysses.size() == 1 && self.ring.size() == 1
    }

    fn head_groups(&self, heads: i64, batch: i64) -> i64 {
        if self.takes_groups(heads, batch) {
            self.ulysses.size() as i64
        } else {
            1
        }
    }

    fn attend_grouped(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        if !self.groups_match(q)? {
            // Not this op's layout: regroup and take the general path.
            return attend_ungrouped(self, q, k, v);
        }
        Ok(self.attend_groups(q, k, v, None)?)
    }

    fn attend_grouped_with(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        during: &mut dyn FnMut(Overlap) -> Res<()>,
    ) -> Res<Tensor> {
        if !self.groups_match(q)? {
            return around(during, || attend_ungrouped(self, q, k, v));
        }
        Ok(self.attend_groups(q, k, v, Some(during))?)
    }

    fn session<'s>(
        &'s self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        overlap: bool,
    ) -> Res<Option<Box<dyn GroupedSession + 's>>> {
        if !self.groups_match(q)? {
            return Ok(None);
        }
        Ok(Some(Box::new(UlyssesSession::new(self, q, k, v, overlap)?)))
    }
}

/// Attention output `(b, h, Lq, d)` (q's kind) and the log-sum-exp of each query's scores
/// `(b, h, Lq)` (fp32), from libtorch's fused kernels: on CUDA the fastest one that returns a
/// log-sum-exp (cuDNN, flash, memory-efficient; [`crate::aten::attention_lse`]), on CPU the flash
/// kernel.
pub fn attention_with_lse(q: &Tensor, k: &Tensor, v: &Tensor) -> Res<(Tensor, Tensor)> {
    if q.device().is_cuda() {
        let (o, lse, _) = crate::aten::attention_lse(q, k, v)?;
        return Ok((o, lse));
    }
    let lq = q.size()[2];
    let (o, lse) = Tensor::f_internal_scaled_dot_product_flash_attention_for_cpu(
        q,
        k,
        v,
        0.0,
        false,
        None::<Tensor>,
        None,
    )?;
    Ok((o, lse.f_narrow(2, 0, lq)?.f_to_kind(Kind::Float)?))
}

/// [`merge`] into the accumulator `(o1, l1)`, `o1` fp32 or (the first block's output) bf16: one
/// kernel on CUDA (bf16 `o2`, heads of 128, the fused kernels loaded; `dtf_lse_merge`), in place
/// where `o1` is fp32, into a new fp32 accumulator where it is bf16, into a bf16 result (`o2`'s
/// kind and layout) when `last`; else by [`merge`] (fp32).
fn merge_into(o1: Tensor, l1: Tensor, o2: &Tensor, l2: &Tensor, last: bool) -> Res<(Tensor, Tensor)> {
    if let tch::Device::Cuda(i) = o1.device()
        && o2.kind() == Kind::BFloat16
        && o1.size().last() == Some(&128)
        && crate::aten::fused_kernels_available(i)
        && !ring_env().reference_merge
    {
        let out = if last {
            o2.f_empty_like()?
        } else if o1.kind() == Kind::Float {
            o1.shallow_clone()
        } else {
            Tensor::f_empty_strided(o1.size(), o1.stride(), (Kind::Float, o1.device()))?
        };
        crate::aten::lse_merge(&o1, &l1, o2, l2, &out)?;
        return Ok((out, l1));
    }
    merge(&o1.f_to_kind(Kind::Float)?, &l1, o2, l2)
}

/// Merges two partial attentions over disjoint key sets: `(o, lse)` pairs, `o` fp32 (the reference
/// the fused merge is checked against by `flux_bench --check-fused`).
pub fn merge(o1: &Tensor, l1: &Tensor, o2: &Tensor, l2: &Tensor) -> Res<(Tensor, Tensor)> {
    let l = l1.f_logaddexp(l2)?; // (b, h, L)
    let w1 = l1.f_sub(&l)?.f_exp()?.f_unsqueeze(-1)?;
    let w2 = l2.f_sub(&l)?.f_exp()?.f_unsqueeze(-1)?;
    let o = o1.f_mul(&w1)?.f_add(&o2.f_to_kind(Kind::Float)?.f_mul(&w2)?)?;
    Ok((o, l))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tch::Device;

    use super::*;
    use crate::parallel::threads::ThreadComm;

    /// Full-sequence reference vs every (u, r, text mode) on 4 or fewer ranks: each rank's output
    /// rows equal the reference's rows for its tokens.
    fn check(u: usize, r: usize, txt_len: i64, img_len: i64, mode: Option<TextMode>) {
        check_layout(u, r, txt_len, img_len, mode, false)
    }

    /// How [`check_layout`] hands q/k/v to the op.
    #[derive(Clone, Copy, PartialEq)]
    enum Call {
        Plain,
        /// In `u` head groups (`attend_grouped`).
        Grouped,
        /// In head groups with the caller's work interleaved (`attend_grouped_with`): the work
        /// must run exactly once per phase, Inbound first.
        GroupedWith,
        /// Through a split-phase session: q/k/v sent as two image parts then the text, the
        /// output given back as text then image and taken in that order.
        Pieces,
        /// As transposed views of one `(3, b, L, heads, d)` buffer (the fused kernel's joint
        /// buffers), which pure Ring takes as they lie.
        Stacked,
    }

    /// [`check`], with q/k/v handed over in `u` head groups (`attend_grouped`) when `grouped`.
    fn check_layout(u: usize, r: usize, txt_len: i64, img_len: i64, mode: Option<TextMode>, grouped: bool) {
        check_call(
            u,
            r,
            txt_len,
            img_len,
            mode,
            if grouped { Call::Grouped } else { Call::Plain },
        )
    }

    fn check_call(u: usize, r: usize, txt_len: i64, img_len: i64, mode: Option<TextMode>, call: Call) {
        tch::manual_seed(11);
        let (b, h, d) = (1, 4, 8);
        let total = txt_len + img_len;
        let q = Tensor::randn([b, h, total, d], (Kind::Float, Device::Cpu));
        let k = Tensor::randn([b, h, total, d], (Kind::Float, Device::Cpu));
        let v = Tensor::randn([b, h, total, d], (Kind::Float, Device::Cpu));
        let reference = sdpa(&q, &k, &v, None, false, None).unwrap();
        let n = u * r;
        let layout = Arc::new(SeqLayout::new(n, txt_len, img_len, mode));
        // Build groups: ulysses groups per ring index, ring groups per ulysses index.
        let mut uly: Vec<Option<ThreadComm>> = (0..n).map(|_| None).collect();
        let mut ring: Vec<Option<ThreadComm>> = (0..n).map(|_| None).collect();
        for ri in 0..r {
            for (j, c) in ThreadComm::group(u, Device::Cpu, Duration::from_secs(20))
                .into_iter()
                .enumerate()
            {
                uly[sp_rank(u, ri, j)] = Some(c);
            }
        }
        for ui in 0..u {
            for (j, c) in ThreadComm::group(r, Device::Cpu, Duration::from_secs(20))
                .into_iter()
                .enumerate()
            {
                ring[sp_rank(u, j, ui)] = Some(c);
            }
        }
        let local = |x: &Tensor, rank: usize| {
            let (ts, tl) = layout.txt[rank];
            let (is, il) = layout.img[rank];
            Tensor::cat(&[x.narrow(2, ts, tl), x.narrow(2, txt_len + is, il)], 2)
        };
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let (ql, kl, vl) = (local(&q, rank), local(&k, rank), local(&v, rank));
                let (uc, rc) = (uly[rank].take().unwrap(), ring[rank].take().unwrap());
                let layout = layout.clone();
                std::thread::spawn(move || {
                    let op = UspAttention {
                        ulysses: &uc,
                        ring: &rc,
                        layout: &layout,
                    };
                    if call == Call::Plain {
                        return op.attend(&ql, &kl, &vl).unwrap();
                    }
                    if call == Call::Stacked {
                        let all = Tensor::stack(&[&ql, &kl, &vl].map(|t| t.transpose(1, 2)), 0); // (3, b, L, H, d)
                        let t: Vec<Tensor> = (0..3).map(|i| all.get(i).transpose(1, 2)).collect();
                        assert!(
                            stacked_bshd(&t[0], &t[1], &t[2]).is_some(),
                            "rank {rank}: one buffer"
                        );
                        return op.attend(&t[0], &t[1], &t[2]).unwrap();
                    }
                    let g = u as i64;
                    let to_groups = |x: &Tensor| {
                        let (b, h, l, d) = x.size4().unwrap();
                        x.transpose(1, 2)
                            .reshape([b, l, g, h / g, d])
                            .permute([2, 0, 1, 3, 4])
                            .contiguous() // (g, b, l, h/g, d)
                    };
                    let (qg, kg, vg) = (to_groups(&ql), to_groups(&kl), to_groups(&vl));
                    if call == Call::Pieces {
                        let mut s = op
                            .session(&qg, &kg, &vg, true)
                            .unwrap()
                            .expect("pure Ulysses takes pieces");
                        for part in 0..2 {
                            s.send(Rows::Img { part, of: 2 }).unwrap();
                        }
                        s.send(Rows::Txt).unwrap();
                        s.attend().unwrap();
                        let img = Rows::Img { part: 0, of: 1 };
                        s.give_back(Rows::Txt).unwrap();
                        s.give_back(img).unwrap();
                        let t = s.take(Rows::Txt).unwrap();
                        let i = s.take(img).unwrap();
                        return Tensor::cat(&[t, i], 1).transpose(1, 2);
                    }
                    if call == Call::Grouped {
                        return op.attend_grouped(&qg, &kg, &vg).unwrap().transpose(1, 2);
                    }
                    let mut phases = Vec::new();
                    let out = op
                        .attend_grouped_with(&qg, &kg, &vg, &mut |p| {
                            phases.push(p);
                            Ok(())
                        })
                        .unwrap();
                    assert_eq!(phases, [Overlap::Inbound, Overlap::Outbound], "rank {rank}");
                    out.transpose(1, 2)
                })
            })
            .collect();
        for (rank, hnd) in handles.into_iter().enumerate() {
            let got = hnd.join().unwrap();
            let want = local(&reference, rank);
            let diff = f64::try_from(got.f_sub(&want).unwrap().abs().max()).unwrap();
            assert!(
                diff < 1e-5,
                "u={u} r={r} txt={txt_len} img={img_len} {:?} rank {rank}: max diff {diff}",
                layout.text
            );
        }
    }

    #[test]
    fn ulysses_matches_full_attention_with_split_and_replicated_text() {
        check(2, 1, 6, 10, None); // split text
        check(2, 1, 5, 10, None); // text split unevenly (3 + 2)
        check(4, 1, 8, 18, None); // uneven image slices
        check(4, 1, 7, 16, None); // text split unevenly (2 + 2 + 2 + 1)
        check(2, 1, 5, 10, Some(TextMode::Replicated));
        check(4, 1, 7, 16, Some(TextMode::Replicated));
    }

    /// The copy-free Ulysses path (q/k/v in the all-to-all's head groups, as the fused kernel
    /// writes them with `Opts::a2a`) computes the same attention, for even and uneven slices; where
    /// it does not apply (replicated text, Ring) the grouped input is regrouped and still right.
    #[test]
    fn ulysses_over_head_groups_matches_full_attention() {
        check_layout(2, 1, 6, 10, None, true);
        check_layout(4, 1, 8, 18, None, true); // uneven image slices
        check_layout(4, 1, 8, 16, None, true);
        check_layout(2, 1, 5, 10, None, true); // uneven text slices
        check_layout(2, 1, 5, 10, Some(TextMode::Replicated), true); // regrouped, general path
        check_layout(2, 2, 8, 16, None, true); // USP: head groups, Ring on the received block
        check_layout(2, 2, 8, 18, None, true); // USP, uneven image slices
        check_layout(2, 2, 6, 13, None, true); // USP, uneven text and image slices
        check_layout(2, 2, 6, 13, Some(TextMode::Replicated), true); // regrouped, general path
    }

    /// Which plans take the copy-free head groups (one rank with stand-in peers).
    #[cfg(feature = "bench")]
    #[test]
    fn head_groups_are_taken_by_pure_ulysses_and_usp_with_split_text_only() {
        let layout = SeqLayout::new(4, 8, 16, None);
        let (u, r) = (
            crate::parallel::LoopbackComm::new(4, Device::Cpu),
            crate::parallel::LoopbackComm::new(1, Device::Cpu),
        );
        let op = UspAttention {
            ulysses: &u,
            ring: &r,
            layout: &layout,
        };
        assert_eq!(
            op.head_groups(24, 1),
            4,
            "pure Ulysses with split text takes head groups"
        );
        assert_eq!(op.head_groups(24, 2), 1, "a batch of 2 does not");
        let ring = crate::parallel::LoopbackComm::new(2, Device::Cpu);
        let usp = UspAttention {
            ulysses: &u,
            ring: &ring,
            layout: &SeqLayout::new(8, 8, 16, None),
        };
        assert_eq!(usp.head_groups(24, 1), 4, "USP takes its ulysses groups");
        let replicated = UspAttention {
            ulysses: &u,
            ring: &ring,
            layout: &SeqLayout::new(8, 7, 16, None),
        };
        assert_eq!(replicated.head_groups(24, 1), 1, "replicated text does not");
    }

    /// The Ulysses exchange with the caller's work interleaved (the single blocks' MLP matmuls
    /// overlapping the all-to-alls) computes the same attention and runs that work once per
    /// phase, Inbound then Outbound, on the copy-free path and on the ones it falls back to.
    #[test]
    fn ulysses_with_interleaved_work_matches_full_attention_and_runs_each_phase_once() {
        check_call(2, 1, 6, 10, None, Call::GroupedWith);
        check_call(4, 1, 8, 18, None, Call::GroupedWith); // uneven image slices
        check_call(2, 1, 5, 10, None, Call::GroupedWith); // uneven text slices
        check_call(2, 1, 5, 10, Some(TextMode::Replicated), Call::GroupedWith); // general path
        check_call(2, 2, 8, 16, None, Call::GroupedWith); // USP: Ring on the received block
    }

    /// Rank 0 of a pure ulysses=2 group with stand-in peers, 4 text + 8 image tokens.
    #[cfg(feature = "bench")]
    fn loopback_ulysses2() -> (
        crate::parallel::LoopbackComm,
        crate::parallel::LoopbackComm,
        SeqLayout,
    ) {
        (
            crate::parallel::LoopbackComm::new(2, Device::Cpu),
            crate::parallel::LoopbackComm::new(1, Device::Cpu),
            SeqLayout::new(2, 4, 8, None),
        )
    }

    /// The split-phase session (the double blocks' path: image rows sent in parts as they are
    /// projected, text rows last, the output back as text then image) computes the same
    /// attention, also where the ranks hold different numbers of image rows (each rank cuts its
    /// own rows, so the pieces still match).
    #[test]
    fn ulysses_session_in_row_pieces_matches_full_attention_for_even_and_uneven_slices() {
        check_call(2, 1, 6, 10, None, Call::Pieces);
        check_call(4, 1, 8, 16, None, Call::Pieces);
        check_call(4, 1, 8, 18, None, Call::Pieces); // image slices of 5, 5, 4, 4
        check_call(2, 1, 4, 3, None, Call::Pieces); // an image part of one row
        check_call(2, 1, 5, 10, None, Call::Pieces); // uneven text slices
        check_call(4, 1, 7, 18, None, Call::Pieces); // uneven text and image slices
        check_call(2, 2, 8, 16, None, Call::Pieces); // USP: Ring on the received block
        check_call(2, 2, 8, 18, None, Call::Pieces); // USP, uneven image slices
    }

    /// Pieces that do not tile the rows, and output taken before it was given back, are refused
    /// with what was asked (never a silent wrong attention).
    #[cfg(feature = "bench")]
    #[test]
    fn a_session_refuses_pieces_that_do_not_tile_the_rows() {
        let (u, r, layout) = loopback_ulysses2();
        let op = UspAttention {
            ulysses: &u,
            ring: &r,
            layout: &layout,
        };
        let x = Tensor::randn([2, 1, layout.local_len(0), 2, 8], (Kind::Float, Device::Cpu));
        let mut s = op.session(&x, &x, &x, true).unwrap().unwrap();
        s.send(Rows::Txt).unwrap();
        let err = s.attend().unwrap_err().to_string();
        assert!(err.contains("pieces"), "{err}");
        s.send(Rows::Img { part: 0, of: 1 }).unwrap();
        s.attend().unwrap();
        let err = s.take(Rows::Txt).unwrap_err().to_string();
        assert!(err.contains("given back"), "{err}");
        s.give_back(Rows::All).unwrap();
        assert_eq!(s.take(Rows::Txt).unwrap().size(), vec![1, 2, 4, 8]);
    }

    /// A started all-to-all's outputs are there after its wait, and a work error between the
    /// start and the wait surfaces as the attention's error (the exchange is still joined).
    #[cfg(feature = "bench")]
    #[test]
    fn a_failing_interleaved_work_fails_the_attention() {
        let (u, r, layout) = loopback_ulysses2();
        let op = UspAttention {
            ulysses: &u,
            ring: &r,
            layout: &layout,
        };
        let rows = layout.local_len(0);
        let x = Tensor::randn([2, 1, rows, 2, 8], (Kind::Float, Device::Cpu));
        let err = op
            .attend_grouped_with(&x, &x, &x, &mut |p| match p {
                Overlap::Inbound => Err(tch::TchError::Torch("injected".into())),
                Overlap::Outbound => Ok(()),
            })
            .unwrap_err();
        assert!(err.to_string().contains("injected"), "{err}");
        let ins = [
            Tensor::ones([3], (Kind::Float, Device::Cpu)),
            Tensor::ones([3], (Kind::Float, Device::Cpu)),
        ];
        let outs = [
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
            Tensor::zeros([3], (Kind::Float, Device::Cpu)),
        ];
        u.start_all_to_all_into(&ins, &outs).unwrap().wait().unwrap();
        assert_eq!(f64::try_from(outs[0].sum(Kind::Float)).unwrap(), 3.0);
    }

    #[test]
    fn ring_matches_full_attention_with_split_and_replicated_text() {
        check(1, 2, 6, 10, None);
        check(1, 2, 5, 11, None); // uneven text slices
        check(1, 2, 5, 11, Some(TextMode::Replicated));
        check(1, 4, 8, 16, None);
        check(1, 4, 3, 17, None); // fewer text tokens than ranks: replicated
    }

    /// Pure Ring over q/k/v that lie in one joint buffer (the fused kernel's layout) passes k and
    /// v as one block without stacking them, and computes the same attention; other plans given
    /// that layout take the general path and are still right.
    #[test]
    fn ring_over_the_joint_buffers_matches_full_attention() {
        check_call(1, 2, 6, 10, None, Call::Stacked);
        check_call(1, 4, 8, 16, None, Call::Stacked);
        check_call(1, 4, 8, 18, None, Call::Stacked); // uneven image slices
        check_call(1, 4, 3, 17, None, Call::Stacked); // replicated text: general path
        check_call(2, 2, 8, 16, None, Call::Stacked); // USP given ungrouped buffers: general path
    }

    /// The joint-buffer check accepts exactly three consecutive slices of one buffer.
    #[test]
    fn stacked_bshd_takes_one_buffer_and_refuses_separate_tensors() {
        let all = Tensor::randn([3, 1, 5, 2, 4], (Kind::Float, Device::Cpu));
        let views: Vec<Tensor> = (0..3).map(|i| all.get(i).transpose(1, 2)).collect();
        let got = stacked_bshd(&views[0], &views[1], &views[2]).expect("one buffer");
        assert_eq!(f64::try_from(got.f_sub(&all).unwrap().abs().max()).unwrap(), 0.0);
        let sep: Vec<Tensor> = (0..3).map(|i| all.get(i).copy().transpose(1, 2)).collect();
        assert!(
            stacked_bshd(&sep[0], &sep[1], &sep[2]).is_none(),
            "three allocations"
        );
        assert!(
            stacked_bshd(&views[1], &views[0], &views[2]).is_none(),
            "out of order"
        );
        let plain = all.get(0).transpose(1, 2).contiguous();
        assert!(
            stacked_bshd(&plain, &views[1], &views[2]).is_none(),
            "not the bshd layout"
        );
    }

    #[test]
    fn usp_matches_full_attention_for_every_degree_pair() {
        check(2, 2, 8, 16, None);
        check(2, 2, 6, 13, None); // uneven text slices (2 + 2 + 1 + 1)
        check(2, 2, 6, 13, Some(TextMode::Replicated));
        check(2, 2, 8, 16, Some(TextMode::Replicated));
    }

    #[test]
    fn replicated_text_keys_count_once() {
        // If the text keys counted once per rank, the text rows would differ from the reference;
        // a text length of 1 over 4 ranks makes that maximal.
        check(4, 1, 1, 8, None);
        check(1, 4, 1, 8, None);
    }
}
