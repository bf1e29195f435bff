"""Is the Ulysses output's head-group -> token re-layout worth removing? (nvidia-h200, torch)

A Ulysses rank gets its rows' attention output back as head groups `(u, rows, H/u, d)`; the
engine re-lays them as tokens `(rows, H*d)` (one copy, 16-byte elements) and then runs the output
projection `out += attn @ W[:, :h]^T` (single blocks' linear2 attention half). The alternative
skips the copy: `out += sum_j group_j @ W[:, j*h/u:(j+1)*h/u]^T` (u matmuls of K = h/u).
Both are captured in a CUDA graph (as the engine runs) and timed per call. Prints JSON lines.
Usage: python3 relayout_matmul.py [iters]
"""
import json, sys
import torch

iters = int(sys.argv[1]) if len(sys.argv) > 1 else 200
dev, dt = "cuda", torch.bfloat16
h, heads, d = 3072, 24, 128
torch.manual_seed(0)
w = torch.randn(h, h + 4 * h, device=dev, dtype=dt) * 0.02  # linear2 (h, h + mlp)
wa = w[:, :h]


def graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            fn()
    return g


def timed(g):
    for _ in range(5):
        g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(iters):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / (iters * 20)  # us per call


for u, rows in [(2, 2304), (4, 1152), (8, 576), (2, 9216), (4, 4608)]:
    back = torch.randn(u, rows, heads // u, d, device=dev, dtype=dt)
    out0 = torch.randn(rows, h, device=dev, dtype=dt)
    outs = {k: out0.clone() for k in ("copy", "groups", "matmul")}
    tok = torch.empty(rows, h, device=dev, dtype=dt)
    hu = h // u

    def copy_then_mm():
        copy_only()
        outs["copy"].addmm_(tok, wa.t())

    def copy_only():  # 16-byte elements, as the engine's groups_to_tokens
        wide = tok.view(rows, u, heads // u, d).view(torch.complex128)
        wide.copy_(back.view(torch.complex128).permute(1, 0, 2, 3))

    def grouped_mm():
        o = outs["groups"]
        for j in range(u):
            o.addmm_(back[j].reshape(rows, hu), wa[:, j * hu:(j + 1) * hu].t())

    def mm_only():
        outs["matmul"].addmm_(tok, wa.t())

    # same result (bf16 accumulation order differs: report the distance)
    copy_then_mm()
    grouped_mm()
    diff = ((outs["copy"].float() - outs["groups"].float()).norm() / (outs["copy"].float() - out0.float()).norm()).item()
    r = {"u": u, "rows": rows, "rel_l2_grouped_vs_copy": diff}
    for name, fn in [("copy_then_matmul_us", copy_then_mm), ("grouped_matmuls_us", grouped_mm),
                     ("copy_us", copy_only), ("matmul_us", mm_only)]:
        r[name] = round(timed(graphed(fn)), 2)
    print(json.dumps(r), flush=True)
