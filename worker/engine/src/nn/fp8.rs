//! FP8 (e4m3fn) linear layers for Hopper's FP8 tensor cores: the weight is quantised once with one scale per output channel, the activation per row
//! (token) at run time, and one scaled GEMM (`_scaled_mm`, cuBLASLt) multiplies them with fp32
//! accumulation and bf16 output: `y[r, o] = sx[r] * sw[o] * Σ q(x)[r, k] q(w)[o, k] + b[o]`.
//!
//! The activation's FP8 copy and its scales come from one kernel pass
//! ([`crate::aten::quant_rows_e4m3`]): separate eager ops (amax, divide, cast) cost more than the
//! FP8 GEMM saves (docs/benchmarks-flux-1gpu.md). On the CPU, where there is no FP8 GEMM, the same
//! arithmetic is emulated: the quantised operands dequantised exactly to fp32 and multiplied in fp32.
//!
//! Scales: `s = max|row| / 448` (448 = the largest finite e4m3fn value), `1` for an all-zero row;
//! values are multiplied by `1 / s` in fp32, clamped to ±448 and rounded to nearest even, exactly
//! as the kernel does (the CPU reference and the kernel agree bit for bit).

use crate::aten::GeluPrefix;
use tch::{Device, Kind, Tensor};

use super::Res;

/// The largest finite e4m3fn value.
pub const E4M3_MAX: f64 = 448.0;

/// Per-row FP8 quantisation of `x` `(rows, n)`: `(q (rows, n) e4m3fn, scale (rows, 1) fp32)` with
/// `x[r] ≈ q[r] * scale[r]`. Through the fused kernel on CUDA where it applies, else the reference
/// ops ([`quantize_rows_reference`]).
pub fn quantize_rows(x: &Tensor) -> Res<(Tensor, Tensor)> {
    if rows_kernel_fits(x) {
        let (rows, n) = x.size2()?;
        let q = Tensor::f_empty([rows, n], (Kind::Float8e4m3fn, x.device()))?;
        let scale = Tensor::f_empty([rows, 1], (Kind::Float, x.device()))?;
        crate::aten::quant_rows_e4m3(x, &q, &scale)?;
        return Ok((q, scale));
    }
    quantize_rows_reference(x)
}

/// Whether the row-quantising kernels take `x`: bf16 `(rows, n)` on a CUDA device with the fused
/// kernels, contiguous last dim, `n % 8 == 0`, 16-byte aligned rows.
fn rows_kernel_fits(x: &Tensor) -> bool {
    let Device::Cuda(i) = x.device() else {
        return false;
    };
    let (size, stride) = (x.size(), x.stride());
    x.kind() == Kind::BFloat16
        && size.len() == 2
        && stride[1] == 1
        && size[1] % 8 == 0
        && stride[0] % 8 == 0
        && crate::aten::aligned16(x)
        && crate::aten::fused_kernels_available(i)
}

/// [`quantize_rows`] with ATen ops (any device, any float dtype): the kernel's arithmetic.
pub fn quantize_rows_reference(x: &Tensor) -> Res<(Tensor, Tensor)> {
    let xf = x.f_to_kind(Kind::Float)?;
    let amax = xf.f_abs()?.f_amax([1], true)?; // (rows, 1)
    // A true division (a tensor divisor): ATen's CUDA division by a scalar multiplies by its
    // reciprocal, which can differ from `amax / 448` in the last bit.
    let scale = amax
        .f_div(&amax.f_full_like(E4M3_MAX)?)?
        .f_masked_fill(&amax.f_eq(0.0)?, 1.0)?;
    let q = xf
        .f_mul(&scale.f_reciprocal()?)?
        .f_clamp(-E4M3_MAX, E4M3_MAX)?
        .f_to_kind(Kind::Float8e4m3fn)?;
    Ok((q, scale))
}

/// `q * scale` in fp32 (exact: an e4m3 value times an fp32 scale fits fp32's 24-bit mantissa).
pub fn dequantize(q: &Tensor, scale: &Tensor) -> Res<Tensor> {
    q.f_to_kind(Kind::Float)?.f_mul(scale)
}

/// An activation in FP8 with one scale per row (token), as a GEMM after it reads it: `q`
/// `(..., n)` e4m3fn and `scale` `(..., 1)` fp32 with the same leading dims, `x ≈ q * scale`.
#[derive(Debug)]
pub struct Fp8Act {
    pub q: Tensor,
    pub scale: Tensor,
}

impl Fp8Act {
    /// Rows `start..start + len` of dim `dim` (a leading dim: per-row scales narrow with them).
    pub fn narrow(&self, dim: i64, start: i64, len: i64) -> Res<Fp8Act> {
        Ok(Fp8Act {
            q: self.q.f_narrow(dim, start, len)?,
            scale: self.scale.f_narrow(dim, start, len)?,
        })
    }

    /// The values in fp32.
    pub fn dequantize(&self) -> Res<Tensor> {
        dequantize(&self.q, &self.scale)
    }
}

/// A linear layer's input: dense activations, or their FP8 copy made by the kernel that produced
/// them ([`Fp8Act`]), so an FP8 GEMM after it needs no quantisation pass.
#[derive(Debug)]
pub enum Act {
    Dense(Tensor),
    Fp8(Fp8Act),
}

impl Act {
    /// See [`Fp8Act::narrow`].
    pub fn narrow(&self, dim: i64, start: i64, len: i64) -> Res<Act> {
        Ok(match self {
            Act::Dense(t) => Act::Dense(t.f_narrow(dim, start, len)?),
            Act::Fp8(a) => Act::Fp8(a.narrow(dim, start, len)?),
        })
    }

    /// The activation as a dense tensor of `kind` (an FP8 one dequantised).
    pub fn dense(&self, kind: Kind) -> Res<Tensor> {
        match self {
            Act::Dense(t) => Ok(t.shallow_clone()),
            Act::Fp8(a) => a.dequantize()?.f_to_kind(kind),
        }
    }
}

/// Per-row FP8 quantisation of `x` `(..., n)` (any leading dims) as an [`Fp8Act`].
pub fn quantize_act(x: &Tensor) -> Res<Fp8Act> {
    let size = x.size();
    let n = size[size.len() - 1];
    let (q, scale) = quantize_rows(&x.f_reshape([-1, n])?)?;
    let mut ssize = size.clone();
    *ssize.last_mut().expect("dims") = 1;
    Ok(Fp8Act {
        q: q.f_reshape(size.as_slice())?,
        scale: scale.f_reshape(ssize.as_slice())?,
    })
}

/// The FP8 input of a GEMM that follows a tanh GELU: rows `[a | GELU(m)]` (`a` optional, e.g. a
/// Flux single block's attention output beside its MLP activation, which `linear2` reads as one
/// row), each GELU value rounded to `m`'s dtype, quantised per row. `a` `(..., na)`, `m` `(..., nm)`
/// with equal leading dims. One kernel pass on CUDA bf16 ([`crate::aten::gelu_quant_e4m3`]),
/// the same arithmetic in reference ops elsewhere.
pub fn gelu_quantize(a: Option<&Tensor>, m: &Tensor) -> Res<Fp8Act> {
    gelu_quantize_after(a.map_or(GeluPrefix::None, GeluPrefix::Bf16), m)
}

/// [`gelu_quantize`] with the prefix in FP8: `a8` `(..., na)` e4m3fn standing for `a8 * descale`
/// (one fp32 on the device: the FP8 attention's output).
pub fn gelu_quantize_a8(a8: &Tensor, descale: &Tensor, m: &Tensor) -> Res<Fp8Act> {
    gelu_quantize_after(GeluPrefix::Fp8 { q: a8, descale }, m)
}

/// [`gelu_quantize`] for any prefix (`(..., na)` tensors in the prefix, `m` `(..., nm)`): the
/// kernel where the rows and the prefix fit it, else the reference ops.
fn gelu_quantize_after(prefix: GeluPrefix<'_>, m: &Tensor) -> Res<Fp8Act> {
    let msize = m.size();
    let nm = msize[msize.len() - 1];
    let m2 = m.f_reshape([-1, nm])?;
    let rows = m2.size()[0];
    let flat = |t: &Tensor| -> Res<(Tensor, i64)> {
        let na = t.size()[t.dim() - 1];
        Ok((t.f_reshape([-1, na])?, na))
    };
    // The prefix as (rows, na) with its descale (FP8 only), and whether the kernel takes it
    // (bf16: its 16-byte rows; FP8: 8-byte aligned rows on CUDA).
    let (a2, na, a_fits) = match prefix {
        GeluPrefix::None => (None, 0, true),
        GeluPrefix::Bf16(a) => {
            let (a2, na) = flat(a)?;
            let fits = rows_kernel_fits(&a2) && a2.size()[0] == rows;
            (Some((a2, None)), na, fits)
        }
        GeluPrefix::Fp8 { q, descale } => {
            let (a2, na) = flat(q)?;
            let fits = a2.device().is_cuda()
                && a2.size()[0] == rows
                && a2.stride()[1] == 1
                && na % 8 == 0
                && a2.stride()[0] % 8 == 0
                && (a2.data_ptr() as usize).is_multiple_of(8);
            (Some((a2, Some(descale))), na, fits)
        }
    };
    let mut qsize = msize.clone();
    *qsize.last_mut().expect("dims") = na + nm;
    let mut ssize = msize.clone();
    *ssize.last_mut().expect("dims") = 1;
    let (q, scale) = if rows_kernel_fits(&m2) && a_fits {
        let q = Tensor::f_empty([rows, na + nm], (Kind::Float8e4m3fn, m.device()))?;
        let scale = Tensor::f_empty([rows, 1], (Kind::Float, m.device()))?;
        let kernel_prefix = match &a2 {
            None => GeluPrefix::None,
            Some((a, None)) => GeluPrefix::Bf16(a),
            Some((a, Some(descale))) => GeluPrefix::Fp8 { q: a, descale },
        };
        crate::aten::gelu_quant_e4m3(kernel_prefix, &m2, &q, &scale, gelu_exact())?;
        (q, scale)
    } else {
        let g = m2
            .f_to_kind(Kind::Float)?
            .f_gelu("tanh")?
            .f_to_kind(m.kind())?
            .f_to_kind(Kind::Float)?;
        let row = match &a2 {
            None => g,
            Some((a, descale)) => {
                let mut a = a.f_to_kind(Kind::Float)?;
                if let Some(descale) = descale {
                    a = a.f_mul(&descale.f_to_kind(Kind::Float)?)?;
                }
                Tensor::f_cat(&[a, g], 1)?
            }
        };
        quantize_rows_reference(&row)?
    };
    Ok(Fp8Act {
        q: q.f_reshape(qsize.as_slice())?,
        scale: scale.f_reshape(ssize.as_slice())?,
    })
}

/// cuBLASLt's fast FP8 accumulation unless the benchmark switch `DITFLEET_FP8_ACCUM=exact`
/// turns it off: its error at Flux's shapes is within the quantisation's own (fp8_bench), as
/// torchao's float8 inference also assumes.
fn default_fast_accum() -> bool {
    !crate::settings::bench().fp8_exact_accum
}

/// Whether the GELU + quantise kernel computes the GELU's tanh as ATen does (`tanhf`: the
/// benchmark switch `DITFLEET_GELU=exact`) instead of its faster sigmoid form.
pub fn gelu_exact() -> bool {
    crate::settings::bench().gelu_exact
}

/// Whether FP8 activations come out of the kernels that produce them (else a quantisation pass
/// of their own before each GEMM: the benchmark switch `DITFLEET_FP8_FUSED=off`).
pub fn fused_producers() -> bool {
    !crate::settings::bench().fp8_unfused
}

/// A linear layer with an FP8 weight: `weight` `(out, in)` e4m3fn, `scale` `(1, out)` fp32 per
/// output channel, `bias` `(out)` in the activations' dtype.
#[derive(Debug)]
pub struct Fp8Linear {
    pub weight: Tensor,
    pub scale: Tensor,
    pub bias: Option<Tensor>,
    /// cuBLASLt's fast FP8 accumulation (no periodic promotion of partial sums to fp32).
    pub fast_accum: bool,
}

impl Fp8Linear {
    /// Quantises `weight` `(out, in)` (any float dtype) per output channel; `bias` is kept as is.
    pub fn quantize(weight: &Tensor, bias: Option<&Tensor>) -> Res<Self> {
        let (q, scale) = quantize_rows_reference(weight)?; // (out, in), (out, 1)
        Ok(Self {
            weight: q,
            scale: scale.f_reshape([1, -1])?,
            bias: bias.map(|b| b.shallow_clone()),
            fast_accum: default_fast_accum(),
        })
    }

    /// A layer from an already quantised weight `(out, in)` e4m3fn and its scales: per output
    /// channel (`(out)`, `(out, 1)` or `(1, out)`) or one per-tensor value (broadcast).
    pub fn from_quantized(weight: Tensor, scale: &Tensor, bias: Option<&Tensor>) -> Res<Self> {
        let out = weight.size()[0];
        let scale = scale.f_to_kind(Kind::Float)?;
        let scale = match scale.numel() as i64 {
            1 => scale
                .f_reshape([1, 1])?
                .f_expand([1, out], false)?
                .f_contiguous()?,
            n if n == out => scale.f_reshape([1, out])?.f_contiguous()?,
            n => {
                return Err(tch::TchError::Shape(format!(
                    "fp8 weight {:?}: {n} scales, want {out} (per output channel) or 1",
                    weight.size()
                )));
            }
        };
        if weight.kind() != Kind::Float8e4m3fn {
            return Err(tch::TchError::Kind(format!(
                "fp8 weight is {:?}, not Float8e4m3fn",
                weight.kind()
            )));
        }
        Ok(Self {
            weight,
            scale,
            bias: bias.map(|b| b.shallow_clone()),
            fast_accum: default_fast_accum(),
        })
    }

    /// The weight dequantised to fp32 `(out, in)`.
    pub fn dequantized_weight(&self) -> Res<Tensor> {
        dequantize(&self.weight, &self.scale.f_reshape([-1, 1])?)
    }

    /// `x` `(..., in)` -> `(..., out)` in `x`'s dtype: the activation quantised per row, then the
    /// scaled FP8 GEMM on CUDA (bf16 out), its fp32 emulation elsewhere.
    pub fn forward(&self, x: &Tensor) -> Res<Tensor> {
        self.forward_q(&quantize_act(x)?, x.kind())
    }

    /// The layer on an already quantised activation `(..., in)`, output `(..., out)` in `kind`
    /// (bf16 on CUDA, where `_scaled_mm` writes it).
    pub fn forward_q(&self, x: &Fp8Act, kind: Kind) -> Res<Tensor> {
        let size = x.q.size();
        let (lead, in_dim) = size.split_at(size.len() - 1);
        let q = x.q.f_reshape([-1, in_dim[0]])?;
        let sx = x.scale.f_reshape([-1, 1])?;
        let y = if q.device().is_cuda() {
            let q = if q.is_contiguous() { q } else { q.f_contiguous()? };
            let sx = if sx.is_contiguous() {
                sx
            } else {
                sx.f_contiguous()?
            };
            self.scaled_mm(&q, &sx, kind)?
        } else {
            let y = dequantize(&q, &sx)?.f_mm(&self.dequantized_weight()?.f_tr()?)?;
            let y = match &self.bias {
                Some(b) => y.f_add(&b.f_to_kind(Kind::Float)?)?,
                None => y,
            };
            y.f_to_kind(kind)?
        };
        let mut shape = lead.to_vec();
        shape.push(self.weight.size()[0]);
        y.f_reshape(shape.as_slice())
    }

    /// `_scaled_mm` with the bias in its epilogue where this torch build takes a bias with
    /// row-wise scales, else the GEMM then a bias add (tried once per process).
    fn scaled_mm(&self, q: &Tensor, sx: &Tensor, kind: Kind) -> Res<Tensor> {
        use std::sync::atomic::{AtomicU8, Ordering};
        // 0: not tried, 1: the epilogue takes the bias, 2: it does not.
        static BIAS_EPILOGUE: AtomicU8 = AtomicU8::new(0);
        let wt = self.weight.f_tr()?; // (in, out), column-major as cuBLASLt wants it
        let bias = self.bias.as_ref().map(|b| {
            if b.kind() == kind {
                Ok(b.shallow_clone())
            } else {
                b.f_to_kind(kind)
            }
        });
        let bias = bias.transpose()?;
        let mm = |b: Option<&Tensor>| {
            q.f_internal_scaled_mm(&wt, sx, &self.scale, b, None::<&Tensor>, kind, self.fast_accum)
        };
        match (&bias, BIAS_EPILOGUE.load(Ordering::Relaxed)) {
            (None, _) => mm(None),
            (Some(b), 0) => match mm(Some(b)) {
                Ok(y) => {
                    BIAS_EPILOGUE.store(1, Ordering::Relaxed);
                    Ok(y)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scaled GEMM takes no bias with row-wise scales here: adding it after");
                    BIAS_EPILOGUE.store(2, Ordering::Relaxed);
                    mm(None)?.f_add_(b)
                }
            },
            (Some(b), 1) => mm(Some(b)),
            (Some(b), _) => mm(None)?.f_add_(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(t: &Tensor) -> Vec<f32> {
        Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap()
    }

    #[test]
    fn gelu_rows_with_an_fp8_prefix_quantise_the_dequantised_prefix_beside_the_rounded_gelu() {
        let _g = tch::no_grad_guard();
        tch::manual_seed(7);
        // (b, tokens, n): an FP8 prefix of 16 with its descale, a bf16 MLP half of 24.
        let a8 = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu))
            .g_mul_scalar(100.0)
            .to_kind(Kind::Float8e4m3fn);
        let descale = Tensor::from_slice(&[0.03125f32]);
        let m = Tensor::randn([2, 3, 24], (Kind::Float, Device::Cpu))
            .g_mul_scalar(3.0)
            .to_kind(Kind::BFloat16);
        let got = gelu_quantize_a8(&a8, &descale, &m).unwrap();
        assert_eq!(got.q.size(), [2, 3, 40]);
        assert_eq!(got.scale.size(), [2, 3, 1]);
        // The same row built by hand: the prefix's exact value, GELU(m) rounded to bf16.
        let a = a8.to_kind(Kind::Float).g_mul_scalar(0.03125).reshape([6, 16]);
        let g = m
            .to_kind(Kind::Float)
            .gelu("tanh")
            .to_kind(Kind::BFloat16)
            .to_kind(Kind::Float)
            .reshape([6, 24]);
        let (q, scale) = quantize_rows_reference(&Tensor::cat(&[a.shallow_clone(), g], 1)).unwrap();
        assert_eq!(
            got.q.reshape([6, 40]).view_dtype(Kind::Uint8),
            q.view_dtype(Kind::Uint8)
        );
        assert_eq!(got.scale.reshape([6, 1]), scale);
        // A float prefix of the same values through the bf16-prefix entry gives the same row.
        let via_float = gelu_quantize(Some(&a.reshape([2, 3, 16])), &m).unwrap();
        assert_eq!(via_float.q.view_dtype(Kind::Uint8), got.q.view_dtype(Kind::Uint8));
        // No prefix: the GELU alone, the leading dims kept.
        let plain = gelu_quantize(None, &m).unwrap();
        assert_eq!(plain.q.size(), [2, 3, 24]);
    }

    #[test]
    fn rows_are_scaled_to_448_and_rounded_to_the_nearest_e4m3_value() {
        // Row 0: max |x| = 896, so scale 2 and x / 2 = [448, 0.5, -1.5, 13.5]: all e4m3 values
        // except 13.5 (between 13 and 14, steps of 1 in [8, 16): a tie, to the even mantissa, 14).
        // Row 1: all zeros: scale 1, q 0. Row 2: one tiny value, scaled up to 448.
        let x = Tensor::from_slice(&[896f32, 1.0, -3.0, 27.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1e-3, 0.0])
            .reshape([3, 4]);
        let (q, s) = quantize_rows_reference(&x).unwrap();
        assert_eq!(q.kind(), Kind::Float8e4m3fn);
        assert_eq!(s.size(), [3, 1]);
        let s = f32s(&s);
        assert_eq!(s[0], 2.0);
        assert_eq!(s[1], 1.0);
        assert_eq!(s[2], 1e-3f32 / 448.0);
        let q = f32s(&q);
        assert_eq!(&q[0..4], &[448.0, 0.5, -1.5, 14.0]);
        assert_eq!(&q[4..8], &[0.0; 4]);
        assert_eq!(q[10], -448.0);
    }

    #[test]
    fn dequantised_values_are_within_half_an_e4m3_step_of_the_input() {
        tch::manual_seed(1);
        let x = Tensor::randn([16, 64], (Kind::Float, Device::Cpu))
            .f_mul_scalar(3.0)
            .unwrap();
        let (q, s) = quantize_rows_reference(&x).unwrap();
        let back = dequantize(&q, &s).unwrap();
        // e4m3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself; values
        // below the smallest normal (2^-6 * scale) by at most half the subnormal step, 2^-10 * scale.
        let err = (&back - &x).abs();
        let bound = x
            .abs()
            .f_mul_scalar(1.0 / 16.0)
            .unwrap()
            .maximum(&s.f_mul_scalar(2f64.powi(-10)).unwrap());
        assert!(bool::try_from(err.le_tensor(&(bound + 1e-12)).all()).unwrap());
        // And the row maxima survive exactly (448 is an e4m3 value).
        let amax_back = back.abs().amax([1], false);
        let amax = x.abs().amax([1], false);
        let rel =
            f64::try_from((amax_back - &amax).abs().max()).unwrap() / f64::try_from(amax.max()).unwrap();
        assert!(rel < 1e-6, "{rel}");
    }

    #[test]
    fn the_cpu_fp8_linear_is_the_exact_product_of_its_quantised_operands() {
        tch::manual_seed(2);
        let w = Tensor::randn([24, 32], (Kind::Float, Device::Cpu))
            .f_mul_scalar(0.2)
            .unwrap();
        let b = Tensor::randn([24], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([2, 5, 32], (Kind::Float, Device::Cpu));
        let lin = Fp8Linear::quantize(&w, Some(&b)).unwrap();
        let y = lin.forward(&x).unwrap();
        assert_eq!(y.size(), [2, 5, 24]);
        // The same product from the dequantised operands in fp64.
        let (q, s) = quantize_rows_reference(&x.reshape([10, 32])).unwrap();
        let xd = dequantize(&q, &s).unwrap().to_kind(Kind::Double);
        let wd = lin.dequantized_weight().unwrap().to_kind(Kind::Double);
        let want = xd.mm(&wd.tr()) + b.to_kind(Kind::Double);
        let got = y.reshape([10, 24]).to_kind(Kind::Double);
        let rel = f64::try_from((&got - &want).norm() / want.norm()).unwrap();
        assert!(rel < 1e-6, "{rel}");
        // And near the full-precision layer: a few percent at most for random data.
        let exact = x.matmul(&w.tr()) + &b;
        let rel = f64::try_from((&y - &exact).norm() / exact.norm()).unwrap();
        assert!(rel < 0.05, "{rel}");
    }
}
