//! FP8 linear layers at Flux.1-dev's GEMM shapes (issue 20): time and error of the bf16 linear
//! against the FP8 path ([`ditfleet_engine::nn::fp8`]: per-row activation quantisation, then
//! `_scaled_mm` with per-channel weight scales and bf16 output), for 4608 tokens (1024²).
//!
//! Per shape `(in, out)`: `bf16_ms` (ATen's linear with bias), `fp8_ms` (quantise + scaled GEMM, as
//! `Fp8Linear::forward` runs it), `fp8_gemm_ms` (the scaled GEMM alone on pre-quantised input),
//! `quant_kernel_ms` (the fused quantisation kernel alone), `quant_eager_ms` (the same with eager
//! ATen ops: amax, reciprocal, multiply, clamp, cast), with and without cuBLASLt's fast FP8
//! accumulation; and each result's relative L2 error against an fp32 linear of the same bf16
//! operands, on Gaussian activations and on activations with outlier channels (8 of every 1024
//! channels scaled by 50, as trained models' activations have: random data understates them).
//! On CUDA it also checks that the kernel's quantisation equals the reference ops bit for bit, and
//! measures the FP8 and bf16 8192³ GEMM rates.
//!
//! ```text
//! cargo run --release -p ditfleet-engine --features bench --example fp8_bench        # CUDA
//! cargo run -p ditfleet-engine --features bench --example fp8_bench -- --check       # CPU, tiny
//! ```
//! Prints one JSON object.

use std::time::Instant;

use anyhow::{Result, bail};
use ditfleet_engine::aten::{GeluPrefix, LnOut};
use ditfleet_engine::nn::fp8::{Fp8Linear, dequantize, quantize_rows, quantize_rows_reference};
use serde_json::json;
use tch::{Device, Kind, Tensor};

fn sync(d: Device) {
    if let Device::Cuda(i) = d {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Median wall time of `f` in ms over `reps` runs after 3 warm-ups.
fn ms(d: Device, reps: usize, mut f: impl FnMut() -> Result<Tensor>) -> Result<f64> {
    for _ in 0..3 {
        let _ = f()?;
    }
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        sync(d);
        let s = Instant::now();
        let _ = f()?;
        sync(d);
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.f_to_kind(Kind::Double)?, b.f_to_kind(Kind::Double)?);
    Ok(f64::try_from(a.f_sub(&b)?.f_norm()?)? / f64::try_from(b.f_norm()?)?)
}

/// The kernels that write FP8 as they produce an activation, against the reference ops: the gated
/// residual + modulated LayerNorm (`gate_residual_ln` with FP8 out against the bf16 kernel then the
/// reference quantisation: bit for bit) and the GELU + quantisation of MLP-out / linear2 inputs
/// (`gelu_quantize` against ATen's GELU, a bf16 rounding and the reference quantisation: the
/// share of differing FP8 bytes, from GELU's last-ulp differences), with their times.
fn fused_kernel_checks(dev: Device, reps: usize) -> Result<serde_json::Value> {
    let (rows, h, m) = (4608i64, 3072i64, 12288i64);
    let bf = |shape: &[i64], scale: f64| -> Result<Tensor> {
        Ok(Tensor::f_randn(shape, (Kind::Float, dev))?
            .f_mul_scalar(scale)?
            .f_to_kind(Kind::BFloat16)?)
    };
    let x = bf(&[1, rows, h], 1.0)?;
    let y = bf(&[1, rows, h], 1.0)?;
    let md = bf(&[1, 1, 3 * h], 0.5)?;
    let (gate, scale, shift) = (
        md.f_narrow(2, 0, h)?,
        md.f_narrow(2, h, h)?,
        md.f_narrow(2, 2 * h, h)?,
    );
    let (xo, ho) = (x.f_empty_like()?, x.f_empty_like()?);
    let xo8 = x.f_empty_like()?;
    let q8 = Tensor::f_empty([1, rows, h], (Kind::Float8e4m3fn, dev))?;
    let s8 = Tensor::f_empty([1, rows, 1], (Kind::Float, dev))?;
    let ln = |fp8: bool| {
        let (x_out, out) = if fp8 {
            (&xo8, LnOut::Fp8 { q: &q8, scale: &s8 })
        } else {
            (&xo, LnOut::Bf16(&ho))
        };
        ditfleet_engine::aten::gate_residual_ln(&x, &gate, &y, &scale, &shift, x_out, out, 1e-6)
    };
    ln(false)?;
    // The bf16 output against the reference ops in fp32: x' = x + gate * y rounded to bf16, then
    // LayerNorm(x') * (1 + scale) + shift.
    let f = |t: &Tensor| t.f_to_kind(Kind::Float);
    let x_ref = f(&x)?
        .f_add(&f(&gate)?.f_mul(&f(&y)?)?)?
        .f_to_kind(Kind::BFloat16)?;
    let x_out_mismatch = f64::try_from(
        xo.f_ne_tensor(&x_ref)?
            .f_to_kind(Kind::Double)?
            .f_mean(None::<Kind>)?,
    )?;
    let h_ref = f(&x_ref)?
        .f_layer_norm([h], None::<&Tensor>, None::<&Tensor>, 1e-6, false)?
        .f_mul(&f(&scale)?.f_add_scalar(1.0)?)?
        .f_add(&f(&shift)?)?;
    let ln_rel = rel_l2(&f(&ho)?, &h_ref)?;
    // The 8-byte-load variant (x 8- but not 16-byte aligned) against the same reference.
    let mut x_odd = Tensor::f_empty([rows * h + 4], (Kind::BFloat16, dev))?
        .f_narrow(0, 4, rows * h)?
        .f_view([1, rows, h])?;
    x_odd.f_copy_(&x)?;
    let (xo_odd, ho_odd) = (x.f_empty_like()?, x.f_empty_like()?);
    ditfleet_engine::aten::gate_residual_ln(
        &x_odd,
        &gate,
        &y,
        &scale,
        &shift,
        &xo_odd,
        LnOut::Bf16(&ho_odd),
        1e-6,
    )?;
    let ln_rel_v4 = rel_l2(&f(&ho_odd)?, &h_ref)?;
    let (qr, sr) = quantize_rows_reference(&ho.f_reshape([rows, h])?)?;
    ln(true)?;
    let ln_same = q8
        .f_reshape([rows, h])?
        .f_view_dtype(Kind::Uint8)?
        .f_equal(&qr.f_view_dtype(Kind::Uint8)?)?
        && s8.f_reshape([rows, 1])?.f_equal(&sr)?
        && xo8.f_equal(&xo)?;
    let ln_ms = ms(dev, reps, || {
        ln(false)?;
        Ok(ho.shallow_clone())
    })?;
    let ln8_ms = ms(dev, reps, || {
        ln(true)?;
        Ok(q8.shallow_clone())
    })?;
    let a = bf(&[1, rows, h], 1.0)?;
    let pre = bf(&[1, rows, m], 2.0)?;
    let got = ditfleet_engine::nn::fp8::gelu_quantize(Some(&a), &pre)?;
    let g = pre
        .f_to_kind(Kind::Float)?
        .f_gelu("tanh")?
        .f_to_kind(Kind::BFloat16)?
        .f_to_kind(Kind::Float)?;
    let row = Tensor::f_cat(&[a.f_to_kind(Kind::Float)?, g], 2)?.f_reshape([rows, h + m])?;
    let (qg, sg) = quantize_rows_reference(&row)?;
    let differ = got
        .q
        .f_reshape([rows, h + m])?
        .f_view_dtype(Kind::Uint8)?
        .f_ne_tensor(&qg.f_view_dtype(Kind::Uint8)?)?
        .f_to_kind(Kind::Double)?
        .f_mean(None::<Kind>)?;
    let gelu_rel = rel_l2(
        &got.dequantize()?.f_reshape([rows, h + m])?,
        &dequantize(&qg, &sg)?,
    )?;
    let gelu_ms = ms(dev, reps, || {
        Ok(ditfleet_engine::nn::fp8::gelu_quantize(Some(&a), &pre)?.q)
    })?;
    // The kernel with the tanh as ATen computes it (tanhf), against the same reference.
    let (a2, m2) = (a.f_reshape([rows, h])?, pre.f_reshape([rows, m])?);
    let qe = Tensor::f_empty([rows, h + m], (Kind::Float8e4m3fn, dev))?;
    let se = Tensor::f_empty([rows, 1], (Kind::Float, dev))?;
    let exact_run = || -> Result<Tensor> {
        ditfleet_engine::aten::gelu_quant_e4m3(GeluPrefix::Bf16(&a2), &m2, &qe, &se, true)?;
        Ok(qe.shallow_clone())
    };
    let _ = exact_run()?;
    let differ_exact = qe
        .f_view_dtype(Kind::Uint8)?
        .f_ne_tensor(&qg.f_view_dtype(Kind::Uint8)?)?
        .f_to_kind(Kind::Double)?
        .f_mean(None::<Kind>)?;
    let gelu_exact_ms = ms(dev, reps, exact_run)?;
    let gelu_bf16_ms = ms(dev, reps, || Ok(pre.f_gelu("tanh")?))?;
    Ok(json!({
        "gate_residual_ln_fp8_equals_reference": ln_same,
        "gate_residual_ln_bf16_rel_l2_vs_fp32_reference": ln_rel,
        "gate_residual_ln_8byte_loads_bf16_rel_l2_vs_fp32_reference": ln_rel_v4,
        "gate_residual_ln_x_out_fraction_differing": x_out_mismatch,
        "gate_residual_ln_ms": {"bf16_out": ln_ms, "fp8_out": ln8_ms},
        "gelu_quant_bytes_differing": f64::try_from(differ)?,
        "gelu_quant_exact_tanh_bytes_differing": f64::try_from(differ_exact)?,
        "gelu_quant_rel_l2_vs_reference": gelu_rel,
        "gelu_quant_ms": {"attn_plus_gelu_15360": gelu_ms, "exact_tanh_attn_plus_gelu_15360": gelu_exact_ms,
                          "aten_gelu_bf16_12288": gelu_bf16_ms},
    }))
}

/// The FP8 attention ([`ditfleet_engine::nn::fp8_attention`]) at Flux.1-dev's attention shape for
/// `rows` joint tokens (24 heads of 128), from one single-block projection (random bf16 with
/// N(0, 1) values, norm weights 1 + N(0, 0.1), random RoPE angles): its output against fp32
/// attention of the same normed, rotated bf16 q/k/v, beside the bf16 path's distance (the fused
/// bf16 kernel then cuDNN's bf16 SDPA), and against the fp32 emulation of its arithmetic
/// (`fp8_attention::reference`); with times of the whole FP8 path (ranges, FP8 q/k/v, cuDNN),
/// cuDNN's FP8 SDPA alone and bf16 SDPA alone. `v_outliers` scales 2 of every 128 v channels by
/// 20. Also the GELU + quantise kernel with the FP8 attention output as its prefix against the
/// reference ops.
fn fp8_attention_checks(dev: Device, reps: usize, rows: i64, v_outliers: bool) -> Result<serde_json::Value> {
    use ditfleet_engine::nn::fp8_attention::{JointFp8, reference};
    let (heads, d) = (24i64, 128i64);
    let h = heads * d;
    let f = (Kind::Float, dev);
    let qkv = Tensor::f_randn([1, rows, 3 * h], f)?;
    if v_outliers {
        let ch = Tensor::f_arange(h, (Kind::Int64, dev))?
            .f_remainder(64)?
            .f_eq(0)?;
        let v = qkv.f_narrow(2, 2 * h, h)?;
        let scaled = v.f_where_self(&ch.f_logical_not()?, &v.f_mul_scalar(20.0)?)?;
        let mut v = v;
        v.f_copy_(&scaled)?;
    }
    let qkv = qkv.f_to_kind(Kind::BFloat16)?;
    let qw = (Tensor::f_randn([d], f)? * 0.1 + 1.0).f_to_kind(Kind::BFloat16)?;
    let kw = (Tensor::f_randn([d], f)? * 0.1 + 1.0).f_to_kind(Kind::BFloat16)?;
    let theta = Tensor::f_rand([rows, d / 2], f)? * std::f64::consts::TAU;
    let rope = Tensor::f_stack(&[theta.f_cos()?, theta.f_sin()?], -1)?.f_contiguous()?; // (rows, 64, 2)
    let eps = 1e-6;
    // bf16 path: fused kernel into (b, rows, heads, d) bf16, cuDNN SDPA.
    let all = Tensor::f_empty([3, 1, rows, heads, d], (Kind::BFloat16, dev))?;
    let (q, k, v) = (all.f_get(0)?, all.f_get(1)?, all.f_get(2)?);
    let bf16_path = || -> Result<Tensor> {
        ditfleet_engine::aten::qkv_norm_rope(&qkv, &qw, &kw, &rope, &q, &k, &v, 0, eps)?;
        Ok(ditfleet_engine::nn::sdpa(
            &q.f_transpose(1, 2)?,
            &k.f_transpose(1, 2)?,
            &v.f_transpose(1, 2)?,
            None,
            false,
            None,
        )?
        .f_transpose(1, 2)?)
    };
    let bf = bf16_path()?; // (1, rows, heads, d)
    let exact = Tensor::f_scaled_dot_product_attention(
        &q.f_transpose(1, 2)?.f_to_kind(Kind::Float)?,
        &k.f_transpose(1, 2)?.f_to_kind(Kind::Float)?,
        &v.f_transpose(1, 2)?.f_to_kind(Kind::Float)?,
        None::<Tensor>,
        0.0,
        false,
        None,
        false,
    )?
    .f_transpose(1, 2)?;
    let amax =
        |t: &Tensor| -> Result<f64> { Ok(f64::try_from(t.f_abs()?.f_max()?.f_to_kind(Kind::Double)?)?) };
    // The emulation materialises the (heads, rows, rows) scores a few times: 4608 rows only.
    let emulated = if rows <= 8192 {
        Some(reference(&q, &k, &v, amax(&qw)?, amax(&kw)?)?)
    } else {
        None
    };
    let fp8_path = || -> Result<(Tensor, Tensor)> {
        let j = JointFp8::new(dev, 1, rows, heads)?;
        j.ranges(&qkv, &qw, &kw)?;
        j.write(&qkv, &qw, &kw, &rope, 0, eps)?;
        let Some(o) = j.attend()? else {
            bail!("cuDNN refused the FP8 attention on this device (see the log)");
        };
        Ok((o.o, o.descale))
    };
    let (o8, descale) = fp8_path()?;
    let got = o8
        .f_to_kind(Kind::Float)?
        .f_mul(&descale)?
        .f_reshape([1, rows, heads, d])?;
    // The GELU + quantise kernel with the FP8 output as its prefix, against reference ops.
    let mlp = (Tensor::f_randn([1, rows, 4 * h], f)? * 2.0).f_to_kind(Kind::BFloat16)?;
    let k8 = ditfleet_engine::nn::fp8::gelu_quantize_a8(&o8, &descale, &mlp)?;
    let g = mlp
        .f_to_kind(Kind::Float)?
        .f_gelu("tanh")?
        .f_to_kind(Kind::BFloat16)?
        .f_to_kind(Kind::Float)?
        .f_reshape([rows, 4 * h])?;
    let a = o8.f_to_kind(Kind::Float)?.f_mul(&descale)?.f_reshape([rows, h])?;
    let (qg, sg) = quantize_rows_reference(&Tensor::f_cat(&[a, g], 1)?)?;
    let gelu_a8_differ =
        k8.q.f_reshape([rows, 5 * h])?
            .f_view_dtype(Kind::Uint8)?
            .f_ne_tensor(&qg.f_view_dtype(Kind::Uint8)?)?
            .f_to_kind(Kind::Double)?
            .f_mean(None::<Kind>)?;
    let gelu_a8_rel = rel_l2(
        &k8.dequantize()?.f_reshape([rows, 5 * h])?,
        &dequantize(&qg, &sg)?,
    )?;
    // Times.
    let j = JointFp8::new(dev, 1, rows, heads)?;
    j.ranges(&qkv, &qw, &kw)?;
    j.write(&qkv, &qw, &kw, &rope, 0, eps)?;
    let sdpa8_ms = ms(dev, reps, || {
        Ok(j.attend()?.map(|o| o.o).unwrap_or_else(|| qkv.shallow_clone()))
    })?;
    let fp8_ms = ms(dev, reps, || Ok(fp8_path()?.0))?;
    let bf16_ms = ms(dev, reps, bf16_path)?;
    let (qt, kt, vt) = (q.f_transpose(1, 2)?, k.f_transpose(1, 2)?, v.f_transpose(1, 2)?);
    let sdpa_ms = ms(dev, reps, || {
        Ok(ditfleet_engine::nn::sdpa(&qt, &kt, &vt, None, false, None)?)
    })?;
    let flop = 4.0 * (rows as f64).powi(2) * h as f64;
    Ok(json!({
        "rows": rows, "heads": heads, "v_outliers": v_outliers,
        "rel_l2_vs_fp32": {"fp8": rel_l2(&got, &exact)?, "bf16": rel_l2(&bf, &exact)?},
        "fp8_rel_l2_vs_bf16": rel_l2(&got, &bf)?,
        "fp8_rel_l2_vs_emulation": emulated.as_ref().map(|(e, _)| rel_l2(&got, e)).transpose()?,
        "emulation_rel_l2_vs_fp32": emulated.as_ref().map(|(e, _)| rel_l2(e, &exact)).transpose()?,
        "emulation_saturated": emulated.as_ref().map(|(_, s)| *s),
        "descale_o": f64::try_from(descale.f_to_kind(Kind::Double)?.f_sum(Kind::Double)?)?,
        "gelu_quant_a8_bytes_differing": f64::try_from(gelu_a8_differ)?,
        "gelu_quant_a8_rel_l2_vs_reference": gelu_a8_rel,
        "ms": {"fp8_whole": fp8_ms, "fp8_sdpa": sdpa8_ms, "bf16_whole": bf16_ms, "bf16_sdpa": sdpa_ms},
        "tflops": {"fp8_sdpa": flop / sdpa8_ms / 1e9, "bf16_sdpa": flop / sdpa_ms / 1e9},
        "fp8_plans": ditfleet_engine::aten::sdpa_fp8_report(),
    }))
}

fn main() -> Result<()> {
    let check = std::env::args().any(|a| a == "--check");
    let cuda = tch::Cuda::is_available() && !check;
    let dev = if cuda { Device::Cuda(0) } else { Device::Cpu };
    let _g = tch::no_grad_guard();
    tch::manual_seed(0);
    let tokens: i64 = if cuda { 4608 } else { 64 };
    // (name, in, out): Flux.1-dev's projections (hidden 3072, MLP 12288; single blocks' fused
    // qkv + MLP-in 21504 and their output over 15360).
    let shapes: Vec<(&str, i64, i64)> = if cuda {
        vec![
            ("double.qkv", 3072, 9216),
            ("double.proj", 3072, 3072),
            ("double.mlp.0", 3072, 12288),
            ("double.mlp.2", 12288, 3072),
            ("single.linear1", 3072, 21504),
            ("single.linear2", 15360, 3072),
        ]
    } else {
        vec![("tiny", 64, 96)]
    };
    let reps = if cuda { 20 } else { 2 };
    let mut rows = Vec::new();
    let mut exact_quant = true;
    for (name, k, n) in shapes {
        let w =
            (Tensor::f_randn([n, k], (Kind::Float, dev))? / (k as f64).sqrt()).f_to_kind(Kind::BFloat16)?;
        let b = (Tensor::f_randn([n], (Kind::Float, dev))? * 0.1).f_to_kind(Kind::BFloat16)?;
        let x = Tensor::f_randn([tokens, k], (Kind::Float, dev))?.f_to_kind(Kind::BFloat16)?;
        // Outlier channels: 8 of every 1024 scaled by 50.
        let mask = Tensor::f_arange(k, (Kind::Int64, dev))?
            .f_remainder(128)?
            .f_eq(0)?;
        let xo = x.f_where_self(&mask.f_logical_not()?, &x.f_mul_scalar(50.0)?)?;
        let mut lin = Fp8Linear::quantize(&w, Some(&b))?;
        let reference = |x: &Tensor| -> Result<Tensor> {
            Ok(x.f_to_kind(Kind::Float)?
                .f_linear(&w.f_to_kind(Kind::Float)?, Some(&b.f_to_kind(Kind::Float)?))?)
        };
        let mut row = serde_json::Map::new();
        row.insert(
            "shape".into(),
            json!({"name": name, "tokens": tokens, "in": k, "out": n}),
        );
        for (label, xin) in [("gaussian", &x), ("outliers", &xo)] {
            let want = reference(xin)?;
            let bf = xin.f_linear(&w, Some(&b))?;
            lin.fast_accum = false;
            let f8 = lin.forward(xin)?;
            lin.fast_accum = true;
            let f8_fast = lin.forward(xin)?;
            row.insert(
                format!("{label}_rel_l2"),
                json!({"bf16": rel_l2(&bf, &want)?, "fp8": rel_l2(&f8, &want)?, "fp8_fast_accum": rel_l2(&f8_fast, &want)?}),
            );
        }
        if cuda {
            // The kernel's quantisation against the reference ops, bit for bit.
            let (q, s) = quantize_rows(&x)?;
            let (qr, sr) = quantize_rows_reference(&x)?;
            let same = q
                .f_view_dtype(Kind::Uint8)?
                .f_equal(&qr.f_view_dtype(Kind::Uint8)?)?
                && s.f_equal(&sr)?;
            exact_quant &= same;
            row.insert("quant_kernel_equals_reference".into(), json!(same));
            let (q, s) = quantize_rows(&x)?;
            let wt = lin.weight.f_tr()?;
            let gemm = |fast: bool| {
                ms(dev, reps, || {
                    Ok(q.f_internal_scaled_mm(
                        &wt,
                        &s,
                        &lin.scale,
                        Some(&b),
                        None::<&Tensor>,
                        Kind::BFloat16,
                        fast,
                    )?)
                })
            };
            lin.fast_accum = false;
            let fp8_ms = ms(dev, reps, || Ok(lin.forward(&x)?))?;
            lin.fast_accum = true;
            let fp8_fast_ms = ms(dev, reps, || Ok(lin.forward(&x)?))?;
            let bf16_ms = ms(dev, reps, || Ok(x.f_linear(&w, Some(&b))?))?;
            let flop = 2.0 * tokens as f64 * k as f64 * n as f64;
            let (g, gf) = (gemm(false)?, gemm(true)?);
            row.insert(
                "ms".into(),
                json!({
                    "bf16": bf16_ms, "fp8": fp8_ms, "fp8_fast_accum": fp8_fast_ms,
                    "fp8_gemm": g, "fp8_gemm_fast_accum": gf,
                    "quant_kernel": ms(dev, reps, || Ok(quantize_rows(&x)?.0))?,
                    "quant_eager": ms(dev, reps, || Ok(quantize_rows_reference(&x)?.0))?,
                }),
            );
            row.insert(
                "tflops".into(),
                json!({"bf16": flop / bf16_ms / 1e9, "fp8": flop / fp8_ms / 1e9, "fp8_gemm": flop / g / 1e9,
                       "fp8_gemm_fast_accum": flop / gf / 1e9}),
            );
        } else {
            // The CPU path's product equals the dequantised operands' product.
            let (q, s) = quantize_rows_reference(&x)?;
            let want = dequantize(&q, &s)?
                .f_mm(&lin.dequantized_weight()?.f_tr()?)?
                .f_add(&b.f_to_kind(Kind::Float)?)?;
            // The output is bf16: compare with the exact product rounded once to bf16.
            let got = lin.forward(&x)?;
            row.insert(
                "cpu_emulation_rel_l2".into(),
                json!(rel_l2(&got, &want.f_to_kind(Kind::BFloat16)?)?),
            );
        }
        eprintln!("{}", serde_json::Value::Object(row.clone()));
        rows.push(serde_json::Value::Object(row));
    }
    let mut report = json!({"device": format!("{dev:?}"), "tokens": tokens, "shapes": rows});
    if cuda {
        let m = 8192;
        let a = Tensor::f_randn([m, m], (Kind::Float, dev))?.f_to_kind(Kind::BFloat16)?;
        let bt = Tensor::f_randn([m, m], (Kind::Float, dev))?.f_to_kind(Kind::BFloat16)?;
        let bf = ms(dev, 10, || Ok(a.f_mm(&bt)?))?;
        let (qa, sa) = quantize_rows(&a)?;
        let lin = Fp8Linear::quantize(&bt, None)?;
        let wt = lin.weight.f_tr()?;
        let f8 = ms(dev, 10, || {
            Ok(qa.f_internal_scaled_mm(
                &wt,
                &sa,
                &lin.scale,
                None::<&Tensor>,
                None::<&Tensor>,
                Kind::BFloat16,
                true,
            )?)
        })?;
        let flop = 2.0 * (m as f64).powi(3);
        report["matmul_8192_tflops"] = json!({"bf16": flop / bf / 1e9, "fp8_fast_accum": flop / f8 / 1e9});
        report["quant_kernel_equals_reference_everywhere"] = json!(exact_quant);
        report["fused_kernels"] = fused_kernel_checks(dev, reps)?;
        let mut attn = Vec::new();
        for (rows, outliers) in [(4608, false), (4608, true), (16896, false)] {
            let r = fp8_attention_checks(dev, reps, rows, outliers)
                .unwrap_or_else(|e| json!({"rows": rows, "v_outliers": outliers, "error": format!("{e:#}")}));
            eprintln!("{r}");
            attn.push(r);
        }
        report["fp8_attention"] = json!(attn);
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    if check {
        for r in report["shapes"].as_array().into_iter().flatten() {
            if r["cpu_emulation_rel_l2"].as_f64().unwrap_or(1.0) > 1e-4
                || r["gaussian_rel_l2"]["fp8"].as_f64().unwrap_or(1.0) > 0.1
            {
                bail!("check: the FP8 path is off: {r}");
            }
        }
        eprintln!("check: ok");
    }
    Ok(())
}
