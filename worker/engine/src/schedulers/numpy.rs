//! The numpy routines diffusers' schedulers compute their schedules with, reproduced bit for bit
//! (numpy 2.4 as pinned by tests/fixtures/requirements-flux-goldens.txt).
//!
//! diffusers builds sigmas and timesteps in numpy (float64 mostly, float32 where it holds the
//! train sigmas) and casts to float32 at the end; one differently rounded intermediate changes a
//! float32 bit of the result, so each routine follows numpy's own order of operations.

/// `np.linspace(start, stop, num)` in float64 (endpoint included): `arange(num) * step + start`
/// with the last element set to `stop`; `step == 0` divides first, as numpy does.
pub fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    let div = num.saturating_sub(1);
    let delta = stop - start;
    let mut y: Vec<f64> = (0..num).map(|i| i as f64).collect();
    if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            for v in &mut y {
                *v = *v / div as f64 * delta;
            }
        } else {
            for v in &mut y {
                *v *= step;
            }
        }
    } else {
        for v in &mut y {
            *v *= delta;
        }
    }
    for v in &mut y {
        *v += start;
    }
    if num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` for a float step: the length is `ceil((stop - start) / step)`,
/// the second element `start + step`, and element `i >= 2` is `start + i * (second - start)`
/// (numpy's `DOUBLE_fill`).
pub fn arange_f64(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.round` (round half to even) of a float64.
pub fn round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, xp, fp)` in float64 (numpy's compiled `arr_interp`, no `left`/`right`/`period`).
/// `xp` must be increasing.
pub fn interp(x: &[f64], xp: &[f64], fp: &[f64]) -> Vec<f64> {
    assert_eq!(xp.len(), fp.len(), "interp: xp and fp differ in length");
    assert!(!xp.is_empty(), "interp: empty xp");
    let n = xp.len();
    x.iter()
        .map(|&xv| {
            if xv.is_nan() {
                return xv;
            }
            // The j with xp[j] <= x < xp[j + 1] (numpy's binary search; its guess only speeds it up).
            if xv < xp[0] {
                return fp[0];
            }
            if xv > xp[n - 1] {
                return fp[n - 1];
            }
            let j = xp.partition_point(|&v| v <= xv) - 1;
            if j == n - 1 || xp[j] == xv {
                return fp[j];
            }
            let slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j]);
            let mut r = slope * (xv - xp[j]) + fp[j];
            if r.is_nan() {
                r = slope * (xv - xp[j + 1]) + fp[j + 1];
                if r.is_nan() && fp[j] == fp[j + 1] {
                    r = fp[j];
                }
            }
            r
        })
        .collect()
}

/// `np.log` of a float32 as numpy computes it on x86-64 CPUs with AVX2+FMA3 or AVX512F (its
/// `simd_log_FLOAT`, used for every float32 log on such CPUs, scalars included): a 5/5 rational
/// polynomial in the mantissa with fused multiply-adds, up to ~4 ulp from the true logarithm, so
/// `f32::ln` would round differently for about one value in five. (Without AVX2, numpy calls the
/// C library's `logf`; the goldens are generated on the same kind of machine as the tests run.)
/// Subnormal inputs never occur in a schedule; they take the float64 logarithm.
// The coefficients are numpy's literals (npy_simd_data.h) as written; both compilers round them
// to the nearest float32.
#[allow(clippy::excessive_precision)]
pub fn logf(x: f32) -> f32 {
    const P: [f32; 6] = [
        0.0,
        9.999_999_999_999_998_702_752e-1,
        2.112_677_543_073_053_063_722,
        1.480_000_633_576_506_585_156,
        3.808_837_741_388_407_920_751e-1,
        2.589_979_117_907_922_693_523e-2,
    ];
    const Q: [f32; 6] = [
        1.0,
        2.612_677_543_073_109_236_779,
        2.453_006_071_784_736_363_091,
        9.864_942_958_519_418_960_339e-1,
        1.546_476_374_983_906_719_538e-1,
        5.875_095_403_124_574_342_950e-3,
    ];
    if x.is_nan() {
        return f32::NAN;
    }
    if x < 0.0 {
        return -f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x == f32::INFINITY {
        return f32::INFINITY;
    }
    let bits = x.to_bits();
    let biased = ((bits >> 23) & 0xff) as i32;
    if biased == 0 {
        return (x as f64).ln() as f32;
    }
    // x = m * 2^e with m in [0.5, 1) (AVX512's getmant/getexp + 1).
    let mut m = f32::from_bits((126u32 << 23) | (bits & 0x7f_ffff));
    let mut e = (biased - 126) as f32;
    if m <= std::f32::consts::FRAC_1_SQRT_2 {
        m = m + m;
        e -= 1.0;
    }
    let r = m - 1.0;
    let mut num = P[5].mul_add(r, P[4]);
    let mut den = Q[5].mul_add(r, Q[4]);
    for k in (0..4).rev() {
        num = num.mul_add(r, P[k]);
        den = den.mul_add(r, Q[k]);
    }
    e.mul_add(std::f32::consts::LN_2, num / den)
}

/// diffusers' `_sigma_to_t`: the fractional train timestep whose log-sigma is `log(sigma)`,
/// interpolated linearly between neighbouring entries of `log_sigmas` (the float32 logs of the
/// train sigmas, increasing). The difference `low - high` is float32 arithmetic in numpy (both
/// are float32 array elements); everything else is float64.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let n = log_sigmas.len();
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of cumsum(dists >= 0): the first index at which the running count of
    // `log_sigmas[j] <= log_sigma` reaches its maximum.
    let mut count = 0usize;
    let mut best = 0usize;
    let mut best_idx = 0usize;
    for (j, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - ls as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            best_idx = j;
        }
    }
    let low_idx = best_idx.min(n - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = (low as f64 - log_sigma) / (low - high) as f64;
    let w = w.clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// diffusers' `_convert_to_karras` (rho = 7): `(max^(1/rho) + ramp * (min^(1/rho) - max^(1/rho)))^rho`
/// over `ramp = linspace(0, 1, steps)`.
pub fn karras(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_ends_exactly_at_stop_and_handles_one_point() {
        assert_eq!(linspace(0.0, 999.0, 1), vec![0.0]);
        let v = linspace(0.0, 999.0, 7);
        assert_eq!(v.len(), 7);
        assert_eq!(v[6], 999.0);
        assert_eq!(v[1], 999.0 / 6.0);
    }

    #[test]
    fn arange_length_rounds_up_a_float_step() {
        // 1000 / (1000 / 3) is not exactly 3 in float64, so numpy yields 3 or 4 elements
        // exactly as ceil() of that quotient says.
        let step = 1000.0 / 3.0;
        let v = arange_f64(1000.0, 0.0, -step);
        assert_eq!(v.len() as f64, ((0.0 - 1000.0) / -step).ceil());
        assert_eq!(v[0], 1000.0);
        assert_eq!(arange_f64(1000.0, 0.0, -100.0).len(), 10);
    }

    #[test]
    fn interp_returns_knot_values_at_knots_and_clamps_outside() {
        let xp = [0.0, 1.0, 2.0];
        let fp = [1.0, 3.0, 7.0];
        assert_eq!(
            interp(&[-1.0, 0.0, 0.5, 1.0, 1.25, 2.0, 9.0], &xp, &fp),
            vec![1.0, 1.0, 2.0, 3.0, 4.0, 7.0, 7.0]
        );
    }

    #[test]
    fn numpy_log_differs_from_correctly_rounded_log_where_numpy_does() {
        // Values checked against numpy 2.4.6's np.log(np.float32(x)) on an AVX512 CPU.
        assert_eq!(logf(2.5), 0.916_290_76);
        let x = f32::from_bits(1_093_466_022); // 10.810461
        assert_eq!(logf(x).to_bits(), 1_075_337_816);
        assert_eq!(((x as f64).ln() as f32).to_bits(), 1_075_337_817);
        assert_eq!(logf(1.0), 0.0);
        assert_eq!(logf(0.0), f32::NEG_INFINITY);
        assert!(logf(-1.0).is_nan());
    }

    #[test]
    fn round_is_half_to_even() {
        assert_eq!(round(0.5), 0.0);
        assert_eq!(round(1.5), 2.0);
        assert_eq!(round(2.5), 2.0);
    }
}
