"""Speed benchmark of one MoE-LoRA FFN layer, fwd+bwd (a script, not a pytest test).

    python bench/bench_moe.py [--quick] [--device cuda] [--dispatch fused] [--T 256 2048] [--E 2 8 32]
    python bench/bench_moe.py --forward [--dims 128 384 8] [--T 100 8192] [--E 4 8 12 16 32]


Builds one layer's FFN with its expert pool (tests/test_experts.PoolFFN: cmoe.FFN + cmoe.Experts, as cmoe.Block
runs FFN-only experts; dim 512, ffn 1376, LoRA rank 16, top-2), E trainable experts with random A and B
and a random router (so routing is non-trivial), frozen base weights (no weight grads; the input grad flows).
Per (T, E) it times, as medians over repeats after warm-up:
  floor      the frozen dense FFN alone (use_experts=False), eager and compiled
  loop       the per-expert loop reference (tests/test_experts.lora_loop in lora_dense's place), eager
  fused      the project's fused dispatch (ffn.dispatch = --dispatch), eager and
             torch.compile(ffn, fullgraph=True, dynamic=False)
The loss includes the balance loss, so the router gets gradients as in training. Ratios are against the
compiled floor. fp32 on CPU, bf16 on CUDA. The last line is the headline.
--forward times the forward alone (no autograd, eager: as generation runs it) of the dense and sparse dispatches,
for the crossover that Experts' "auto" uses without autograd; --dims sets the layer (the MiniCoIN model: 128 384 8)."""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # the modules, and the loop reference in tests/test_experts.py
import cmoe  # noqa: E402
from test_experts import PoolFFN, lora_loop  # noqa: E402

DENSE = cmoe.lora_dense


def build(T, E, device, dtype, seed=0, batch=8, dims=(512, 1376, 16)):
    g = torch.Generator().manual_seed(seed)
    cfg = cmoe.LlamaConfig(dim=dims[0], ffn_dim=dims[1], n_heads=8, n_kv_heads=8, n_layers=1)
    ecfg = cmoe.ExpertConfig(rank=dims[2], alpha=2.0 * dims[2], top_k=2)
    ffn = PoolFFN(cfg, ecfg)
    dense = (ffn.ffn.gate_proj, ffn.ffn.up_proj, ffn.ffn.down_proj)
    with torch.no_grad():
        for lin in dense:
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / math.sqrt(lin.in_features))
    ffn.add_experts(E, generator=g)
    with torch.no_grad():
        for p in (experts.train_B for experts in ffn.lora.values()):
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    ffn.add_router(torch.randn(E, cfg.dim, generator=g) / math.sqrt(cfg.dim))
    for lin in dense:
        lin.weight.requires_grad_(False)
    ffn = ffn.to(device=device, dtype=dtype)
    # T tokens as `batch` sequences: with batch=1 the compiled router backward (index_put of
    # router_NED[task_ids_B]) hits an inductor CPU codegen bug in torch 2.13 (out-of-bounds atomic_add ->
    # "free(): corrupted unsorted chunks").
    x = torch.randn(batch, T // batch, cfg.dim, generator=g).to(device, dtype)
    gy = torch.randn(batch, T // batch, cfg.dim, generator=g).to(device, dtype)
    return ffn, x, gy


def step(fn, x, gy, use_experts):
    xx = x.detach().requires_grad_()
    y, aux = fn(xx, use_experts=use_experts)
    ((y.float() * gy.float()).sum() + aux).backward()
    return y.detach(), xx.grad


def timeit(fn, ffn, x, gy, use_experts, reps, warm, sync):
    for _ in range(warm):
        step(fn, x, gy, use_experts)
    ts = []
    for _ in range(reps):
        ffn.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        step(fn, x, gy, use_experts)
        sync()
        ts.append(time.perf_counter() - t0)
    ffn.zero_grad(set_to_none=True)
    return statistics.median(ts) * 1e3


def compiled(ffn):
    torch._dynamo.reset()  # fresh caches per module: no recompile-limit fallback to eager across configs
    return torch.compile(ffn, fullgraph=True, dynamic=False)


def forward_crossover(a, dev, dtype, sync):
    """Forward-only, eager, no autograd: dense vs sparse dispatch per (T, E), median of a.reps."""
    print(f"forward only, eager, no autograd: D={a.dims[0]} F={a.dims[1]} r={a.dims[2]} top-2, median of {a.reps} (ms)")
    for T in a.T:
        for E in a.E:
            ffn, x, _ = build(T, E, dev, dtype, batch=min(a.batch, T), dims=a.dims)
            ms = {}
            with torch.no_grad():
                for d in ("dense", "sparse"):
                    ffn.dispatch = d
                    for _ in range(a.warm):
                        ffn(x)
                    ts = []
                    for _ in range(a.reps):
                        sync()
                        t0 = time.perf_counter()
                        ffn(x)
                        sync()
                        ts.append(time.perf_counter() - t0)
                    ms[d] = statistics.median(ts) * 1e3
            print(f"T={T:>5} E={E:>3}: dense {ms['dense']:8.2f}  sparse {ms['sparse']:8.2f}  sparse/dense "
                  f"{ms['sparse'] / ms['dense']:.2f}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="T=256, E=8 only, 3 repeats")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dispatch", nargs="+", default=["dense", "sparse", "auto"],
                    help="Experts.dispatch values to time as the fused path (dense, sparse, auto)")
    ap.add_argument("--T", type=int, nargs="+", default=[256, 2048])
    ap.add_argument("--E", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--batch", type=int, default=8, help="T tokens = batch x T/batch (batch=1 crashes, see build)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (the dev machine has 2 shared cores)")
    ap.add_argument("--forward", action="store_true", help="forward-only dense vs sparse (the no-autograd crossover)")
    ap.add_argument("--dims", type=int, nargs=3, default=[512, 1376, 16], metavar=("D", "F", "R"))
    a = ap.parse_args()
    if a.quick:
        a.T, a.E, a.reps, a.warm = [256], [8], 3, 1
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.set_num_threads(a.threads)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
    if a.forward:
        return forward_crossover(a, dev, dtype, sync)

    print(f"torch {torch.__version__}  device {dev}  dtype {str(dtype).split('.')[-1]}  threads "
          f"{torch.get_num_threads()}  dispatch {' '.join(a.dispatch)}  batch {a.batch}  D={a.dims[0]} F={a.dims[1]} r={a.dims[2]} top-2  fwd+bwd median of {a.reps}")
    hdr = (f"{'T':>5} {'E':>3} {'fused':>6} | {'floor eag':>9} {'floor cmp':>9} | {'loop eag':>9} {'fused eag':>9} {'fused cmp':>9}"
           f" | {'loop/fl':>7} {'fus_e/fl':>8} {'fus_c/fl':>8} {'loop/fus_c':>10} | {'max err':>8}")
    print(hdr)
    print("-" * len(hdr))
    res = {}
    for T in a.T:
        for E in a.E:
            ffn, x, gy = build(T, E, dev, dtype, batch=a.batch, dims=a.dims)
            r = {}
            r["floor_e"] = timeit(ffn, ffn, x, gy, False, a.reps, a.warm, sync)
            r["floor_c"] = timeit(compiled(ffn), ffn, x, gy, False, a.reps, a.warm, sync)
            cmoe.lora_dense, ffn.dispatch = lora_loop, "dense"  # the loop reference in the dense path's place
            y_ref, gx_ref = step(ffn, x, gy, True)
            ffn.zero_grad(set_to_none=True)
            r["loop"] = timeit(ffn, ffn, x, gy, True, a.reps, a.warm, sync)
            cmoe.lora_dense = DENSE
            for d in a.dispatch:  # every fused variant against the same floor and loop
                ffn.dispatch = d
                r = dict(r)
                r["fused_e"] = timeit(ffn, ffn, x, gy, True, a.reps, a.warm, sync)
                cf = compiled(ffn)
                y, gx = step(cf, x, gy, True)  # compiles; also the correctness check against the loop
                ffn.zero_grad(set_to_none=True)
                err = max(float((y - y_ref).abs().max() / y_ref.abs().max().clamp(min=1)),
                          float((gx - gx_ref).abs().max() / gx_ref.abs().max().clamp(min=1)))
                r["fused_c"] = timeit(cf, ffn, x, gy, True, a.reps, a.warm, sync)
                fl = r["floor_c"]
                print(f"{T:>5} {E:>3} {d:>6} | {r['floor_e']:9.2f} {r['floor_c']:9.2f} | {r['loop']:9.2f} {r['fused_e']:9.2f}"
                      f" {r['fused_c']:9.2f} | {r['loop'] / fl:7.2f} {r['fused_e'] / fl:8.2f} {r['fused_c'] / fl:8.2f}"
                      f" {r['loop'] / r['fused_c']:10.2f} | {err:8.1e}{'' if err < tol else '  MISMATCH'}", flush=True)
                res[(T, E, d)] = r
                del cf
            del ffn
    Th = 2048 if 2048 in a.T else max(a.T)
    d = "auto" if "auto" in a.dispatch else a.dispatch[-1]  # the headline is the dispatch training uses
    parts = []
    for E in (8, 32):
        if (Th, E, d) in res:
            r = res[(Th, E, d)]
            parts.append(f"fused_compiled({d})/dense_floor at T={Th}, E={E}: {r['fused_c'] / r['floor_c']:.2f}x"
                         f" (target <= {1.25 if E == 8 else 1.6})")
    if (Th, 32, d) in res:
        r = res[(Th, 32, d)]
        parts.append(f"loop/fused_compiled at E=32: {r['loop'] / r['fused_c']:.2f}x (target >= 2)")
    if not parts:
        (T, E, d), r = next(iter(res.items()))
        parts.append(f"fused_compiled({d})/dense_floor at T={T}, E={E}: {r['fused_c'] / r['floor_c']:.2f}x")
    print("HEADLINE " + "; ".join(parts))


if __name__ == "__main__":
    main()
