"""torchrun data parallelism: two gloo ranks on the CPU against one process, same global batch (marked
`distributed`: deselect with -m "not distributed")."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train
from test_train import TINY as TRAIN_TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# test_train.py's run (so its stage 0, and the pytest run's cached base, are the same) with this file's task settings
TINY = [*TRAIN_TINY, "--steps", "10", "--locator-n", "24", "--calib-n", "8", "--save-every", "5", "--set", "eval_batch=16"]


def torchrun(out, base, extra=(), script=("train.py",), env=()):
    """train.py (or a wrapper script) under torchrun, 2 gloo ranks, one thread each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, script[0]), *script[1:], *TINY, "--out", str(out), "--base-dir", str(base), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **dict(env)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def one(tmp_path_factory, base_dir):
    """The single-process reference, run in this process (one thread, as the ranks)."""
    out = tmp_path_factory.mktemp("one")
    train.main([*TINY, "--out", str(out), "--base-dir", base_dir])
    return out


@pytest.mark.distributed
def test_two_gloo_ranks_reproduce_one_process(tmp_path, one, base_dir):
    two = tmp_path / "two"
    p = torchrun(two, base_dir)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for key in ("acc", "zero_shot", "unseen", "locator", "params", "experts_per_layer"):
        assert a[key] == b[key], key
    assert [d["expand"] for d in a["pgke"]] == [d["expand"] for d in b["pgke"]]  # the same PGKE decisions
    assert [d["copied_from"] for d in a["pgke"]] == [d["copied_from"] for d in b["pgke"]]
    for d, e in zip(a["pgke"], b["pgke"]):
        assert d["freq"] == pytest.approx(e["freq"], abs=1e-9)  # counts summed over the ranks' halves
    for t in (0, 1):
        x, y = (load_file(str(d / f"task_{t}/model.safetensors")) for d in (one, two))
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(y[k], x[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"task_{t} {k}: {m}")
    log = (two / "log.txt").read_text()
    assert ", 2 ranks (torchrun" in log and log.count("=== task") == 2  # one writer: rank 0 logs, once per task
    for task in ("sqa", "cls", "textcolor"):  # predictions gathered from both ranks, in test order
        rows = [json.loads(line) for line in (two / f"predictions/{task}.jsonl").read_text().splitlines()]
        assert [r["index"] for r in rows if r["stage"] == 1] == list(range(8))


@pytest.mark.distributed
def test_in_float64_two_gloo_ranks_equal_one_process_to_rounding(tmp_path, one, base_dir):
    """The ranks compute what one process computes: in float64 (tests/float64run.py), where rounding is ~1e-16, on a
    run whose float32 tensors drift apart: tasks past the warm-up at twice the learning rate (in float32 the two runs'
    second-task experts differ by up to 4.3e-5, their decisions equal: Adam's first step of each stage amplifies the
    rounding, as it does between two one-process runs at --threads 1 and 2), and ocr's answers of 2-4 tokens, so the
    ranks' shares of a batch's labelled tokens differ (rank_shard's weights matter). `one` has cached the float32
    stage 0 (the wrapper refuses to train it)."""
    extra = ["--tasks", "ocr,cls", "--steps", "25", "--lr", "1e-2"]
    ref, two = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, os.path.join(ROOT, "tests/float64run.py"), *TINY, "--out", str(ref), "--base-dir", base_dir,
           *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    p = torchrun(two, base_dir, extra, script=("tests/float64run.py",))
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, two))
    for key in ("acc", "zero_shot", "unseen", "locator", "params", "experts_per_layer"):
        assert a[key] == b[key], key
    assert [(d["expand"], d["copied_from"]) for d in a["pgke"]] == [(d["expand"], d["copied_from"]) for d in b["pgke"]]
    for d, e in zip(a["pgke"], b["pgke"]):
        assert d["freq"] == pytest.approx(e["freq"], abs=1e-12)
    for t in (0, 1):
        x, y = (load_file(str(d / f"task_{t}/model.safetensors")) for d in (ref, two))
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype == torch.float64, k  # the run really was float64
            torch.testing.assert_close(y[k], x[k], atol=1e-10, rtol=0, msg=lambda m, k=k: f"task_{t} {k}: {m}")
    for d in (ref, two):
        assert "reused from" in (d / "log.txt").read_text()  # float32 stage 0, cast


def test_more_ranks_than_the_batch_is_refused(tmp_path, base_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # what torchrun --nproc_per_node=3 gives each rank
    with pytest.raises(SystemExit, match="torchrun started 3 ranks but --batch-size is 2"):
        train.main([*TINY, "--out", str(tmp_path / "run"), "--base-dir", base_dir, "--batch-size", "2"])
    assert not (tmp_path / "run").exists()  # refused before any rank joins the group or writes


@pytest.mark.distributed
def test_a_rank_killed_mid_task_stops_every_rank_and_resume_under_torchrun_finishes_the_run(tmp_path, one, base_dir):
    ref, out, base = one, tmp_path / "killed", base_dir
    killer = ("tests/killrun.py", "log:^task1:cls step:3", "--")  # rank 1 dies (SIGKILL) in task 2's training
    p = torchrun(out, base, script=killer, env={"KILL_RANK": "1"})
    assert p.returncode != 0
    assert json.loads((out / "state.json").read_text())["finished_tasks"] == 1  # task 1 saved whole, task 2 not
    assert not (out / "task_1/model.safetensors").exists() and not list(out.glob("**/*.tmp*"))
    p = torchrun(out, base, extra=["--resume"])
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, out))
    assert a["acc"] == b["acc"] and [d["expand"] for d in a["pgke"]] == [d["expand"] for d in b["pgke"]]
    x, y = (load_file(str(d / "task_1/model.safetensors")) for d in (ref, out))
    for k in x:
        torch.testing.assert_close(y[k], x[k], atol=1e-5, rtol=0)


@pytest.mark.distributed
def test_two_gloo_ranks_with_experts_in_both_towers_reproduce_one_process(tmp_path, base_dir):
    """--experts-in both under torchrun: DDP over the tower's pools too (no unused parameters), the tower's balance
    loss over the whole batch (its pools' batch_sum), PGKE's counts summed for both towers: one process's run."""
    one, two = tmp_path / "one", tmp_path / "two"
    train.main([*TINY, "--out", str(one), "--base-dir", base_dir, "--experts-in", "both"])
    p = torchrun(two, base_dir, ["--experts-in", "both"])
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    for key in ("acc", "zero_shot", "params", "experts_per_layer", "expert_layers"):
        assert a[key] == b[key], key
    assert [d["expand"] for d in a["pgke"]] == [d["expand"] for d in b["pgke"]]
    x, y = (load_file(str(d / "task_1/model.safetensors")) for d in (one, two))
    assert x.keys() == y.keys() and any(k.startswith("vision.encoder.layers.1.experts.lora.fc2.") for k in x)
    for k in (k for k in x if ".experts." in k):  # (the locator's gate bounds are ~1e4: float noise above 1e-5)
        torch.testing.assert_close(y[k], x[k], atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
