// FP8 (e4m3) scaled dot-product attention on Hopper through cuDNN's graph API, for the FP8
// precision's attention (src/nn/fp8_attention.rs). ATen 2.11's SDPA has no FP8 path, so this file
// builds the graph with the cudnn-frontend headers (header-only, from the `nvidia-cudnn-frontend`
// wheel at build time) and loads cuDNN dynamically: libtorch_cuda has libcudnn.so.9 loaded
// already, so the engine links nothing new and a build without the headers only loses this op.
//
// Same C ABI conventions as aten_shim.cpp: every function returns NULL on success or a malloc'ed
// message the caller frees with dtf_free_error.

#include <ATen/ATen.h>

#include "dtf_guarded.h"

#include <cstdlib>
#include <cstring>
#include <string>

#if defined(DTF_WITH_CUDA) && defined(DTF_WITH_CUDNN_FE)
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <dlfcn.h>

#include <cudnn_frontend.h>

#include <map>
#include <memory>
#include <mutex>
#include <tuple>
#include <vector>

namespace cudnn_frontend {
// The frontend's dynamic loading reads cuDNN's entry points through this handle.
void *cudnn_dlhandle = nullptr;
} // namespace cudnn_frontend
#endif


// Slots (fp32 elements) of the scale buffer the FP8 attention kernels and cuDNN share, each 16
// bytes from the next (cuDNN's scalar tensors are read as separate, aligned 1-element tensors).
// Must match the DTF_SLOT_* constants of flux_kernels.cu.inc and src/nn/fp8_attention.rs.
#define DTF_SLOT_DESCALE_Q 12
#define DTF_SLOT_DESCALE_K 16
#define DTF_SLOT_DESCALE_V 20
#define DTF_SLOT_DESCALE_S 24
#define DTF_SLOT_SCALE_S 28
#define DTF_SLOT_SCALE_O 32
#define DTF_SLOT_AMAX_S 40
#define DTF_SLOT_AMAX_O 44
#define DTF_SLOTS 48

#if defined(DTF_WITH_CUDA) && defined(DTF_WITH_CUDNN_FE)

namespace {

namespace fe = cudnn_frontend;
using TensorAttr = std::shared_ptr<fe::graph::Tensor_attributes>;

void fe_check(fe::error_t e, const char *what) {
  if (!e.is_good()) {
    throw std::runtime_error(std::string("cuDNN FP8 attention: ") + what + ": " + e.get_message());
  }
}

void load_cudnn() {
  static std::once_flag once;
  static std::string error;
  std::call_once(once, [] {
    // Already loaded by libtorch_cuda: RTLD_NOLOAD returns that copy without a search.
    void *h = dlopen("libcudnn.so.9", RTLD_NOW | RTLD_NOLOAD);
    if (h == nullptr) {
      h = dlopen("libcudnn.so.9", RTLD_NOW);
    }
    if (h == nullptr) {
      const char *e = dlerror();
      error = std::string("cannot load libcudnn.so.9: ") + (e ? e : "unknown error");
      return;
    }
    cudnn_frontend::cudnn_dlhandle = h;
  });
  if (!error.empty()) {
    throw std::runtime_error(error);
  }
}

struct Plan {
  std::shared_ptr<fe::graph::Graph> graph;
  TensorAttr q, k, v, o, descale_q, descale_k, descale_v, descale_s, scale_s, scale_o, amax_s, amax_o;
  int64_t workspace = 0;
  // The execution plan in use (heuristics' first until tuned), and whether the candidates (all
  // built when the plan's key asks to tune) were timed yet.
  int64_t index = 0;
  bool tuned = false;
};

struct Device {
  cudnnHandle_t handle = nullptr;
  std::map<std::vector<int64_t>, std::shared_ptr<Plan>> plans;
};

std::mutex &state_mutex() {
  static std::mutex mu;
  return mu;
}

std::map<int, Device> &devices() {
  static std::map<int, Device> d;
  return d;
}

// dims (b, h, s, d) and strides in that order from a (b, s, h, d) tensor.
std::vector<int64_t> bhsd_strides(const at::Tensor &t) {
  return {t.stride(0), t.stride(2), t.stride(1), t.stride(3)};
}

std::shared_ptr<Plan> build_plan(cudnnHandle_t handle, const at::Tensor &q, const at::Tensor &k,
                                 const at::Tensor &v, const at::Tensor &o, float attn_scale, bool all) {
  const int64_t b = q.size(0), sq = q.size(1), h = q.size(2), d = q.size(3), skv = k.size(1);
  auto p = std::make_shared<Plan>();
  p->graph = std::make_shared<fe::graph::Graph>();
  auto &g = *p->graph;
  g.set_io_data_type(fe::DataType_t::FP8_E4M3)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);
  auto input = [&](const char *name, int64_t uid, int64_t s, const at::Tensor &t) {
    return g.tensor(fe::graph::Tensor_attributes()
                        .set_name(name)
                        .set_uid(uid)
                        .set_dim({b, h, s, d})
                        .set_stride(bhsd_strides(t)));
  };
  p->q = input("Q", 1, sq, q);
  p->k = input("K", 2, skv, k);
  p->v = input("V", 3, skv, v);
  auto scalar = [&](const char *name, int64_t uid) {
    return g.tensor(fe::graph::Tensor_attributes()
                        .set_name(name)
                        .set_uid(uid)
                        .set_dim({1, 1, 1, 1})
                        .set_stride({1, 1, 1, 1})
                        .set_data_type(fe::DataType_t::FLOAT));
  };
  p->descale_q = scalar("descale_q", 10);
  p->descale_k = scalar("descale_k", 11);
  p->descale_v = scalar("descale_v", 12);
  p->descale_s = scalar("descale_s", 13);
  p->scale_s = scalar("scale_s", 14);
  p->scale_o = scalar("scale_o", 15);
  auto opts = fe::graph::SDPA_fp8_attributes()
                  .set_name("dtf_sdpa_fp8")
                  .set_generate_stats(false)
                  .set_causal_mask(false)
                  .set_attn_scale(attn_scale);
  auto [O, stats, amax_s, amax_o] = g.sdpa_fp8(p->q, p->k, p->v, p->descale_q, p->descale_k, p->descale_v,
                                               p->descale_s, p->scale_s, p->scale_o, opts);
  (void)stats;
  O->set_output(true).set_uid(4).set_dim({b, h, sq, d}).set_stride(bhsd_strides(o));
  amax_s->set_output(true).set_uid(16).set_dim({1, 1, 1, 1}).set_stride({1, 1, 1, 1}).set_data_type(
      fe::DataType_t::FLOAT);
  amax_o->set_output(true).set_uid(17).set_dim({1, 1, 1, 1}).set_stride({1, 1, 1, 1}).set_data_type(
      fe::DataType_t::FLOAT);
  p->o = O;
  p->amax_s = amax_s;
  p->amax_o = amax_o;
  fe_check(g.validate(), "validate");
  fe_check(g.build_operation_graph(handle), "build_operation_graph");
  fe_check(g.create_execution_plans({fe::HeurMode_t::A}), "create_execution_plans");
  fe_check(g.check_support(handle), "check_support");
  // With `all`, every candidate heuristics lists (those that fail to build are skipped), for
  // `tune_plan` to time; else the first one that builds.
  fe_check(g.build_plans(all ? fe::BuildPlanPolicy_t::ALL : fe::BuildPlanPolicy_t::HEURISTICS_CHOICE),
           "build_plans");
  fe_check(g.get_workspace_size(p->workspace), "get_workspace_size");
  return p;
}

// What the last tuning found, for the benchmarks' reports (dtf_sdpa_fp8_report).
std::string &tune_report() {
  static std::string r;
  return r;
}

// Times every built candidate plan on the real operands (one warm-up, then the best of 5) and
// keeps the fastest: cuDNN's heuristics rank its FP8 attention kernels by a model, not by this
// GPU's clock. Runs on `stream` outside graph capture; the operands are the call's own, so the
// timed runs only write the output the real run overwrites.
void tune_plan(Plan &p, cudnnHandle_t handle, cudaStream_t stream,
               std::unordered_map<TensorAttr, void *> &pack, const at::Tensor &like) {
  auto &g = *p.graph;
  const int64_t count = g.get_execution_plan_count();
  std::string report = "plans " + std::to_string(count) + ":";
  cudaEvent_t start = nullptr, stop = nullptr;
  if (fe::detail::cuda_event_create(&start) != cudaSuccess ||
      fe::detail::cuda_event_create(&stop) != cudaSuccess) {
    throw std::runtime_error("cuDNN FP8 attention: cudaEventCreate failed");
  }
  struct Events {
    cudaEvent_t a, b;
    ~Events() {
      fe::detail::cuda_event_destroy(a);
      fe::detail::cuda_event_destroy(b);
    }
  } events{start, stop};
  float best_ms = -1.f;
  int64_t best = p.index;
  for (int64_t i = 0; i < count; ++i) {
    int64_t ws_size = 0;
    if (!g.get_workspace_size_plan_at_index(i, ws_size).is_good()) {
      continue;  // not built
    }
    at::Tensor ws;
    if (ws_size > 0) {
      ws = at::empty({ws_size}, like.options().dtype(at::kByte));
    }
    void *wsp = ws_size > 0 ? ws.data_ptr() : nullptr;
    if (!g.execute_plan_at_index(handle, pack, wsp, i).is_good()) {
      continue;
    }
    float ms = -1.f;
    for (int rep = 0; rep < 5; ++rep) {
      float t = 0.f;
      if (fe::detail::cuda_event_record(start, stream) != cudaSuccess ||
          !g.execute_plan_at_index(handle, pack, wsp, i).is_good() ||
          fe::detail::cuda_event_record(stop, stream) != cudaSuccess ||
          fe::detail::cuda_event_synchronize(stop) != cudaSuccess ||
          fe::detail::cuda_event_elapsed_time(&t, start, stop) != cudaSuccess) {
        ms = -1.f;
        break;
      }
      ms = ms < 0.f ? t : std::min(ms, t);
    }
    std::string name;
    (void)g.get_plan_name_at_index(i, name);
    report += " [" + std::to_string(i) + "] " + name + " " + (ms < 0.f ? "failed" : std::to_string(ms) + " ms");
    if (ms >= 0.f && (best_ms < 0.f || ms < best_ms)) {
      best_ms = ms;
      best = i;
    }
  }
  if (best_ms >= 0.f) {
    p.index = best;
    fe_check(g.get_workspace_size_plan_at_index(best, p.workspace), "get_workspace_size_plan_at_index");
  }
  p.tuned = true;
  tune_report() = report + "; chose " + std::to_string(p.index);
}

void check_operand(const at::Tensor &t, const char *name, int device) {
  if (!(t.is_cuda() && t.get_device() == device && t.scalar_type() == at::kFloat8_e4m3fn &&
        t.dim() == 4 && t.stride(3) == 1 && t.size(3) == 128 &&
        reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0)) {
    throw std::runtime_error(std::string(name) +
                             " must be a float8_e4m3fn (b, s, heads, 128) CUDA tensor with a "
                             "contiguous, 16-byte aligned last dim on q's device");
  }
  for (int i = 0; i < 3; ++i) {
    if (t.stride(i) % 16 != 0) {
      throw std::runtime_error(std::string(name) + "'s strides must be multiples of 16");
    }
  }
}

} // namespace

extern "C" {

int dtf_fp8_attention_built(void) { return 1; }

// O = softmax(attn_scale * Q K^T) V over FP8 operands: q (b, sq, h, 128), k/v (b, skv, h, 128), o
// (b, sq, h, 128), all float8_e4m3fn with a contiguous last dim (any other strides, multiples of
// 16 bytes); `slots` an fp32 (>= 48) CUDA tensor holding descale_q/k/v, descale_s, scale_s and
// scale_o at the DTF_SLOT_* offsets (written on the device by the kernels before this call) and
// receiving cuDNN's amax of S and O. The values are q * descale_q etc., O is written scaled by
// scale_o. Runs on the device's current stream; the plan for a shape is built on first use
// (outside any CUDA graph capture: the caller warms up first) and reused.
char *dtf_sdpa_fp8(const at::Tensor *q, const at::Tensor *k, const at::Tensor *v, const at::Tensor *o,
                   const at::Tensor *slots, double attn_scale, int tune) {
  return dtf::guarded([&] {
    const int device = q->get_device();
    check_operand(*q, "q", device);
    check_operand(*k, "k", device);
    check_operand(*v, "v", device);
    check_operand(*o, "o", device);
    if (k->sizes() != v->sizes() || k->size(0) != q->size(0) || k->size(2) != q->size(2) ||
        o->sizes() != q->sizes() || k->strides() != v->strides()) {
      throw std::runtime_error("k and v must have one shape and layout, batch and heads of q; o q's shape");
    }
    if (!(slots->is_cuda() && slots->get_device() == device && slots->scalar_type() == at::kFloat &&
          slots->is_contiguous() && slots->numel() >= DTF_SLOTS &&
          reinterpret_cast<uintptr_t>(slots->data_ptr()) % 16 == 0)) {
      throw std::runtime_error("slots must be a contiguous, aligned fp32 CUDA tensor of >= 48 elements");
    }
    if (q->numel() == 0 || k->size(1) == 0) {
      return;
    }
    load_cudnn();
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
      if (fe::detail::create_handle(&dev.handle) != CUDNN_STATUS_SUCCESS) {
        dev.handle = nullptr;
        throw std::runtime_error("cuDNN FP8 attention: cudnnCreate failed");
      }
    }
    const float scale = static_cast<float>(attn_scale);
    int32_t scale_bits = 0;
    std::memcpy(&scale_bits, &scale, sizeof scale);
    std::vector<int64_t> key = {q->size(0), q->size(1), q->size(2), k->size(1), scale_bits};
    for (const at::Tensor *t : {q, k, o}) {
      for (int i = 0; i < 4; ++i) {
        key.push_back(t->stride(i));
      }
    }
    key.push_back(tune != 0 ? 1 : 0);
    auto &slot = dev.plans[key];
    if (!slot) {
      slot = build_plan(dev.handle, *q, *k, *v, *o, scale, tune != 0);
    }
    Plan &p = *slot;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
    if (fe::detail::set_stream(dev.handle, stream) != CUDNN_STATUS_SUCCESS) {
      throw std::runtime_error("cuDNN FP8 attention: cudnnSetStream failed");
    }
    float *s = slots->data_ptr<float>();
    std::unordered_map<TensorAttr, void *> pack = {
        {p.q, q->data_ptr()},
        {p.k, k->data_ptr()},
        {p.v, v->data_ptr()},
        {p.o, o->data_ptr()},
        {p.descale_q, s + DTF_SLOT_DESCALE_Q},
        {p.descale_k, s + DTF_SLOT_DESCALE_K},
        {p.descale_v, s + DTF_SLOT_DESCALE_V},
        {p.descale_s, s + DTF_SLOT_DESCALE_S},
        {p.scale_s, s + DTF_SLOT_SCALE_S},
        {p.scale_o, s + DTF_SLOT_SCALE_O},
        {p.amax_s, s + DTF_SLOT_AMAX_S},
        {p.amax_o, s + DTF_SLOT_AMAX_O},
    };
    if (tune != 0 && !p.tuned) {
      // Not while a CUDA graph is being captured (timing needs synchronisation): the first
      // eager call of the shape tunes (the engine warms up eagerly before it captures).
      cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
      if (fe::detail::cuda_stream_is_capturing(stream, &capturing) == cudaSuccess &&
          capturing == cudaStreamCaptureStatusNone) {
        tune_plan(p, dev.handle, stream, pack, *q);
      }
    }
    at::Tensor workspace;
    void *ws = nullptr;
    if (p.workspace > 0) {
      workspace = at::empty({p.workspace}, q->options().dtype(at::kByte));
      ws = workspace.data_ptr();
    }
    fe_check(p.graph->execute_plan_at_index(dev.handle, pack, ws, p.index), "execute");
  });
}

// What the last tuning of a shape's plans timed and chose (empty before any), malloc'ed (free
// with dtf_free_error).
char *dtf_sdpa_fp8_report(void) {
  std::lock_guard<std::mutex> lock(state_mutex());
  return dtf::dup_error(tune_report().c_str());
}

} // extern "C"

#else

extern "C" {

int dtf_fp8_attention_built(void) { return 0; }

char *dtf_sdpa_fp8_report(void) { return dtf::dup_error(""); }

char *dtf_sdpa_fp8(const at::Tensor *, const at::Tensor *, const at::Tensor *, const at::Tensor *,
                   const at::Tensor *, double, int) {
  return dtf::dup_error(
      "this build of the engine has no FP8 attention (built without CUDA or without the "
      "cudnn-frontend headers: scripts/setup.sh installs nvidia-cudnn-frontend)");
}

} // extern "C"

#endif
