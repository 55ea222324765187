"""Which merge keeps old tasks working: the measurement behind cmoe.merge_experts' defaults (a script, not a test).

    python bench/merge_rules.py out/minicoin-cmoe [--merges 1] [--pair least|ward] [--threads 1]

Rebuilds the run's last stage (base + every task's experts and routers), records each task's usage of each expert
with its own router on its first locator_n training rows (train.record_task_use, as --max-expert-params does), then
for each rule merges, in every layer, two frozen experts (--pair: the least-used, or by Ward's cost; --merges times) and scores every task with
its own routers (the oracle: the merge's cost, without the locator's). Rules: the merged LoRA is the rank-R SVD fit of
the usage-weighted mean delta (svd) or the weighted mean of the factors (mean); each router that saw both keeps the
row of the expert its task used more (keep) or their usage-weighted mean (mean); `drop` removes the less-used expert
and leaves the other as it was (no merge: the floor). Prints per rule the accuracy per task, their mean, and the
relative Frobenius error of the merged delta against the weighted mean delta (mean over merges and projections)."""
import argparse
import contextlib
import os
import sys
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cmoe  # noqa: E402
import data  # noqa: E402
import eval as ev  # noqa: E402
import train  # noqa: E402
from data import read_json  # noqa: E402


def merge_all(model, merges, fit, row, pair):
    """--merges merges per layer, each of its two least-used frozen experts; returns the relative fit errors."""
    errs = []
    for pool in model.llm.expert_pools():
        for _ in range(merges):
            use_E = cmoe.expert_use(pool)[: pool.n_frozen]
            i, j = cmoe.merge_pair(pool, pair)
            w_i, w_j = float(use_E[i]) / float(use_E[i] + use_E[j]), float(use_E[j]) / float(use_E[i] + use_E[j])
            targets = {n: w_i * e.frozen_A[i] @ e.frozen_B[i] + w_j * e.frozen_A[j] @ e.frozen_B[j]
                       for n, e in pool.lora.items()}
            if fit == "drop":
                _drop(pool, i, j, keep_j=bool(use_E[j] > use_E[i]))
            else:
                cmoe.merge_experts(pool, i, j, fit, row)
            for n, e in pool.lora.items():
                errs.append(float((e.frozen_A[i] @ e.frozen_B[i] - targets[n]).norm() / targets[n].norm().clamp(min=1e-12)))
    return errs


def _drop(pool, i, j, keep_j):
    """Remove the less-used of experts i < j (no merge): the kept one's LoRA and router rows end at index i."""
    with torch.no_grad():
        keep = [e for e in range(pool.n_frozen) if e != j]
        for e in pool.lora.values():
            A, B = e.frozen_A.clone(), e.frozen_B.clone()
            if keep_j:
                A[i], B[i] = A[j], B[j]
            e._set("frozen", A[keep], B[keep])
        for t, r in enumerate(pool.routers):
            if r.shape[0] > j:
                pool.routers[t] = torch.nn.Parameter(cmoe.merge_rows(r.detach(), i, j, float(not keep_j),
                                                                     float(keep_j)), requires_grad=False)
        pool.task_use = [torch.cat([u[:j], u[j + 1:]]) if len(u) > j else u for u in pool.task_use]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--merges", type=int, default=1, help="merges per layer")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pair", default="least", help="which two experts: least | ward (cmoe.merge_pair)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    run = os.path.abspath(args.run)
    metrics = ev.load_run(run)
    with contextlib.chdir(metrics.get("cwd") or "."):
        cfg = types.SimpleNamespace(**read_json(os.path.join(run, "config.json")))
        cfg.device, cfg.locator, cfg.reject = "cpu", "oracle", False
        tok, template = data.tokenizer(cfg)
        model = ev.load_model(metrics["base"], data.pad_id(tok)).requires_grad_(False)
        tdir = os.path.join(run, f"task_{metrics['finished_tasks'] - 1}")
        ev.load_task(model, tdir)
        names = metrics["tasks"]
        for t, n in enumerate(names):  # each task's usage with its own router, as record_task_use counts it
            ds = train.encode(model, data.load_examples(cfg, n, "train"), tok, template, cfg, t)
            train.record_task_use(model, train.trim_padding(ds, model.pad_id), cfg)
        uses = [list(pool.task_use) for pool in model.llm.expert_pools()]
        tests = {n: data.load_examples(cfg, n, "test") for n in names}
        images = {n: ev.image_features(model, tests[n], cfg) for n in names}
        rules = [("none", None), ("svd", "keep"), ("svd", "mean"), ("mean", "keep"), ("mean", "mean"), ("drop", "keep")]
        print(f"{run}: {args.merges} merge(s) per layer of the pair chosen by {args.pair}; experts per layer {[p.n_experts for p in model.llm.expert_pools()]}")
        print("| merged LoRA | router row | " + " | ".join(names) + " | mean | delta fit error |")
        print("|---|---|" + "---|" * (len(names) + 2))
        for fit, row in rules:
            ev.load_task(model, tdir)
            for pool, u in zip(model.llm.expert_pools(), uses):
                pool.task_use = [x.clone() for x in u]
            errs = [] if fit == "none" else merge_all(model, args.merges, fit, row, args.pair)
            accs = []
            for t, n in enumerate(names):
                rows, _ = ev.predict(model, None, tests[n], images[n], tok, template, cfg, t, len(names), True)
                accs.append(ev.task_accuracy(rows, metrics["metric"][n]))
            err = f"{sum(errs) / len(errs):.3f}" if errs else "—"
            print(f"| {fit} | {row or '—'} | " + " | ".join(f"{a:.1f}" for a in accs)
                  + f" | {sum(accs) / len(accs):.2f} | {err} |", flush=True)


if __name__ == "__main__":
    main()
