// The FP8 linear layers' GEMM through cuBLASLt directly (src/nn/fp8.rs): e4m3 activation rows
// times an e4m3 weight with one fp32 scale per row and per output channel (cuBLASLt's "outer
// vector" scaling), the bias in the epilogue, fp32 accumulation and bf16 output; the same
// arithmetic as ATen's row-wise `_scaled_mm`, which calls the same library. Two things ATen does
// not:
// - the algorithm: `_scaled_mm` takes cuBLASLt's heuristic first; with `tune`, the first eager
//   call of a shape times every candidate the heuristic lists (warm-up, then the best of 5, CUDA
//   events on the call's stream) and keeps the fastest. Wave quantisation at Flux's shapes
//   (e.g. 4608 x 3072 outputs on 132 SMs) makes the ranking shape- and card-dependent;
// - the host cost: descriptors, layouts and the chosen algorithm are built once per shape and
//   reused, where `_scaled_mm` rebuilds them every call.
//
// cuBLASLt and the CUDA runtime are loaded dynamically: libtorch_cuda has both loaded already,
// so the engine links nothing new. Same C ABI conventions as aten_shim.cpp: every function
// returns NULL on success or a malloc'ed message the caller frees with dtf_free_error.

#include <ATen/ATen.h>

#include "dtf_guarded.h"

#include <cstdint>
#include <string>

#if defined(DTF_WITH_CUDA) && __has_include(<cublasLt.h>)
#define DTF_WITH_CUBLASLT 1
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cublasLt.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace {

// The entry points this file calls, read from the copies libtorch_cuda loaded.
struct Api {
  decltype(&cublasLtCreate) create;
  decltype(&cublasLtMatmulDescCreate) desc_create;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set;
  decltype(&cublasLtMatrixLayoutCreate) layout_create;
  decltype(&cublasLtMatmulPreferenceCreate) pref_create;
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set;
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic;
  decltype(&cublasLtMatmulAlgoConfigGetAttribute) algo_get;
  decltype(&cublasLtMatmul) matmul;
  cudaError_t (*event_create)(cudaEvent_t *);  // overloaded in C++: named by its C form
  decltype(&cudaEventDestroy) event_destroy;
  decltype(&cudaEventRecord) event_record;
  decltype(&cudaEventSynchronize) event_synchronize;
  decltype(&cudaEventElapsedTime) event_elapsed;
  decltype(&cudaStreamIsCapturing) stream_is_capturing;
};

void *open_loaded(const char *name, std::string &error) {
  // Already loaded by libtorch_cuda: RTLD_NOLOAD returns that copy without a search.
  void *h = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
  if (h == nullptr) {
    h = dlopen(name, RTLD_NOW);
  }
  if (h == nullptr) {
    const char *e = dlerror();
    error = std::string("cannot load ") + name + ": " + (e ? e : "unknown error");
  }
  return h;
}

template <typename F> void sym(void *h, const char *name, F &out, std::string &error) {
  out = reinterpret_cast<F>(dlsym(h, name));
  if (out == nullptr && error.empty()) {
    error = std::string("missing symbol ") + name;
  }
}

const Api &api() {
  static Api a{};
  static std::string error;
  static std::once_flag once;
  std::call_once(once, [] {
    void *lt = open_loaded("libcublasLt.so.13", error);
    void *rt = lt ? open_loaded("libcudart.so.13", error) : nullptr;
    if (lt == nullptr || rt == nullptr) {
      return;
    }
    sym(lt, "cublasLtCreate", a.create, error);
    sym(lt, "cublasLtMatmulDescCreate", a.desc_create, error);
    sym(lt, "cublasLtMatmulDescSetAttribute", a.desc_set, error);
    sym(lt, "cublasLtMatrixLayoutCreate", a.layout_create, error);
    sym(lt, "cublasLtMatmulPreferenceCreate", a.pref_create, error);
    sym(lt, "cublasLtMatmulPreferenceSetAttribute", a.pref_set, error);
    sym(lt, "cublasLtMatmulPreferenceDestroy", a.pref_destroy, error);
    sym(lt, "cublasLtMatmulAlgoGetHeuristic", a.heuristic, error);
    sym(lt, "cublasLtMatmulAlgoConfigGetAttribute", a.algo_get, error);
    sym(lt, "cublasLtMatmul", a.matmul, error);
    sym(rt, "cudaEventCreate", a.event_create, error);
    sym(rt, "cudaEventDestroy", a.event_destroy, error);
    sym(rt, "cudaEventRecord", a.event_record, error);
    sym(rt, "cudaEventSynchronize", a.event_synchronize, error);
    sym(rt, "cudaEventElapsedTime", a.event_elapsed, error);
    sym(rt, "cudaStreamIsCapturing", a.stream_is_capturing, error);
  });
  if (!error.empty()) {
    throw std::runtime_error("cuBLASLt FP8 GEMM: " + error);
  }
  return a;
}

void lt_check(cublasStatus_t s, const char *what) {
  if (s != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("cuBLASLt FP8 GEMM: ") + what + " failed (cublasStatus_t " +
                             std::to_string(static_cast<int>(s)) + ")");
  }
}

// The largest power of two (<= 256) that divides the address: the heuristic assumes 256-byte
// alignment unless told otherwise, and an algorithm chosen for that fails on less.
uint32_t alignment(const void *p) {
  uint32_t a = 256;
  while (a > 1 && reinterpret_cast<uintptr_t>(p) % a != 0) {
    a /= 2;
  }
  return a;
}

// Descriptors for one shape (owned for the process: a handful of shapes per model), the
// heuristic's candidates and the one in use.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t w = nullptr, a = nullptr, d = nullptr;
  std::vector<cublasLtMatmulHeuristicResult_t> candidates;
  size_t index = 0;
  bool tuned = false;
};

struct Device {
  cublasLtHandle_t handle = nullptr;
  std::map<std::vector<int64_t>, std::unique_ptr<Plan>> plans;
};

std::mutex &state_mutex() {
  static std::mutex mu;
  return mu;
}

std::map<int, Device> &devices() {
  static std::map<int, Device> d;
  return d;
}

// Every tuning so far, one line a shape, for the benchmarks' reports (dtf_fp8_gemm_report).
std::string &tune_report() {
  static std::string r;
  return r;
}

struct Operands {
  const void *w, *a, *bias;
  void *d;
  const float *sw, *sa;
};

void set_pointers(const Api &lt, Plan &p, const Operands &o) {
  // A is the weight (its scales run along n), B the activation (along m).
  lt_check(lt.desc_set(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &o.sw, sizeof o.sw), "A_SCALE_POINTER");
  lt_check(lt.desc_set(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &o.sa, sizeof o.sa), "B_SCALE_POINTER");
  if (o.bias != nullptr) {
    lt_check(lt.desc_set(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &o.bias, sizeof o.bias), "BIAS_POINTER");
  }
}

constexpr size_t kMaxWorkspace = 32u << 20;
constexpr int kCandidates = 16;

std::unique_ptr<Plan> build_plan(const Api &lt, cublasLtHandle_t handle, int64_t m, int64_t n,
                                 int64_t k, int64_t lda, int64_t ldw, int64_t ldd, const Operands &o,
                                 bool fast_accum, const uint32_t align[4]) {
  const bool bias = o.bias != nullptr;
  auto p = std::make_unique<Plan>();
  lt_check(lt.desc_create(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  // Column-major view of the row-major operands: D^T (n, m) = op(W^T (k, n)) (n, k) * A^T (k, m).
  // FP8 on Hopper takes only this "TN" form.
  const cublasOperation_t t = CUBLAS_OP_T, nt = CUBLAS_OP_N;
  lt_check(lt.desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &t, sizeof t), "TRANSA");
  lt_check(lt.desc_set(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &nt, sizeof nt), "TRANSB");
  const cublasLtMatmulMatrixScale_t outer = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
  lt_check(lt.desc_set(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &outer, sizeof outer), "A_SCALE_MODE");
  lt_check(lt.desc_set(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &outer, sizeof outer), "B_SCALE_MODE");
  const int8_t fast = fast_accum ? 1 : 0;
  lt_check(lt.desc_set(p->desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast, sizeof fast), "FAST_ACCUM");
  if (bias) {
    const cublasLtEpilogue_t epi = CUBLASLT_EPILOGUE_BIAS;
    const cudaDataType_t bias_type = CUDA_R_16BF;
    lt_check(lt.desc_set(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof epi), "EPILOGUE");
    lt_check(lt.desc_set(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof bias_type),
             "BIAS_DATA_TYPE");
  }
  // The heuristic refuses vector scales whose pointers are unset (it does not read them).
  set_pointers(lt, *p, o);
  lt_check(lt.layout_create(&p->w, CUDA_R_8F_E4M3, k, n, ldw), "weight layout");
  lt_check(lt.layout_create(&p->a, CUDA_R_8F_E4M3, k, m, lda), "activation layout");
  lt_check(lt.layout_create(&p->d, CUDA_R_16BF, n, m, ldd), "output layout");
  cublasLtMatmulPreference_t pref = nullptr;
  lt_check(lt.pref_create(&pref), "cublasLtMatmulPreferenceCreate");
  struct PrefGuard {
    const Api &lt;
    cublasLtMatmulPreference_t p;
    ~PrefGuard() { lt.pref_destroy(p); }
  } guard{lt, pref};
  const size_t ws = kMaxWorkspace;
  lt_check(lt.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws), "MAX_WORKSPACE");
  const cublasLtMatmulPreferenceAttributes_t align_attr[4] = {
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
      CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
  for (int i = 0; i < 4; ++i) {
    lt_check(lt.pref_set(pref, align_attr[i], &align[i], sizeof align[i]), "MIN_ALIGNMENT");
  }
  p->candidates.resize(kCandidates);
  int found = 0;
  lt_check(lt.heuristic(handle, p->desc, p->w, p->a, p->d, p->d, pref, kCandidates, p->candidates.data(),
                        &found),
           "cublasLtMatmulAlgoGetHeuristic");
  p->candidates.resize(static_cast<size_t>(std::max(found, 0)));
  if (p->candidates.empty()) {
    throw std::runtime_error("cuBLASLt FP8 GEMM: no algorithm for m=" + std::to_string(m) + " n=" +
                             std::to_string(n) + " k=" + std::to_string(k) +
                             (bias ? " with a bias epilogue" : ""));
  }
  return p;
}

// What identifies a candidate in the report: cuBLASLt's algorithm id, tile, stages, split-K,
// cluster shape, swizzle and custom option.
std::string describe(const Api &lt, const cublasLtMatmulAlgo_t &algo) {
  // Each attribute is read at its own width (the shape ids are 16-bit, the rest 32-bit).
  auto get = [&](cublasLtMatmulAlgoConfigAttributes_t attr, size_t width) -> int64_t {
    uint64_t v = 0;
    size_t written = 0;
    if (lt.algo_get(&algo, attr, &v, width, &written) != CUBLAS_STATUS_SUCCESS) {
      return -1;
    }
    return width == 2 ? static_cast<int64_t>(static_cast<uint16_t>(v)) : static_cast<int64_t>(static_cast<int32_t>(v));
  };
  return "id" + std::to_string(get(CUBLASLT_ALGO_CONFIG_ID, 4)) + "/tile" +
         std::to_string(get(CUBLASLT_ALGO_CONFIG_TILE_ID, 4)) + "/st" +
         std::to_string(get(CUBLASLT_ALGO_CONFIG_STAGES_ID, 4)) + "/sk" +
         std::to_string(get(CUBLASLT_ALGO_CONFIG_SPLITK_NUM, 4)) + "/cl" +
         std::to_string(get(CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, 2)) + "/sw" +
         std::to_string(get(CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, 4)) + "/opt" +
         std::to_string(get(CUBLASLT_ALGO_CONFIG_CUSTOM_OPTION, 4));
}

cublasStatus_t run(const Api &lt, cublasLtHandle_t handle, Plan &p, size_t i, const Operands &o,
                   cudaStream_t stream, const at::Tensor &like) {
  const auto &c = p.candidates[i];
  at::Tensor ws;
  void *wsp = nullptr;
  if (c.workspaceSize > 0) {
    ws = at::empty({static_cast<int64_t>(c.workspaceSize)}, like.options().dtype(at::kByte));
    wsp = ws.data_ptr();
  }
  const float one = 1.f, zero = 0.f;
  return lt.matmul(handle, p.desc, &one, o.w, p.w, o.a, p.a, &zero, o.d, p.d, o.d, p.d, &c.algo, wsp,
                   c.workspaceSize, stream);
}

// Times every candidate on the call's operands (one warm-up, then the best of 5) and keeps the
// fastest. The timed runs write only the output the real run then overwrites.
void tune_plan(const Api &lt, cublasLtHandle_t handle, Plan &p, const Operands &o, cudaStream_t stream,
               const at::Tensor &like, const std::string &shape) {
  cudaEvent_t start = nullptr, stop = nullptr;
  if (lt.event_create(&start) != cudaSuccess || lt.event_create(&stop) != cudaSuccess) {
    throw std::runtime_error("cuBLASLt FP8 GEMM: cudaEventCreate failed");
  }
  struct Events {
    const Api &lt;
    cudaEvent_t a, b;
    ~Events() {
      lt.event_destroy(a);
      lt.event_destroy(b);
    }
  } events{lt, start, stop};
  std::string report = shape + ": " + std::to_string(p.candidates.size()) + " candidates:";
  float best_ms = -1.f;
  size_t best = p.index;
  for (size_t i = 0; i < p.candidates.size(); ++i) {
    float ms = -1.f;
    if (run(lt, handle, p, i, o, stream, like) == CUBLAS_STATUS_SUCCESS) {
      for (int rep = 0; rep < 5; ++rep) {
        float t = 0.f;
        if (lt.event_record(start, stream) != cudaSuccess ||
            run(lt, handle, p, i, o, stream, like) != CUBLAS_STATUS_SUCCESS ||
            lt.event_record(stop, stream) != cudaSuccess || lt.event_synchronize(stop) != cudaSuccess ||
            lt.event_elapsed(&t, start, stop) != cudaSuccess) {
          ms = -1.f;
          break;
        }
        ms = ms < 0.f ? t : std::min(ms, t);
      }
    }
    report += " [" + std::to_string(i) + "] " + describe(lt, p.candidates[i].algo) + " " +
              (ms < 0.f ? std::string("failed") : std::to_string(ms) + " ms");
    if (ms >= 0.f && (best_ms < 0.f || ms < best_ms)) {
      best_ms = ms;
      best = i;
    }
  }
  p.index = best;
  p.tuned = true;
  tune_report() += report + "; chose " + std::to_string(best) + "\n";
}

void check_2d(const at::Tensor &t, const char *name, at::ScalarType kind, int device) {
  if (!(t.is_cuda() && t.get_device() == device && t.scalar_type() == kind && t.dim() == 2 &&
        t.stride(1) == 1 && t.stride(0) >= t.size(1) && t.stride(0) % 16 == 0 &&
        reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0)) {
    throw std::runtime_error(std::string(name) + " must be a 2-d " + c10::toString(kind) +
                             " CUDA tensor on the activation's device with unit column stride, a row "
                             "stride that is a multiple of 16 elements and a 16-byte aligned start");
  }
}

void check_vector(const at::Tensor &t, const char *name, at::ScalarType kind, int64_t n, int device) {
  if (!(t.is_cuda() && t.get_device() == device && t.scalar_type() == kind && t.numel() == n &&
        t.is_contiguous() && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0)) {
    throw std::runtime_error(std::string(name) + " must be a contiguous, 16-byte aligned " +
                             c10::toString(kind) + " CUDA tensor of " + std::to_string(n) +
                             " elements on the activation's device");
  }
}

} // namespace

extern "C" {

int dtf_fp8_gemm_built(void) { return 1; }

// out (m, n) bf16 = (a (m, k) e4m3 * sa (m) fp32 per row) x (w (n, k) e4m3 * sw (n) fp32 per
// output channel)^T + bias (n) bf16 (may be NULL), fp32 accumulation (`fast_accum`: cuBLASLt's
// fast mode, no periodic promotion of partial sums). Row-major operands with unit column stride;
// k a multiple of 16. With `tune`, the first call of a shape outside graph capture times the
// heuristic's candidates and keeps the fastest; else the heuristic's first (as `_scaled_mm`).
// Runs on the device's current stream.
char *dtf_fp8_gemm(const at::Tensor *a, const at::Tensor *w, const at::Tensor *sa, const at::Tensor *sw,
                   const at::Tensor *bias, const at::Tensor *out, int fast_accum, int tune) {
  return dtf::guarded([&] {
    const int device = a->get_device();
    check_2d(*a, "a", at::kFloat8_e4m3fn, device);
    check_2d(*w, "w", at::kFloat8_e4m3fn, device);
    check_2d(*out, "out", at::kBFloat16, device);
    const int64_t m = a->size(0), k = a->size(1), n = w->size(0);
    if (w->size(1) != k || out->size(0) != m || out->size(1) != n) {
      throw std::runtime_error("shapes: a (m, k), w (n, k) and out (m, n) do not agree");
    }
    if (k % 16 != 0) {
      throw std::runtime_error("k must be a multiple of 16 for cuBLASLt's FP8 GEMM");
    }
    check_vector(*sa, "sa", at::kFloat, m, device);
    check_vector(*sw, "sw", at::kFloat, n, device);
    if (bias != nullptr) {
      check_vector(*bias, "bias", at::kBFloat16, n, device);
    }
    if (m == 0 || n == 0) {
      return;
    }
    const Api &lt = api();
    // libc10_cuda's exported device calls (CUDAGuard's inline code would link the CUDA runtime,
    // which this shim leaves to libtorch).
    struct DeviceScope {
      c10::DeviceIndex prev;
      explicit DeviceScope(int d) : prev(c10::cuda::current_device()) {
        c10::cuda::set_device(static_cast<c10::DeviceIndex>(d));
      }
      ~DeviceScope() { c10::cuda::set_device(prev); }
    } scope(device);
    std::lock_guard<std::mutex> lock(state_mutex());
    Device &dev = devices()[device];
    if (dev.handle == nullptr) {
      lt_check(lt.create(&dev.handle), "cublasLtCreate");
    }
    const Operands o{w->data_ptr(), a->data_ptr(), bias != nullptr ? bias->data_ptr() : nullptr,
                     out->data_ptr(), sw->data_ptr<float>(), sa->data_ptr<float>()};
    const uint32_t align[4] = {alignment(o.w), alignment(o.a), alignment(o.d), alignment(o.d)};
    const std::vector<int64_t> key = {m, n, k, a->stride(0), w->stride(0), out->stride(0),
                                      bias != nullptr, fast_accum != 0, align[0], align[1], align[2]};
    auto &slot = dev.plans[key];
    if (!slot) {
      slot = build_plan(lt, dev.handle, m, n, k, a->stride(0), w->stride(0), out->stride(0), o, fast_accum != 0,
                        align);
    }
    Plan &p = *slot;
    set_pointers(lt, p, o);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
    if (tune != 0 && !p.tuned && p.candidates.size() > 1) {
      // Not while a CUDA graph is being captured (timing synchronises): the first eager call of
      // the shape tunes (the engine warms up eagerly before it captures).
      cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
      if (lt.stream_is_capturing(stream, &capturing) == cudaSuccess && capturing == cudaStreamCaptureStatusNone) {
        const std::string shape = "m" + std::to_string(m) + " n" + std::to_string(n) + " k" + std::to_string(k) +
                                  (bias != nullptr ? " bias" : "");
        tune_plan(lt, dev.handle, p, o, stream, *a, shape);
      }
    }
    lt_check(run(lt, dev.handle, p, p.index, o, stream, *a), "cublasLtMatmul");
  });
}

// Every shape's tuning so far (one line each; empty before any), malloc'ed (free with
// dtf_free_error).
char *dtf_fp8_gemm_report(void) {
  std::lock_guard<std::mutex> lock(state_mutex());
  return dtf::dup_error(tune_report());
}

} // extern "C"

#else

extern "C" {

int dtf_fp8_gemm_built(void) { return 0; }

char *dtf_fp8_gemm_report(void) { return dtf::dup_error(""); }

char *dtf_fp8_gemm(const at::Tensor *, const at::Tensor *, const at::Tensor *, const at::Tensor *,
                   const at::Tensor *, const at::Tensor *, int, int) {
  return dtf::dup_error("this build of the engine has no cuBLASLt FP8 GEMM (built without CUDA or without "
                        "cublasLt.h): the FP8 layers use ATen's _scaled_mm");
}

} // extern "C"

#endif
