//! Safe wrappers over `csrc/aten_shim.cpp`: ATen calls that tch 0.24 does not expose.
//!
//! - [`attention_lse`]: attention with its log-sum-exp through the fastest CUDA kernel that
//!   returns one (cuDNN, then flash, then memory-efficient; Ring attention needs the log-sum-exp);
//! - [`current_stream`]: the CUDA stream libtorch launches on for a device (NCCL is ordered on it);
//! - [`CudaGraph`]: CUDA graph capture and replay (libtorch's `at::cuda::CUDAGraph`);
//! - SDXL's fused kernels ([`group_norm`], [`geglu`]) and [`attention`] through a named kernel.
#![allow(unsafe_code)] // FFI to the shim: every unsafe block states what it relies on.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};

use tch::{TchError, Tensor};

unsafe extern "C" {
    fn dtf_free_error(err: *mut c_char);
    fn dtf_attention_lse(
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        prefer: c_int,
        out: *mut *mut c_void,
        lse: *mut *mut c_void,
        backend: *mut c_int,
    ) -> *mut c_char;
    fn dtf_has_cuda() -> c_int;
    fn dtf_current_stream(device: c_int, stream: *mut *mut c_void) -> *mut c_char;
    fn dtf_graph_new(device: c_int, out: *mut *mut c_void) -> *mut c_char;
    fn dtf_graph_free(g: *mut c_void);
    fn dtf_graph_enter(g: *mut c_void, prev: *mut *mut c_void, side: *mut *mut c_void) -> *mut c_char;
    fn dtf_graph_exit(g: *mut c_void) -> *mut c_char;
    fn dtf_graph_begin(g: *mut c_void) -> *mut c_char;
    fn dtf_graph_end(g: *mut c_void) -> *mut c_char;
    fn dtf_graph_replay(g: *mut c_void) -> *mut c_char;
    fn dtf_kernels_compile_check(arch: *const c_char) -> *mut c_char;
    fn dtf_kernels_load(device: c_int) -> *mut c_char;
    fn dtf_addmm_gelu(
        bias: *const c_void,
        mat1: *const c_void,
        mat2: *const c_void,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn dtf_empty_cache() -> *mut c_char;
    fn dtf_memory_peak(device: c_int, reset: c_int, peak: *mut i64) -> *mut c_char;
    fn dtf_qkv_norm_rope(
        qkv: *const c_void,
        q_scale: *const c_void,
        k_scale: *const c_void,
        rope: *const c_void,
        q_out: *const c_void,
        k_out: *const c_void,
        v_out: *const c_void,
        row_offset: i64,
        eps: f64,
    ) -> *mut c_char;
    fn dtf_gate_residual_ln(
        x: *const c_void,
        gate: *const c_void,
        y: *const c_void,
        scale: *const c_void,
        shift: *const c_void,
        x_out: *const c_void,
        h_out: *const c_void,
        eps: f64,
    ) -> *mut c_char;
    fn dtf_lora_add(w: *const c_void, d: *const c_void, nonfinite: *const c_void) -> *mut c_char;
    fn dtf_quant_rows_e4m3(x: *const c_void, q: *const c_void, scale: *const c_void) -> *mut c_char;
    fn dtf_gelu_quant_e4m3(
        a: *const c_void,
        m: *const c_void,
        q: *const c_void,
        scale: *const c_void,
        exact: c_int,
    ) -> *mut c_char;
    fn dtf_gate_residual_ln_fp8(
        x: *const c_void,
        gate: *const c_void,
        y: *const c_void,
        scale: *const c_void,
        shift: *const c_void,
        x_out: *const c_void,
        q_out: *const c_void,
        q_scale: *const c_void,
        eps: f64,
    ) -> *mut c_char;
    fn dtf_lse_merge(
        acc: *const c_void,
        acc_lse: *const c_void,
        o: *const c_void,
        lse: *const c_void,
        out: *const c_void,
    ) -> *mut c_char;
    fn dtf_attention(
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        which: c_int,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn dtf_sdxl_kernels_compile_check(arch: *const c_char) -> *mut c_char;
    fn dtf_sdxl_kernels_load(device: c_int) -> *mut c_char;
    fn dtf_group_norm(
        x: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        add: *const c_void,
        groups: i64,
        eps: f64,
        act: c_int,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn dtf_geglu(h: *const c_void, out: *mut *mut c_void) -> *mut c_char;
    fn dtf_bias_add(out: *const c_void, bias: *const c_void, residual: *const c_void) -> *mut c_char;
    fn dtf_add_layer_norm(
        x: *const c_void,
        y: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        eps: f64,
        x_out: *mut *mut c_void,
        h_out: *mut *mut c_void,
    ) -> *mut c_char;
    fn dtf_gelu_quant_e4m3_a8(
        a8: *const c_void,
        a8_descale: *const c_void,
        m: *const c_void,
        q: *const c_void,
        scale: *const c_void,
        exact: c_int,
    ) -> *mut c_char;
    fn dtf_attn_amax(
        qkv: *const c_void,
        q_scale: *const c_void,
        k_scale: *const c_void,
        heads: i64,
        slots: *const c_void,
    ) -> *mut c_char;
    fn dtf_qkv_norm_rope_e4m3(
        qkv: *const c_void,
        q_scale: *const c_void,
        k_scale: *const c_void,
        rope: *const c_void,
        q_out: *const c_void,
        k_out: *const c_void,
        v_out: *const c_void,
        row_offset: i64,
        eps: f64,
        slots: *const c_void,
    ) -> *mut c_char;
    fn dtf_fp8_attention_built() -> c_int;
    fn dtf_sdpa_fp8(
        q: *const c_void,
        k: *const c_void,
        v: *const c_void,
        o: *const c_void,
        slots: *const c_void,
        attn_scale: f64,
        tune: c_int,
    ) -> *mut c_char;
    fn dtf_sdpa_fp8_report() -> *mut c_char;
    fn dtf_profiler_start() -> *mut c_char;
    fn dtf_profiler_stop(path: *const c_char) -> *mut c_char;
}

/// A string the shim malloc'ed (or NULL), as an owned string; freed here.
fn take_c_string(s: *mut c_char) -> Option<String> {
    if s.is_null() {
        return None;
    }
    // SAFETY: a non-null return is a NUL-terminated string the shim malloc'ed; freed once here.
    let out = unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned();
    // SAFETY: as above.
    unsafe { dtf_free_error(s) };
    Some(out)
}

/// Turns the shim's error convention (NULL = success, else a malloc'ed message) into a result.
fn check(op: &str, err: *mut c_char) -> Result<(), TchError> {
    match take_c_string(err) {
        None => Ok(()),
        Some(msg) => Err(TchError::Torch(format!("{op}: {msg}"))),
    }
}

/// The attention kernel that produced an [`attention_lse`] result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnBackend {
    Cudnn,
    Flash,
    MemEfficient,
}

/// Which kernels [`attention_lse`] tries, fastest first (measured on H200 at (1, 24, 4608, 128)
/// bf16: cuDNN 0.40 ms, flash 0.78 ms, memory-efficient 1.58 ms).
/// cuDNN first; the benchmark switch `DITFLEET_ATTN_LSE=flash|efficient` tries another first.
fn preference() -> c_int {
    match crate::settings::bench().attn_lse.as_deref() {
        Some("flash") => 2,
        Some("efficient") => 3,
        _ => 0,
    }
}

/// CUDA attention with log-sum-exp: q `(b, h, lq, d)`, k/v `(b, h, lk, d)` on one CUDA device ->
/// output `(b, h, lq, d)` in q's kind and the log-sum-exp `(b, h, lq)` in fp32.
pub fn attention_lse(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor, AttnBackend), TchError> {
    let mut out: *mut c_void = std::ptr::null_mut();
    let mut lse: *mut c_void = std::ptr::null_mut();
    let mut backend: c_int = 0;
    // SAFETY: q/k/v are live tch tensors (their pointers are `at::Tensor*`, tch's representation);
    // on success the shim hands over two new heap `at::Tensor`s, owned by tch from here on.
    let err = unsafe {
        dtf_attention_lse(
            q.as_ptr().cast(),
            k.as_ptr().cast(),
            v.as_ptr().cast(),
            preference(),
            &mut out,
            &mut lse,
            &mut backend,
        )
    };
    check("attention with log-sum-exp", err)?;
    // SAFETY: see above: fresh, non-null tensors whose ownership passes to the returned values.
    let (o, l) = unsafe { (Tensor::from_ptr(out.cast()), Tensor::from_ptr(lse.cast())) };
    let b = match backend {
        1 => AttnBackend::Cudnn,
        2 => AttnBackend::Flash,
        _ => AttnBackend::MemEfficient,
    };
    CALLS[b as usize].fetch_add(1, Ordering::Relaxed);
    Ok((o, l, b))
}

static CALLS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];

/// How many [`attention_lse`] calls each kernel served in this process: `[cuDNN, flash,
/// memory-efficient]` (the bench reports which one Ring attention really ran on).
pub fn attention_lse_calls() -> [u64; 3] {
    [0, 1, 2].map(|i| CALLS[i].load(Ordering::Relaxed))
}

/// Whether this build has the CUDA parts of the shim (streams, graphs).
pub fn has_cuda() -> bool {
    // SAFETY: a plain query without arguments.
    unsafe { dtf_has_cuda() != 0 }
}

/// libtorch's current stream on CUDA device `ordinal` (null = the legacy default stream, also
/// what a build without CUDA returns).
pub fn current_stream(ordinal: usize) -> Result<*mut c_void, TchError> {
    let mut s: *mut c_void = std::ptr::null_mut();
    // SAFETY: `s` is a valid out-pointer.
    check("current stream", unsafe {
        dtf_current_stream(ordinal as c_int, &mut s)
    })?;
    Ok(s)
}

/// `GELU_tanh(bias + mat1 @ mat2)` on CUDA as one cuBLASLt matmul with the GELU in its epilogue
/// (ATen's `_addmm_activation`; on the CPU ATen applies the erf GELU). Not tch's own
/// `f_internal_addmm_activation`: torch-sys 0.24 binds `use_gelu` to the op's `beta` argument, so
/// that call always runs the RELU epilogue (caught by `flux_bench --check-fused` on an H200).
pub fn addmm_gelu(bias: &Tensor, mat1: &Tensor, mat2: &Tensor) -> Result<Tensor, TchError> {
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: live tch tensors borrowed for the call; on success the shim hands over a new heap
    // `at::Tensor`, owned by the returned value.
    check("addmm with GELU epilogue", unsafe {
        dtf_addmm_gelu(
            bias.as_ptr().cast(),
            mat1.as_ptr().cast(),
            mat2.as_ptr().cast(),
            &mut out,
        )
    })?;
    // SAFETY: see above.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// Returns libtorch's unused cached CUDA memory to the driver (`torch.cuda.empty_cache()`); a
/// no-op without CUDA.
pub fn empty_cache() -> Result<(), TchError> {
    // SAFETY: no arguments.
    check("empty CUDA cache", unsafe { dtf_empty_cache() })
}

/// Peak bytes allocated by libtorch on CUDA device `ordinal` since the last reset
/// (`torch.cuda.max_memory_allocated`); with `reset`, a new peak starts from the current use.
pub fn memory_peak(ordinal: usize, reset: bool) -> Result<u64, TchError> {
    let mut peak = 0i64;
    // SAFETY: `peak` is a valid out-pointer.
    check("CUDA memory peak", unsafe {
        dtf_memory_peak(ordinal as c_int, c_int::from(reset), &mut peak)
    })?;
    Ok(peak.max(0) as u64)
}

/// Compiles the fused Flux kernels (`csrc/flux_kernels.cu.inc`) with NVRTC for `arch` (e.g.
/// `sm_90`) without running them: needs NVRTC only, no GPU. The error carries NVRTC's log.
pub fn kernels_compile_check(arch: &str) -> Result<(), TchError> {
    let arch = std::ffi::CString::new(arch).map_err(|e| TchError::Torch(e.to_string()))?;
    // SAFETY: a valid NUL-terminated string for the duration of the call.
    check("fused kernels", unsafe {
        dtf_kernels_compile_check(arch.as_ptr())
    })
}

/// Whether the fused kernels are ready on CUDA device `ordinal`: compiled (NVRTC, from the torch
/// wheel beside libtorch) and loaded on first call, remembered per device. Where they cannot be
/// (no NVRTC, an old driver), this says so once in the log and the model runs its reference
/// formulations instead: a node without NVRTC is slower, not broken.
pub fn fused_kernels_available(ordinal: usize) -> bool {
    static READY: std::sync::Mutex<Vec<Option<bool>>> = std::sync::Mutex::new(Vec::new());
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    if ready.len() <= ordinal {
        ready.resize(ordinal + 1, None);
    }
    *ready[ordinal].get_or_insert_with(|| {
        // SAFETY: a plain call with an integer argument.
        match check("fused kernels", unsafe { dtf_kernels_load(ordinal as c_int) }) {
            Ok(()) => {
                tracing::info!(ordinal, "fused Flux kernels compiled and loaded");
                true
            }
            Err(e) => {
                tracing::warn!(ordinal, error = %e, "fused Flux kernels unavailable; using the reference formulations");
                false
            }
        }
    })
}

/// The fused attention-input kernel (`dtf_qkv_norm_rope`): from one stream's fused projection
/// `qkv` `(b, t, >= 3 * heads * 128)` (bf16, last dim contiguous) writes, at rows `row_offset..
/// row_offset + t` of `q_out`/`k_out`/`v_out` `(b, rows, heads, 128)` (bf16, contiguous), or
/// of `(g, b, rows, heads / g, 128)` buffers holding the heads in `g` groups (group `j` = heads
/// `j * heads / g..`: what a Ulysses all-to-all sends to peer `j`):
/// `q = RoPE(RMSNorm(q) * q_scale)`, the same for k, and `v`, in fp32 with one rounding. `rope`:
/// the `(rows, 64)` complex64 table ([`crate::flux::transformer::Rope::freqs`]). On the current
/// stream of the tensors' CUDA device; the module is compiled on first use per device.
#[allow(clippy::too_many_arguments)]
pub fn qkv_norm_rope(
    qkv: &Tensor,
    q_scale: &Tensor,
    k_scale: &Tensor,
    rope: &Tensor,
    q_out: &Tensor,
    k_out: &Tensor,
    v_out: &Tensor,
    row_offset: i64,
    eps: f64,
) -> Result<(), TchError> {
    // SAFETY: every pointer is a live tch tensor (`at::Tensor*`) borrowed for the call; the shim
    // checks devices, kinds, shapes and alignment before launching and writes only the outputs.
    check("fused qkv norm + rope", unsafe {
        dtf_qkv_norm_rope(
            qkv.as_ptr().cast(),
            q_scale.as_ptr().cast(),
            k_scale.as_ptr().cast(),
            rope.as_ptr().cast(),
            q_out.as_ptr().cast(),
            k_out.as_ptr().cast(),
            v_out.as_ptr().cast(),
            row_offset,
            eps,
        )
    })
}

/// Where [`gate_residual_ln`] writes the modulated LayerNorm `h`.
pub enum LnOut<'a> {
    /// bf16 `(b, s, n)`.
    Bf16(&'a Tensor),
    /// FP8 `q` `(b, s, n)` float8_e4m3fn with its per-row scales `scale` `(b * s)` fp32, scaled
    /// as [`quant_rows_e4m3`] scales the bf16 `h` it replaces.
    Fp8 { q: &'a Tensor, scale: &'a Tensor },
}

/// The fused gated residual + modulated LayerNorm (`dtf_gate_residual_ln`, or
/// `dtf_gate_residual_ln_fp8` for [`LnOut::Fp8`]): `x_out = x + gate * y` and
/// `h = LN(x_out) * (1 + scale) + shift` into `h`, bf16 `(b, s, n)` with `(b, 1, n)` modulation
/// chunks, on the current stream of their CUDA device.
#[allow(clippy::too_many_arguments)]
pub fn gate_residual_ln(
    x: &Tensor,
    gate: &Tensor,
    y: &Tensor,
    scale: &Tensor,
    shift: &Tensor,
    x_out: &Tensor,
    h: LnOut<'_>,
    eps: f64,
) -> Result<(), TchError> {
    let ins = [x, gate, y, scale, shift, x_out].map(|t| t.as_ptr().cast::<c_void>());
    // SAFETY: as in `qkv_norm_rope`.
    match h {
        LnOut::Bf16(h_out) => check("fused gated residual + layer norm", unsafe {
            dtf_gate_residual_ln(
                ins[0],
                ins[1],
                ins[2],
                ins[3],
                ins[4],
                ins[5],
                h_out.as_ptr().cast(),
                eps,
            )
        }),
        LnOut::Fp8 { q, scale: qs } => check("fused gated residual + layer norm (fp8 out)", unsafe {
            dtf_gate_residual_ln_fp8(
                ins[0],
                ins[1],
                ins[2],
                ins[3],
                ins[4],
                ins[5],
                q.as_ptr().cast(),
                qs.as_ptr().cast(),
                eps,
            )
        }),
    }
}

/// The LoRA merge's add in place (`dtf_lora_add`): `w = bf16(float(w) + d)` over contiguous bf16
/// `w` and fp32 `d` of one size (both 16-byte aligned: [`lora_add_fits`]), rounded as ATen's
/// `add_` rounds; any non-finite result stores 1 into `nonfinite` (one int32), on the current
/// stream of their CUDA device.
pub fn lora_add(w: &Tensor, d: &Tensor, nonfinite: &Tensor) -> Result<(), TchError> {
    // SAFETY: as in `qkv_norm_rope`.
    check("LoRA merge add", unsafe {
        dtf_lora_add(w.as_ptr().cast(), d.as_ptr().cast(), nonfinite.as_ptr().cast())
    })
}

/// Per-row FP8 quantisation in one pass (`dtf_quant_rows_e4m3`): for `x` `(rows, n)` bf16 on CUDA
/// (contiguous last dim, 16-byte aligned rows, `n % 8 == 0`) writes `scale[r] = max|x[r]| / 448`
/// (fp32, 1 for an all-zero row) and `q = e4m3fn(x / scale)` (round to nearest even, saturating)
/// into `q` `(rows, n)` float8_e4m3fn and `scale` `(rows)`, on the current stream.
pub fn quant_rows_e4m3(x: &Tensor, q: &Tensor, scale: &Tensor) -> Result<(), TchError> {
    // SAFETY: as in `qkv_norm_rope`.
    check("fp8 row quantisation", unsafe {
        dtf_quant_rows_e4m3(x.as_ptr().cast(), q.as_ptr().cast(), scale.as_ptr().cast())
    })
}

/// What precedes the GELU values in each row [`gelu_quant_e4m3`] quantises.
pub enum GeluPrefix<'a> {
    /// Nothing: the row is the GELU alone (a plain MLP-out).
    None,
    /// bf16 `(rows, na)` with 16-byte aligned rows, `na % 8 == 0` (a single block's attention
    /// output beside its MLP activation).
    Bf16(&'a Tensor),
    /// float8_e4m3fn `(rows, na)` (8-byte aligned rows, `na % 8 == 0`) standing for
    /// `q * descale[0]` (the FP8 attention's output and its per-tensor descale, fp32 on the
    /// device), taken as the exact product.
    Fp8 { q: &'a Tensor, descale: &'a Tensor },
}

/// The FP8 input of a GEMM after a GELU in one pass (`dtf_gelu_quant_e4m3`): rows
/// `[prefix | GELU_tanh(m)]` (each GELU value rounded to bf16) quantised per row into `q`
/// `(rows, na + nm)` float8_e4m3fn and `scale` `(rows)` fp32. `m`: bf16 `(rows, nm)` with
/// 16-byte aligned rows and `nm % 8 == 0`, on the current stream of its CUDA device. `exact`:
/// the GELU's tanh as ATen computes it (`tanhf`); else its sigmoid form with the hardware exp,
/// a few fp32 ulp away (the bf16 values it rounds to differ in a few per million).
pub fn gelu_quant_e4m3(
    prefix: GeluPrefix<'_>,
    m: &Tensor,
    q: &Tensor,
    scale: &Tensor,
    exact: bool,
) -> Result<(), TchError> {
    let (m, q, scale) = (m.as_ptr().cast(), q.as_ptr().cast(), scale.as_ptr().cast());
    let exact = c_int::from(exact);
    // SAFETY: as in `qkv_norm_rope`; a null prefix is the kernel's documented "no prefix".
    check("fp8 GELU quantisation", unsafe {
        match prefix {
            GeluPrefix::None => dtf_gelu_quant_e4m3(std::ptr::null(), m, q, scale, exact),
            GeluPrefix::Bf16(a) => dtf_gelu_quant_e4m3(a.as_ptr().cast(), m, q, scale, exact),
            GeluPrefix::Fp8 { q: a8, descale } => {
                dtf_gelu_quant_e4m3_a8(a8.as_ptr().cast(), descale.as_ptr().cast(), m, q, scale, exact)
            }
        }
    })
}

/// The FP8 attention's ranges of one stream (`dtf_attn_amax`): max|v| over the v columns of `qkv`
/// `(b, t, >= 3 * heads * 128)` bf16 and max|w| of the q/k RMSNorm weights (`(128)` bf16),
/// accumulated into `slots` (fp32 `(48)`, zeroed before an attention's first stream).
pub fn attn_amax(
    qkv: &Tensor,
    q_scale: &Tensor,
    k_scale: &Tensor,
    heads: i64,
    slots: &Tensor,
) -> Result<(), TchError> {
    // SAFETY: as in `qkv_norm_rope`; the shim checks the slots tensor's kind, size and device.
    check("fp8 attention ranges", unsafe {
        dtf_attn_amax(
            qkv.as_ptr().cast(),
            q_scale.as_ptr().cast(),
            k_scale.as_ptr().cast(),
            heads,
            slots.as_ptr().cast(),
        )
    })
}

/// [`qkv_norm_rope`] with FP8 outputs (`dtf_qkv_norm_rope_e4m3`): q, k, v `(b, rows, heads, 128)`
/// float8_e4m3fn, each scaled by its per-tensor descale from the ranges [`attn_amax`] gathered in
/// `slots` (which it also writes: cuDNN's descales and the output's scale).
#[allow(clippy::too_many_arguments)]
pub fn qkv_norm_rope_e4m3(
    qkv: &Tensor,
    q_scale: &Tensor,
    k_scale: &Tensor,
    rope: &Tensor,
    (q_out, k_out, v_out): (&Tensor, &Tensor, &Tensor),
    row_offset: i64,
    eps: f64,
    slots: &Tensor,
) -> Result<(), TchError> {
    // SAFETY: as in `qkv_norm_rope`.
    check("fused qkv norm + rope (fp8)", unsafe {
        dtf_qkv_norm_rope_e4m3(
            qkv.as_ptr().cast(),
            q_scale.as_ptr().cast(),
            k_scale.as_ptr().cast(),
            rope.as_ptr().cast(),
            q_out.as_ptr().cast(),
            k_out.as_ptr().cast(),
            v_out.as_ptr().cast(),
            row_offset,
            eps,
            slots.as_ptr().cast(),
        )
    })
}

/// Whether this build has cuDNN's FP8 attention (the cudnn-frontend headers were found).
pub fn fp8_attention_built() -> bool {
    // SAFETY: a plain call without arguments.
    unsafe { dtf_fp8_attention_built() != 0 }
}

/// cuDNN's FP8 attention (`csrc/cudnn_fp8_attention.cpp`): `o = softmax(attn_scale q k^T) v` over
/// float8_e4m3fn `(b, s, heads, 128)` operands with per-tensor descales in `slots` (see
/// [`qkv_norm_rope_e4m3`]); `o` is written scaled by the slots' output scale. With `tune`, the
/// first call of a shape outside graph capture times every execution plan cuDNN offers for it
/// and keeps the fastest ([`sdpa_fp8_report`] says what it found); else heuristics' first.
pub fn sdpa_fp8(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    slots: &Tensor,
    attn_scale: f64,
    tune: bool,
) -> Result<(), TchError> {
    // SAFETY: as in `qkv_norm_rope`; the shim checks kinds, shapes, strides and alignment.
    check("cuDNN fp8 attention", unsafe {
        dtf_sdpa_fp8(
            q.as_ptr().cast(),
            k.as_ptr().cast(),
            v.as_ptr().cast(),
            o.as_ptr().cast(),
            slots.as_ptr().cast(),
            attn_scale,
            c_int::from(tune),
        )
    })
}

/// What the FP8 attention's last plan tuning timed and chose (empty before any).
pub fn sdpa_fp8_report() -> String {
    // SAFETY: a plain call; it returns a malloc'ed C string (NULL only when out of memory).
    take_c_string(unsafe { dtf_sdpa_fp8_report() }).unwrap_or_default()
}

/// Whether `t`'s data starts on a 16-byte boundary (what the fused kernels' 16-byte loads need).
pub fn aligned16(t: &Tensor) -> bool {
    (t.data_ptr() as usize).is_multiple_of(16)
}

/// Whether [`lora_add`] takes `w` and `d`: contiguous bf16 and fp32 of one size on one CUDA
/// device whose fused kernels are loaded, both 16-byte aligned.
pub fn lora_add_fits(w: &Tensor, d: &Tensor) -> bool {
    let tch::Device::Cuda(i) = w.device() else {
        return false;
    };
    w.kind() == tch::Kind::BFloat16
        && d.kind() == tch::Kind::Float
        && d.device() == w.device()
        && w.is_contiguous()
        && d.is_contiguous()
        && w.numel() == d.numel()
        && aligned16(w)
        && aligned16(d)
        && fused_kernels_available(i)
}

/// Ring attention's log-sum-exp merge in one pass (`dtf_lse_merge`): the partial attention `acc`
/// `(b, h, L, 128)` (fp32 or bf16) with its log-sum-exp `acc_lse` `(b, h, L)` (fp32) absorbs the
/// partial attention `o` (bf16, same shape) with its `lse`; the result goes to `out` (fp32 or bf16,
/// `acc` itself for an in-place merge) and `acc_lse` is updated in place, on the current stream of
/// their CUDA device.
pub fn lse_merge(
    acc: &Tensor,
    acc_lse: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    out: &Tensor,
) -> Result<(), TchError> {
    // SAFETY: as in `qkv_norm_rope`.
    check("fused log-sum-exp merge", unsafe {
        dtf_lse_merge(
            acc.as_ptr().cast(),
            acc_lse.as_ptr().cast(),
            o.as_ptr().cast(),
            lse.as_ptr().cast(),
            out.as_ptr().cast(),
        )
    })
}

/// The attention kernel a model's attention runs on. `Sdpa` lets ATen's
/// `scaled_dot_product_attention` pick (flash, memory-efficient, cuDNN or math, by its own
/// priorities and the inputs); the others call that kernel by name (CUDA only), for A/B runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttnKernel {
    #[default]
    Sdpa,
    Cudnn,
    Flash,
    Efficient,
}

impl AttnKernel {
    /// `sdpa`, `cudnn`, `flash` or `efficient`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "sdpa" => Self::Sdpa,
            "cudnn" => Self::Cudnn,
            "flash" => Self::Flash,
            "efficient" => Self::Efficient,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Sdpa => "sdpa",
            Self::Cudnn => "cudnn",
            Self::Flash => "flash",
            Self::Efficient => "efficient",
        }
    }
}

/// Attention of q `(b, h, lq, d)` over k/v `(b, h, lk, d)` (no mask, default scale) through
/// `kernel`; off CUDA every kernel is ATen's `scaled_dot_product_attention`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, kernel: AttnKernel) -> Result<Tensor, TchError> {
    let which = match kernel {
        AttnKernel::Cudnn => 1,
        AttnKernel::Flash => 2,
        AttnKernel::Efficient => 3,
        AttnKernel::Sdpa => 0,
    };
    if which == 0 || !q.device().is_cuda() {
        return crate::nn::sdpa(q, k, v, None, false, None);
    }
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: live tch tensors borrowed for the call; on success the shim hands over a new heap
    // `at::Tensor`, owned by the returned value.
    check(&format!("{} attention", kernel.name()), unsafe {
        dtf_attention(
            q.as_ptr().cast(),
            k.as_ptr().cast(),
            v.as_ptr().cast(),
            which,
            &mut out,
        )
    })?;
    // SAFETY: see above.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// Compiles SDXL's fused kernels (`csrc/sdxl_kernels.cu.inc`) with NVRTC for `arch` without
/// running them (NVRTC only, no GPU).
pub fn sdxl_kernels_compile_check(arch: &str) -> Result<(), TchError> {
    let arch = std::ffi::CString::new(arch).map_err(|e| TchError::Torch(e.to_string()))?;
    // SAFETY: a valid NUL-terminated string for the duration of the call.
    check("sdxl kernels", unsafe {
        dtf_sdxl_kernels_compile_check(arch.as_ptr())
    })
}

/// Whether SDXL's fused kernels are ready on CUDA device `ordinal` (compiled and loaded on first
/// call, remembered per device); where they cannot be, the log says so once and the models run
/// ATen's ops instead.
pub fn sdxl_kernels_available(ordinal: usize) -> bool {
    static READY: std::sync::Mutex<Vec<Option<bool>>> = std::sync::Mutex::new(Vec::new());
    let mut ready = READY.lock().unwrap_or_else(|e| e.into_inner());
    if ready.len() <= ordinal {
        ready.resize(ordinal + 1, None);
    }
    *ready[ordinal].get_or_insert_with(|| {
        // SAFETY: a plain call with an integer argument.
        match check("sdxl kernels", unsafe { dtf_sdxl_kernels_load(ordinal as c_int) }) {
            Ok(()) => {
                tracing::info!(ordinal, "fused SDXL kernels compiled and loaded");
                true
            }
            Err(e) => {
                tracing::warn!(ordinal, error = %e, "fused SDXL kernels unavailable; using ATen's ops");
                false
            }
        }
    })
}

/// `GroupNorm(x + add)` with affine `weight`/`bias` `(c)`, then SiLU when `silu`, in one
/// statistics pass and one normalising pass (`dtf_gn_stats`, `dtf_gn_apply`): `x` `(b, c, h, w)`
/// bf16 on CUDA, dense in NCHW or channels-last layout (the output keeps it); `add` `(b, c)`
/// bf16 is added to every pixel of its channel first (a resnet's time embedding). Moments in
/// fp32, one bf16 rounding of the output.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    add: Option<&Tensor>,
    groups: i64,
    eps: f64,
    silu: bool,
) -> Result<Tensor, TchError> {
    let mut out: *mut c_void = std::ptr::null_mut();
    let add_ptr = add.map_or(std::ptr::null(), |a| a.as_ptr().cast());
    // SAFETY: live tch tensors (or null for `add`) borrowed for the call; the shim checks devices,
    // kinds, shapes and layouts before launching and hands over a new heap `at::Tensor`.
    check("fused group norm", unsafe {
        dtf_group_norm(
            x.as_ptr().cast(),
            weight.as_ptr().cast(),
            bias.as_ptr().cast(),
            add_ptr,
            groups,
            eps,
            c_int::from(silu),
            &mut out,
        )
    })?;
    // SAFETY: see above.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// GEGLU `h[..., :n] * gelu(h[..., n:])` (exact GELU) of `h` `(..., 2n)` bf16 on CUDA with
/// contiguous rows, in one pass (`dtf_geglu`).
pub fn geglu(h: &Tensor) -> Result<Tensor, TchError> {
    let mut out: *mut c_void = std::ptr::null_mut();
    // SAFETY: as in `group_norm`.
    check("fused geglu", unsafe { dtf_geglu(h.as_ptr().cast(), &mut out) })?;
    // SAFETY: see above.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

/// A convolution's bias (and optionally its residual) added in place into its output in one pass
/// (`dtf_bias_add`): `out = bf16(out + bias[c])`, then `out = bf16(out + residual)`, the roundings
/// of ATen's separate adds. `out` `(b, c, h, w)` bf16 channels-last on CUDA (`c % 8 == 0`),
/// `residual` of its shape and layout.
pub fn bias_add(out: &Tensor, bias: &Tensor, residual: Option<&Tensor>) -> Result<(), TchError> {
    let res = residual.map_or(std::ptr::null(), |r| r.as_ptr().cast());
    // SAFETY: as in `qkv_norm_rope`.
    check("fused conv bias add", unsafe {
        dtf_bias_add(out.as_ptr().cast(), bias.as_ptr().cast(), res)
    })
}

/// A residual add and the LayerNorm of its result in one pass (`dtf_add_layer_norm`): returns
/// `(x + y, LayerNorm(x + y) * weight + bias)` over the last dim, `x`/`y` contiguous bf16 of one
/// shape on CUDA (width a multiple of 8, at most 8192), `weight`/`bias` bf16; the sum rounded to
/// bf16 as ATen's add rounds it, the statistics in fp32 over the rounded sum.
pub fn add_layer_norm(
    x: &Tensor,
    y: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor), TchError> {
    let (mut xo, mut h): (*mut c_void, *mut c_void) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: as in `group_norm`; both outputs are handed over together, only on success.
    check("fused add + layer norm", unsafe {
        dtf_add_layer_norm(
            x.as_ptr().cast(),
            y.as_ptr().cast(),
            weight.as_ptr().cast(),
            bias.as_ptr().cast(),
            eps,
            &mut xo,
            &mut h,
        )
    })?;
    // SAFETY: see above.
    Ok(unsafe { (Tensor::from_ptr(xo.cast()), Tensor::from_ptr(h.cast())) })
}

/// Starts libtorch's kineto profiler (CPU ops and CUDA kernels, as `torch.profiler` records
/// them) for this process.
pub fn profiler_start() -> Result<(), TchError> {
    // SAFETY: no arguments.
    check("profiler start", unsafe { dtf_profiler_start() })
}

/// Stops the profiler and writes its Chrome trace (JSON) to `path`.
pub fn profiler_stop(path: &std::path::Path) -> Result<(), TchError> {
    let p = std::ffi::CString::new(path.to_string_lossy().as_bytes())
        .map_err(|e| TchError::Torch(e.to_string()))?;
    // SAFETY: a valid NUL-terminated string for the duration of the call.
    check("profiler stop", unsafe { dtf_profiler_stop(p.as_ptr()) })
}

/// Makes `later` wait (on the GPU) for the work enqueued on `earlier` so far, through an event
/// (the CUDA driver API, as cudarc exposes it; streams are the runtime's `cudaStream_t`s).
fn order(earlier: *mut c_void, later: *mut c_void) -> Result<(), TchError> {
    use cudarc::driver::result::{event, stream};
    use cudarc::driver::sys::{CUevent_flags, CUevent_wait_flags};
    let err = |e: cudarc::driver::DriverError| TchError::Torch(format!("stream ordering: {e}"));
    let ev = event::create(CUevent_flags::CU_EVENT_DISABLE_TIMING).map_err(err)?;
    // SAFETY: both streams belong to the current device's primary context (libtorch's); the
    // event is destroyed after the wait is enqueued (CUDA defers its release until then).
    unsafe {
        let r = event::record(ev, earlier.cast())
            .and_then(|_| stream::wait_event(later.cast(), ev, CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT));
        let _ = event::destroy(ev);
        r.map_err(err)
    }
}

/// A CUDA graph of one device. Use: [`CudaGraph::enter`] (a side stream becomes current), warm up,
/// [`CudaGraph::begin`], run the work to capture, [`CudaGraph::end`], [`CudaGraph::exit`]; then
/// [`CudaGraph::replay`] relaunches exactly the captured kernels on the same memory. Tensors the
/// captured work reads or writes must stay alive (and at the same address) as long as the graph.
pub struct CudaGraph {
    raw: *mut c_void,
    entered: bool,
    /// `(previous, side)` streams while entered.
    streams: Option<(*mut c_void, *mut c_void)>,
}

// SAFETY: the graph is created, used and dropped by the one rank thread that owns it (moving it
// between threads is fine: CUDA graphs are not bound to a host thread).
unsafe impl Send for CudaGraph {}

impl std::fmt::Debug for CudaGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaGraph({:p})", self.raw)
    }
}

impl CudaGraph {
    pub fn new(ordinal: usize) -> Result<Self, TchError> {
        let mut raw: *mut c_void = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer; on success it holds a new graph freed in Drop.
        check("cuda graph", unsafe { dtf_graph_new(ordinal as c_int, &mut raw) })?;
        Ok(Self {
            raw,
            entered: false,
            streams: None,
        })
    }

    /// Makes the graph's side stream current (ordered after the work enqueued so far).
    pub fn enter(&mut self) -> Result<(), TchError> {
        let (mut prev, mut side) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: `raw` is a live graph from `dtf_graph_new`; the out-pointers are valid.
        check("cuda graph enter", unsafe {
            dtf_graph_enter(self.raw, &mut prev, &mut side)
        })?;
        self.entered = true;
        self.streams = Some((prev, side));
        order(prev, side)
    }

    /// Restores the previous stream, ordered after the side stream's work.
    pub fn exit(&mut self) -> Result<(), TchError> {
        if !self.entered {
            return Ok(());
        }
        self.entered = false;
        // SAFETY: as in `enter`.
        check("cuda graph exit", unsafe { dtf_graph_exit(self.raw) })?;
        match self.streams.take() {
            Some((prev, side)) => order(side, prev),
            None => Ok(()),
        }
    }

    pub fn begin(&mut self) -> Result<(), TchError> {
        // SAFETY: as in `enter`.
        check("cuda graph capture begin", unsafe { dtf_graph_begin(self.raw) })
    }

    pub fn end(&mut self) -> Result<(), TchError> {
        // SAFETY: as in `enter`.
        check("cuda graph capture end", unsafe { dtf_graph_end(self.raw) })
    }

    pub fn replay(&self) -> Result<(), TchError> {
        // SAFETY: as in `enter`.
        check("cuda graph replay", unsafe { dtf_graph_replay(self.raw) })
    }
}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        let _ = self.exit();
        // SAFETY: created by `dtf_graph_new`, freed exactly once.
        unsafe { dtf_graph_free(self.raw) };
    }
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind};

    use super::*;

    #[test]
    fn the_engine_is_built_with_the_cuda_parts_of_the_shim() {
        // The GPU binaries are built on this kind of machine: without CUDA headers at build time
        // they would silently lose CUDA graphs and the stream-aware NCCL ordering.
        assert!(
            has_cuda(),
            "csrc/aten_shim.cpp was compiled without DTF_WITH_CUDA"
        );
    }

    #[test]
    fn cuda_attention_on_cpu_tensors_is_an_error_naming_every_kernel_tried() {
        let q = Tensor::randn([1, 2, 8, 16], (Kind::Float, Device::Cpu));
        let err = attention_lse(&q, &q, &q).unwrap_err().to_string();
        for kernel in ["cuDNN", "flash", "memory-efficient"] {
            assert!(err.contains(kernel), "{kernel} missing from: {err}");
        }
    }

    #[test]
    fn the_fused_flux_kernels_compile_with_nvrtc_for_hopper_and_ampere() {
        // NVRTC ships in the torch wheel, so this runs on the CPU machine: a syntax or type error
        // in csrc/flux_kernels.cu.inc fails here, not on the first GPU job.
        for arch in ["sm_90", "sm_80"] {
            kernels_compile_check(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        }
    }

    #[test]
    fn the_fused_sdxl_kernels_compile_with_nvrtc_for_hopper_and_ampere() {
        for arch in ["sm_90", "sm_80"] {
            sdxl_kernels_compile_check(arch).unwrap_or_else(|e| panic!("{arch}: {e}"));
        }
    }

    #[test]
    fn attention_through_a_named_kernel_off_cuda_is_scaled_dot_product_attention() {
        let q = Tensor::randn([1, 2, 8, 16], (Kind::Float, Device::Cpu));
        let k = Tensor::randn([1, 2, 5, 16], (Kind::Float, Device::Cpu));
        let want = crate::nn::sdpa(&q, &k, &k, None, false, None).unwrap();
        for kernel in [
            AttnKernel::Sdpa,
            AttnKernel::Cudnn,
            AttnKernel::Flash,
            AttnKernel::Efficient,
        ] {
            assert!(attention(&q, &k, &k, kernel).unwrap().equal(&want), "{kernel:?}");
            assert_eq!(AttnKernel::parse(kernel.name()), Some(kernel));
        }
    }

    #[test]
    fn the_fused_sdxl_ops_on_cpu_tensors_are_errors_not_crashes() {
        let x = Tensor::randn([1, 8, 4, 4], (Kind::BFloat16, Device::Cpu));
        let w = Tensor::ones([8], (Kind::BFloat16, Device::Cpu));
        assert!(group_norm(&x, &w, &w, None, 2, 1e-5, true).is_err());
        assert!(geglu(&x).is_err());
    }

    #[test]
    fn addmm_gelu_applies_a_gelu_not_the_relu_of_tchs_binding() {
        // On the CPU ATen's op applies the erf GELU: check it is a GELU of bias + x W^T (negative
        // pre-activations stay slightly negative, where a RELU gives 0).
        let x = Tensor::randn([8, 16], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([12, 16], (Kind::Float, Device::Cpu));
        let b = Tensor::randn([12], (Kind::Float, Device::Cpu));
        let got = addmm_gelu(&b, &x, &w.tr()).unwrap();
        let want = x.linear(&w, Some(&b)).gelu("none");
        let err = f64::try_from((&got - &want).abs().max()).unwrap();
        assert!(err < 1e-4, "max abs diff {err}");
        assert!(
            f64::try_from(got.min()).unwrap() < 0.0,
            "no negative outputs: a RELU"
        );
        // Why the shim exists: tch's own binding passes `use_gelu` as `beta` and runs a RELU.
        let tch_op = b.internal_addmm_activation(&x, &w.tr(), true);
        let relu = x.linear(&w, Some(&b)).relu();
        assert!(
            f64::try_from((&tch_op - &relu).abs().max()).unwrap() < 1e-4,
            "tch's _addmm_activation binding no longer runs a RELU for use_gelu = true: \
             it may be fixed, and ditfleet_engine::aten::addmm_gelu could go"
        );
    }

    #[test]
    fn a_cuda_graph_without_a_gpu_is_an_error_not_a_crash() {
        if tch::Cuda::is_available() {
            return; // the point is the missing device
        }
        let err = CudaGraph::new(0).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("cuda graph"), "{err}");
    }
}
