"""bench/gpu_check.py, the parts a CPU can check: it refuses to measure without CUDA, and its torch._grouped_mm
dispatch gives the per-expert loop's result and gradients (the CPU has the op in bf16)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import gpu_check  # noqa: E402

import cmoe  # noqa: E402
from test_experts import lora_loop  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the failure it checks needs a machine without CUDA")
def test_gpu_check_says_there_is_no_cuda_and_exits_non_zero(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "--dry-run" in err
    assert not (tmp_path / "out").exists()  # no table of figures that were never measured


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch without _grouped_mm")
def test_grouped_mm_dispatch_matches_the_expert_loop():
    g = torch.Generator().manual_seed(0)
    T, E, D, O, R, K = 40, 5, 32, 48, 16, 2
    x = torch.randn(T, D, generator=g).bfloat16().requires_grad_()
    a = (torch.randn(E, D, R, generator=g) / D ** 0.5).bfloat16().requires_grad_()
    b = torch.randn(E, R, O, generator=g).bfloat16().requires_grad_()
    logits = torch.randn(T, E, generator=g)
    top, idx = logits.softmax(-1).topk(K, -1)
    w = torch.zeros(T, E).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    gy = torch.randn(T, O, generator=g)
    outs = []
    for fn in (lambda: lora_loop(x, a, b, w, 2.0), lambda: gpu_check.lora_grouped(x, a, b, cmoe.dispatch_plan(w, K), 2.0)):
        y = fn()
        x.grad = a.grad = b.grad = None
        (y.float() * gy).sum().backward()
        outs.append([y.detach().float(), x.grad.float(), a.grad.float(), b.grad.float()])
    for name, ref, got in zip(("y", "dx", "da", "db"), *outs):
        torch.testing.assert_close(got, ref, atol=0.05 * float(ref.abs().max()), rtol=0, msg=name)
