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
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#ifdef DTF_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

char *dup_error(const std::string &msg) {
  char *out = static_cast<char *>(std::malloc(msg.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, msg.c_str(), msg.size() + 1);
  }
  return out;
}

template <typename F> char *guarded(F &&f) {
  try {
    f();
    return nullptr;
  } catch (const std::exception &e) {
    return dup_error(e.what());
  } catch (...) {
    return dup_error("unknown C++ exception");
  }
}

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

#ifdef DTF_WITH_CUDA

int dtf_has_cuda(void) { return 1; }

// The current stream of CUDA device `device` (the legacy default stream unless a stream guard or
// a capture changed it) as a cudaStream_t.
char *dtf_current_stream(int device, void **stream) {
  return guarded([&] {
    *stream = static_cast<void *>(c10::cuda::getCurrentCUDAStream(device).stream());
  });
}

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

#endif

} // extern "C"
