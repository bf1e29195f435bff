// ATen calls that tch 0.24 does not expose, behind a small C ABI (see src/aten.rs).
//
// - attention with its log-sum-exp on CUDA through the fastest kernel that returns one (cuDNN,
//   then flash, then memory-efficient): Ring attention merges blocks by their log-sum-exp;
// - the current CUDA stream of a device (NCCL work is ordered on it);
// - CUDA graph capture and replay (at::cuda::CUDAGraph) on a side stream of libtorch's pool.
//
// Every function catches C++ exceptions and returns them as a malloc'ed message (NULL = success);
// the caller frees it with dtf_free_error. Tensors cross the boundary as `at::Tensor*`, the
// representation tch's C API uses for its tensors (torch-sys: `typedef torch::Tensor *tensor`).

#include <ATen/ATen.h>

#include "dtf_guarded.h"
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#ifdef DTF_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dlfcn.h>
#include <nvrtc.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <vector>
#endif

namespace {

using dtf::dup_error;
using dtf::guarded;

// Log-sum-exp as (b, h, lq) fp32 whatever layout the kernel returned it in (cuDNN: (b, h, lq, 1);
// memory-efficient: sequence padded to a multiple of 32).
at::Tensor lse_bhl(const at::Tensor &lse, int64_t lq) {
  at::Tensor l = lse;
  if (l.dim() == 4) {
    l = l.squeeze(-1);
  }
  return l.narrow(2, 0, lq).to(at::kFloat);
}

} // namespace

extern "C" {

void dtf_free_error(char *err) { std::free(err); }

// q (b, h, lq, d), k/v (b, h, lk, d) on one CUDA device -> out (b, h, lq, d) in q's dtype and
// lse (b, h, lq) fp32. `backend` receives 1 = cuDNN, 2 = flash, 3 = memory-efficient.
// `prefer`: 0 = cuDNN first; 2 = flash first; 3 = memory-efficient only.
char *dtf_attention_lse(const at::Tensor *q, const at::Tensor *k, const at::Tensor *v, int prefer,
                        at::Tensor **out, at::Tensor **lse, int *backend) {
  return guarded([&] {
    const int64_t lq = q->size(2);
    std::string errors;
    auto done = [&](const at::Tensor &o, const at::Tensor &l, int b) {
      *out = new at::Tensor(o);
      *lse = new at::Tensor(lse_bhl(l, lq));
      *backend = b;
    };
    if (prefer == 0) {
      try {
        auto r = at::_scaled_dot_product_cudnn_attention(*q, *k, *v, std::nullopt, true, 0.0,
                                                         false, false, std::nullopt);
        done(std::get<0>(r), std::get<1>(r), 1);
        return;
      } catch (const std::exception &e) {
        errors += std::string("cuDNN: ") + e.what() + "; ";
      }
    }
    if (prefer <= 2) {
      try {
        auto r = at::_scaled_dot_product_flash_attention(*q, *k, *v, 0.0, false, false,
                                                         std::nullopt);
        done(std::get<0>(r), std::get<1>(r), 2);
        return;
      } catch (const std::exception &e) {
        errors += std::string("flash: ") + e.what() + "; ";
      }
    }
    try {
      auto r = at::_scaled_dot_product_efficient_attention(*q, *k, *v, std::nullopt, true, 0.0,
                                                           false, std::nullopt);
      done(std::get<0>(r), std::get<1>(r), 3);
    } catch (const std::exception &e) {
      throw std::runtime_error(errors + "memory-efficient: " + e.what());
    }
  });
}

// bias + mat1 @ mat2 with the tanh GELU applied, through ATen's _addmm_activation (on CUDA the
// GELU runs in cuBLASLt's epilogue; on the CPU it is the erf GELU). tch 0.24's generated binding
// of this op passes `use_gelu` positionally into `beta` and so always runs the RELU epilogue:
// hence this call with every argument named.
char *dtf_addmm_gelu(const at::Tensor *bias, const at::Tensor *mat1, const at::Tensor *mat2,
                     at::Tensor **out) {
  return guarded([&] {
    *out = new at::Tensor(at::_addmm_activation(*bias, *mat1, *mat2, /*beta=*/1, /*alpha=*/1,
                                                /*use_gelu=*/true));
  });
}

#ifdef DTF_WITH_CUDA

int dtf_has_cuda(void) { return 1; }

// Returns the unused cached blocks of libtorch's CUDA allocator to the driver (what
// torch.cuda.empty_cache() does), e.g. after the text encoders are dropped.
char *dtf_empty_cache(void) {
  return guarded([&] { c10::cuda::CUDACachingAllocator::emptyCache(); });
}

// The peak of bytes allocated through libtorch's caching allocator on `device` since the last
// reset (torch.cuda.max_memory_allocated); with `reset`, starts a new peak from the current use.
char *dtf_memory_peak(int device, int reset, int64_t *peak) {
  return guarded([&] {
    const auto d = static_cast<c10::DeviceIndex>(device);
    // The caching allocator sets up its per-device state on the first CUDA allocation; asked
    // before it, it answers "Invalid device argument". One empty allocation makes it ready.
    (void)at::empty({0}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, d));
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(d);
    *peak = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
    if (reset != 0) {
      c10::cuda::CUDACachingAllocator::resetPeakStats(d);
    }
  });
}

// The current stream of CUDA device `device` (the legacy default stream unless a stream guard or
// a capture changed it) as a cudaStream_t.
char *dtf_current_stream(int device, void **stream) {
  return guarded([&] {
    *stream = static_cast<void *>(c10::cuda::getCurrentCUDAStream(device).stream());
  });
}

} // extern "C"

// ---- Fused kernels (csrc/flux_kernels.cu.inc), compiled at run time with NVRTC ----------------
//
// NVRTC and the driver are opened with dlopen (NVRTC from the torch wheel's nvidia/cu13/lib beside
// libtorch, the driver from the system), so the engine links neither and a CPU machine without
// them still loads it. Each device's module is compiled once (for its exact sm_XY) and cached.

namespace {

const char *kKernelSource =
#include "flux_kernels.cu.inc"
    ;

const char *kSdxlKernelSource =
#include "sdxl_kernels.cu.inc"
    ;

struct Nvrtc {
  nvrtcResult (*create)(nvrtcProgram *, const char *, const char *, int, const char *const *,
                        const char *const *) = nullptr;
  nvrtcResult (*compile)(nvrtcProgram, int, const char *const *) = nullptr;
  nvrtcResult (*log_size)(nvrtcProgram, size_t *) = nullptr;
  nvrtcResult (*log)(nvrtcProgram, char *) = nullptr;
  nvrtcResult (*cubin_size)(nvrtcProgram, size_t *) = nullptr;
  nvrtcResult (*cubin)(nvrtcProgram, char *) = nullptr;
  nvrtcResult (*destroy)(nvrtcProgram *) = nullptr;
  const char *(*error)(nvrtcResult) = nullptr;
  std::string load_error;
};

struct Driver {
  CUresult (*module_load)(CUmodule *, const void *) = nullptr;
  CUresult (*get_function)(CUfunction *, CUmodule, const char *) = nullptr;
  CUresult (*launch)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                     unsigned, CUstream, void **, void **) = nullptr;
  CUresult (*ctx_get)(CUcontext *) = nullptr;
  CUresult (*ctx_set)(CUcontext) = nullptr;
  CUresult (*primary_retain)(CUcontext *, CUdevice) = nullptr;
  CUresult (*device_get)(CUdevice *, int) = nullptr;
  CUresult (*attribute)(int *, CUdevice_attribute, CUdevice) = nullptr;
  CUresult (*ctx_get_device)(CUdevice *) = nullptr;
  CUresult (*error)(CUresult, const char **) = nullptr;
  std::string load_error;
};

template <typename T> void sym(void *lib, const char *name, T &out, std::string &err) {
  out = reinterpret_cast<T>(dlsym(lib, name));
  if (out == nullptr) {
    err += std::string("missing symbol ") + name + "; ";
  }
}

// The directory of the libtorch shared objects (where libc10_cuda.so was loaded from).
std::string torch_lib_dir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void *>(&c10::cuda::getCurrentCUDAStream), &info) == 0 ||
      info.dli_fname == nullptr) {
    return "";
  }
  std::string p(info.dli_fname);
  auto slash = p.rfind('/');
  return slash == std::string::npos ? "" : p.substr(0, slash);
}

const Nvrtc &nvrtc() {
  static Nvrtc api = [] {
    Nvrtc a;
    std::vector<std::string> candidates;
    const std::string dir = torch_lib_dir();
    if (!dir.empty()) {
      candidates.push_back(dir + "/../../nvidia/cu13/lib/libnvrtc.so.13");
      candidates.push_back(dir + "/../../nvidia/cuda_nvrtc/lib/libnvrtc.so.13");
    }
    candidates.push_back("libnvrtc.so.13");
    candidates.push_back("libnvrtc.so");
    void *lib = nullptr;
    for (const auto &c : candidates) {
      lib = dlopen(c.c_str(), RTLD_NOW | RTLD_GLOBAL);
      if (lib != nullptr) {
        // NVRTC opens its builtins library by name at compile time; that name only resolves if
        // it is already loaded or on the loader's path, so load it from beside libnvrtc first.
        const auto slash = c.rfind('/');
        if (slash != std::string::npos) {
          for (const char *b : {"libnvrtc-builtins.so.13.0", "libnvrtc-builtins.so.13.1",
                                "libnvrtc-builtins.so.13.2", "libnvrtc-builtins.so"}) {
            if (dlopen((c.substr(0, slash + 1) + b).c_str(), RTLD_NOW | RTLD_GLOBAL) != nullptr) {
              break;
            }
          }
        }
        break;
      }
    }
    if (lib == nullptr) {
      a.load_error = "NVRTC not found (tried the torch wheel's nvidia/cu13/lib and libnvrtc.so.13)";
      return a;
    }
    sym(lib, "nvrtcCreateProgram", a.create, a.load_error);
    sym(lib, "nvrtcCompileProgram", a.compile, a.load_error);
    sym(lib, "nvrtcGetProgramLogSize", a.log_size, a.load_error);
    sym(lib, "nvrtcGetProgramLog", a.log, a.load_error);
    sym(lib, "nvrtcGetCUBINSize", a.cubin_size, a.load_error);
    sym(lib, "nvrtcGetCUBIN", a.cubin, a.load_error);
    sym(lib, "nvrtcDestroyProgram", a.destroy, a.load_error);
    sym(lib, "nvrtcGetErrorString", a.error, a.load_error);
    return a;
  }();
  if (!api.load_error.empty()) {
    throw std::runtime_error(api.load_error);
  }
  return api;
}

const Driver &driver() {
  static Driver api = [] {
    Driver a;
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    if (lib == nullptr) {
      a.load_error = "the CUDA driver (libcuda.so.1) is not loadable";
      return a;
    }
    sym(lib, "cuModuleLoadData", a.module_load, a.load_error);
    sym(lib, "cuModuleGetFunction", a.get_function, a.load_error);
    sym(lib, "cuLaunchKernel", a.launch, a.load_error);
    sym(lib, "cuCtxGetCurrent", a.ctx_get, a.load_error);
    sym(lib, "cuCtxSetCurrent", a.ctx_set, a.load_error);
    sym(lib, "cuDevicePrimaryCtxRetain", a.primary_retain, a.load_error);
    sym(lib, "cuDeviceGet", a.device_get, a.load_error);
    sym(lib, "cuDeviceGetAttribute", a.attribute, a.load_error);
    sym(lib, "cuCtxGetDevice", a.ctx_get_device, a.load_error);
    sym(lib, "cuGetErrorString", a.error, a.load_error);
    return a;
  }();
  if (!api.load_error.empty()) {
    throw std::runtime_error(api.load_error);
  }
  return api;
}

void cu_check(CUresult r, const char *what) {
  if (r != CUDA_SUCCESS) {
    const char *msg = nullptr;
    driver().error(r, &msg);
    throw std::runtime_error(std::string(what) + ": " + (msg ? msg : "unknown CUDA error"));
  }
}

// Compiles a kernel source (`name` for messages) for `arch` (e.g. "sm_90"); returns the CUBIN.
std::string compile_source(const char *source, const std::string &name, const std::string &arch) {
  const Nvrtc &n = nvrtc();
  nvrtcProgram prog = nullptr;
  if (n.create(&prog, source, (name + ".cu").c_str(), 0, nullptr, nullptr) != NVRTC_SUCCESS) {
    throw std::runtime_error("nvrtcCreateProgram failed");
  }
  const std::string arch_opt = "--gpu-architecture=" + arch;
  const char *opts[] = {arch_opt.c_str(), "--std=c++17"};
  const nvrtcResult r = n.compile(prog, 2, opts);
  size_t log_size = 0;
  n.log_size(prog, &log_size);
  std::string log(log_size, '\0');
  if (log_size > 1) {
    n.log(prog, &log[0]);
  }
  if (r != NVRTC_SUCCESS) {
    n.destroy(&prog);
    throw std::runtime_error("NVRTC compile of the " + name + " kernels for " + arch +
                             " failed: " + n.error(r) + "\n" + log);
  }
  size_t size = 0;
  n.cubin_size(prog, &size);
  std::string cubin(size, '\0');
  n.cubin(prog, &cubin[0]);
  n.destroy(&prog);
  return cubin;
}

std::string compile_kernels(const std::string &arch) { return compile_source(kKernelSource, "flux", arch); }

struct Kernels {
  CUfunction qkv_norm_rope = nullptr;
  CUfunction gate_residual_ln = nullptr;
  CUfunction gate_residual_ln_v8 = nullptr;
  CUfunction lse_merge = nullptr;
  CUfunction lora_add = nullptr;
  CUfunction quant_rows_e4m3 = nullptr;
  CUfunction gelu_quant_e4m3 = nullptr;
  CUfunction attn_amax = nullptr;
  CUfunction qkv_norm_rope_e4m3 = nullptr;
};

// Makes `device`'s primary context (libtorch's) current on this thread.
void use_device_context(int device) {
  const Driver &d = driver();
  CUcontext cur = nullptr;
  d.ctx_get(&cur);
  if (cur != nullptr) {
    CUdevice dev = -1;
    if (d.ctx_get_device(&dev) == CUDA_SUCCESS && dev == device) {
      return;
    }
  }
  CUdevice dev = 0;
  cu_check(d.device_get(&dev, device), "cuDeviceGet");
  CUcontext ctx = nullptr;
  cu_check(d.primary_retain(&ctx, dev), "cuDevicePrimaryCtxRetain");
  cu_check(d.ctx_set(ctx), "cuCtxSetCurrent");
}

const Kernels &kernels(int device) {
  static std::mutex mu;
  static std::map<int, Kernels> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) {
    return it->second;
  }
  use_device_context(device);
  const Driver &d = driver();
  CUdevice dev = 0;
  cu_check(d.device_get(&dev, device), "cuDeviceGet");
  int major = 0, minor = 0;
  cu_check(d.attribute(&major, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "compute capability");
  cu_check(d.attribute(&minor, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "compute capability");
  const std::string cubin = compile_kernels("sm_" + std::to_string(major) + std::to_string(minor));
  CUmodule module = nullptr;
  cu_check(d.module_load(&module, cubin.data()), "cuModuleLoadData");
  Kernels k;
  cu_check(d.get_function(&k.qkv_norm_rope, module, "dtf_qkv_norm_rope"), "dtf_qkv_norm_rope");
  cu_check(d.get_function(&k.gate_residual_ln, module, "dtf_gate_residual_ln"),
           "dtf_gate_residual_ln");
  cu_check(d.get_function(&k.gate_residual_ln_v8, module, "dtf_gate_residual_ln_v8"),
           "dtf_gate_residual_ln_v8");
  cu_check(d.get_function(&k.lse_merge, module, "dtf_lse_merge"), "dtf_lse_merge");
  cu_check(d.get_function(&k.lora_add, module, "dtf_lora_add"), "dtf_lora_add");
  cu_check(d.get_function(&k.quant_rows_e4m3, module, "dtf_quant_rows_e4m3"), "dtf_quant_rows_e4m3");
  cu_check(d.get_function(&k.gelu_quant_e4m3, module, "dtf_gelu_quant_e4m3"), "dtf_gelu_quant_e4m3");
  cu_check(d.get_function(&k.attn_amax, module, "dtf_attn_amax"), "dtf_attn_amax");
  cu_check(d.get_function(&k.qkv_norm_rope_e4m3, module, "dtf_qkv_norm_rope_e4m3"),
           "dtf_qkv_norm_rope_e4m3");
  return cache.emplace(device, k).first->second;
}

void require(bool ok, const std::string &what) {
  if (!ok) {
    throw std::runtime_error(what);
  }
}

bool aligned8(const at::Tensor &t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 8 == 0;
}

// The q/k RMSNorm weights the attention-input kernels read: contiguous bf16 (128) on `device`.
void check_norm_scales(const at::Tensor &q_scale, const at::Tensor &k_scale, int device) {
  for (const at::Tensor *sc : {&q_scale, &k_scale}) {
    require(sc->is_cuda() && sc->get_device() == device && sc->scalar_type() == at::kBFloat16 &&
                sc->is_contiguous() && sc->numel() == 128 && aligned8(*sc),
            "norm scales must be contiguous bf16 (128) tensors on qkv's device");
  }
}

// A RoPE table over `rows` tokens: contiguous (rows, 64) complex64 or (rows, 64, 2) fp32.
void check_rope(const at::Tensor &r, int device, int64_t rows) {
  require(r.is_cuda() && r.get_device() == device && r.is_contiguous() &&
              (r.scalar_type() == at::kComplexFloat || r.scalar_type() == at::kFloat) &&
              r.numel() * (r.scalar_type() == at::kComplexFloat ? 2 : 1) == rows * 128,
          "rope must be contiguous (rows, 64) complex64 or (rows, 64, 2) fp32 on qkv's device");
}

// A stream's fused projection as the FP8 attention's kernels read it: CUDA bf16 (b, t, w) with
// contiguous, 8-byte aligned rows.
void check_qkv_rows(const at::Tensor &x) {
  require(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.dim() == 3 && x.stride(2) == 1 &&
              aligned8(x) && x.stride(1) % 4 == 0 && x.stride(0) % 4 == 0,
          "qkv must be a CUDA bf16 (b, t, w) tensor with contiguous, 8-byte aligned rows");
}

// The FP8 attention's scale buffer (DTF_SLOT_* in flux_kernels.cu.inc): contiguous fp32 (>= 48).
void check_slots(const at::Tensor &slots, int device) {
  require(slots.is_cuda() && slots.get_device() == device && slots.scalar_type() == at::kFloat &&
              slots.is_contiguous() && slots.numel() >= 48,
          "slots must be a contiguous fp32 (>= 48) tensor on qkv's device");
}

void launch(int device, CUfunction f, unsigned gx, unsigned gy, unsigned block, void **args,
            unsigned shared_bytes = 0) {
  use_device_context(device);
  CUstream stream = reinterpret_cast<CUstream>(c10::cuda::getCurrentCUDAStream(device).stream());
  cu_check(driver().launch(f, gx, gy, 1, block, 1, 1, shared_bytes, stream, args, nullptr),
           "cuLaunchKernel");
}

} // namespace

extern "C" {

// Compiles and loads the fused kernels for CUDA device `device` (once per device; later calls
// are free): NULL when they are ready, else why not (no NVRTC, no driver, a compile error).
char *dtf_kernels_load(int device) {
  return guarded([&] { kernels(device); });
}

// Compiles the fused kernels for `arch` (e.g. "sm_90") without a GPU (NVRTC only): NULL on
// success, else the error with NVRTC's log.
char *dtf_kernels_compile_check(const char *arch) {
  return guarded([&] { compile_kernels(arch); });
}

// See dtf_qkv_norm_rope in flux_kernels.cu.inc. qkv (b, t, >= 3*H*128) bf16, last dim contiguous;
// q_scale/k_scale (128) bf16; rope (rows, 64) complex64 or (rows, 64, 2) fp32, contiguous;
// q_out/k_out/v_out (b, rows, H, 128) bf16 contiguous, or (G, b, rows, H/G, 128) contiguous: G head
// groups, group g holding heads g*H/G.. (the layout a Ulysses all-to-all sends from); rows >=
// row_offset + t.
char *dtf_qkv_norm_rope(const at::Tensor *qkv, const at::Tensor *q_scale, const at::Tensor *k_scale,
                        const at::Tensor *rope, const at::Tensor *q_out, const at::Tensor *k_out,
                        const at::Tensor *v_out, int64_t row_offset, double eps) {
  return guarded([&] {
    const at::Tensor &x = *qkv;
    require(x.is_cuda() && x.scalar_type() == at::kBFloat16 && x.dim() == 3 && x.stride(2) == 1,
            "qkv must be a CUDA bf16 (b, t, w) tensor with a contiguous last dim");
    const int device = x.get_device();
    const int64_t b = x.size(0), t = x.size(1);
    const at::Tensor &qo = *q_out;
    const bool grouped = qo.dim() == 5;
    require((qo.dim() == 4 || grouped) && qo.size(qo.dim() - 1) == 128,
            "outputs must be (b, rows, heads, 128) or (groups, b, rows, heads / groups, 128)");
    const int64_t groups = grouped ? qo.size(0) : 1;
    const int64_t heads = groups * qo.size(qo.dim() - 2), rows = qo.size(qo.dim() - 3);
    require(qo.size(qo.dim() - 4) == b, "outputs must have qkv's batch size");
    require(x.size(2) >= 3 * heads * 128, "qkv is narrower than 3 * heads * 128");
    require(row_offset >= 0 && row_offset + t <= rows, "rows out of range");
    for (const at::Tensor *o : {q_out, k_out, v_out}) {
      require(o->is_cuda() && o->get_device() == device && o->scalar_type() == at::kBFloat16 &&
                  o->is_contiguous() && o->sizes() == qo.sizes() && aligned8(*o),
              "outputs must be contiguous bf16 tensors of one shape on qkv's device");
    }
    check_norm_scales(*q_scale, *k_scale, device);
    const at::Tensor &r = *rope;
    check_rope(r, device, rows);
    require(aligned8(x) && x.stride(1) % 4 == 0 && x.stride(0) % 4 == 0,
            "qkv rows must be 8-byte aligned");
    if (b == 0 || t == 0) {
      return;
    }
    const void *px = x.data_ptr(), *pqs = q_scale->data_ptr(), *pks = k_scale->data_ptr(),
               *pr = r.data_ptr();
    void *pq = q_out->data_ptr(), *pk = k_out->data_ptr(), *pv = v_out->data_ptr();
    long long row_stride = x.stride(1), batch_stride = x.stride(0),
              out_batch_stride = rows * (heads / groups) * 128, group_stride = b * out_batch_stride;
    int tokens = static_cast<int>(t), h = static_cast<int>(heads), g = static_cast<int>(groups),
        off = static_cast<int>(row_offset);
    float e = static_cast<float>(eps);
    void *args[] = {&px,  &row_stride,       &batch_stride, &pqs,    &pks, &pr, &pq, &pk,
                    &pv,  &out_batch_stride, &group_stride, &tokens, &h,   &g,  &off, &e};
    const int64_t warps = t * heads;
    const unsigned block = 256;
    launch(device, kernels(device).qkv_norm_rope, static_cast<unsigned>((warps * 32 + block - 1) / block),
           static_cast<unsigned>(b), block, args);
  });
}

// See dtf_gate_residual_ln in flux_kernels.cu.inc. x (b, s, n) contiguous; y (b, s, n) with
// contiguous rows (stride(0) == s * stride(1) unless b == 1); gate/scale/shift (b, 1, n) with one
// batch stride, last dim contiguous; x_out (b, s, n) contiguous. The modulated LayerNorm goes to
// h_out (b, s, n) contiguous bf16, or (q_out non-null) as FP8 to q_out (b, s, n) float8_e4m3fn
// contiguous with per-row scales in q_scale (b * s) fp32. All on one device.
static void gate_residual_ln_impl(const at::Tensor *x, const at::Tensor *gate, const at::Tensor *y,
                           const at::Tensor *scale, const at::Tensor *shift, const at::Tensor *x_out,
                           const at::Tensor *h_out, const at::Tensor *q_out, const at::Tensor *q_scale,
                           double eps) {
  require(x->is_cuda() && x->dim() == 3 && x->is_contiguous() && x->scalar_type() == at::kBFloat16,
          "x must be a contiguous CUDA bf16 (b, s, n) tensor");
  const int device = x->get_device();
  const int64_t b = x->size(0), s = x->size(1), n = x->size(2);
  require(n % 4 == 0 && n <= 16384, "row width must be a multiple of 4, at most 16384");
  require(y->is_cuda() && y->get_device() == device && y->scalar_type() == at::kBFloat16 &&
              y->sizes() == x->sizes() && y->stride(2) == 1 && y->stride(1) % 4 == 0 &&
              (b == 1 || y->stride(0) == s * y->stride(1)) && aligned8(*y),
          "y must be bf16 (b, s, n) with contiguous, aligned rows on x's device");
  for (const at::Tensor *m : {gate, scale, shift}) {
    require(m->is_cuda() && m->get_device() == device && m->scalar_type() == at::kBFloat16 &&
                m->dim() == 3 && m->size(0) == b && m->size(1) == 1 && m->size(2) == n &&
                m->stride(2) == 1 && m->stride(0) == gate->stride(0) &&
                m->stride(0) % 4 == 0 && aligned8(*m),
            "gate/scale/shift must be bf16 (b, 1, n) chunks of one modulation tensor");
  }
  std::vector<const at::Tensor *> outs = {x_out};
  if (q_out == nullptr) {
    outs.push_back(h_out);
  } else {
    require(q_out->is_cuda() && q_out->get_device() == device &&
                q_out->scalar_type() == at::kFloat8_e4m3fn && q_out->is_contiguous() &&
                q_out->sizes() == x->sizes() && reinterpret_cast<uintptr_t>(q_out->data_ptr()) % 4 == 0,
            "q_out must be a contiguous float8_e4m3fn tensor of x's shape on x's device");
    require(q_scale->is_cuda() && q_scale->get_device() == device &&
                q_scale->scalar_type() == at::kFloat && q_scale->is_contiguous() &&
                q_scale->numel() == b * s,
            "q_scale must be a contiguous fp32 tensor of b * s values on x's device");
  }
  for (const at::Tensor *o : outs) {
    require(o->is_cuda() && o->get_device() == device && o->scalar_type() == at::kBFloat16 &&
                o->is_contiguous() && o->sizes() == x->sizes() && aligned8(*o),
            "outputs must be contiguous bf16 tensors of x's shape");
  }
  require(aligned8(*x), "x must be 8-byte aligned");
  if (b * s == 0) {
    return;
  }
  const void *px = x->data_ptr(), *py = y->data_ptr(), *pg = gate->data_ptr(),
             *psc = scale->data_ptr(), *psh = shift->data_ptr();
  void *pxo = x_out->data_ptr();
  void *pho = q_out == nullptr ? h_out->data_ptr() : nullptr;
  void *pq = q_out == nullptr ? nullptr : q_out->data_ptr();
  void *pqs = q_out == nullptr ? nullptr : q_scale->data_ptr();
  long long xs = n, ys = y->stride(1), ms = gate->stride(0), os = n;
  int rpb = static_cast<int>(s), width = static_cast<int>(n);
  float e = static_cast<float>(eps);
  void *args[] = {&px, &xs, &py, &ys, &pg, &psc, &psh, &ms, &rpb, &pxo, &pho, &os, &width, &e, &pq, &pqs};
  // 16-byte loads where every row and vector allows them (Flux: always), else 8-byte ones; the
  // block is as small as holds a row in LN_CHUNKS (4) chunks per thread, so more rows are in
  // flight per SM.
  auto a16 = [](const void *p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  const bool v8 = n % 8 == 0 && ys % 8 == 0 && ms % 8 == 0 && a16(px) && a16(py) && a16(pg) &&
                  a16(psc) && a16(psh) && a16(pxo) && (pho == nullptr || a16(pho)) &&
                  (pq == nullptr || reinterpret_cast<uintptr_t>(pq) % 8 == 0);
  const int64_t vec = v8 ? 8 : 4, chunks = n / vec;
  const unsigned block =
      static_cast<unsigned>(std::max<int64_t>(32, ((chunks + 3) / 4 + 31) / 32 * 32));
  launch(device, v8 ? kernels(device).gate_residual_ln_v8 : kernels(device).gate_residual_ln,
         static_cast<unsigned>(b * s), 1, block, args);
}

char *dtf_gate_residual_ln(const at::Tensor *x, const at::Tensor *gate, const at::Tensor *y,
                           const at::Tensor *scale, const at::Tensor *shift, const at::Tensor *x_out,
                           const at::Tensor *h_out, double eps) {
  return guarded([&] { gate_residual_ln_impl(x, gate, y, scale, shift, x_out, h_out, nullptr, nullptr, eps); });
}

char *dtf_gate_residual_ln_fp8(const at::Tensor *x, const at::Tensor *gate, const at::Tensor *y,
                               const at::Tensor *scale, const at::Tensor *shift, const at::Tensor *x_out,
                               const at::Tensor *q_out, const at::Tensor *q_scale, double eps) {
  return guarded([&] {
    require(q_out != nullptr && q_scale != nullptr, "q_out and q_scale are required");
    gate_residual_ln_impl(x, gate, y, scale, shift, x_out, nullptr, q_out, q_scale, eps);
  });
}

// See dtf_gelu_quant_e4m3 in flux_kernels.cu.inc. a (rows, na) bf16 or null (na = 0), m (rows, nm)
// bf16, both with a contiguous last dim and 16-byte aligned rows (na, nm multiples of 8); q
// (rows, na + nm) float8_e4m3fn contiguous; scale (rows) fp32 contiguous. All on one CUDA device.
static void gelu_quant_impl(const at::Tensor *a, const at::Tensor *a8, const at::Tensor *a8_descale,
                            const at::Tensor *m, const at::Tensor *q, const at::Tensor *scale, int exact) {
  {
    auto rows_ok = [](const at::Tensor &t) {
      return t.is_cuda() && t.scalar_type() == at::kBFloat16 && t.dim() == 2 && t.stride(1) == 1 &&
             t.size(1) % 8 == 0 && t.stride(0) % 8 == 0 &&
             reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
    };
    require(rows_ok(*m), "m must be a CUDA bf16 (rows, n) tensor with 16-byte aligned rows, n % 8 == 0");
    const int device = m->get_device();
    const int64_t rows = m->size(0), nm = m->size(1);
    int64_t na = 0;
    if (a != nullptr) {
      require(rows_ok(*a) && a->get_device() == device && a->size(0) == rows,
              "a must be a bf16 (rows, n) tensor like m on m's device");
      na = a->size(1);
    }
    if (a8 != nullptr) {
      require(a8->is_cuda() && a8->get_device() == device && a8->scalar_type() == at::kFloat8_e4m3fn &&
                  a8->dim() == 2 && a8->stride(1) == 1 && a8->size(0) == rows && a8->size(1) % 8 == 0 &&
                  a8->stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(a8->data_ptr()) % 8 == 0,
              "a8 must be a float8_e4m3fn (rows, n) tensor with 8-byte aligned rows, n % 8 == 0, on m's device");
      require(a8_descale != nullptr && a8_descale->is_cuda() && a8_descale->get_device() == device &&
                  a8_descale->scalar_type() == at::kFloat && a8_descale->numel() >= 1,
              "a8's descale must be an fp32 CUDA tensor on m's device");
      na = a8->size(1);
    }
    require(q->is_cuda() && q->get_device() == device && q->scalar_type() == at::kFloat8_e4m3fn &&
                q->is_contiguous() && q->dim() == 2 && q->size(0) == rows && q->size(1) == na + nm &&
                reinterpret_cast<uintptr_t>(q->data_ptr()) % 8 == 0,
            "q must be a contiguous float8_e4m3fn (rows, na + nm) tensor on m's device");
    require(scale->is_cuda() && scale->get_device() == device && scale->scalar_type() == at::kFloat &&
                scale->is_contiguous() && scale->numel() == rows,
            "scale must be a contiguous fp32 (rows) tensor on m's device");
    require(rows < (int64_t(1) << 31) && na + nm < (int64_t(1) << 30), "too large");
    if (rows == 0 || na + nm == 0) {
      return;
    }
    const void *pa = a == nullptr ? m->data_ptr() : a->data_ptr();
    const void *pm = m->data_ptr();
    void *pq = q->data_ptr(), *ps = scale->data_ptr();
    const void *pa8 = a8 == nullptr ? nullptr : a8->data_ptr();
    const void *pa8s = a8 == nullptr ? nullptr : a8_descale->data_ptr();
    long long as = a8 != nullptr ? a8->stride(0) : (a == nullptr ? 0 : a->stride(0)), ms = m->stride(0);
    int ina = static_cast<int>(na), inm = static_cast<int>(nm);
    int ex = exact != 0 ? 1 : 0;
    void *args[] = {&pa, &as, &ina, &pm, &ms, &inm, &pq, &ps, &pa8, &pa8s, &ex};
    // Enough threads that a row fits 4 chunks of 8 per thread (held in registers) up to 32768
    // values; at least 128.
    const int64_t chunks = (na + nm + 7) / 8;
    const unsigned block = static_cast<unsigned>(
        std::max<int64_t>(128, std::min<int64_t>(1024, ((chunks + 3) / 4 + 31) / 32 * 32)));
    launch(device, kernels(device).gelu_quant_e4m3, static_cast<unsigned>(rows), 1, block, args);
  }
}

// `exact`: the GELU's tanh through tanhf as ATen computes it; else its sigmoid form with the
// hardware exp (see gelu_sigmoid in flux_kernels.cu.inc).
char *dtf_gelu_quant_e4m3(const at::Tensor *a, const at::Tensor *m, const at::Tensor *q,
                          const at::Tensor *scale, int exact) {
  return guarded([&] { gelu_quant_impl(a, nullptr, nullptr, m, q, scale, exact); });
}

// dtf_gelu_quant_e4m3 with the a part in FP8: a8 (rows, na) float8_e4m3fn (8-byte aligned rows,
// na % 8 == 0) whose values are a8 * a8_descale[0] (fp32, on the device).
char *dtf_gelu_quant_e4m3_a8(const at::Tensor *a8, const at::Tensor *a8_descale, const at::Tensor *m,
                             const at::Tensor *q, const at::Tensor *scale, int exact) {
  return guarded([&] { gelu_quant_impl(nullptr, a8, a8_descale, m, q, scale, exact); });
}

// See dtf_attn_amax in flux_kernels.cu.inc. qkv (b, t, >= 3*H*128) bf16 (last dim contiguous,
// 8-byte aligned rows), q_scale/k_scale (128) bf16, slots fp32 (>= 48) contiguous, zeroed before
// the first stream of an attention. All on one CUDA device.
char *dtf_attn_amax(const at::Tensor *qkv, const at::Tensor *q_scale, const at::Tensor *k_scale,
                    int64_t heads, const at::Tensor *slots) {
  return guarded([&] {
    const at::Tensor &x = *qkv;
    check_qkv_rows(x);
    const int device = x.get_device();
    require(heads > 0 && x.size(2) >= 3 * heads * 128, "qkv is narrower than 3 * heads * 128");
    check_norm_scales(*q_scale, *k_scale, device);
    check_slots(*slots, device);
    const int64_t b = x.size(0), t = x.size(1);
    require(t < (int64_t(1) << 31) && b < 65536, "too large");
    if (b == 0 || t == 0) {
      return;
    }
    const void *px = x.data_ptr(), *pqs = q_scale->data_ptr(), *pks = k_scale->data_ptr();
    void *psl = slots->data_ptr();
    long long rs = x.stride(1), bs = x.stride(0);
    int h = static_cast<int>(heads);
    void *args[] = {&px, &rs, &bs, &h, &pqs, &pks, &psl};
    launch(device, kernels(device).attn_amax, static_cast<unsigned>(t), static_cast<unsigned>(b), 128, args);
  });
}

// See dtf_qkv_norm_rope_e4m3 in flux_kernels.cu.inc: dtf_qkv_norm_rope's inputs, outputs
// (b, rows, H, 128) float8_e4m3fn contiguous, and the slots dtf_attn_amax filled.
char *dtf_qkv_norm_rope_e4m3(const at::Tensor *qkv, const at::Tensor *q_scale, const at::Tensor *k_scale,
                             const at::Tensor *rope, const at::Tensor *q_out, const at::Tensor *k_out,
                             const at::Tensor *v_out, int64_t row_offset, double eps,
                             const at::Tensor *slots) {
  return guarded([&] {
    const at::Tensor &x = *qkv;
    check_qkv_rows(x);
    const int device = x.get_device();
    const int64_t b = x.size(0), t = x.size(1);
    const at::Tensor &qo = *q_out;
    require(qo.dim() == 4 && qo.size(3) == 128 && qo.size(0) == b,
            "outputs must be (b, rows, heads, 128) with qkv's batch size");
    const int64_t heads = qo.size(2), rows = qo.size(1);
    require(x.size(2) >= 3 * heads * 128, "qkv is narrower than 3 * heads * 128");
    require(row_offset >= 0 && row_offset + t <= rows, "rows out of range");
    for (const at::Tensor *o : {q_out, k_out, v_out}) {
      require(o->is_cuda() && o->get_device() == device && o->scalar_type() == at::kFloat8_e4m3fn &&
                  o->is_contiguous() && o->sizes() == qo.sizes() &&
                  reinterpret_cast<uintptr_t>(o->data_ptr()) % 4 == 0,
              "outputs must be contiguous float8_e4m3fn tensors of one shape on qkv's device");
    }
    check_norm_scales(*q_scale, *k_scale, device);
    const at::Tensor &r = *rope;
    check_rope(r, device, rows);
    check_slots(*slots, device);
    if (b == 0 || t == 0) {
      return;
    }
    const void *px = x.data_ptr(), *pqs = q_scale->data_ptr(), *pks = k_scale->data_ptr(),
               *pr = r.data_ptr();
    void *pq = q_out->data_ptr(), *pk = k_out->data_ptr(), *pv = v_out->data_ptr(),
         *psl = slots->data_ptr();
    long long row_stride = x.stride(1), batch_stride = x.stride(0), out_batch_stride = rows * heads * 128;
    int tokens = static_cast<int>(t), h = static_cast<int>(heads), off = static_cast<int>(row_offset);
    float e = static_cast<float>(eps);
    void *args[] = {&px, &row_stride, &batch_stride, &pqs, &pks,    &pr, &pq,  &pk,
                    &pv, &out_batch_stride, &tokens,  &h,   &off, &e,  &psl};
    const int64_t warps = t * heads;
    const unsigned block = 256;
    launch(device, kernels(device).qkv_norm_rope_e4m3,
           static_cast<unsigned>((warps * 32 + block - 1) / block), static_cast<unsigned>(b), block, args);
  });
}

// See dtf_lora_add in flux_kernels.cu.inc. w bf16 and d fp32, contiguous, of one numel, both
// 16-byte aligned; nonfinite an int32 tensor of one element. All on one CUDA device.
char *dtf_lora_add(const at::Tensor *w, const at::Tensor *d, const at::Tensor *nonfinite) {
  return guarded([&] {
    require(w->is_cuda() && w->scalar_type() == at::kBFloat16 && w->is_contiguous(),
            "w must be a contiguous CUDA bf16 tensor");
    const int device = w->get_device();
    require(d->is_cuda() && d->get_device() == device && d->scalar_type() == at::kFloat &&
                d->is_contiguous() && d->numel() == w->numel(),
            "d must be a contiguous fp32 tensor of w's size on w's device");
    require(nonfinite->is_cuda() && nonfinite->get_device() == device &&
                nonfinite->scalar_type() == at::kInt && nonfinite->numel() == 1,
            "nonfinite must be one int32 on w's device");
    require(reinterpret_cast<uintptr_t>(w->data_ptr()) % 16 == 0 &&
                reinterpret_cast<uintptr_t>(d->data_ptr()) % 16 == 0,
            "w and d must be 16-byte aligned");
    long long n = w->numel();
    if (n == 0) {
      return;
    }
    void *pw = w->data_ptr(), *pd = d->data_ptr(), *pf = nonfinite->data_ptr();
    void *args[] = {&pw, &pd, &n, &pf};
    const unsigned block = 256;
    const long long want = ((n >> 3) + block - 1) / block;
    const unsigned grid = static_cast<unsigned>(std::max<long long>(1, std::min<long long>(want, 132 * 16)));
    launch(device, kernels(device).lora_add, grid, 1, block, args);
  });
}

// See dtf_quant_rows_e4m3 in flux_kernels.cu.inc. x (rows, n) bf16 with a contiguous last dim and
// 16-byte aligned rows, n % 8 == 0; q (rows, n) float8_e4m3fn contiguous; scale (rows) fp32
// contiguous. All on one CUDA device.
char *dtf_quant_rows_e4m3(const at::Tensor *x, const at::Tensor *q, const at::Tensor *scale) {
  return guarded([&] {
    const at::Tensor &t = *x;
    require(t.is_cuda() && t.scalar_type() == at::kBFloat16 && t.dim() == 2 && t.stride(1) == 1,
            "x must be a CUDA bf16 (rows, n) tensor with a contiguous last dim");
    const int device = t.get_device();
    const int64_t rows = t.size(0), n = t.size(1);
    require(n % 8 == 0 && t.stride(0) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
            "x's rows must be 16-byte aligned with n % 8 == 0");
    require(q->is_cuda() && q->get_device() == device && q->scalar_type() == at::kFloat8_e4m3fn &&
                q->is_contiguous() && q->sizes() == t.sizes() &&
                reinterpret_cast<uintptr_t>(q->data_ptr()) % 8 == 0,
            "q must be a contiguous float8_e4m3fn tensor of x's shape on x's device");
    require(scale->is_cuda() && scale->get_device() == device && scale->scalar_type() == at::kFloat &&
                scale->is_contiguous() && scale->numel() == rows,
            "scale must be a contiguous fp32 (rows) tensor on x's device");
    require(rows < (int64_t(1) << 31), "at most 2^31 rows");
    if (rows == 0 || n == 0) {
      return;
    }
    const void *px = t.data_ptr();
    void *pq = q->data_ptr(), *ps = scale->data_ptr();
    long long xs = t.stride(0);
    int nn = static_cast<int>(n);
    void *args[] = {&px, &xs, &pq, &ps, &nn};
    const unsigned block = static_cast<unsigned>(std::min<int64_t>(256, (n / 8 + 31) / 32 * 32));
    launch(device, kernels(device).quant_rows_e4m3, static_cast<unsigned>(rows), 1, block, args);
  });
}

// See dtf_lse_merge in flux_kernels.cu.inc. acc (b, h, L, 128) fp32 and o (same sizes) bf16, last
// dims contiguous, other strides multiples of 4; acc_lse / lse (b, h, L) fp32. acc and acc_lse are
// updated in place. All on one device.
char *dtf_lse_merge(const at::Tensor *acc, const at::Tensor *acc_lse, const at::Tensor *o,
                    const at::Tensor *lse, const at::Tensor *out) {
  return guarded([&] {
    // acc and out: (b, h, L, 128), fp32 or bf16, rows contiguous and 16-byte (fp32) or 8-byte
    // (bf16) aligned; out may be acc itself.
    auto rows_ok = [](const at::Tensor &t) {
      const bool f32 = t.scalar_type() == at::kFloat;
      return t.is_cuda() && (f32 || t.scalar_type() == at::kBFloat16) && t.dim() == 4 &&
             t.size(3) == 128 && t.stride(3) == 1 && t.stride(0) % 4 == 0 && t.stride(1) % 4 == 0 &&
             t.stride(2) % 4 == 0 &&
             reinterpret_cast<uintptr_t>(t.data_ptr()) % (f32 ? 16 : 8) == 0;
    };
    require(rows_ok(*acc), "acc must be a CUDA fp32 or bf16 (b, h, L, 128) tensor with contiguous, aligned rows");
    const int device = acc->get_device();
    const int64_t b = acc->size(0), h = acc->size(1), len = acc->size(2);
    require(rows_ok(*out) && out->get_device() == device && out->sizes() == acc->sizes(),
            "out must be fp32 or bf16 of acc's shape with contiguous, aligned rows on acc's device");
    require(o->is_cuda() && o->get_device() == device && o->scalar_type() == at::kBFloat16 &&
                o->sizes() == acc->sizes() && o->stride(3) == 1 && o->stride(0) % 4 == 0 &&
                o->stride(1) % 4 == 0 && o->stride(2) % 4 == 0 && aligned8(*o),
            "o must be bf16 of acc's shape with contiguous, aligned rows on acc's device");
    for (const at::Tensor *l : {acc_lse, lse}) {
      require(l->is_cuda() && l->get_device() == device && l->scalar_type() == at::kFloat &&
                  l->dim() == 3 && l->size(0) == b && l->size(1) == h && l->size(2) == len,
              "log-sum-exps must be fp32 (b, h, L) on acc's device");
    }
    const long long rows = b * h * len;
    if (rows == 0) {
      return;
    }
    const void *pa = acc->data_ptr();
    void *pal = acc_lse->data_ptr(), *pu = out->data_ptr();
    const void *po = o->data_ptr(), *pl = lse->data_ptr();
    int a_bf16 = acc->scalar_type() == at::kBFloat16, u_bf16 = out->scalar_type() == at::kBFloat16;
    long long a_b = acc->stride(0), a_h = acc->stride(1), a_l = acc->stride(2);
    long long al_b = acc_lse->stride(0), al_h = acc_lse->stride(1), al_l = acc_lse->stride(2);
    long long o_b = o->stride(0), o_h = o->stride(1), o_l = o->stride(2);
    long long l_b = lse->stride(0), l_h = lse->stride(1), l_l = lse->stride(2);
    long long u_b = out->stride(0), u_h = out->stride(1), u_l = out->stride(2);
    int heads = static_cast<int>(h), n = static_cast<int>(len);
    long long r = rows;
    void *args[] = {&pa,  &a_bf16, &a_b, &a_h, &a_l, &pal, &al_b, &al_h, &al_l, &po,  &o_b, &o_h,
                    &o_l, &pl,     &l_b, &l_h, &l_l, &pu,  &u_bf16, &u_b, &u_h, &u_l, &heads, &n, &r};
    launch(device, kernels(device).lse_merge, static_cast<unsigned>((rows + 7) / 8), 1, 256, args);
  });
}

} // extern "C"

#include "sdxl_ops.cpp.inc"

extern "C" {

// The kineto profiler (CPU ops and CUDA kernels) for this process, as torch.profiler runs it;
// dtf_profiler_stop writes a Chrome trace to `path`.
char *dtf_profiler_start(void) {
  return guarded([&] {
    using torch::profiler::impl::ActivityType;
    torch::profiler::impl::ProfilerConfig cfg(torch::profiler::impl::ProfilerState::KINETO);
    const std::set<ActivityType> acts{ActivityType::CPU, ActivityType::CUDA};
    torch::autograd::profiler::prepareProfiler(cfg, acts);
    torch::autograd::profiler::enableProfiler(cfg, acts);
  });
}

char *dtf_profiler_stop(const char *path) {
  return guarded([&] {
    auto result = torch::autograd::profiler::disableProfiler();
    result->save(path);
  });
}

} // extern "C"

extern "C" {

struct DtfGraph {
  at::cuda::CUDAGraph graph;
  int device;
  bool has_prev = false;
  c10::cuda::CUDAStream prev;
  c10::cuda::CUDAStream side;
  explicit DtfGraph(int dev)
      : graph(false), device(dev), prev(c10::cuda::getCurrentCUDAStream(dev)),
        side(c10::cuda::getStreamFromPool(false, dev)) {}
};

char *dtf_graph_new(int device, DtfGraph **out) {
  return guarded([&] { *out = new DtfGraph(device); });
}

void dtf_graph_free(DtfGraph *g) { delete g; }

// Makes the graph's side stream current on its device; `prev` / `side` receive the stream that
// was current and the side stream (the caller orders them with events: the shim includes no CUDA
// runtime API).
char *dtf_graph_enter(DtfGraph *g, void **prev, void **side) {
  return guarded([&] {
    g->prev = c10::cuda::getCurrentCUDAStream(g->device);
    g->has_prev = true;
    *prev = static_cast<void *>(g->prev.stream());
    *side = static_cast<void *>(g->side.stream());
    c10::cuda::setCurrentCUDAStream(g->side);
  });
}

// Restores the stream that was current before dtf_graph_enter.
char *dtf_graph_exit(DtfGraph *g) {
  return guarded([&] {
    if (g->has_prev) {
      c10::cuda::setCurrentCUDAStream(g->prev);
      g->has_prev = false;
    }
  });
}

// Starts capturing the current (side) stream. Thread-local capture mode: other rank threads keep
// launching (and capturing) on their own devices meanwhile.
char *dtf_graph_begin(DtfGraph *g) {
  return guarded([&] {
    g->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
  });
}

char *dtf_graph_end(DtfGraph *g) {
  return guarded([&] { g->graph.capture_end(); });
}

// Launches the captured work on the device's current stream.
char *dtf_graph_replay(DtfGraph *g) {
  return guarded([&] { g->graph.replay(); });
}

#else

int dtf_has_cuda(void) { return 0; }

struct DtfGraph {};

static char *no_cuda() { return dup_error("this build of the engine has no CUDA support"); }
char *dtf_current_stream(int, void **stream) {
  *stream = nullptr;
  return nullptr;
}
char *dtf_graph_new(int, DtfGraph **out) {
  *out = nullptr;
  return no_cuda();
}
void dtf_graph_free(DtfGraph *) {}
char *dtf_graph_enter(DtfGraph *, void **, void **) { return no_cuda(); }
char *dtf_graph_exit(DtfGraph *) { return no_cuda(); }
char *dtf_graph_begin(DtfGraph *) { return no_cuda(); }
char *dtf_graph_end(DtfGraph *) { return no_cuda(); }
char *dtf_graph_replay(DtfGraph *) { return no_cuda(); }
char *dtf_empty_cache(void) { return nullptr; }
char *dtf_memory_peak(int, int, int64_t *peak) {
  *peak = 0;
  return no_cuda();
}
char *dtf_kernels_compile_check(const char *) { return no_cuda(); }
char *dtf_kernels_load(int) { return no_cuda(); }
char *dtf_lora_add(const at::Tensor *, const at::Tensor *, const at::Tensor *) { return no_cuda(); }
char *dtf_quant_rows_e4m3(const at::Tensor *, const at::Tensor *, const at::Tensor *) { return no_cuda(); }
char *dtf_gelu_quant_e4m3(const at::Tensor *, const at::Tensor *, const at::Tensor *, const at::Tensor *,
                          int) {
  return no_cuda();
}
char *dtf_gelu_quant_e4m3_a8(const at::Tensor *, const at::Tensor *, const at::Tensor *, const at::Tensor *,
                             const at::Tensor *, int) {
  return no_cuda();
}
char *dtf_attn_amax(const at::Tensor *, const at::Tensor *, const at::Tensor *, int64_t, const at::Tensor *) {
  return no_cuda();
}
char *dtf_qkv_norm_rope_e4m3(const at::Tensor *, const at::Tensor *, const at::Tensor *, const at::Tensor *,
                             const at::Tensor *, const at::Tensor *, const at::Tensor *, int64_t, double,
                             const at::Tensor *) {
  return no_cuda();
}
char *dtf_gate_residual_ln_fp8(const at::Tensor *, const at::Tensor *, const at::Tensor *,
                               const at::Tensor *, const at::Tensor *, const at::Tensor *,
                               const at::Tensor *, const at::Tensor *, double) {
  return no_cuda();
}
char *dtf_attention(const at::Tensor *, const at::Tensor *, const at::Tensor *, int,
                    at::Tensor **out) {
  *out = nullptr;
  return no_cuda();
}
char *dtf_sdxl_kernels_load(int) { return no_cuda(); }
char *dtf_sdxl_kernels_compile_check(const char *) { return no_cuda(); }
char *dtf_group_norm(const at::Tensor *, const at::Tensor *, const at::Tensor *, const at::Tensor *,
                     int64_t, double, int, at::Tensor **out) {
  *out = nullptr;
  return no_cuda();
}
char *dtf_geglu(const at::Tensor *, at::Tensor **out) {
  *out = nullptr;
  return no_cuda();
}
char *dtf_bias_add(const at::Tensor *, const at::Tensor *, const at::Tensor *) { return no_cuda(); }
char *dtf_add_layer_norm(const at::Tensor *, const at::Tensor *, const at::Tensor *, const at::Tensor *,
                         double, at::Tensor **x_out, at::Tensor **h_out) {
  *x_out = nullptr;
  *h_out = nullptr;
  return no_cuda();
}
char *dtf_qkv_norm_rope(const at::Tensor *, const at::Tensor *, const at::Tensor *,
                        const at::Tensor *, const at::Tensor *, const at::Tensor *,
                        const at::Tensor *, int64_t, double) {
  return no_cuda();
}
char *dtf_gate_residual_ln(const at::Tensor *, const at::Tensor *, const at::Tensor *,
                           const at::Tensor *, const at::Tensor *, const at::Tensor *,
                           const at::Tensor *, double) {
  return no_cuda();
}
char *dtf_lse_merge(const at::Tensor *, const at::Tensor *, const at::Tensor *, const at::Tensor *,
                    const at::Tensor *) {
  return no_cuda();
}
char *dtf_profiler_start(void) { return no_cuda(); }
char *dtf_profiler_stop(const char *) { return no_cuda(); }

#endif

} // extern "C"
