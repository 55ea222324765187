"""The first GPU's check, in one command (a script, not a pytest test): three parts, each under its own time limit,
then one table.

    python bench/gpu_check.py --out DIR                 # all three parts (about 8 minutes on an H200)
    python bench/gpu_check.py --out DIR --train quick   # part 3 as train.py --quick; --train skip: parts 1-2 only
    python bench/gpu_check.py --dry-run                 # tiny sizes on the CPU: checks the script, not the GPU

1. moe    bench/bench_moe.py's MoE-LoRA FFN layer (dim 512, ffn 1376, rank 16, top-2) in bf16, fwd+bwd, compiled: the
          frozen dense floor and the fused dispatches dense, sparse (the block plan: two bmm over 32-row blocks) and
          grouped (the same block plan through torch._grouped_mm, one grouped GEMM per LoRA factor, where torch has
          it); median ms of repeats, each checked against the per-expert loop.
2. step   one compiled training step of a Llama-3.2-1B-sized random model (train.PRESETS["llama-3.2-1b"] + CLIP
          ViT-L/14-336 + projector, built by train.prepare as train.py builds it: the frozen base in bf16, task 1's
          fp32 experts on FFN and attention, bf16 autocast) on a batch of B x S tokens (S = 255 text + 576 image, as
          --max-len 256): median step time, tokens/s, MFU against --peak-tflops (H200 bf16 dense: 989), the peak
          memory (torch.cuda.max_memory_allocated) beside what `train.py --plan` predicts for the same settings.
3. train  the default `python train.py` on MiniCoIN (bf16, compiled: CUDA's defaults) as a subprocess in a temporary
          folder: Last, BWT and total time from its metrics.json.
A part that fails or runs out of time prints its error in the table and the next part runs. --out DIR writes the
table as DIR/gpu_check.json and DIR/gpu_check.md. Without CUDA (and without --dry-run) it says so and exits 2."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
import bench_moe  # noqa: E402  (also puts tests/ on the path: its loop reference)
import cmoe  # noqa: E402
import train  # noqa: E402
from vision import CLIPVision, Projector, VisionConfig  # noqa: E402

H200_BF16_TFLOPS = 989.0  # dense bf16 tensor-core peak of an H200 (SXM), without sparsity


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds):
    """SIGALRM raises PartTimeout in the part's Python code once `seconds` pass (a kernel already queued finishes)."""
    def fire(signum, frame):
        raise PartTimeout(f"ran past its {seconds} s limit")
    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(int(seconds))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------------------------------------
# 1. the MoE layer benchmark in bf16, with torch._grouped_mm where torch has it

def lora_grouped(x_TD, a_EDR, b_ERO, plan, scale, x_bLD=None):
    """cmoe.lora_sparse's result through torch._grouped_mm: the block plan's rows are grouped by expert already (each
    group padded to 32-row blocks), so one grouped GEMM per factor replaces the per-block bmm and the per-block copies
    of A and B. The unused tail blocks join the last group (running max of the blocks' experts): their gate is 0, and
    rows past the last offset would be left unwritten."""
    pos_N, tok_M, w_M, e_b = plan
    E, T = a_EDR.shape[0], x_TD.shape[0]
    x_MD = cmoe.to_rows(x_TD, plan).flatten(0, 1) if x_bLD is None else x_bLD.flatten(0, 1)
    e_b = e_b.cummax(0).values
    offs_E = (F.one_hot(e_b, E).sum(0).cumsum(0) * (tok_M.shape[0] // e_b.shape[0])).to(torch.int32)
    dt = torch.bfloat16  # _grouped_mm takes bf16 operands
    h_MR = torch._grouped_mm(x_MD.to(dt), a_EDR.to(dt), offs=offs_E)
    h_MR = h_MR * (w_M.to(h_MR.dtype) * scale)[:, None]
    y_MO = torch._grouped_mm(h_MR, b_ERO.to(dt), offs=offs_E)
    return cmoe._FromRows.apply(y_MO.to(x_TD.dtype), tok_M, pos_N, T)


def part_moe(a, dev, dtype, sync):
    """Per (T, E): compiled floor and the compiled fused dispatches, median ms and the error against the loop."""
    rows = []
    dispatches = ["dense", "sparse"] + (["grouped"] if hasattr(torch, "_grouped_mm") else [])
    for T in a.moe_T:
        for E in a.moe_E:
            ffn, x, gy = bench_moe.build(T, E, dev, dtype, batch=8)
            floor = bench_moe.timeit(bench_moe.compiled(ffn), ffn, x, gy, False, a.reps, 2, sync)
            cmoe.lora_dense, ffn.dispatch = bench_moe.lora_loop, "dense"  # the loop reference
            y_ref, gx_ref = bench_moe.step(ffn, x, gy, True)
            cmoe.lora_dense = bench_moe.DENSE
            ffn.zero_grad(set_to_none=True)
            row = {"T": T, "E": E, "floor ms": round(floor, 3)}
            for d in dispatches:
                sparse = cmoe.lora_sparse
                try:
                    ffn.dispatch = "sparse" if d == "grouped" else d
                    cmoe.lora_sparse = lora_grouped if d == "grouped" else sparse
                    cf = bench_moe.compiled(ffn)
                    y, gx = bench_moe.step(cf, x, gy, True)
                    ffn.zero_grad(set_to_none=True)
                    err = max(float((y - y_ref).abs().max() / y_ref.abs().max().clamp(min=1)),
                              float((gx - gx_ref).abs().max() / gx_ref.abs().max().clamp(min=1)))
                    ms = bench_moe.timeit(cf, ffn, x, gy, True, a.reps, 2, sync)
                    row[f"{d} ms"], row[f"{d}/floor"], row[f"{d} err"] = round(ms, 3), round(ms / floor, 2), f"{err:.1e}"
                except PartTimeout:
                    raise
                except Exception as e:  # one dispatch failing (e.g. _grouped_mm on this GPU) leaves the others
                    row[f"{d} ms"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                finally:
                    cmoe.lora_sparse = sparse
            rows.append(row)
            print("  moe", row, flush=True)
            del ffn
    return rows


# ----------------------------------------------------------------------------------------------------------
# 2. a compiled training step of a Llama-3.2-1B-sized model

def step_flops(lc, T, S, ecfg, E):
    """Model FLOPs of one training step over T = B*S tokens (multiply-add = 2 FLOPs), counted as the step computes
    them. The frozen base's linear layers (q, k, v, o, gate, up, down in each of L layers; lm_head) cost 2 per weight
    and token forward and 2 more backward (the input gradient only: frozen weights get none): 4 * N_lin * T.
    Causal attention: QK^T and AV over on average S/2 keys, 2 * 2 * (S/2) * H*hd per token and layer forward, twice
    that backward (no weights: the gradients of q, k and v). LoRA experts: each token's top-k experts on the FFN's
    gate, up, down (and q, k, v, o with attention experts), rank R: 2 * R * (din + dout) forward, twice that backward
    (input and weight gradients). The router, norms, RoPE and the loss are left out (a few percent)."""
    D, Fd, L, Q, KV, R = lc.dim, lc.ffn_dim, lc.n_layers, lc.n_heads * lc.head_dim, lc.n_kv_heads * lc.head_dim, ecfg.rank
    n_lin = L * (D * Q + 2 * D * KV + Q * D + 3 * D * Fd) + lc.vocab_size * D
    attn = 3 * 2 * S * Q * L  # forward 2*S*Q per token and layer (causal: half of 4*S*Q), backward twice that
    proj = [(D, Fd), (D, Fd), (Fd, D)] + ([(D, Q), (D, KV), (D, KV), (Q, D)] if ecfg.attn else [])
    lora = 6 * min(ecfg.top_k, E) * R * sum(i + o for i, o in proj) * L
    return T * (4 * n_lin + attn + lora)


def part_step(a, dev, sync):
    """Build, compile and time train.py's training step at a.step_batch x S; compare the peak with --plan's."""
    S_text = a.step_max_len - 1
    flags = ["--precision", "bf16", "--compile", "on", "--tasks", "1", "--max-len", str(a.step_max_len),
             "--gpu-mem", "139"] + (["--grad-ckpt"] if a.grad_ckpt else [])
    cfg = train.parse_args(flags + ["--device", dev.type])
    lc = cmoe.LlamaConfig.from_hf(train.PRESETS["llama-3.2-1b"], "preset llama-3.2-1b")
    vc = VisionConfig.clip_vit_large_patch14_336() if not a.dry_run else VisionConfig.tiny()
    if a.dry_run:  # the same code on a model the CPU can run
        lc = cmoe.LlamaConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    torch.manual_seed(0)
    with torch.device(dev):  # random fp32 weights, then the bf16 base: the device holds the fp32 copy only briefly
        model = train.prepare(cmoe.LLaVA(CLIPVision(vc), Projector(vc.hidden_size, lc.dim), cmoe.Llama(lc)), cfg)
        cmoe.init_experts(model.llm, cfg.n_init)
    train.trainable_cl(model)
    for pool in model.llm.expert_pools():  # non-zero B: the experts' outputs and gradients are not trivially zero
        for e in pool.lora.values():
            e.train_B.data.normal_(0, 1e-3)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    B, P = a.step_batch, vc.num_patches
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, lc.vocab_size, (B, S_text + 1), generator=g)
    ids[:, 1] = cmoe.IMAGE_TOKEN_ID
    labels = ids.masked_fill(torch.arange(S_text + 1) < S_text // 2, cmoe.IGNORE_INDEX)  # answers: the second half
    with torch.no_grad():  # train.encode: the frozen tower runs once per dataset, outside the step
        feats = model.image_features(torch.randn(B, 3, vc.image_size, vc.image_size, generator=g).to(dev))
    ids, labels, tids = ids.to(dev), labels.to(dev), torch.zeros(B, dtype=torch.long, device=dev)
    named = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(named, lr=1e-4, betas=(0.9, 0.95))
    fwd = torch.compile(model)
    model.train()

    def step():  # train.train_stage's step
        _, loss, aux = fwd(ids, feats, labels, tids)
        (loss + cfg.lambda_aux * aux).backward()
        torch.nn.utils.clip_grad_norm_(named, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    loss0 = float(step().detach())  # compiles
    sync()
    compile_s = time.perf_counter() - t0
    step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(a.reps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        sync()
        ts.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    sec, S = statistics.median(ts), S_text + P
    flops = step_flops(lc, B * S, S, model.llm.ecfg, model.llm.layers[0].experts.n_experts)
    row = {"model": "llama-3.2-1b + CLIP-L/336" if not a.dry_run else "tiny (dry run)", "B x S": f"{B} x {S}",
           "grad ckpt": a.grad_ckpt, "compile s": round(compile_s, 1), "step ms": round(sec * 1e3, 2),
           "tokens/s": round(B * S / sec), "TFLOP/step": round(flops / 1e12, 3),
           "MFU": f"{flops / sec / (a.peak_tflops * 1e12):.1%}", "loss first/last": f"{loss0:.3f}/{float(loss):.3f}"}
    if peak is not None and not a.dry_run:  # --plan for the same settings: weights, gradients, AdamW + B samples
        plan = train.plan(train.parse_args(["--plan", "--preset", "llama-3.2-1b"] + flags))
        per_sample, per_step = plan["act"][a.grad_ckpt]
        predicted = sum(plan["mem"].values()) + B * per_sample + per_step
        row.update({"peak GiB": round(peak / 2**30, 2), "plan GiB": round(predicted / 2**30, 2),
                    "peak/plan": round(peak / predicted, 2)})
    print("  step", row, flush=True)
    return [row]


# ----------------------------------------------------------------------------------------------------------
# 3. the default train.py run

def part_train(a):
    out = tempfile.mkdtemp(prefix="gpu_check_run_")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--out", os.path.join(out, "run"), "--base-dir",
           os.path.join(out, "base")] + (["--quick"] if a.train == "quick" else [])
    if a.dry_run:  # a few steps of everything, on the CPU
        cmd += ["--quick", "--threads", "1", "--tasks", "sqa", "--steps", "4", "--base-steps", "4",
                "--instruct-steps", "4", "--probe-steps", "2"]
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=a.train_limit)
    except subprocess.TimeoutExpired:  # how far it got: the tasks it finished, its last log line
        state, log = os.path.join(out, "run", "state.json"), os.path.join(out, "run", "log.txt")
        done = json.load(open(state)).get("finished_tasks") if os.path.isfile(state) else 0
        last = open(log).read().strip().splitlines()[-1] if os.path.isfile(log) else ""
        return [{"run": " ".join(cmd[2:]), "error": f"ran past its {a.train_limit} s limit after {done} task(s); "
                                                     f"last log line: {last[:160]}"}]
    if p.returncode:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return [{"run": " ".join(cmd[2:]), "error": f"exit {p.returncode}: " + " | ".join(tail)}]
    m = json.load(open(os.path.join(out, "run", "metrics.json")))
    fmt = lambda v: None if v is None else round(v, 2)  # noqa: E731
    row = {"run": "train.py" + (" --quick" if a.train == "quick" else ""), "Last": fmt(m.get("last")),
           "BWT": fmt(m.get("bwt")), "total s": round(m["time"]["total"], 1), "wall s": round(time.time() - t0, 1),
           "base s": round(m["time"]["base"], 1), "folder": os.path.join(out, "run")}
    print("  train", row, flush=True)
    return [row]


# ----------------------------------------------------------------------------------------------------------

def table_md(results):
    lines = []
    for part, rows in results.items():
        lines.append(f"### {part}")
        keys = list(dict.fromkeys(k for r in rows for k in r))
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "---|" * len(keys))
        lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--train", choices=("full", "quick", "skip"), default="full",
                    help="part 3: the default run, --quick, or none")
    ap.add_argument("--parts", nargs="+", choices=("moe", "step", "train"), default=["moe", "step", "train"])
    ap.add_argument("--moe-limit", type=int, default=90, help="seconds for part 1")
    ap.add_argument("--step-limit", type=int, default=180, help="seconds for part 2")
    ap.add_argument("--train-limit", type=int, default=210, help="seconds for part 3")
    ap.add_argument("--moe-T", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--moe-E", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--step-batch", type=int, default=16, help="part 2: samples per step")
    ap.add_argument("--step-max-len", type=int, default=256, help="part 2: text tokens per sample (+ 576 image)")
    ap.add_argument("--grad-ckpt", action="store_true", help="part 2 with gradient checkpointing")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=H200_BF16_TFLOPS, help="bf16 dense peak for MFU")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script only")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available() and not a.dry_run:
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}): this script measures a GPU; run it on a CUDA machine "
              "(--dry-run checks the script itself on the CPU)", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if a.dry_run else "cuda")
    if a.dry_run:  # dynamo's eager backend: the graphs are traced (breaks, guards), no code is generated
        a.moe_T, a.moe_E, a.reps, a.step_batch, a.step_max_len = [64], [8], 2, 2, 16
        a.train = "quick" if a.train == "full" else a.train
        compile_ = torch.compile
        torch.compile = lambda m, **kw: compile_(m, **{**kw, "backend": "eager"})
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (dry run)"
    print(f"gpu_check: {name}, torch {torch.__version__}, parts {' '.join(a.parts)}", flush=True)
    results = {"device": [{"device": name, "torch": torch.__version__, "grouped_mm": hasattr(torch, "_grouped_mm"),
                           "peak TFLOP/s for MFU": a.peak_tflops}]}
    parts = {"moe": (a.moe_limit, lambda: part_moe(a, dev, torch.bfloat16, sync)),
             "step": (a.step_limit, lambda: part_step(a, dev, sync)),
             "train": (a.train_limit + 30, lambda: part_train(a))}
    failed = False
    for part in a.parts:
        if part == "train" and a.train == "skip":
            continue
        limit, fn = parts[part]
        t0 = time.time()
        print(f"[{part}] (limit {limit} s)", flush=True)
        try:
            with time_limit(limit):
                results[part] = fn()
        except Exception as e:  # the table says what failed; the next part runs
            failed = True
            traceback.print_exc()
            results[part] = [{"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}]
        finally:
            torch._dynamo.reset()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        print(f"[{part}] {time.time() - t0:.0f} s", flush=True)
    md = table_md(results)
    print("\n" + md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "gpu_check.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(a.out, "gpu_check.md"), "w") as f:
            f.write(md)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
