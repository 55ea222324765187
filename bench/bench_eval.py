"""Evaluation cost of the task locator (a script, not a pytest test).

    python bench/bench_eval.py out/minicoin-cmoe [--reps 3] [--reject]
    python bench/bench_eval.py out/minicoin-cmoe --whole     # the whole re-evaluation, with and without the caches

Rebuilds the run's last stage (base, experts, locator) and times eval.Benchmark.evaluate over every test set, with
the locator choosing each sample's routers and with the oracle (generation only), in this one process. The first
located evaluation also extracts the test sets' PTL features (frozen base: once per run, cached); the next ones
reuse them (median of --reps, interleaved with the oracle's). Prints all three, and the ratio over a run whose S
stages locate: (first + (S - 1) * later) / (S * oracle).
--whole times eval.reevaluate of a copy of the run (row 0 and every stage) as it is, and with the test sets' image and
PTL features recomputed at every stage (what evaluation did before they were cached), median of --reps each.
Predictions go to a temporary folder: the run folder is not touched."""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import eval as ev  # noqa: E402
from data import read_json  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--reject", action="store_true", help="time the locator with its reject option")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--whole", action="store_true", help="time the whole re-evaluation, with and without the caches")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.whole:
        return time_reevaluation(a)
    cfg = types.SimpleNamespace(**read_json(os.path.join(a.run, "config.json")))
    metrics = read_json(os.path.join(a.run, "metrics.json"))
    cfg.device, cfg.out, cfg.reject = "cpu", tempfile.mkdtemp(prefix="bench-eval-"), a.reject
    tok, template = data.tokenizer(cfg)
    model = ev.load_model(metrics["base"], data.pad_id(tok)).requires_grad_(False)
    bench = ev.Benchmark(cfg, model, tok, template, log=lambda m: None)
    t = metrics["finished_tasks"] - 1
    locator = ev.load_task(model, os.path.join(a.run, f"task_{t}"))
    times = {}
    for mode in ("first",) + ("ptl", "oracle") * a.reps:  # interleaved: drift hits both alike
        cfg.locator = "oracle" if mode == "oracle" else "ptl"
        t0 = time.perf_counter()
        bench.evaluate(model, locator, t)
        times.setdefault(mode, []).append(time.perf_counter() - t0)
    first, ptl, oracle = times["first"][0], statistics.median(times["ptl"]), statistics.median(times["oracle"])
    S = t + 1 if a.reject else t  # stages that locate (without --reject the first stage has one task: no locator)
    print(f"{a.run}: stage {t}, {sum(len(x) for x in bench.tests.values())} test samples, {a.threads} threads"
          f"{', --reject' if a.reject else ''}: first located evaluation {first:.2f} s (features extracted), later "
          f"{ptl:.2f} s, oracle {oracle:.2f} s (medians of {a.reps}); per stage {ptl / oracle:.2f}x, over a run of "
          f"{S} located stages {(first + (S - 1) * ptl) / (S * oracle):.2f}x")


def time_reevaluation(a):
    evaluate = ev.Benchmark.evaluate

    def uncached(self, model, locator, t):  # image and PTL features recomputed for this stage, as before the caches
        self.images = {n: ev.image_features(model, exs, self.cfg) for n, exs in self.tests.items()}
        self.feats = {}
        return evaluate(self, model, locator, t)
    times = {}
    for mode in ("cached", "uncached") * a.reps:
        ev.Benchmark.evaluate = evaluate if mode == "cached" else uncached
        copy = os.path.join(tempfile.mkdtemp(prefix="bench-eval-"), "run")
        shutil.copytree(a.run, copy)
        t0 = time.perf_counter()
        ev.reevaluate(copy, device="cpu")
        times.setdefault(mode, []).append(time.perf_counter() - t0)
        shutil.rmtree(os.path.dirname(copy))
    c, u = statistics.median(times["cached"]), statistics.median(times["uncached"])
    print(f"{a.run}: re-evaluation (row 0 + every stage), {a.threads} threads, medians of {a.reps}: features cached "
          f"{c:.1f} s, recomputed every stage {u:.1f} s: {100 * (1 - c / u):.0f} % lower")


if __name__ == "__main__":
    main()
