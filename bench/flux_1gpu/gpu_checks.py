#!/usr/bin/env python3
"""GPU facts the engine's fused formulations rely on, and where diffusers' eager step spends its time.

1. `_addmm_activation(use_gelu=True)` on CUDA bf16: which GELU (tanh / erf) it computes.
2. complex fp16 (`view_as_complex` on half) multiply on CUDA: supported, and its error.
3. SDPA at Flux.1-dev's attention shape (1, 24, 4608, 128) bf16: the backend libtorch picks and
   each backend's time.
4. torch.profiler over one diffusers FluxTransformer2DModel forward (full size, random weights):
   GPU time by kernel class (matmul / attention / other), top kernels.
Prints one JSON line `CHECKS {...}`.
"""
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

res = {}
dev = "cuda"
torch.manual_seed(0)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# 1. GELU epilogue
x = torch.randn(4608, 3072, device=dev, dtype=torch.bfloat16)
w = torch.randn(12288, 3072, device=dev, dtype=torch.bfloat16) / 3072 ** 0.5
b = torch.randn(12288, device=dev, dtype=torch.bfloat16)
y = torch._addmm_activation(b, x, w.t(), use_gelu=True).float()
z = torch.addmm(b.float(), x.float(), w.t().float())
res["addmm_gelu_rel_vs_tanh_fp32"] = rel(y, F.gelu(z, approximate="tanh"))
res["addmm_gelu_rel_vs_erf_fp32"] = rel(y, F.gelu(z))
res["bf16_linear_then_gelu_tanh_rel_vs_fp32"] = rel(F.gelu(torch.addmm(b, x, w.t()), approximate="tanh"), F.gelu(z, approximate="tanh"))

# 2. complex fp16 multiply
try:
    q = torch.randn(1, 24, 4608, 128, device=dev, dtype=torch.bfloat16)
    ang = torch.rand(1, 1, 4608, 64, device=dev, dtype=torch.float64) * 100
    f32 = torch.complex(ang.cos().float(), ang.sin().float())
    f16 = torch.complex(ang.cos().half(), ang.sin().half())
    r32 = torch.view_as_real(torch.view_as_complex(q.float().reshape(1, 24, 4608, 64, 2)) * f32).reshape(q.shape)
    r16 = torch.view_as_real(torch.view_as_complex(q.half().reshape(1, 24, 4608, 64, 2)) * f16).reshape(q.shape)
    res["rope16_rel_vs_fp32"] = rel(r16.to(torch.bfloat16), r32)
    res["rope32_bf16_rel_vs_fp32"] = rel(r32.to(torch.bfloat16), r32)
except Exception as e:  # noqa: BLE001
    res["rope16_error"] = repr(e)[:300]

# 3. SDPA backends
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

q, k, v = (torch.randn(1, 24, 4608, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
try:
    res["sdpa_default_choice"] = int(torch._fused_sdp_choice(q, k, v))
except Exception as e:  # noqa: BLE001
    res["sdpa_default_choice"] = repr(e)[:200]
flop = 4 * 4608 * 4608 * 3072


def t_ms(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n


ref = F.scaled_dot_product_attention(q, k, v)
res["sdpa_default_ms"] = t_ms(lambda: F.scaled_dot_product_attention(q, k, v))
for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                 ("cudnn", SDPBackend.CUDNN_ATTENTION)):
    try:
        with sdpa_kernel([be]):
            out = F.scaled_dot_product_attention(q, k, v)
            res[f"sdpa_{name}_ms"] = t_ms(lambda: F.scaled_dot_product_attention(q, k, v))
            res[f"sdpa_{name}_tflops"] = flop / res[f"sdpa_{name}_ms"] / 1e9
            res[f"sdpa_{name}_rel_vs_default"] = rel(out, ref)
    except Exception as e:  # noqa: BLE001
        res[f"sdpa_{name}_error"] = repr(e)[:200]
del q, k, v, ref, x, w, b, y, z
torch.cuda.empty_cache()

# 4. profile one diffusers forward
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import flux_bench_common as C  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402

model = C.build_transformer(FluxTransformer2DModel, C.FLUX_DEV_CONFIG, dev, torch.bfloat16)
inp = C.make_inputs(C.FLUX_DEV_CONFIG, 1024, 1024, 512, dev, torch.bfloat16)
g = torch.full([1], 3.5, device=dev)


def fwd():
    return model(hidden_states=inp["latents"], timestep=torch.full([1], 1.0, device=dev, dtype=torch.bfloat16),
                 guidance=g, pooled_projections=inp["pooled"], encoder_hidden_states=inp["prompt_embeds"],
                 txt_ids=inp["txt_ids"], img_ids=inp["img_ids"], return_dict=False)[0]


with torch.inference_mode():
    fwd(); fwd()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fwd()
        torch.cuda.synchronize()
cls = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
per = {}
for evt in prof.events():
    if evt.device_type != torch.autograd.DeviceType.CUDA:
        continue
    n = evt.name
    us = evt.device_time if hasattr(evt, "device_time") else evt.cuda_time
    ln = n.lower()
    c = ("attention" if any(s in ln for s in ("flash", "fmha", "attention", "cudnn", "sdpa"))
         else "matmul" if any(s in ln for s in ("gemm", "xmma", "cutlass", "nvjet", "cublas", "sm90_"))
         else "other")
    cls[c] += us
    per[n[:90]] = per.get(n[:90], 0.0) + us
res["diffusers_profile_ms"] = {k: v / 1e3 for k, v in cls.items()}
res["diffusers_profile_total_ms"] = sum(cls.values()) / 1e3
res["diffusers_profile_top"] = [(k, round(v / 1e3, 2)) for k, v in sorted(per.items(), key=lambda x: -x[1])[:25]]
print("CHECKS " + json.dumps(res), flush=True)
