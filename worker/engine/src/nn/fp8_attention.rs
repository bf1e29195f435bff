//! FP8 (e4m3fn) attention for the FP8 precision on Hopper: cuDNN's FP8 SDPA
//! ([`crate::aten::sdpa_fp8`]) over q, k, v written in FP8 by the kernel that norms and rotates
//! them, its FP8 output read directly by the GEMM (or the GELU + quantise pass) after it.
//!
//! cuDNN's FP8 attention takes one scale per tensor, on the device:
//! - q and k need no pass over the data: after RMSNorm every element satisfies
//!   `|x_i| / rms(x) <= sqrt(d)` and RoPE only rotates pairs, so `sqrt(128) * max|w|` (the norm's
//!   weight) bounds them. Their descale is that bound / 448.
//! - v's descale is its measured `max|v| / 448` (one small pass over the projection's v columns,
//!   [`crate::aten::attn_amax`]).
//! - the probabilities are scaled by 448 (they lie in [0, 1]).
//! - the output is a convex combination of v's rows, so `max|v|` bounds it; its scale keeps
//!   [`O_HEADROOM`] below that, because the FP8 probabilities it is summed with are rounded.
//!
//! All of it happens on the device without a host sync, so it captures in CUDA graphs. On the
//! CPU there is no FP8 attention: [`reference`] emulates the arithmetic for the tests.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tch::{Device, Kind, Tensor};

use super::Res;
use super::fp8::{E4M3_MAX, Fp8Act};

/// fp32 elements of the scale buffer the kernels and cuDNN share (csrc: `DTF_SLOTS`).
const SLOTS: i64 = 48;
/// The output's descale (csrc: `DTF_SLOT_DESCALE_O`).
const SLOT_DESCALE_O: i64 = 36;
/// The output scale's headroom below `448 / max|v|` (csrc: `DTF_O_HEADROOM`).
pub const O_HEADROOM: f64 = 0.875;
/// `sqrt(128)`: `|RMSNorm(x)_i| <= sqrt(d) * |w_i|` for heads of 128.
pub const QK_BOUND: f64 = 11.313_708_498_984_761;
/// Heads of 128: the only head size the kernels take.
const HEAD_DIM: i64 = 128;

/// Whether this process runs the FP8 precision's attention in FP8: built with the cuDNN frontend
/// and not switched off for an A/B run (`DITFLEET_FP8_ATTN=off`, a benchmark switch).
pub fn enabled() -> bool {
    !crate::settings::bench().fp8_attention_off && crate::aten::fp8_attention_built()
}

/// FP8 attentions run in this process (for the benchmarks' reports).
static CALLS: AtomicU64 = AtomicU64::new(0);

/// How many attentions ran in FP8 in this process so far.
pub fn calls() -> u64 {
    CALLS.load(Ordering::Relaxed)
}

/// Per CUDA device: `None` untried, `Some(true)` cuDNN ran it, `Some(false)` it refused.
static USABLE: Mutex<Vec<Option<bool>>> = Mutex::new(Vec::new());

/// Whether FP8 attention may run on `device` ([`enabled`], a CUDA device where cuDNN has not
/// refused it).
pub fn usable(device: Device) -> bool {
    let Device::Cuda(i) = device else {
        return false;
    };
    if !enabled() {
        return false;
    }
    let u = USABLE.lock().unwrap_or_else(|e| e.into_inner());
    u.get(i).copied().flatten() != Some(false)
}

fn remember(ordinal: usize, ok: bool) {
    let mut u = USABLE.lock().unwrap_or_else(|e| e.into_inner());
    if u.len() <= ordinal {
        u.resize(ordinal + 1, None);
    }
    u[ordinal] = Some(ok);
}

fn tried(ordinal: usize) -> bool {
    let u = USABLE.lock().unwrap_or_else(|e| e.into_inner());
    u.get(ordinal).copied().flatten().is_some()
}

/// The FP8 attention's output: `o` `(b, rows, heads * 128)` e4m3fn and its per-tensor descale
/// (one fp32 on the device).
#[derive(Debug)]
pub struct Fp8AttnOut {
    pub o: Tensor,
    pub descale: Tensor,
}

impl Fp8AttnOut {
    /// The output as a GEMM input: its descale broadcast to one per row.
    pub fn act(&self) -> Res<Fp8Act> {
        let (b, rows, _) = self.o.size3()?;
        Ok(Fp8Act {
            q: self.o.shallow_clone(),
            scale: self.descale.f_reshape([1, 1, 1])?.f_expand([b, rows, 1], false)?,
        })
    }
}

/// One joint attention's FP8 q/k/v `(b, rows, heads, 128)` and its scale buffer, filled stream by
/// stream: [`JointFp8::ranges`] for every stream, then [`JointFp8::write`] for every stream, then
/// [`JointFp8::attend`].
pub struct JointFp8 {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slots: Tensor,
    heads: i64,
}

impl JointFp8 {
    pub fn new(device: Device, b: i64, rows: i64, heads: i64) -> Res<Self> {
        let all = Tensor::f_empty([3, b, rows, heads, HEAD_DIM], (Kind::Float8e4m3fn, device))?;
        Ok(Self {
            q: all.f_get(0)?,
            k: all.f_get(1)?,
            v: all.f_get(2)?,
            slots: Tensor::f_zeros([SLOTS], (Kind::Float, device))?,
            heads,
        })
    }

    /// Adds one stream's ranges: its projection `qkv` `(b, t, >= 3 * heads * 128)` bf16 and its
    /// q/k norm weights `(128)`.
    pub fn ranges(&self, qkv: &Tensor, q_w: &Tensor, k_w: &Tensor) -> Res<()> {
        crate::aten::attn_amax(qkv, q_w, k_w, self.heads, &self.slots)
    }

    /// Writes one stream's normed, rotated q/k and v at rows `row_offset..` in FP8 (after every
    /// stream's [`JointFp8::ranges`]). `rope`: the `(rows, 64)` table of the joint rows.
    pub fn write(
        &self,
        qkv: &Tensor,
        q_w: &Tensor,
        k_w: &Tensor,
        rope: &Tensor,
        row_offset: i64,
        eps: f64,
    ) -> Res<()> {
        crate::aten::qkv_norm_rope_e4m3(
            qkv,
            q_w,
            k_w,
            rope,
            (&self.q, &self.k, &self.v),
            row_offset,
            eps,
            &self.slots,
        )
    }

    /// The attention over the rows written. `Ok(None)` where cuDNN refuses it on this device the
    /// first time (an older GPU or cuDNN): said once in the log, and the caller attends in bf16
    /// from then on. Later errors are errors.
    pub fn attend(&self) -> Res<Option<Fp8AttnOut>> {
        let (b, rows, heads, d) = self.q.size4()?;
        let device = self.q.device();
        let Device::Cuda(ordinal) = device else {
            return Ok(None);
        };
        let o = Tensor::f_empty([b, rows, heads, d], (Kind::Float8e4m3fn, device))?;
        let scale = 1.0 / (d as f64).sqrt();
        let tune = !crate::settings::bench().fp8_attention_untuned;
        match crate::aten::sdpa_fp8(&self.q, &self.k, &self.v, &o, &self.slots, scale, tune) {
            Ok(()) => {
                CALLS.fetch_add(1, Ordering::Relaxed);
                if !tried(ordinal) {
                    tracing::info!(ordinal, "FP8 attention (cuDNN) in use");
                    remember(ordinal, true);
                }
                Ok(Some(Fp8AttnOut {
                    o: o.f_reshape([b, rows, heads * d])?,
                    descale: self.slots.f_narrow(0, SLOT_DESCALE_O, 1)?,
                }))
            }
            Err(e) if !tried(ordinal) => {
                tracing::warn!(ordinal, error = %e, "FP8 attention unavailable on this device; the FP8 precision attends in bf16");
                remember(ordinal, false);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// The per-tensor descales the kernels derive: `(q, k, v)` from max|w_q|, max|w_k| (the norm
/// weights) and max|v|.
pub fn descales(q_w_amax: f64, k_w_amax: f64, v_amax: f64) -> (f64, f64, f64) {
    let d = |a: f64| if a > 0.0 { a / E4M3_MAX } else { 1.0 };
    (d(q_w_amax * QK_BOUND), d(k_w_amax * QK_BOUND), d(v_amax))
}

/// `x / descale` rounded to e4m3fn (saturating), back in fp32 times `descale`.
fn through_e4m3(x: &Tensor, descale: f64) -> Res<Tensor> {
    x.f_div_scalar(descale)?
        .f_clamp(-E4M3_MAX, E4M3_MAX)?
        .f_to_kind(Kind::Float8e4m3fn)?
        .f_to_kind(Kind::Float)?
        .f_mul_scalar(descale)
}

/// The FP8 attention's arithmetic in fp32 ops (any device): q, k, v `(b, s, heads, d)` (q and k
/// normed and rotated, norm weights' maxima `q_w_amax` / `k_w_amax`) through e4m3 with the
/// kernels' scales, the probabilities through e4m3 scaled by 448 (normalised by their unrounded
/// sum, as a flash kernel's running sum), the output through e4m3 with the headroom scale.
/// Returns `(b, s, heads, d)` fp32 and whether anything saturated (a value at ±448 before
/// rounding: the scales promise it does not).
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor, q_w_amax: f64, k_w_amax: f64) -> Res<(Tensor, bool)> {
    let f = |t: &Tensor| -> Res<Tensor> { t.f_to_kind(Kind::Float)?.f_transpose(1, 2) }; // (b, h, s, d)
    let (q, k, v) = (f(q)?, f(k)?, f(v)?);
    let v_amax = f64::try_from(v.f_abs()?.f_max()?)?;
    let (dq, dk, dv) = descales(q_w_amax, k_w_amax, v_amax);
    let over = |t: &Tensor, descale: f64| -> Res<bool> {
        Ok(f64::try_from(t.f_abs()?.f_max()?)? / descale > E4M3_MAX)
    };
    let mut saturated = over(&q, dq)? || over(&k, dk)?;
    let (q8, k8, v8) = (
        through_e4m3(&q, dq)?,
        through_e4m3(&k, dk)?,
        through_e4m3(&v, dv)?,
    );
    let d = q.size()[3] as f64;
    let s = q8
        .f_matmul(&k8.f_transpose(-2, -1)?)?
        .f_mul_scalar(1.0 / d.sqrt())?;
    let m = s.f_amax([-1], true)?;
    let p = s.f_sub(&m)?.f_exp()?; // (0, 1]
    let l = p.f_sum_dim_intlist([-1].as_slice(), true, Kind::Float)?;
    let p8 = through_e4m3(&p, 1.0 / E4M3_MAX)?;
    let o = p8.f_matmul(&v8)?.f_div(&l)?;
    let descale_o = dv / O_HEADROOM;
    saturated |= over(&o, descale_o)?;
    let o8 = through_e4m3(&o, descale_o)?;
    Ok((o8.f_transpose(1, 2)?, saturated))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        f64::try_from((a - b).norm() / b.norm()).unwrap()
    }

    /// RMSNorm(x) * w then a random rotation of each pair, as Flux's q/k reach the attention.
    fn normed_rotated(x: &Tensor, w: &Tensor) -> Tensor {
        let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let y = x * (var + 1e-6).rsqrt() * w;
        let (b, s, h, d) = y.size4().unwrap();
        let pairs = y.reshape([b, s, h, d / 2, 2]);
        let theta = Tensor::rand([1, s, 1, d / 2], (Kind::Float, Device::Cpu)) * std::f64::consts::TAU;
        let (c, sn) = (theta.cos(), theta.sin());
        let (a, bb) = (pairs.select(-1, 0), pairs.select(-1, 1));
        Tensor::stack(&[&a * &c - &bb * &sn, &bb * &c + &a * &sn], -1).reshape([b, s, h, d])
    }

    #[test]
    fn the_qk_bound_holds_even_for_a_row_with_all_its_mass_in_one_channel() {
        tch::manual_seed(3);
        let w = Tensor::randn([128], (Kind::Float, Device::Cpu)) * 0.5 + 1.0;
        let x = Tensor::randn([1, 64, 4, 128], (Kind::Float, Device::Cpu));
        // Worst cases: one channel carries the row (|x_i| / rms = sqrt(128) exactly), at the
        // weight's largest entry, on both members of a rotary pair.
        let big = i64::try_from(w.abs().argmax(0, false)).unwrap();
        let _ = x.get(0).get(0).get(0).fill_(0.0);
        let _ = x.get(0).get(0).get(0).get(big).fill_(1e4);
        let y = normed_rotated(&x, &w);
        let w_amax = f64::try_from(w.abs().max()).unwrap();
        let (dq, _, _) = descales(w_amax, w_amax, 1.0);
        let peak = f64::try_from(y.abs().max()).unwrap() / dq;
        assert!(peak <= E4M3_MAX * (1.0 + 1e-5), "q / descale reaches {peak}");
        // The bound is tight for that row: the rotated pair's length is the whole range (one of
        // its two elements reaches it when the angle is a multiple of pi / 2).
        let (b, s, h, d) = y.size4().unwrap();
        let pair = y
            .reshape([b, s, h, d / 2, 2])
            .pow_tensor_scalar(2)
            .sum_dim_intlist(-1, false, Kind::Float)
            .sqrt();
        let reach = f64::try_from(pair.max()).unwrap() / dq;
        assert!(
            reach > 0.99 * E4M3_MAX && reach <= E4M3_MAX * (1.0 + 1e-5),
            "{reach}"
        );
    }

    #[test]
    fn emulated_fp8_attention_stays_within_a_few_percent_of_exact_attention_without_saturating() {
        tch::manual_seed(4);
        let (b, s, h) = (1, 96, 3);
        let opts = (Kind::Float, Device::Cpu);
        let wq = Tensor::randn([128], opts) * 0.3 + 1.0;
        let wk = Tensor::randn([128], opts) * 0.3 + 1.0;
        let q = normed_rotated(&Tensor::randn([b, s, h, 128], opts), &wq);
        let k = normed_rotated(&Tensor::randn([b, s, h, 128], opts), &wk);
        // v with outlier channels: 20x on two of them.
        let mut v = Tensor::randn([b, s, h, 128], opts);
        let mask = Tensor::ones([128], opts);
        let _ = mask.narrow(0, 5, 2).fill_(20.0);
        v *= &mask;
        let amax = |t: &Tensor| f64::try_from(t.abs().max()).unwrap();
        let (got, saturated) = reference(&q, &k, &v, amax(&wq), amax(&wk)).unwrap();
        assert!(!saturated, "a scale let a value saturate");
        let exact = Tensor::scaled_dot_product_attention(
            &q.transpose(1, 2),
            &k.transpose(1, 2),
            &v.transpose(1, 2),
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        )
        .transpose(1, 2);
        let r = rel(&got, &exact);
        // The output alone rounded to e4m3 (as the FP8 GEMM after a bf16 attention reads it,
        // per row): the floor any FP8 output has. Rounding q, k, v, the probabilities and the
        // output each cost about 2.5% here (2^-4 at most per value); together about 6%.
        let (qo, so) = super::super::fp8::quantize_rows_reference(&exact.reshape([-1, 128])).unwrap();
        let floor = rel(
            &super::super::fp8::dequantize(&qo, &so)
                .unwrap()
                .reshape(exact.size().as_slice()),
            &exact,
        );
        assert!(
            r < 0.08,
            "FP8 attention {r} from exact, output rounding alone {floor}"
        );
        assert!(
            r > floor,
            "the emulation rounded nothing but the output ({r} vs {floor})"
        );
    }

    #[test]
    fn descales_of_all_zero_ranges_are_one_and_others_map_the_bound_to_448() {
        assert_eq!(descales(0.0, 0.0, 0.0), (1.0, 1.0, 1.0));
        let (dq, dk, dv) = descales(2.0, 0.5, 896.0);
        assert!((dq * E4M3_MAX - 2.0 * QK_BOUND).abs() < 1e-9);
        assert!((dk * E4M3_MAX - 0.5 * QK_BOUND).abs() < 1e-9);
        assert_eq!(dv, 2.0);
    }
}
