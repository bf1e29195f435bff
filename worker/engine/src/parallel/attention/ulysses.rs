//! Pure Ulysses over head-grouped q/k/v as a [`GroupedSession`]: every peer's tokens of this
//! rank's heads arrive by all-to-all, are attended once, and go back the same way, piece by piece
//! so the transfers can overlap the projections around them. A child of `attention` for
//! [`UspAttention`]'s private group and layout state.

use tch::{Kind, Tensor};

use super::super::comm::{CommError, CommResult, Communicator, Pending};
use super::{KvLayout, UspAttention, sp_rank};
use crate::nn::attention::{GroupedSession, Rows};
use crate::nn::{Res, sdpa};

/// [`GroupedSession`] of pure Ulysses over head-grouped q/k/v (see
/// [`UspAttention::attend_groups`]): each piece of rows is its own all-to-all, started on the
/// communicator's side stream when `overlap` (else complete when sent).
pub(super) struct UlyssesSession<'a> {
    op: &'a UspAttention<'a>,
    comm: &'a dyn Communicator,
    /// The caller's buffers `(u, 1, rows, H/u, d)`.
    qkv: [Tensor; 3],
    /// Each peer's `(text, image)` rows and where its tokens start in the received buffers.
    peers: Vec<(i64, i64)>,
    offs: Vec<i64>,
    me: usize,
    overlap: bool,
    /// `(1, L', H/u, d)` each: every peer's tokens, this rank's heads.
    recv: [Tensor; 3],
    /// k and v of `recv` as one `(2, 1, L', H/u, d)` block (they are one allocation).
    kv: Tensor,
    sent: Vec<(i64, i64)>,
    inbound: Vec<Pending<'a>>,
    /// The attention output `(1, L', H/u, d)` and the buffer it returns into `(u, 1, rows, H/u, d)`.
    out: Option<(Tensor, Tensor)>,
    outbound: Vec<((i64, i64), Option<Pending<'a>>)>,
}

impl<'a> UlyssesSession<'a> {
    pub(super) fn new(
        op: &'a UspAttention<'a>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        overlap: bool,
    ) -> CommResult<Self> {
        let u = op.ulysses.size();
        let (g, b, rows, hu, d) = q.size5()?;
        let ring_idx = op.ring.rank();
        let peers: Vec<(i64, i64)> = (0..u).map(|j| op.lens(sp_rank(u, ring_idx, j))).collect();
        let me = op.ulysses.rank();
        let lens: Vec<i64> = peers.iter().map(|(t, i)| t + i).collect();
        if g != u as i64 || b != 1 || lens[me] != rows || k.size() != q.size() || v.size() != q.size() {
            return Err(CommError::Usage {
                op: "ulysses (head groups)",
                message: format!("q {:?} for {u} ranks holding {lens:?} tokens", q.size()),
            });
        }
        let mut offs = Vec::with_capacity(u);
        let mut total = 0;
        for l in &lens {
            offs.push(total);
            total += l;
        }
        // One allocation: its k and v halves are the K/V block Ring passes on.
        let all = Tensor::f_empty([3, b, total, hu, d], (q.kind(), q.device()))?;
        let recv = [all.f_get(0)?, all.f_get(1)?, all.f_get(2)?];
        let kv = all.f_narrow(0, 1, 2)?;
        Ok(Self {
            op,
            comm: op.ulysses,
            qkv: [q.shallow_clone(), k.shallow_clone(), v.shallow_clone()],
            peers,
            offs,
            me,
            overlap,
            recv,
            kv,
            sent: Vec::new(),
            inbound: Vec::new(),
            out: None,
            outbound: Vec::new(),
        })
    }

    fn rows_of(&self, peer: usize, piece: Rows) -> (i64, i64) {
        let (t, i) = self.peers[peer];
        UspAttention::piece_rows(piece, t, i)
    }

    fn start(&self, ins: &[Tensor], outs: &[Tensor]) -> CommResult<Option<Pending<'a>>> {
        if self.overlap {
            Ok(Some(self.comm.start_all_to_all_into(ins, outs)?))
        } else {
            self.comm.all_to_all_into(ins, outs)?;
            Ok(None)
        }
    }

    /// `ranges` tile `0..rows` exactly.
    fn tiles(ranges: &[(i64, i64)], rows: i64) -> bool {
        let mut r: Vec<(i64, i64)> = ranges.iter().copied().filter(|x| x.1 > 0).collect();
        r.sort();
        let mut at = 0;
        for (s, l) in r {
            if s != at {
                return false;
            }
            at += l;
        }
        at == rows
    }

    fn usage(message: String) -> CommError {
        CommError::Usage {
            op: "ulysses session",
            message,
        }
    }

    pub(super) fn send_piece(&mut self, piece: Rows) -> CommResult<()> {
        if self.out.is_some() {
            return Err(Self::usage(format!("{piece:?} sent after the attention")));
        }
        let mine = self.rows_of(self.me, piece);
        let (mut ins, mut outs) = (Vec::new(), Vec::new());
        for j in 0..self.peers.len() {
            let (s, l) = self.rows_of(j, piece);
            for (src, dst) in self.qkv.iter().zip(&self.recv) {
                // My rows of the piece for peer j's heads; peer j's rows of it for mine.
                ins.push(src.f_get(j as i64)?.f_narrow(1, mine.0, mine.1)?);
                outs.push(dst.f_narrow(1, self.offs[j] + s, l)?);
            }
        }
        if let Some(p) = self.start(&ins, &outs)? {
            self.inbound.push(p);
        }
        self.sent.push(mine);
        Ok(())
    }

    pub(super) fn attend_all(&mut self) -> CommResult<()> {
        let rows = self.qkv[0].size()[2];
        if self.out.is_some() || !Self::tiles(&self.sent, rows) {
            return Err(Self::usage(format!(
                "attention over pieces {:?} of {rows} rows",
                self.sent
            )));
        }
        for p in self.inbound.drain(..) {
            p.wait()?;
        }
        let [qr, kr, vr] = &self.recv;
        let out = if self.op.ring.size() > 1 {
            // USP: Ring across the ulysses groups, the K/V block being k and v as received.
            self.op
                .ring_attend(&qr.f_transpose(1, 2)?, &self.kv, 0, KvLayout::Bshd)?
        } else {
            sdpa(
                &qr.f_transpose(1, 2)?,
                &kr.f_transpose(1, 2)?,
                &vr.f_transpose(1, 2)?,
                None,
                false,
                None,
            )?
        } // (1, H/u, L', d)
        .f_transpose(1, 2)?
        .f_contiguous()?; // (1, L', H/u, d): no copy where cuDNN wrote it in that layout
        let back = self.qkv[0].f_empty_like()?; // (u, 1, rows, H/u, d)
        self.out = Some((out, back));
        Ok(())
    }

    pub(super) fn give_back_piece(&mut self, piece: Rows) -> CommResult<()> {
        let Some((out, back)) = &self.out else {
            return Err(Self::usage(format!("{piece:?} given back before the attention")));
        };
        let mine = self.rows_of(self.me, piece);
        let (mut ins, mut outs) = (Vec::new(), Vec::new());
        for j in 0..self.peers.len() {
            let (s, l) = self.rows_of(j, piece);
            ins.push(out.f_narrow(1, self.offs[j] + s, l)?); // peer j's rows of it, my heads
            outs.push(back.f_get(j as i64)?.f_narrow(1, mine.0, mine.1)?); // mine, peer j's heads
        }
        let p = self.start(&ins, &outs)?;
        self.outbound.push((mine, p));
        Ok(())
    }

    pub(super) fn take_piece(&mut self, piece: Rows) -> CommResult<Tensor> {
        let Some((_, back)) = &self.out else {
            return Err(Self::usage(format!("{piece:?} taken before the attention")));
        };
        let back = back.shallow_clone();
        let (s, l) = self.rows_of(self.me, piece);
        // Every piece given back that holds some of these rows, waited for.
        let mut covered = Vec::new();
        for (r, p) in self.outbound.iter_mut() {
            if r.0 < s + l && s < r.0 + r.1 {
                covered.push(*r);
                if let Some(p) = p.take() {
                    p.wait()?;
                }
            }
        }
        // The pieces given back must cover these rows (a piece may hold more of them).
        covered.sort();
        let mut at = s;
        for (a, n) in &covered {
            if *a <= at {
                at = at.max(a + n);
            }
        }
        if l > 0 && at < s + l {
            let given: Vec<(i64, i64)> = self.outbound.iter().map(|(r, _)| *r).collect();
            return Err(Self::usage(format!(
                "rows {s}+{l} taken, pieces {given:?} given back"
            )));
        }
        Ok(groups_to_tokens(&back.f_narrow(2, s, l)?)?) // (1, len, H, d)
    }
}

/// Head groups `(g, b, len, H/g, d)` re-laid as tokens `(b, len, H, d)`: one copy. Where the
/// layout allows (every stride and the offset a multiple of 16 bytes, rows of a multiple of 16
/// bytes: bf16 with `d = 128` is 16 such elements), the copy moves 16-byte elements instead of
/// 2-byte ones: the elementwise copy kernel's cost is per element, and at bf16 it moved the
/// ulysses=2 output at about a quarter of the memory bandwidth (1.28 ms/step on nvidia-h200,
/// `bench/parallel/results/h200x1-u2prof`, engine at b9a5d5e); the wide copy took 0.4 ms/step off
/// that share, with byte-identical latents (`h200x1-relayout1`, engine at 9c7782a). The bytes are
/// the same either way.
/// `DITFLEET_RELAYOUT=elementwise` copies element by element, for A/B runs.
pub fn groups_to_tokens(x: &Tensor) -> Res<Tensor> {
    let (g, b, len, hu, d) = x.size5()?;
    let permuted =
        |t: &Tensor, d: i64| -> Res<Tensor> { t.f_permute([1, 2, 0, 3, 4])?.f_reshape([b, len, g * hu, d]) };
    match wide_elements(x) {
        Some(wide) if !relayout_elementwise() => {
            let v = x.f_view_dtype(Kind::ComplexDouble)?; // (g, b, len, H/g, d / wide), 16-byte elements
            permuted(&v, d / wide)?.f_view_dtype(x.kind())
        }
        _ => permuted(x, d),
    }
}

/// How many of `x`'s elements make one 16-byte element, where every stride, the last dimension
/// and the data pointer allow viewing `x` that way.
fn wide_elements(x: &Tensor) -> Option<i64> {
    let es = x.kind().elt_size_in_bytes() as i64;
    let wide = 16 / es.max(1);
    let d = *x.size().last()?;
    let strides = x.stride();
    let (last, outer) = strides.split_last()?;
    (es < 16
        && 16 % es == 0
        && *last == 1
        && d % wide == 0
        && outer.iter().all(|s| s % wide == 0)
        && crate::aten::aligned16(x))
    .then_some(wide)
}

fn relayout_elementwise() -> bool {
    crate::settings::bench().relayout_elementwise
}

impl GroupedSession for UlyssesSession<'_> {
    fn local_rows(&self, piece: Rows) -> (i64, i64) {
        self.rows_of(self.me, piece)
    }

    fn send(&mut self, piece: Rows) -> Res<()> {
        Ok(self.send_piece(piece)?)
    }

    fn attend(&mut self) -> Res<()> {
        Ok(self.attend_all()?)
    }

    fn give_back(&mut self, piece: Rows) -> Res<()> {
        Ok(self.give_back_piece(piece)?)
    }

    fn take(&mut self, piece: Rows) -> Res<Tensor> {
        Ok(self.take_piece(piece)?)
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    #[test]
    fn head_groups_return_as_tokens_in_16_byte_elements_with_the_same_bytes() {
        // (g, b, rows, H/g, d) -> (b, rows, H, d), as the elementwise permute gives it, for the
        // whole buffer and a row range of it; bf16 d = 128 and fp32 d = 4 take 16-byte elements,
        // bf16 d = 6 (12-byte rows) cannot and copies element by element.
        for (kind, d, wide) in [
            (Kind::BFloat16, 128, Some(8)),
            (Kind::Float, 4, Some(4)),
            (Kind::BFloat16, 6, None),
        ] {
            let x = Tensor::randn([3, 1, 10, 2, d], (Kind::Float, Device::Cpu)).to_kind(kind);
            assert_eq!(wide_elements(&x), wide, "{kind:?} d={d}");
            for (s, l) in [(0, 10), (4, 5)] {
                let part = x.narrow(2, s, l);
                let want = part.permute([1, 2, 0, 3, 4]).reshape([1, l, 6, d]);
                let got = groups_to_tokens(&part).unwrap();
                assert_eq!(got.size(), [1, l, 6, d]);
                assert_eq!(got.kind(), kind);
                assert!(got.equal(&want), "{kind:?} d={d} rows {s}+{l}");
            }
        }
    }
}
