//! Spatial (patch) parallelism of convolutional models: the image is split into horizontal bands
//! of rows, one per rank of a group, and [`Bands`] implements [`SpatialOps`] on one rank's band
//! so that the model (a VAE decoder, a UNet) computes exactly the rows of the single-device
//! forward. Each operation exchanges only what the exact result needs:
//!
//! - 3x3 convolution, stride 1: the row just above and just below the band from the neighbouring
//!   bands (a 1-row halo; zero padding at the image border, as in the unsplit convolution). The
//!   band is convolved with its own zero padding and only its first and last output rows are
//!   recomputed from 3-row strips, so no padded copy of the band is made.
//! - 3x3 convolution, stride 2 (a UNet's downsamplers): output row `j` is centred on input row
//!   `2j` and belongs to the band holding that row. A band that starts at an even row computes
//!   its outputs from its own rows plus the row above it (a top halo only), and its output band
//!   starts at half its start. Every non-empty band must start at an even row at every
//!   downsampler: [`aligned_split`] picks starts that are multiples of `2^downsamplers`, so they
//!   stay even through all levels; the last band takes the remainder, odd sizes included.
//! - GroupNorm: the statistics of the whole image: per-group sums, then sums of squared
//!   deviations from the global mean, each accumulated in fp64 and all-reduced (two tiny
//!   all-reduces per norm), then applied with the layer's eps and affine in fp32.
//! - self-attention over the image tokens: each rank projects its own pixels, the keys and values
//!   of all pixels are all-gathered and each rank attends for its own queries, so every query
//!   sees every token in the single-device order.
//! - nearest upsampling: row-local. 2x doubles the band; a UNet's up path returns to the band
//!   table of the finer level it came down from (the last band is one row short of 2x where that
//!   level has an odd number of rows).
//!
//! 1x1 convolutions and everything outside [`SpatialOps`] are local to a pixel. A band may be
//! empty (fewer rows than ranks): it still takes part in the collectives.

use std::cell::RefCell;

use tch::{Kind, TchError, Tensor};

use super::comm::Communicator;
use crate::EngineError;
use crate::nn::spatial::SpatialOps;
use crate::nn::{Conv2d, GroupNorm, Res, sdpa};

/// Elements one chunk of the GroupNorm passes converts to fp32 at a time (64 MiB): bounds the
/// temporary memory of a bf16 forward to a fraction of one activation.
pub const NORM_CHUNK_ELEMS: i64 = 1 << 24;

/// Attention scores (queries x keys, over batch and heads) computed at a time: the queries are
/// processed in chunks so that a math-kernel fallback never materialises more than this many.
const ATTN_CHUNK_SCORES: i64 = 1 << 28;

/// Splits `n` rows into `parts` contiguous bands (`(start, len)` in rank order) whose starts are
/// multiples of `align` and whose lengths are as even as that allows; the last band takes the
/// remainder. With `align = 2^downsamplers` every band still starts at an even row at each
/// downsampler of a UNet. No band is empty unless there are fewer than `parts` blocks of `align`
/// rows (the last one partial).
pub fn aligned_split(n: i64, parts: usize, align: i64) -> Vec<(i64, i64)> {
    let (p, a) = (parts.max(1) as i64, align.max(1));
    // The last aligned start that still leaves the last band a row.
    let last_start = (n - 1).max(0) / a * a;
    let mut bounds = vec![0];
    for i in 1..p {
        let prev = *bounds.last().unwrap_or(&0);
        // round(n i / p / a) * a, in integers
        let ideal = ((2 * n * i + p * a) / (2 * p * a)) * a;
        // Keep the previous band and each later one non-empty; with fewer blocks than ranks
        // (then from the first boundary on) one block per band, the last bands empty.
        let (lo, hi) = (prev + a, last_start - (p - 1 - i) * a);
        let b = if lo <= hi { ideal.clamp(lo, hi) } else { lo.min(n) };
        bounds.push(b);
    }
    bounds.push(n);
    bounds.windows(2).map(|w| (w[0], w[1] - w[0])).collect()
}

/// The bands of one resolution level.
#[derive(Debug, Clone, PartialEq)]
struct Level {
    /// `(start, len)` of every rank, contiguous from row 0 in rank order.
    rows: Vec<(i64, i64)>,
    width: i64,
}

impl Level {
    fn total(&self) -> i64 {
        self.rows.iter().map(|r| r.1).sum()
    }

    /// The level a 3x3 stride-2 convolution (padding 1) produces: output row `j` is centred on
    /// input row `2j`, so band `[s, e)` holds outputs `[ceil(s/2), ceil(e/2))`.
    fn halved(&self) -> Self {
        let half = |r: i64| (r + 1) / 2;
        Self {
            rows: self
                .rows
                .iter()
                .map(|&(s, n)| (half(s), half(s + n) - half(s)))
                .collect(),
            width: half(self.width),
        }
    }

    fn doubled(&self, width: i64) -> Self {
        Self {
            rows: self.rows.iter().map(|&(s, n)| (2 * s, 2 * n)).collect(),
            width,
        }
    }

    /// The nearest ranks above / below `me` with a non-empty band (`None` at the image border).
    fn neighbours(&self, me: usize) -> (Option<usize>, Option<usize>) {
        let non_empty = |j: &usize| self.rows[*j].1 > 0;
        (
            (0..me).rev().find(non_empty),
            (me + 1..self.rows.len()).find(non_empty),
        )
    }
}

fn usage(message: String) -> TchError {
    TchError::Torch(format!("patch parallel: {message}"))
}

/// The [`SpatialOps`] of one rank's band of rows. It follows the band table through the model's
/// resolution levels (stride-2 convolutions halve it, upsampling doubles it or returns to the
/// finer level), so one `Bands` serves one forward: build a new one per forward. Every rank of
/// `comm` must run the same model on its band (SPMD).
pub struct Bands<'a> {
    comm: &'a dyn Communicator,
    level: RefCell<Level>,
    /// The levels the stride-2 convolutions left, the latest last.
    finer: RefCell<Vec<Level>>,
    norm_chunk: i64,
}

impl<'a> Bands<'a> {
    /// `rows[j]` = `(start, len)` of rank `j`'s band of the model input (contiguous from row 0
    /// in rank order; a band may be empty), `width` the input's width.
    pub fn new(comm: &'a dyn Communicator, rows: &[(i64, i64)], width: i64) -> Result<Self, EngineError> {
        let bad = |m: String| Err(EngineError::Torch(format!("patch parallel: {m}")));
        if rows.len() != comm.size() {
            return bad(format!("{} row bands for {} ranks", rows.len(), comm.size()));
        }
        let mut next = 0;
        for &(start, len) in rows {
            if start != next || len < 0 {
                return bad(format!("row bands {rows:?} are not contiguous from row 0"));
            }
            next = start + len;
        }
        if next == 0 || width < 1 {
            return bad(format!("the image has {next} rows and {width} columns"));
        }
        Ok(Self {
            comm,
            level: RefCell::new(Level {
                rows: rows.to_vec(),
                width,
            }),
            finer: RefCell::new(Vec::new()),
            norm_chunk: NORM_CHUNK_ELEMS,
        })
    }

    /// GroupNorm converts at most `elems` elements to fp32 at a time.
    pub fn with_norm_chunk(mut self, elems: i64) -> Self {
        self.norm_chunk = elems.max(1);
        self
    }

    /// The band table of the current resolution level.
    pub fn rows(&self) -> Vec<(i64, i64)> {
        self.level.borrow().rows.clone()
    }

    fn me(&self) -> usize {
        self.comm.rank()
    }

    /// `x`'s size, checked against this rank's band at the current level.
    fn check(&self, x: &Tensor, op: &str) -> Res<(i64, i64, i64, i64)> {
        let (b, c, h, w) = x.size4()?;
        let level = self.level.borrow();
        let want = level.rows[self.me()].1;
        if h != want || w != level.width {
            return Err(usage(format!(
                "{op} on rank {} got {h}x{w}, its band at this level is {want}x{}",
                self.me(),
                level.width
            )));
        }
        Ok((b, c, h, w))
    }

    /// The rows just outside this band `(b, c, 1, w)`: `(above, below)`, `None` at the image
    /// border (and `below` when `with_below` is false). One shift along the chain of non-empty
    /// bands per direction: every band sends its last row down and (`with_below`) its first row
    /// up; an empty band takes no part.
    fn halos(&self, x: &Tensor, with_below: bool) -> Res<(Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, w) = x.size4()?;
        if h == 0 {
            return Ok((None, None));
        }
        let (above, below) = self.level.borrow().neighbours(self.me());
        let (dev, kind) = (self.comm.device(), x.kind());
        let shape = [b, c, 1, w];
        let edge = |i: i64| -> Res<Tensor> { x.f_narrow(2, i, 1)?.f_contiguous()?.f_to_device(dev) };
        let shift = |send: Tensor, to: Option<usize>, from: Option<usize>| -> Res<Option<Tensor>> {
            Ok(match (to, from) {
                (Some(t), Some(f)) => Some(self.comm.send_recv(&send, t, &shape, kind, f)?),
                (None, Some(f)) => Some(self.comm.recv(&shape, kind, f)?),
                (Some(t), None) => {
                    self.comm.send(&send, t)?;
                    None
                }
                (None, None) => None,
            })
        };
        let back = |t: Option<Tensor>| t.map(|t| t.f_to_device(x.device())).transpose();
        // Down: the band above's last row becomes our top halo. Up: the band below's first row.
        let top = back(shift(edge(h - 1)?, below, above)?)?;
        let bottom = if with_below {
            back(shift(edge(0)?, above, below)?)?
        } else {
            None
        };
        Ok((top, bottom))
    }

    /// A 3x3 convolution with padding 1 and stride 1 or 2 of this band. The band convolved with
    /// its own zero padding is right except in its first output row when a band is above and,
    /// at stride 1, its last when one is below; those are recomputed from 3-row strips.
    fn conv3x3(&self, conv: &Conv2d, x: &Tensor) -> Res<Tensor> {
        let (b, c, h, w) = x.size4()?;
        let s = conv.stride;
        if s == 2 {
            let level = self.level.borrow();
            if let Some(&(start, _)) = level.rows.iter().find(|r| r.1 > 0 && r.0 % 2 != 0) {
                return Err(usage(format!(
                    "a stride-2 convolution needs every band to start at an even row; bands \
                     {:?} start one at row {start} (split with aligned_split)",
                    level.rows
                )));
            }
        }
        // At stride 2 the last output row of a band is centred on its last or second-to-last
        // row: nothing below it is read (the start check above keeps odd bands last).
        let (top, bottom) = self.halos(x, s == 1)?;
        if h == 0 {
            let cout = conv.weight.size()[0];
            return Tensor::f_zeros([b, cout, 0, (w - 1) / s + 1], (x.kind(), x.device()));
        }
        let out = conv.forward(x)?; // (b, cout, ceil(h / s), ceil(w / s))
        if top.is_none() && bottom.is_none() {
            return Ok(out);
        }
        let zero = Tensor::f_zeros([b, c, 1, w], (x.kind(), x.device()))?;
        // Row `i` of the band extended by the halos (zeros at the image border).
        let row = |i: i64| -> Res<Tensor> {
            Ok(if i < 0 {
                top.as_ref().unwrap_or(&zero).shallow_clone()
            } else if i >= h {
                bottom.as_ref().unwrap_or(&zero).shallow_clone()
            } else {
                x.f_narrow(2, i, 1)?
            })
        };
        // Output row `o`, centred on input row `s o`: (b, cout, 1, w / s).
        let out_row = |o: i64| -> Res<Tensor> {
            let i = s * o;
            let strip = Tensor::f_cat(&[row(i - 1)?, row(i)?, row(i + 1)?], 2)?; // (b, c, 3, w)
            strip.f_conv2d(&conv.weight, Some(&conv.bias), [s, s], [0, 1], [1, 1], 1)
        };
        if top.is_some() {
            out.f_narrow(2, 0, 1)?.f_copy_(&out_row(0)?)?;
        }
        if bottom.is_some() {
            let last = out.size()[2] - 1;
            out.f_narrow(2, last, 1)?.f_copy_(&out_row(last)?)?;
        }
        Ok(out)
    }

    /// All-reduces a small fp64 statistics tensor over the ranks.
    fn reduce(&self, t: &Tensor) -> Res<Tensor> {
        let sum = self.comm.all_reduce_sum(&t.f_to_device(self.comm.device())?)?;
        sum.f_to_device(t.device())
    }

    /// `(start, len)` row chunks of a `(b, c, h, w)` band of at most `norm_chunk` elements each
    /// (at least one row).
    fn row_chunks(&self, x: &Tensor) -> Res<Vec<(i64, i64)>> {
        let (b, c, h, w) = x.size4()?;
        let per = (self.norm_chunk / (b * c * w).max(1)).max(1);
        Ok((0..h)
            .step_by(per as usize)
            .map(|s| (s, per.min(h - s)))
            .collect())
    }
}

impl SpatialOps for Bands<'_> {
    fn conv(&self, conv: &Conv2d, x: &Tensor) -> Res<Tensor> {
        let (b, _, h, w) = self.check(x, "convolution")?;
        let k = conv.weight.size();
        match (k[2], k[3], conv.padding, conv.stride) {
            (1, 1, 0, 1) if h == 0 => Tensor::f_zeros([b, k[0], 0, w], (x.kind(), x.device())),
            (1, 1, 0, 1) => conv.forward(x),
            (3, 3, 1, 1) => self.conv3x3(conv, x),
            (3, 3, 1, 2) => {
                let out = self.conv3x3(conv, x)?;
                let coarser = self.level.borrow().halved();
                let finer = self.level.replace(coarser);
                self.finer.borrow_mut().push(finer);
                Ok(out)
            }
            (kh, kw, p, s) => Err(usage(format!(
                "a {kh}x{kw} convolution with padding {p} and stride {s} is not supported"
            ))),
        }
    }

    fn group_norm(&self, norm: &GroupNorm, x: &Tensor) -> Res<Tensor> {
        let (b, c, _, w) = self.check(x, "GroupNorm")?;
        let g = norm.groups;
        let cpg = c / g;
        let count = (cpg * self.level.borrow().total() * w) as f64;
        let chunks = self.row_chunks(x)?;
        // This band's rows [s, s + n) as fp32 `(b, g, cpg * n * w)`.
        let chunk = |s: i64, n: i64| -> Res<Tensor> {
            x.f_narrow(2, s, n)?.f_to_kind(Kind::Float)?.f_reshape([b, g, -1])
        };
        let dims: &[i64] = &[2];
        // Pass 1: global mean per (batch, group).
        let mut sum = Tensor::f_zeros([b, g], (Kind::Double, x.device()))?;
        for &(s, n) in &chunks {
            sum = sum.f_add(&chunk(s, n)?.f_sum_dim_intlist(dims, false, Kind::Double)?)?;
        }
        let mean = self.reduce(&sum)?.f_div_scalar(count)?; // (b, g) f64
        // Pass 2: global variance (biased, as GroupNorm) from squared deviations.
        let mean_f = mean.f_to_kind(Kind::Float)?.f_unsqueeze(2)?; // (b, g, 1)
        let mut sq = Tensor::f_zeros([b, g], (Kind::Double, x.device()))?;
        for &(s, n) in &chunks {
            let d = chunk(s, n)?.f_sub(&mean_f)?;
            sq = sq.f_add(&d.f_mul(&d)?.f_sum_dim_intlist(dims, false, Kind::Double)?)?;
        }
        let var = self.reduce(&sq)?.f_div_scalar(count)?;
        let rstd = var.f_add_scalar(norm.eps)?.f_rsqrt()?; // (b, g)
        // y = x * a + s per channel: a = rstd * weight, s = bias - mean * a.
        let per_channel = |t: &Tensor| t.f_repeat_interleave_self_int(cpg, 1, None); // (b, c)
        let weight = norm.weight.f_to_kind(Kind::Double)?;
        let a = per_channel(&rstd)?.f_mul(&weight)?;
        let shift = norm
            .bias
            .f_to_kind(Kind::Double)?
            .f_sub(&per_channel(&mean)?.f_mul(&a)?)?;
        let a = a.f_to_kind(Kind::Float)?.f_view([b, c, 1, 1])?;
        let shift = shift.f_to_kind(Kind::Float)?.f_view([b, c, 1, 1])?;
        let out = x.f_empty_like()?;
        for &(s, n) in &chunks {
            let y = x
                .f_narrow(2, s, n)?
                .f_to_kind(Kind::Float)?
                .f_mul(&a)?
                .f_add(&shift)?;
            out.f_narrow(2, s, n)?.f_copy_(&y)?;
        }
        Ok(out)
    }

    fn attention(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        let (b, heads, n, d) = k.size4()?;
        let tokens: Vec<i64> = {
            let level = self.level.borrow();
            level.rows.iter().map(|r| r.1 * level.width).collect()
        };
        if tokens[self.me()] != n || q.size()[2] != n {
            return Err(usage(format!(
                "attention on rank {} got {n} tokens, its band holds {}",
                self.me(),
                tokens[self.me()]
            )));
        }
        let max = tokens.iter().copied().max().unwrap_or(0);
        // K and V of this band, padded to the longest band: (2, b, heads, max, d).
        let kv = Tensor::f_stack(&[k, v], 0)?;
        let kv = if n < max {
            let pad = Tensor::f_zeros([2, b, heads, max - n, d], (kv.kind(), kv.device()))?;
            Tensor::f_cat(&[kv, pad], 3)?
        } else {
            kv
        };
        let parts = self.comm.all_gather(&kv.f_to_device(self.comm.device())?)?;
        let trimmed = parts
            .iter()
            .zip(&tokens)
            .map(|(p, &len)| p.f_narrow(3, 0, len))
            .collect::<Res<Vec<_>>>()?;
        let all = Tensor::f_cat(&trimmed, 3)?.f_to_device(q.device())?; // (2, b, heads, N, d)
        drop((parts, trimmed));
        let (k_all, v_all) = (all.f_select(0, 0)?, all.f_select(0, 1)?);
        if n == 0 {
            return q.f_zeros_like();
        }
        let total: i64 = tokens.iter().sum();
        let per = (ATTN_CHUNK_SCORES / (b * heads * total).max(1)).max(1);
        let outs = (0..n)
            .step_by(per as usize)
            .map(|s| {
                let q = q.f_narrow(2, s, per.min(n - s))?;
                sdpa(&q, &k_all, &v_all, None, false, None)
            })
            .collect::<Res<Vec<_>>>()?;
        Tensor::f_cat(&outs, 2)
    }

    fn upsample_nearest(&self, x: &Tensor, size: [i64; 2]) -> Res<Tensor> {
        let (b, c, h, _) = self.check(x, "upsampling")?;
        let me = self.me();
        let current = self.level.borrow().clone();
        // Back up to the level a downsampler came from (a UNet's up path), else a new 2x level
        // (a VAE decoder).
        let back_up = matches!(self.finer.borrow().last(), Some(f) if f.halved() == current);
        let target = match self.finer.borrow().last() {
            Some(f) if back_up => f.clone(),
            _ => current.doubled(size[1]),
        };
        if size != [target.rows[me].1, target.width] {
            return Err(usage(format!(
                "upsampling on rank {me} to {size:?}; its band at the finer level is {}x{}",
                target.rows[me].1, target.width
            )));
        }
        if back_up {
            self.finer.borrow_mut().pop();
        }
        self.level.replace(target);
        if h == 0 {
            return Tensor::f_zeros([b, c, 0, size[1]], (x.kind(), x.device()));
        }
        // Output row i reads input row floor(i / 2) whether the finer level has 2 H or 2 H - 1
        // rows (nearest at scale H / (2H - 1) rounds to the same row), so a band doubles its
        // own rows; only the last band can be one row short.
        let up = x.f_upsample_nearest2d([2 * h, size[1]], None, None)?; // (b, c, 2h, size[1])
        if size[0] == 2 * h {
            Ok(up)
        } else {
            up.f_narrow(2, 0, size[0])
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tch::Device;

    use super::*;
    use crate::nn::spatial::SingleDevice;
    use crate::parallel::threads::ThreadComm;

    /// Deterministic data of `shape` (no RNG: other tests draw seeded noise from the global one).
    fn wave(shape: &[i64], f: f64) -> Tensor {
        let n: i64 = shape.iter().product();
        (Tensor::arange(n, (Kind::Float, Device::Cpu)) * f + f)
            .sin()
            .view(shape)
    }

    fn conv(cin: i64, cout: i64, k: i64, stride: i64, f: f64) -> Conv2d {
        Conv2d {
            weight: wave(&[cout, cin, k, k], f) * 0.5,
            bias: wave(&[cout], f + 0.1),
            padding: k / 2,
            stride,
        }
    }

    fn rel_l2(got: &Tensor, want: &Tensor) -> f64 {
        assert_eq!(got.size(), want.size());
        let (got, want) = (got.to_kind(Kind::Double), want.to_kind(Kind::Double));
        (&got - &want).norm().double_value(&[]) / want.norm().double_value(&[])
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.size(), b.size());
        f64::try_from(a.f_sub(b).unwrap().abs().max()).unwrap()
    }

    /// Runs `f(rank, comm, inputs[rank])` on one thread per rank of a threads group.
    fn on_ranks<I: Send, T: Send>(inputs: Vec<I>, f: impl Fn(usize, &ThreadComm, I) -> T + Sync) -> Vec<T> {
        let comms = ThreadComm::group(inputs.len(), Device::Cpu, Duration::from_secs(60));
        std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .iter()
                .zip(inputs)
                .enumerate()
                .map(|(r, (c, input))| {
                    let f = &f;
                    s.spawn(move || f(r, c, input))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn aligned_split_starts_every_band_at_a_multiple_of_the_alignment() {
        assert_eq!(aligned_split(128, 3, 4), vec![(0, 44), (44, 40), (84, 44)]);
        assert_eq!(aligned_split(128, 2, 4), vec![(0, 64), (64, 64)]);
        // The remainder of an odd height goes to the last band; fewer blocks than ranks leave a
        // band empty.
        assert_eq!(aligned_split(13, 3, 4), vec![(0, 4), (4, 4), (8, 5)]);
        assert_eq!(aligned_split(13, 4, 4), vec![(0, 4), (4, 4), (8, 4), (12, 1)]);
        assert_eq!(aligned_split(6, 3, 4), vec![(0, 4), (4, 2), (6, 0)]);
        assert_eq!(aligned_split(10, 4, 1), vec![(0, 3), (3, 2), (5, 3), (8, 2)]);
        for n in 1..40 {
            for parts in 1..6 {
                let rows = aligned_split(n, parts, 4);
                assert_eq!(rows.len(), parts);
                let mut next = 0;
                for &(s, len) in &rows {
                    assert_eq!(s, next, "{n} over {parts}: {rows:?}");
                    assert!(len == 0 || s % 4 == 0, "{n} over {parts}: {rows:?}");
                    next = s + len;
                }
                assert_eq!(next, n);
                let longest = rows.iter().map(|r| r.1).max().unwrap();
                assert!(longest <= n / parts as i64 + 4 + 3, "{n} over {parts}: {rows:?}");
                let blocks = (n + 3) / 4;
                let empty = rows.iter().filter(|r| r.1 == 0).count() as i64;
                assert_eq!(
                    empty,
                    (parts as i64 - blocks).max(0),
                    "{n} over {parts}: {rows:?}"
                );
            }
        }
    }

    #[test]
    fn group_norm_uses_global_statistics_in_row_chunks() {
        let _g = tch::no_grad_guard();
        let x = wave(&[1, 8, 10, 6], 0.7) * 3.0 + 1.5;
        let norm = || GroupNorm {
            weight: wave(&[8], 0.3) + 1.0,
            bias: wave(&[8], 0.9),
            groups: 4,
            eps: 1e-6,
        };
        let want = norm().forward(&x).unwrap();
        let rows = vec![(0, 1), (1, 6), (7, 3)];
        let inputs = rows.iter().map(|&(s, n)| x.narrow(2, s, n).copy()).collect();
        // 48 elements = one row of (1, 8, _, 6) per chunk: the multi-chunk path.
        let bands = on_ranks(inputs, |_, c, band: Tensor| {
            let ops = Bands::new(c, &rows, 6).unwrap().with_norm_chunk(48);
            ops.group_norm(&norm(), &band).unwrap()
        });
        let d = max_diff(&Tensor::cat(&bands, 2), &want);
        assert!(d <= 1e-5, "max abs diff {d:e}");
    }

    #[test]
    fn bad_row_bands_are_refused() {
        on_ranks(vec![(); 2], |_, c, ()| {
            assert!(Bands::new(c, &[(0, 3), (4, 3)], 4).is_err(), "gap");
            assert!(Bands::new(c, &[(0, 3)], 4).is_err(), "one band for two ranks");
            assert!(Bands::new(c, &[(0, 0), (0, 0)], 4).is_err(), "no rows");
            let ops = Bands::new(c, &[(0, 2), (2, 4)], 4).unwrap();
            let x = Tensor::zeros([1, 3, 3, 4], (Kind::Float, Device::Cpu));
            assert!(ops.conv(&conv(3, 3, 3, 1, 0.1), &x).is_err(), "band height");
        });
    }

    /// Two downsampling levels and back, as a UNet does: stride-1 and stride-2 3x3 convolutions,
    /// a 1x1 convolution, GroupNorm, 2-head attention over the coarsest tokens, upsampling to the
    /// skip connections' sizes. Returns the coarsest level and the output.
    fn unet_like(ops: &dyn SpatialOps, x: &Tensor) -> (Tensor, Tensor) {
        let a = ops.conv(&conv(3, 4, 3, 1, 0.11), x).unwrap(); // (1, 4, H, W)
        let d1 = ops.conv(&conv(4, 4, 3, 2, 0.23), &a).unwrap(); // ceil(H/2)
        let b = ops.conv(&conv(4, 4, 3, 1, 0.31), &d1).unwrap();
        let d2 = ops.conv(&conv(4, 4, 3, 2, 0.47), &b).unwrap(); // ceil(H/4)
        let norm = GroupNorm {
            weight: wave(&[4], 0.5) + 1.0,
            bias: wave(&[4], 0.6),
            groups: 2,
            eps: 1e-5,
        };
        let n = ops.group_norm(&norm, &d2).unwrap();
        let (_, c, h, w) = n.size4().unwrap();
        let t = n
            .reshape([1, c, h * w])
            .transpose(1, 2)
            .reshape([1, h * w, 2, 2])
            .transpose(1, 2); // (1, 2, hw, 2)
        let att = ops.attention(&t, &(&t * 0.5), &t.sin()).unwrap();
        let low = att
            .transpose(1, 2)
            .reshape([1, h * w, c])
            .transpose(1, 2)
            .reshape([1, c, h, w])
            + &d2;
        let low = ops.conv(&conv(4, 4, 1, 1, 0.53), &low).unwrap();
        let (bh, bw) = (b.size()[2], b.size()[3]);
        let u1 = ops.upsample_nearest(&low, [bh, bw]).unwrap();
        let c1 = ops
            .conv(&conv(8, 4, 3, 1, 0.61), &Tensor::cat(&[u1, b], 1))
            .unwrap();
        let (ah, aw) = (a.size()[2], a.size()[3]);
        let u0 = ops.upsample_nearest(&c1, [ah, aw]).unwrap();
        let out = ops
            .conv(&conv(8, 2, 3, 1, 0.73), &Tensor::cat(&[u0, a], 1))
            .unwrap();
        (low, out)
    }

    #[test]
    fn strided_halo_convolutions_and_upsampling_are_exact_at_odd_sizes() {
        let _g = tch::no_grad_guard();
        for (h, w) in [(13, 7), (11, 5), (6, 3), (16, 4)] {
            let x = wave(&[1, 3, h, w], 0.29);
            let (want_low, want) = unet_like(&SingleDevice, &x);
            for n in [2usize, 3, 4] {
                let rows = aligned_split(h, n, 4);
                let inputs = rows.iter().map(|&(s, len)| x.narrow(2, s, len).copy()).collect();
                let out = on_ranks(inputs, |_, c, band: Tensor| {
                    let ops = Bands::new(c, &rows, w).unwrap();
                    let (low, out) = unet_like(&ops, &band);
                    assert_eq!(ops.rows(), rows, "back at the input's bands");
                    (low, out)
                });
                let low = Tensor::cat(&out.iter().map(|o| o.0.shallow_clone()).collect::<Vec<_>>(), 2);
                let got = Tensor::cat(&out.iter().map(|o| o.1.shallow_clone()).collect::<Vec<_>>(), 2);
                let (dl, d) = (rel_l2(&low, &want_low), rel_l2(&got, &want));
                assert!(dl <= 1e-6 && d <= 1e-6, "{h}x{w} bands {rows:?}: {dl:e} / {d:e}");
            }
        }
    }

    #[test]
    fn a_band_at_an_odd_row_is_refused_by_a_stride_2_convolution_on_every_rank() {
        let x = wave(&[1, 3, 7, 4], 0.4);
        let rows = vec![(0, 3), (3, 4)];
        let inputs = rows.iter().map(|&(s, len)| x.narrow(2, s, len).copy()).collect();
        let errs = on_ranks(inputs, |_, c, band: Tensor| {
            let ops = Bands::new(c, &rows, 4).unwrap();
            ops.conv(&conv(3, 3, 3, 2, 0.2), &band).unwrap_err().to_string()
        });
        for e in errs {
            assert!(e.contains("even row"), "{e}");
        }
    }
}
