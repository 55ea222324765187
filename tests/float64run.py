"""Run train.py in float64 (one process, or each rank under torchrun), from a stage-0 base already cached in
--base-dir, injected from outside the production code by wrapping the functions that fix the dtype.

    python tests/float64run.py <train.py arguments>
    torchrun --standalone --nproc_per_node=2 tests/float64run.py <train.py arguments>

Why: in float32 a torchrun run and the one-process run differ only by rounding (the ranks sum the batch's gradient
in another order), and a run amplifies rounding: Adam's first step of every stage turns a gradient element at the
rounding floor (|g| ~ 1e-9, below eps) into a step of up to the learning rate, and top-k routing flips on near ties.
The same amplification separates two one-process runs at --threads 1 and 2. In float64 the rounding is ~1e-16, so
any real difference between the ranks and the process (a sample weighted twice, a rank-dependent draw, a wrongly
reduced statistic) stands out by many orders of magnitude."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

torch.set_default_dtype(torch.float64)  # new experts, routers, VAEs
torch.Tensor.float = torch.Tensor.double  # cmoe computes norms, routing and the loss "in fp32" via .float()

import cmoe  # noqa: E402  (after the dtype is set)
import train  # noqa: E402

build_base, train_stage, image_features = train.build_base, train.train_stage, cmoe.LLaVA.image_features


def build_base_f64(*args, **kw):
    model, base = build_base(*args, **kw)
    return model.double(), base


def train_stage_f64(model, ds, cfg, steps, lr, task_id, tag, log, experts=True, **kw):
    if not experts:  # stage 0 would be trained in float64 and cached under the float32 base's key
        raise SystemExit(f"float64run: stage 0 is not cached in --base-dir {cfg.base_dir}: build it with train.py first")
    return train_stage(model, ds, cfg, steps, lr, task_id, tag, log, experts, **kw)


train.build_base, train.train_stage = build_base_f64, train_stage_f64
cmoe.PRECISIONS["fp32"] = torch.float64  # train.prepare's cast of the frozen base (--precision fp32 on a CPU)
cmoe.LLaVA.image_features = lambda self, pixel_values, *a, **kw: image_features(self, pixel_values.double(), *a, **kw)

if __name__ == "__main__":
    train.main(sys.argv[1:])
