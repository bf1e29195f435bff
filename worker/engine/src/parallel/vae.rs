//! Patch-parallel VAE decode: the latent is split into horizontal bands of rows, one per rank,
//! and every rank runs the whole decoder on its band, exchanging only what the exact result
//! needs:
//!
//! - every 3x3 convolution (stride 1, zero padding 1) gets the row just above and just below its
//!   band from the neighbouring ranks (a 1-row halo; zero padding at the image border, as in the
//!   unsplit convolution); the band is convolved with its own zero padding and only its first
//!   and last output rows are recomputed from 3-row strips, so no padded copy of the band is made;
//! - GroupNorm uses the statistics of the whole image: per-group sums, then sums of squared
//!   deviations from the global mean, each accumulated in fp64 and all-reduced (two tiny
//!   all-reduces per norm), then applied with the layer's eps and affine in fp32;
//! - the mid block's single-head self-attention: each rank projects its own pixels, the keys and
//!   values of all pixels are all-gathered (the mid block runs at the latent resolution, 1/64 of
//!   the pixels) and each rank attends for its own queries;
//! - nearest 2x upsampling is row-local: the band's rows double.
//!
//! The result on each rank is its band of image rows, equal to the same rows of the single
//! decode up to floating-point summation order.

use std::cell::Cell;

use tch::{Kind, TchError, Tensor};

use super::comm::Communicator;
use crate::EngineError;
use crate::flux::layers::{Conv2d, GroupNorm, Res, sdpa};
use crate::flux::vae::{Decoder, Spatial};

/// Elements one chunk of the GroupNorm passes converts to fp32 at a time (64 MiB): bounds the
/// temporary memory of a bf16 decode to a fraction of one activation.
const NORM_CHUNK_ELEMS: i64 = 1 << 24;

/// Attention scores (queries x keys) computed at a time: the queries are processed in chunks so
/// that a math-kernel fallback never materialises more than this many scores.
const ATTN_CHUNK_SCORES: i64 = 1 << 28;

/// Decodes this rank's band of the latent. `z` `(1, latent_ch, h_r, w)` are this rank's rows of
/// the scaled latent (as the transformer produces it; `z / scaling + shift` is applied here);
/// `rows[j]` = `(start, len)` of rank `j`'s band, contiguous from row 0 in rank order (a band may
/// be empty). Returns this rank's image rows `(1, 3, 8 h_r, 8 w)` in [-1, 1]. Every rank of
/// `comm` must call it (SPMD).
pub fn decode_patch_parallel(
    decoder: &Decoder,
    z: &Tensor,
    comm: &dyn Communicator,
    rows: &[(i64, i64)],
) -> Result<Tensor, EngineError> {
    let _guard = tch::no_grad_guard();
    let (_, _, h, w) = z.size4()?;
    let bands = Bands::new(comm, rows, h, w, NORM_CHUNK_ELEMS)?;
    Ok(decoder.forward_with(&decoder.unscale(z)?, &bands)?)
}

/// The [`Spatial`] operations of one rank's band.
pub(crate) struct Bands<'a> {
    comm: &'a dyn Communicator,
    /// Latent rows of every rank.
    rows: &'a [(i64, i64)],
    /// Latent width.
    width: i64,
    /// The nearest ranks above / below with a non-empty band (`None` at the image border).
    above: Option<usize>,
    below: Option<usize>,
    /// Pixels per latent pixel at the current stage of the decoder (doubled by each upsample).
    scale: Cell<i64>,
    norm_chunk: i64,
}

fn usage(message: String) -> EngineError {
    EngineError::Torch(format!("patch-parallel VAE decode: {message}"))
}

impl<'a> Bands<'a> {
    /// `h`, `w`: this rank's latent band size.
    pub(crate) fn new(
        comm: &'a dyn Communicator,
        rows: &'a [(i64, i64)],
        h: i64,
        w: i64,
        norm_chunk: i64,
    ) -> Result<Self, EngineError> {
        let me = comm.rank();
        if rows.len() != comm.size() {
            return Err(usage(format!(
                "{} row bands for {} ranks",
                rows.len(),
                comm.size()
            )));
        }
        let mut next = 0;
        for &(start, len) in rows {
            if start != next || len < 0 {
                return Err(usage(format!("row bands {rows:?} are not contiguous from row 0")));
            }
            next = start + len;
        }
        if next == 0 {
            return Err(usage("the latent has no rows".into()));
        }
        if rows[me].1 != h {
            return Err(usage(format!(
                "rank {me} holds {h} rows, its band is {:?}",
                rows[me]
            )));
        }
        let non_empty = |j: &usize| rows[*j].1 > 0;
        Ok(Self {
            comm,
            rows,
            width: w,
            above: (0..me).rev().find(non_empty),
            below: (me + 1..rows.len()).find(non_empty),
            scale: Cell::new(1),
            norm_chunk,
        })
    }

    fn total_rows(&self) -> i64 {
        self.rows.iter().map(|r| r.1).sum::<i64>() * self.scale.get()
    }

    /// The rows just outside this band `(b, c, 1, w)`: `(above, below)`, `None` at the image
    /// border. Two shifts along the chain of non-empty bands: every band sends its last row down
    /// and its first row up (an empty band takes no part).
    fn halos(&self, x: &Tensor) -> Res<(Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, w) = x.size4()?;
        if h == 0 {
            return Ok((None, None));
        }
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
        // Down: the band above's last row becomes our top halo. Up: the band below's first row.
        let top = shift(edge(h - 1)?, self.below, self.above)?;
        let bottom = shift(edge(0)?, self.above, self.below)?;
        let back = |t: Option<Tensor>| t.map(|t| t.f_to_device(x.device())).transpose();
        Ok((back(top)?, back(bottom)?))
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

impl Spatial for Bands<'_> {
    fn conv(&self, conv: &Conv2d, x: &Tensor) -> Res<Tensor> {
        let (b, c, h, w) = x.size4()?;
        if h == 0 {
            let cout = conv.weight.size()[0];
            return Tensor::f_zeros([b, cout, 0, w], (x.kind(), x.device()));
        }
        match conv.padding {
            0 => conv.forward(x),
            1 => {
                let (top, bottom) = self.halos(x)?;
                // Correct everywhere except the first / last row when a neighbour is there.
                let out = conv.forward(x)?; // (b, cout, h, w)
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
                // Output row `i` from input rows i-1, i, i+1: (b, cout, 1, w).
                let out_row = |i: i64| -> Res<Tensor> {
                    let strip = Tensor::f_cat(&[row(i - 1)?, row(i)?, row(i + 1)?], 2)?; // (b, c, 3, w)
                    strip.f_conv2d(&conv.weight, Some(&conv.bias), [1, 1], [0, 1], [1, 1], 1)
                };
                if top.is_some() {
                    out.f_narrow(2, 0, 1)?.f_copy_(&out_row(0)?)?;
                }
                if bottom.is_some() {
                    out.f_narrow(2, h - 1, 1)?.f_copy_(&out_row(h - 1)?)?;
                }
                Ok(out)
            }
            p => Err(TchError::Torch(format!(
                "patch-parallel VAE decode: convolution padding {p} is not supported"
            ))),
        }
    }

    fn group_norm(&self, norm: &GroupNorm, x: &Tensor) -> Res<Tensor> {
        let (b, c, _, w) = x.size4()?;
        let g = norm.groups;
        let cpg = c / g;
        let count = (cpg * self.total_rows() * w) as f64;
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

    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
        let (b, heads, n, c) = k.size4()?;
        let s = self.scale.get();
        let tokens: Vec<i64> = self.rows.iter().map(|r| r.1 * s * self.width * s).collect();
        if tokens[self.comm.rank()] != n {
            return Err(TchError::Torch(format!(
                "patch-parallel VAE attention: {n} local tokens, expected {}",
                tokens[self.comm.rank()]
            )));
        }
        let max = tokens.iter().copied().max().unwrap_or(0);
        // K and V of this band, padded to the longest band: (2, b, heads, max, c).
        let kv = Tensor::f_stack(&[k, v], 0)?;
        let kv = if n < max {
            let pad = Tensor::f_zeros([2, b, heads, max - n, c], (kv.kind(), kv.device()))?;
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
        let all = Tensor::f_cat(&trimmed, 3)?.f_to_device(q.device())?; // (2, b, heads, N, c)
        drop((parts, trimmed));
        let (k_all, v_all) = (all.f_select(0, 0)?, all.f_select(0, 1)?);
        let total: i64 = tokens.iter().sum();
        let per = (ATTN_CHUNK_SCORES / total.max(1)).max(1);
        let nq = q.size()[2];
        if nq == 0 {
            return q.f_zeros_like();
        }
        let outs = (0..nq)
            .step_by(per as usize)
            .map(|s| {
                sdpa(
                    &q.f_narrow(2, s, per.min(nq - s))?,
                    &k_all,
                    &v_all,
                    None,
                    false,
                    None,
                )
            })
            .collect::<Res<Vec<_>>>()?;
        Tensor::f_cat(&outs, 2)
    }

    fn upsample(&self, x: &Tensor) -> Res<Tensor> {
        self.scale.set(self.scale.get() * 2);
        let (b, c, h, w) = x.size4()?;
        if h == 0 {
            return Tensor::f_zeros([b, c, 0, 2 * w], (x.kind(), x.device()));
        }
        x.f_upsample_nearest2d([h * 2, w * 2], None, None)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tch::Device;

    use super::*;
    use crate::flux::vae::{Config, Whole};
    use crate::parallel::comm::balanced_split;
    use crate::parallel::threads::ThreadComm;

    fn bytes(t: &Tensor) -> i64 {
        (t.numel() * t.kind().elt_size_in_bytes()) as i64
    }

    /// Records the largest tensor any of the decoder's spatial operations takes or returns (the
    /// activations between them are the same size or smaller).
    struct Traced<'a> {
        inner: &'a dyn Spatial,
        peak: Cell<i64>,
    }

    impl Traced<'_> {
        fn see(&self, ts: &[&Tensor]) {
            for t in ts {
                self.peak.set(self.peak.get().max(bytes(t)));
            }
        }
    }

    impl Spatial for Traced<'_> {
        fn conv(&self, conv: &Conv2d, x: &Tensor) -> Res<Tensor> {
            let y = self.inner.conv(conv, x)?;
            self.see(&[x, &y]);
            Ok(y)
        }

        fn group_norm(&self, norm: &GroupNorm, x: &Tensor) -> Res<Tensor> {
            let y = self.inner.group_norm(norm, x)?;
            self.see(&[x, &y]);
            Ok(y)
        }

        fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Res<Tensor> {
            let y = self.inner.attend(q, k, v)?;
            self.see(&[q, k, v, &y]);
            Ok(y)
        }

        fn upsample(&self, x: &Tensor) -> Res<Tensor> {
            let y = self.inner.upsample(x)?;
            self.see(&[x, &y]);
            Ok(y)
        }
    }

    /// Runs `f(rank, comm, inputs[rank])` on one thread per rank of a threads group.
    fn on_ranks<I: Send, T: Send>(inputs: Vec<I>, f: impl Fn(usize, &ThreadComm, I) -> T + Sync) -> Vec<T> {
        let comms = ThreadComm::group(inputs.len(), Device::Cpu, Duration::from_secs(120));
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
    fn group_norm_uses_global_statistics_in_row_chunks() {
        let _g = tch::no_grad_guard();
        let (x, weight, bias) = {
            let _lock = crate::flux::rng_lock();
            tch::manual_seed(7);
            (
                Tensor::randn([1, 8, 10, 6], (Kind::Float, Device::Cpu))
                    .f_mul_scalar(3.0)
                    .unwrap()
                    + 1.5,
                Tensor::randn([8], (Kind::Float, Device::Cpu)),
                Tensor::randn([8], (Kind::Float, Device::Cpu)),
            )
        };
        let want = x
            .f_group_norm(4, Some(&weight), Some(&bias), 1e-6, false)
            .unwrap();
        let rows = vec![(0, 1), (1, 6), (7, 3)];
        // 48 elements = one row of (1, 8, _, 6) per chunk: the multi-chunk path.
        let inputs = rows
            .iter()
            .map(|&(s, n)| (x.f_narrow(2, s, n).unwrap().copy(), weight.copy(), bias.copy()))
            .collect();
        let bands = on_ranks(inputs, |r, c, (band, weight, bias)| {
            let norm = GroupNorm {
                weight,
                bias,
                groups: 4,
                eps: 1e-6,
            };
            let ops = Bands::new(c, &rows, rows[r].1, 6, 48).unwrap();
            ops.group_norm(&norm, &band).unwrap()
        });
        let got = Tensor::cat(&bands, 2);
        let d = f64::try_from(got.f_sub(&want).unwrap().abs().max()).unwrap();
        assert!(d <= 1e-5, "max abs diff {d:e}");
    }

    #[test]
    fn bad_row_bands_are_refused() {
        on_ranks(vec![3, 3], |_, c, h| {
            assert!(Bands::new(c, &[(0, 3), (4, 3)], h, 4, 1).is_err(), "gap");
            assert!(
                Bands::new(c, &[(0, 3)], h, 4, 1).is_err(),
                "one band for two ranks"
            );
            assert!(Bands::new(c, &[(0, 2), (2, 4)], h, 4, 1).is_err(), "band height");
        });
    }

    /// The largest activation each rank holds, patch-parallel vs one device (Flux's block
    /// structure at a quarter of its widths: the ratio is what the docs' estimate scales).
    #[test]
    fn patch_parallel_decode_divides_the_largest_activation() {
        let _g = tch::no_grad_guard();
        let cfg = Config {
            block_out_channels: vec![32, 64, 128, 128],
            ..Config::flux()
        };
        let (dec, z) = {
            let _lock = crate::flux::rng_lock();
            tch::manual_seed(3);
            let dec = Decoder::new(&cfg, Device::Cpu, Kind::Float).unwrap();
            (dec, Tensor::randn([1, 16, 8, 6], (Kind::Float, Device::Cpu)))
        };
        let whole = Traced {
            inner: &Whole,
            peak: Cell::new(0),
        };
        let want = dec.forward_with(&dec.unscale(&z).unwrap(), &whole).unwrap();
        let single = whole.peak.get();
        eprintln!(
            "VAE decode 64x48 px, widths {:?}: largest activation {} KiB on one device",
            cfg.block_out_channels,
            single / 1024
        );
        for n in [2usize, 4] {
            let rows = balanced_split(8, n);
            let inputs = rows
                .iter()
                .map(|&(s, len)| {
                    (
                        dec.replicate(Device::Cpu).unwrap(),
                        z.f_narrow(2, s, len).unwrap().copy(),
                    )
                })
                .collect();
            let out = on_ranks(inputs, |r, c, (d, band): (Decoder, Tensor)| {
                let ops = Bands::new(c, &rows, rows[r].1, 6, NORM_CHUNK_ELEMS).unwrap();
                let traced = Traced {
                    inner: &ops,
                    peak: Cell::new(0),
                };
                let img = d.forward_with(&d.unscale(&band).unwrap(), &traced).unwrap();
                (img, traced.peak.get())
            });
            let peaks: Vec<i64> = out.iter().map(|o| o.1).collect();
            let got = Tensor::cat(&out.iter().map(|o| o.0.shallow_clone()).collect::<Vec<_>>(), 2);
            let d = f64::try_from(got.f_sub(&want).unwrap().abs().max()).unwrap();
            assert!(d <= 1e-5, "{n} ranks: max abs diff {d:e}");
            let worst = *peaks.iter().max().unwrap();
            eprintln!(
                "  {n} ranks (rows {rows:?}): largest activation per rank {:?} KiB = {:.3} of one device",
                peaks.iter().map(|p| p / 1024).collect::<Vec<_>>(),
                worst as f64 / single as f64
            );
        }
    }
}
