//! Safe wrappers over `csrc/cublaslt_fp8_gemm.cpp`: the FP8 layers' GEMM through cuBLASLt with
//! its algorithm chosen by timing and its descriptors built once per shape.

use std::ffi::{c_char, c_int, c_void};

use tch::{TchError, Tensor};

use super::{check, take_c_string};

unsafe extern "C" {
    fn dtf_fp8_gemm_built() -> c_int;
    fn dtf_fp8_gemm(
        a: *const c_void,
        w: *const c_void,
        sa: *const c_void,
        sw: *const c_void,
        bias: *const c_void,
        out: *const c_void,
        fast_accum: c_int,
        tune: c_int,
    ) -> *mut c_char;
    fn dtf_fp8_gemm_report() -> *mut c_char;
}

/// Whether this build has the cuBLASLt FP8 GEMM (`cublasLt.h` was among the CUDA headers).
pub fn fp8_gemm_built() -> bool {
    // SAFETY: a plain call without arguments.
    unsafe { dtf_fp8_gemm_built() != 0 }
}

/// `out (m, n) bf16 = (a (m, k) e4m3 · sa) × (w (n, k) e4m3 · sw)ᵀ + bias`: per-row scales `sa`
/// (`m` fp32), per-output-channel scales `sw` (`n` fp32), `bias` (`n` bf16) in the epilogue, fp32
/// accumulation (`fast_accum`: cuBLASLt's fast mode). Row-major CUDA operands with unit column
/// stride on one device; `k` a multiple of 16. With `tune`, the first call of a shape outside
/// graph capture times every algorithm cuBLASLt's heuristic lists and keeps the fastest
/// ([`fp8_gemm_report`] says what it found); else the heuristic's first, as `_scaled_mm`.
#[allow(clippy::too_many_arguments)]
pub fn fp8_gemm(
    a: &Tensor,
    w: &Tensor,
    sa: &Tensor,
    sw: &Tensor,
    bias: Option<&Tensor>,
    out: &Tensor,
    fast_accum: bool,
    tune: bool,
) -> Result<(), TchError> {
    let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr().cast());
    // SAFETY: the pointers are live tensors (tch's `*mut C_tensor` is the shim's `at::Tensor*`)
    // or NULL for no bias; the shim checks devices, kinds, shapes, strides and alignment.
    check("cuBLASLt fp8 gemm", unsafe {
        dtf_fp8_gemm(
            a.as_ptr().cast(),
            w.as_ptr().cast(),
            sa.as_ptr().cast(),
            sw.as_ptr().cast(),
            bias,
            out.as_ptr().cast(),
            c_int::from(fast_accum),
            c_int::from(tune),
        )
    })
}

/// Every shape's algorithm timing so far, one line a shape (empty before any).
pub fn fp8_gemm_report() -> String {
    // SAFETY: a plain call; it returns a malloc'ed C string (NULL only when out of memory).
    take_c_string(unsafe { dtf_fp8_gemm_report() }).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn the_fp8_gemm_on_cpu_tensors_is_an_error_naming_the_operand_not_a_crash() {
        let a = Tensor::zeros([32, 64], (Kind::Float8e4m3fn, Device::Cpu));
        let w = Tensor::zeros([48, 64], (Kind::Float8e4m3fn, Device::Cpu));
        let sa = Tensor::ones([32], (Kind::Float, Device::Cpu));
        let sw = Tensor::ones([48], (Kind::Float, Device::Cpu));
        let out = Tensor::zeros([32, 48], (Kind::BFloat16, Device::Cpu));
        let err = fp8_gemm(&a, &w, &sa, &sw, None, &out, true, true).unwrap_err().to_string();
        assert!(err.contains("cuBLASLt fp8 gemm"), "{err}");
        if fp8_gemm_built() {
            assert!(err.contains("a must be a 2-d") && err.contains("CUDA tensor"), "{err}");
        } else {
            assert!(err.contains("no cuBLASLt FP8 GEMM"), "{err}");
        }
        assert_eq!(fp8_gemm_report(), "", "nothing was tuned");
    }
}
