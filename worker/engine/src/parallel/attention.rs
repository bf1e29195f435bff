//! Sequence-parallel joint attention: Ulysses (all-to-all over heads), Ring (K/V blocks passed
//! around with log-sum-exp merging) and USP (Ulysses inside, Ring across), all exact.
//!
//! Flux attends over `[text; image]` tokens. Each rank of a sequence-parallel group holds a
//! contiguous slice of the image tokens and, per [`TextMode`], either a slice of the text tokens
//! or all of them. With all of them (the replicated path), the text keys must count ONCE in
//! every softmax: Ulysses takes the text heads locally instead of gathering N copies, Ring adds
//! the text block once instead of passing it around.

use tch::{Kind, Tensor};

use super::comm::{CommError, CommResult, Communicator, balanced_split};
use crate::flux::layers::{Res, sdpa};
use crate::flux::transformer::{JointAttention, Overlap, attend_ungrouped};

/// How the text tokens are laid out over the ranks of a sequence-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum TextMode {
    /// Each rank holds `txt_len / n` text tokens (used when divisible).
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
    /// Text split when `txt_len` divides evenly over `n` ranks, replicated otherwise (unless
    /// `force` picks a mode); image tokens split in balanced contiguous slices.
    pub fn new(n: usize, txt_len: i64, img_len: i64, force: Option<TextMode>) -> Self {
        let text = force.unwrap_or(if txt_len % n as i64 == 0 {
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

    /// Ring attention of `q` over the keys of the whole ring. `kv`: `(2, b, h, L', d)` of this
    /// rank. With replicated text the first `t` tokens of `kv` are text: they join the first
    /// block only, and only image K/V travel.
    fn ring_attend(&self, q: &Tensor, kv: &Tensor, t: i64) -> CommResult<Tensor> {
        let r = self.ring.size();
        if r == 1 {
            // Pure Ulysses: every key is here, no log-sum-exp needed, so libtorch's SDPA picks its
            // fastest kernel (cuDNN on H100/H200).
            return Ok(sdpa(q, &kv.f_get(0)?, &kv.f_get(1)?, None, false, None)?);
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
                Some(kv.f_narrow(3, 0, t)?),
                kv.f_narrow(3, t, kv.size()[3] - t)?.f_contiguous()?,
            )
        } else {
            (None, kv.shallow_clone())
        };
        let (_, b, h, _, d) = kv.size5()?;
        let mut acc: Option<(Tensor, Tensor)> = None;
        for step in 0..r {
            let src = (me + r - step) % r; // whose block `cur` is
            let next = if step + 1 < r {
                let from = (me + r - step - 1) % r;
                let shape = [2, b, h, block_len(from), d];
                Some(
                    self.ring
                        .send_recv(&cur, (me + 1) % r, &shape, cur.kind(), (me + r - 1) % r)?,
                )
            } else {
                None
            };
            debug_assert_eq!(cur.size()[3], block_len(src));
            let block = match (&txt_kv, step) {
                (Some(tkv), 0) => Tensor::f_cat(&[tkv.shallow_clone(), cur.shallow_clone()], 3)?,
                _ => cur.shallow_clone(),
            };
            if block.size()[3] > 0 {
                let (o, lse) = attention_with_lse(q, &block.f_get(0)?, &block.f_get(1)?)?;
                acc = Some(match acc {
                    None => (o.f_to_kind(Kind::Float)?, lse),
                    Some((ao, al)) => merge(&ao, &al, &o, &lse)?,
                });
            }
            if let Some(n) = next {
                cur = n;
            }
        }
        let (o, _) = acc.expect("the ring holds at least the query's own tokens");
        Ok(o.f_to_kind(q.kind())?)
    }

    fn attend_inner(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> CommResult<Tensor> {
        let u = self.ulysses.size();
        let ring_idx = self.ring.rank();
        let own = sp_rank(u, ring_idx, self.ulysses.rank());
        let (t_loc, _) = self.lens(own);
        let qkv = Tensor::f_stack(&[q, k, v], 0)?; // (3, b, H, L, d)
        let qkv = self.scatter_heads(&qkv, ring_idx)?; // (3, b, H/u, L', d)
        let txt_in_front = if self.replicated() { t_loc } else { 0 };
        let q = qkv.f_get(0)?;
        let kv = qkv.f_narrow(0, 1, 2)?;
        let o = self.ring_attend(&q, &kv, txt_in_front)?; // (b, H/u, L', d)
        self.gather_heads(&o, ring_idx)
    }
}

impl UspAttention<'_> {
    /// Whether q/k/v can come in the all-to-all's head groups: pure Ulysses (`u > 1`, no Ring),
    /// split text and one image (the received chunks are then contiguous slices of the buffers
    /// attention reads).
    fn takes_groups(&self, heads: i64, batch: i64) -> bool {
        let u = self.ulysses.size() as i64;
        u > 1 && self.ring.size() == 1 && !self.replicated() && batch == 1 && heads % u == 0
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
        mut during: Option<&mut dyn FnMut(Overlap) -> Res<()>>,
    ) -> CommResult<Tensor> {
        let u = self.ulysses.size();
        let (g, b, rows, hu, d) = q.size5()?;
        let lens: Vec<i64> = (0..u)
            .map(|j| {
                let (t, i) = self.lens(sp_rank(u, 0, j));
                t + i
            })
            .collect();
        if g != u as i64 || b != 1 || lens[self.ulysses.rank()] != rows {
            return Err(CommError::Usage {
                op: "ulysses (head groups)",
                message: format!("q {:?} for {u} ranks holding {lens:?} tokens", q.size()),
            });
        }
        let total: i64 = lens.iter().sum();
        let o = (q.kind(), q.device());
        let recv = [
            Tensor::f_empty([b, total, hu, d], o)?,
            Tensor::f_empty([b, total, hu, d], o)?,
            Tensor::f_empty([b, total, hu, d], o)?,
        ]; // (1, L', H/u, d) each
        let (mut ins, mut outs) = (Vec::with_capacity(3 * u), Vec::with_capacity(3 * u));
        let mut off = 0;
        for (j, len) in lens.iter().enumerate() {
            for (src, dst) in [q, k, v].into_iter().zip(&recv) {
                ins.push(src.f_get(j as i64)?); // (1, rows, H/u, d): my tokens, peer j's heads
                outs.push(dst.f_narrow(1, off, *len)?); // peer j's tokens, my heads
            }
            off += len;
        }
        self.exchange(&ins, &outs, &mut during, Overlap::Inbound)?;
        let [qr, kr, vr] = recv;
        let out = sdpa(
            &qr.f_transpose(1, 2)?,
            &kr.f_transpose(1, 2)?,
            &vr.f_transpose(1, 2)?,
            None,
            false,
            None,
        )? // (1, H/u, L', d)
        .f_transpose(1, 2)?
        .f_contiguous()?; // (1, L', H/u, d): no copy where cuDNN wrote it in that layout
        let back = Tensor::f_empty([u as i64, b, rows, hu, d], o)?;
        let (mut ins, mut outs) = (Vec::with_capacity(u), Vec::with_capacity(u));
        let mut off = 0;
        for (j, len) in lens.iter().enumerate() {
            ins.push(out.f_narrow(1, off, *len)?); // peer j's tokens, my heads
            outs.push(back.f_get(j as i64)?); // my tokens, peer j's heads
            off += len;
        }
        self.exchange(&ins, &outs, &mut during, Overlap::Outbound)?;
        Ok(back.f_permute([1, 2, 0, 3, 4])?.f_reshape([b, rows, g * hu, d])?) // (1, rows, H, d)
    }
}

impl UspAttention<'_> {
    /// One all-to-all of [`UspAttention::attend_groups`]: blocking, or started with `during`'s
    /// `phase` enqueued before the wait.
    fn exchange(
        &self,
        ins: &[Tensor],
        outs: &[Tensor],
        during: &mut Option<&mut dyn FnMut(Overlap) -> Res<()>>,
        phase: Overlap,
    ) -> CommResult<()> {
        match during {
            None => self.ulysses.all_to_all_into(ins, outs),
            Some(work) => {
                let pending = self.ulysses.start_all_to_all_into(ins, outs)?;
                work(phase)?;
                pending.wait()
            }
        }
    }
}

impl JointAttention for UspAttention<'_> {
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        Ok(self.attend_inner(q, k, v)?)
    }

    fn head_groups(&self, heads: i64, batch: i64) -> i64 {
        if self.takes_groups(heads, batch) {
            self.ulysses.size() as i64
        } else {
            1
        }
    }

    fn attend_grouped(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        let (g, b, _, hu, _) = q.size5()?;
        if !self.takes_groups(g * hu, b) || g != self.ulysses.size() as i64 {
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
        let (g, b, _, hu, _) = q.size5()?;
        if !self.takes_groups(g * hu, b) || g != self.ulysses.size() as i64 {
            during(Overlap::Inbound)?;
            let o = attend_ungrouped(self, q, k, v)?;
            during(Overlap::Outbound)?;
            return Ok(o);
        }
        Ok(self.attend_groups(q, k, v, Some(during))?)
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

/// Merges two partial attentions over disjoint key sets: `(o, lse)` pairs, `o` fp32.
fn merge(o1: &Tensor, l1: &Tensor, o2: &Tensor, l2: &Tensor) -> Res<(Tensor, Tensor)> {
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
                    let g = u as i64;
                    let to_groups = |x: &Tensor| {
                        let (b, h, l, d) = x.size4().unwrap();
                        x.transpose(1, 2)
                            .reshape([b, l, g, h / g, d])
                            .permute([2, 0, 1, 3, 4])
                            .contiguous() // (g, b, l, h/g, d)
                    };
                    let (qg, kg, vg) = (to_groups(&ql), to_groups(&kl), to_groups(&vl));
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
        check(2, 1, 5, 10, None); // replicated text (5 % 2 != 0)
        check(4, 1, 8, 18, None); // uneven image slices
        check(4, 1, 7, 16, None);
    }

    /// The copy-free Ulysses path (q/k/v in the all-to-all's head groups, as the fused kernel
    /// writes them with `Opts::a2a`) computes the same attention, for even and uneven slices; where
    /// it does not apply (replicated text, Ring) the grouped input is regrouped and still right.
    #[test]
    fn ulysses_over_head_groups_matches_full_attention() {
        check_layout(2, 1, 6, 10, None, true);
        check_layout(4, 1, 8, 18, None, true); // uneven image slices
        check_layout(4, 1, 8, 16, None, true);
        check_layout(2, 1, 5, 10, None, true); // replicated text: regrouped, general path
        check_layout(2, 2, 8, 16, None, true); // USP: regrouped, general path
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
        assert_eq!(usp.head_groups(24, 1), 1, "USP does not");
    }

    /// The Ulysses exchange with the caller's work interleaved (the single blocks' MLP matmuls
    /// overlapping the all-to-alls) computes the same attention and runs that work once per
    /// phase, Inbound then Outbound, on the copy-free path and on the ones it falls back to.
    #[test]
    fn ulysses_with_interleaved_work_matches_full_attention_and_runs_each_phase_once() {
        check_call(2, 1, 6, 10, None, Call::GroupedWith);
        check_call(4, 1, 8, 18, None, Call::GroupedWith); // uneven image slices
        check_call(2, 1, 5, 10, None, Call::GroupedWith); // replicated text: general path
        check_call(2, 2, 8, 16, None, Call::GroupedWith); // USP: general path
    }

    /// A started all-to-all's outputs are there after its wait, and a work error between the
    /// start and the wait surfaces as the attention's error (the exchange is still joined).
    #[test]
    fn a_failing_interleaved_work_fails_the_attention() {
        let (u, r) = (
            crate::parallel::LoopbackComm::new(2, Device::Cpu),
            crate::parallel::LoopbackComm::new(1, Device::Cpu),
        );
        let layout = SeqLayout::new(2, 4, 8, None);
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
        check(1, 2, 5, 11, None);
        check(1, 4, 8, 16, None);
        check(1, 4, 3, 17, None);
    }

    #[test]
    fn usp_matches_full_attention_for_every_degree_pair() {
        check(2, 2, 8, 16, None);
        check(2, 2, 6, 13, None); // 6 % 4 != 0 -> replicated
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
