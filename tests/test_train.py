"""The continual pipeline end to end on a tiny MiniCoIN slice: run folder, frozen knowledge, PGKE rule, PTL,
resume and NaN handling."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import cmoe
import train

# smaller than --quick: two tasks, a few steps each; the base is pretrained once per pytest run and cached (conftest's
# base_dir; test_distributed.py's runs share it)
TINY = ["--tasks", "sqa,cls", "--base-steps", "30", "--instruct-steps", "10", "--steps", "12",
        "--probe-steps", "4", "--train-n", "48", "--test-n", "8", "--caption-n", "64", "--instruct-n", "64",
        "--batch-size", "8", "--locator-n", "32",
        "--save-every", "4", "--threads", "1"]


def run(out, base_dir, *extra):
    return train.main(TINY + ["--out", str(out), "--base-dir", base_dir, *extra])


@pytest.fixture(scope="session")
def oracle_run(tmp_path_factory, base_dir):
    out = tmp_path_factory.mktemp("oracle")
    return out, run(out, base_dir, "--locator", "oracle", "--no-attn-experts")  # FFN experts only (the default's
    # attention experts: ptl_run and the attention-experts test)


@pytest.fixture(scope="session")
def ptl_run(tmp_path_factory, base_dir):
    out = tmp_path_factory.mktemp("ptl")
    return out, run(out, base_dir)


def test_quick_run_writes_the_run_folder(oracle_run):
    out, M = oracle_run
    for f in ("config.json", "metrics.json", "log.txt", "task_0/model.safetensors", "task_0/meta.json",
              "task_1/model.safetensors", "task_1/meta.json", "predictions/sqa.jsonl", "predictions/cls.jsonl"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["tasks"] == ["sqa", "cls"] and m["finished_tasks"] == 2
    assert len(m["acc"]) == 2 and all(len(r) == 2 for r in m["acc"])
    assert m["last"] == pytest.approx(sum(m["acc"][1]) / 2)
    assert m["bwt"] == pytest.approx(m["acc"][1][0] - m["acc"][0][0])
    assert len(m["pgke"]) == 1 and len(m["pgke"][0]["expand"]) == 4
    # the recorded decision follows the rule on the recorded frequencies
    assert m["pgke"][0]["expand"] == cmoe.pgke_decide(m["pgke"][0]["freq"], 1.0)[0]
    grown = sum(m["pgke"][0]["expand"])
    # every grown layer names the expert it copied (an old one: task 1 had 2 per layer), the others name none
    for grow, src in zip(m["pgke"][0]["expand"], m["pgke"][0]["copied_from"]):
        assert (src in (0, 1)) if grow else src is None
    assert sum(m["experts_per_layer"][1]) == sum(m["experts_per_layer"][0]) + grown
    assert not list(out.glob("task_*/partial*")), "partial checkpoints are removed when a task finishes"
    # the run ends with its report (no eval.py needed), and its last log line says where it is
    report = (out / "report.md").read_text()
    assert "Accuracy matrix" in report and "after cls" in report and len(list(out.glob("figures/*.png"))) >= 2
    assert (out / "log.txt").read_text().splitlines()[-1] == f"report: {out / 'report.md'}, figures in {out / 'figures'}"


def test_stage_0b_keeps_the_tower_of_stage_0a(oracle_run, base_dir):
    """LLaVA's recipe: captions train tower, projector and LLM; instruction tuning freezes the tower."""
    (caption,), (instruct,) = ([os.path.join(base_dir, d) for d in os.listdir(base_dir) if d.startswith(f"minicoin-{tag}-")]
                               for tag in ("base", "instruct"))
    a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (caption, instruct))
    assert a.keys() == b.keys()
    tower = [k for k in a if k.startswith("vision.")]
    assert tower and all(torch.equal(a[k], b[k]) for k in tower)
    assert not torch.equal(a["projector.0.weight"], b["projector.0.weight"])
    assert not torch.equal(a["llm.layers.0.ffn.up_proj.weight"], b["llm.layers.0.ffn.up_proj.weight"])


def test_task1_experts_and_routers_bit_identical_after_task2(oracle_run):
    out, _ = oracle_run
    a, b = load_file(str(out / "task_0/model.safetensors")), load_file(str(out / "task_1/model.safetensors"))
    checked = 0
    for k, v in a.items():
        if ".frozen_" in k:
            assert torch.equal(b[k][: v.shape[0]], v), k  # old experts are a prefix of the grown bank
            checked += 1
        if ".routers.0" in k:
            assert torch.equal(b[k], v), k
            checked += 1
    assert checked == 4 * 7  # 6 expert tensors + task-1's router, in each of 4 layers


def test_task1_predictions_with_oracle_router_unchanged(oracle_run):
    out, _ = oracle_run
    rows = [json.loads(line) for line in (out / "predictions/sqa.jsonl").read_text().splitlines()]
    by_stage = {s: [r["prediction"] for r in rows if r["stage"] == s] for s in (0, 1)}
    assert len(by_stage[0]) == 8 and by_stage[0] == by_stage[1]


def test_pgke_rule_on_hand_made_frequencies():
    freq = [0.10, 0.40, 0.25, 0.05]
    mean = sum(freq) / 4
    std = (sum((f - mean) ** 2 for f in freq) / 4) ** 0.5
    for alpha in (0.0, 0.5, 1.0):
        expand, thr = cmoe.pgke_decide(freq, alpha)
        assert thr == pytest.approx(mean - alpha * std)
        assert expand == [f > mean - alpha * std for f in freq]
    assert cmoe.pgke_decide(freq, 0.0)[0] == [False, True, True, False]


def _shrunk_mahalanobis(fit, x, shrink):
    """Hand reference: (x - mu)^T C^-1 (x - mu), C = (1 - s) S + s tr(S)/D I, by a float64 linear solve."""
    f = fit.double()
    mu = f.mean(0)
    S = (f - mu).T @ (f - mu) / (f.shape[0] - 1)
    C = (1 - shrink) * S + shrink * S.trace() / S.shape[0] * torch.eye(S.shape[0], dtype=torch.float64)
    d = x.double() - mu
    return (d * torch.linalg.solve(C, d.T).T).sum(-1)


@pytest.mark.parametrize("n,dim,shrink", [(60, 6, cmoe.GATE_SHRINK), (60, 6, 0.2), (5, 8, 0.05)])
def test_reject_gate_distance_is_the_shrunk_mahalanobis_by_hand(n, dim, shrink):
    """Full rank (n > dim) and the kept eigenbasis of a rank-deficient covariance (n <= dim: 4 of 8 directions, the
    rest at the floor variance) both give the distance of the full shrunk covariance."""
    g = torch.Generator().manual_seed(3)
    fit = torch.randn(n, dim, generator=g) * torch.linspace(0.2, 3.0, dim) + 1.5
    x = torch.cat([torch.randn(7, dim, generator=g) * 2 + 1.5, fit[:2]])
    gate = cmoe.fit_gate(fit, shrink=shrink)
    assert gate.basis.shape == (dim, min(dim, n - 1))
    torch.testing.assert_close(gate.distance(x), _shrunk_mahalanobis(fit, x, shrink), rtol=2e-4, atol=1e-6)


def test_reject_gate_bound_is_the_held_out_quantile():
    g = torch.Generator().manual_seed(4)
    gate = cmoe.fit_gate(torch.randn(100, 5, generator=g))
    held = torch.randn(200, 5, generator=g)
    gate.calibrate(held, quantile=0.9)
    d = sorted(gate.distance(held).tolist())
    want = d[179] + 0.1 * (d[180] - d[179])  # linear interpolation at position 0.9 * (200 - 1) = 179.1
    assert float(gate.bound) == pytest.approx(want, rel=1e-5)
    gate.calibrate(held, quantile=1.0)
    assert float(gate.bound) == pytest.approx(d[-1], rel=1e-5)  # the farthest held-out one, no margin


def test_reject_goes_to_the_best_accepting_task_and_the_base_where_no_gate_accepts():
    """The VAEs choose among the tasks whose gate (on its own feature g) accepts; none accepting: REJECTED."""
    g = torch.Generator().manual_seed(1)
    centers = [torch.zeros(16), torch.zeros(16)]
    centers[0][:8], centers[1][8:] = 4.0, 4.0
    draw = lambda c, n: c + 0.3 * torch.randn(n, 16, generator=g)  # noqa: E731
    loc = cmoe.Locator()
    for c in centers:
        loc.add_task(draw(c, 200), steps=200)
    f = torch.cat([draw(centers[0], 4), draw(centers[1], 4)])
    with pytest.raises(ValueError, match="0 calibrated reject gates for 2 tasks"):
        loc.locate(f, reject=True, g_BD=f)
    for c in centers:  # the gates see another feature of the same samples: here the VAEs' feature negated
        loc.add_gate(-draw(c, 200), -draw(c, 200), quantile=1.0)
    with pytest.raises(ValueError, match="needs the samples' 'text' features"):
        loc.locate(f, reject=True)
    far = torch.full((3, 16), 40.0)
    assert loc.locate(f).tolist() == [0] * 4 + [1] * 4
    assert loc.locate(f, reject=True, g_BD=-f).tolist() == [0] * 4 + [1] * 4
    assert loc.locate(f, reject=True, g_BD=far[:1].expand(8, -1)).tolist() == [-1] * 8  # the gates decide
    assert loc.locate(far, reject=True, g_BD=-f[:3]).tolist() == [0] * 3  # what the VAEs think of the far sample
    # the VAEs prefer task 0 for f[:4]; with task 1's gate features, only task 1 accepts them
    assert loc.locate(f[:4], reject=True, g_BD=-f[4:]).tolist() == [1] * 4
    loc.gates[0].bound.fill_(float("nan"))
    with pytest.raises(ValueError, match="calibrated reject gates"):
        loc.locate(f, reject=True, g_BD=-f)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_batch_shards_cover_the_batch_once_and_weigh_their_losses_into_its_token_mean(n):
    """One process takes every shard; the shards' token-mean losses times their shares sum to the token-mean loss over
    the whole batch, computed by hand from per-token losses, with rows of 0 to 5 labelled tokens."""
    g = torch.Generator().manual_seed(n)
    B, T = 7, 6
    labels = torch.full((B, T), train.cmoe.IGNORE_INDEX)
    for i, k in enumerate([3, 0, 5, 1, 2, 4, 5]):
        labels[i, T - k:] = 1
    loss_BT = torch.rand(B, T, generator=g, dtype=torch.float64)
    b = {"labels": labels, "row": torch.arange(B)}
    want = loss_BT[labels != train.cmoe.IGNORE_INDEX].mean()
    got, rows = 0.0, []
    for shard, share in train.batch_shards(b, n):
        rows += shard["row"].tolist()
        lab = shard["labels"] != train.cmoe.IGNORE_INDEX
        if lab.any():
            got += share * loss_BT[shard["row"]][lab].mean()
    assert sorted(rows) == list(range(B)) and len(rows) == B
    assert float(got) == pytest.approx(float(want), rel=1e-12)


def test_ptl_locates_separated_tasks_per_sample():
    g = torch.Generator().manual_seed(0)
    centers = [torch.zeros(32), torch.zeros(32), torch.zeros(32)]
    centers[0][:8], centers[1][8:16], centers[2][16:24] = 4.0, 4.0, 4.0
    loc = cmoe.Locator()
    for c in centers:
        loc.add_task(c + 0.3 * torch.randn(300, 32, generator=g), steps=300)
    # a mixed batch: each sample must get its own task, not the batch's majority
    truth = torch.tensor([2, 0, 0, 1, 2, 1, 0, 2])
    f = torch.stack([centers[t] + 0.3 * torch.randn(32, generator=g) for t in truth])
    assert torch.equal(loc.locate(f), truth)
    assert torch.equal(loc.locate(f[3:4]), truth[3:4])


class Crash(RuntimeError):
    pass


def test_resume_after_crash_equals_uninterrupted(tmp_path, base_dir, ptl_run, monkeypatch):
    ref_out, ref = ptl_run
    out = tmp_path / "crashed"
    log = train.Log.__call__

    def crash_after_step_10(self, msg):  # injected from outside: the run dies right after logging step 10
        log(self, msg)
        if msg.startswith("task1:cls step    10/"):
            raise Crash(msg)
    with monkeypatch.context() as m:
        m.setattr(train.Log, "__call__", crash_after_step_10)
        with pytest.raises(Crash):
            run(out, base_dir)
    assert (out / "task_0/model.safetensors").is_file() and (out / "task_1/partial.safetensors").is_file()
    assert json.loads((out / "state.json").read_text())["finished_tasks"] == 1
    M = run(out, base_dir, "--resume")
    assert "resume: 1 finished task(s), and a partial task 1" in (out / "log.txt").read_text()
    assert M["acc"] == ref["acc"] and M["pgke"] == ref["pgke"] and M["locator"] == ref["locator"]
    a, b = load_file(str(ref_out / "task_1/model.safetensors")), load_file(str(out / "task_1/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_stops_cleanly_and_keeps_checkpoints(tmp_path, base_dir, ptl_run, capsys, monkeypatch):
    ref_out, _ = ptl_run
    out = tmp_path / "nan"
    train_stage = train.train_stage

    def nan_at_step_3(model, ds, args, steps, lr, task_id, tag, *a, **kw):  # injected: in task 2, the loss of step
        # 3's first shard (a forward per shard) is NaN
        if tag != "task1:cls":
            return train_stage(model, ds, args, steps, lr, task_id, tag, *a, **kw)
        calls, forward = [], model.forward

        def poisoned(*x, **k):
            logits, loss, aux = forward(*x, **k)
            calls.append(1)
            return logits, loss * float("nan") if len(calls) == 2 * args.batch_shards + 1 else loss, aux
        model.forward = poisoned  # nn.Module.__call__ calls the instance's forward
        try:
            return train_stage(model, ds, args, steps, lr, task_id, tag, *a, **kw)
        finally:
            del model.forward
    monkeypatch.setattr(train, "train_stage", nan_at_step_3)
    with pytest.raises(SystemExit) as e:
        run(out, base_dir)
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "'task1:cls'" in err and "step 3" in err
    # task 1's finished checkpoint is intact (identical to the clean run's); nothing of task 2 was written
    assert (out / "task_0/model.safetensors").read_bytes() == (ref_out / "task_0/model.safetensors").read_bytes()
    assert json.loads((out / "state.json").read_text())["finished_tasks"] == 1
    assert not (out / "task_1/model.safetensors").exists()


def test_eval_reevaluates_run_and_writes_report(ptl_run, oracle_run, tmp_path):
    import eval as ev
    out, M = ptl_run
    assert ev.main([str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["acc"] == M["acc"]  # regenerated from the checkpoints, same numbers as during training
    assert m["zero_shot"] == M["zero_shot"] and len(M["zero_shot"]) == 2  # row 0 regenerated from the bare base
    assert m["plasticity"] == [M["acc"][0][0], M["acc"][1][1]]
    assert "| base (zero-shot) |" in (out / "report.md").read_text()
    assert m["locator"]["confusion"] == M["locator"]["confusion"]
    for f in ("report.md", "figures/acc_matrix.png", "figures/locator_confusion.png", "figures/experts_per_layer.png"):
        assert (out / f).is_file(), f
    assert ev.main(["--compare", str(out), str(oracle_run[0]), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp/compare.md").read_text()
    assert out.name in table and oracle_run[0].name in table


def test_eval_rejects_checkpoint_from_another_config(ptl_run, tmp_path):
    import shutil
    import eval as ev
    out = tmp_path / "copy"
    shutil.copytree(ptl_run[0], out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["method"] = "lora"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="field 'method'"):
        ev.reevaluate(str(out))


# Real kills (SIGKILL from inside a subprocess, at exact points chosen by tests/killrun.py), chained in one run
# folder: each --resume goes on to the next kill point; the end result must equal the uninterrupted run's.
def _exists(*names):
    return lambda out: all((out / n).exists() for n in names)


def _absent(*names):
    return lambda out: not any((out / n).exists() for n in names)


KILL_CHAIN = [  # (kill point, what the folder holds right after it)
    ("before:task_0/meta.json:1", _absent("task_0/meta.json", "state.json")),  # task 1's checkpoint half-written
    ("before:state.json:1", _exists("task_0/meta.json")),  # task 1's checkpoint done, its progress marker not yet
    ("log:^probe1 step:2", _exists("state.json")),  # during the probe of task 2
    ("log:^PGKE task 1:1", _absent("task_1/partial.json")),  # layers grown, task 2 not trained yet
    ("after:task_1/partial.json:1", _exists("task_1/partial.json")),  # right after task 2's first mid-task save
    ("after:predictions/sqa.jsonl:1", lambda out: _stages(out, "sqa") == {-1, 0, 1} and _stages(out, "cls") == {-1, 0}),
]  # the last one: in the middle of task 2's evaluation (sqa scored, cls not yet)


def _stages(out, task):
    return {json.loads(line)["stage"] for line in (out / f"predictions/{task}.jsonl").read_text().splitlines()}


def test_real_kills_then_resume_reproduce_the_uninterrupted_run(tmp_path, base_dir, ptl_run):
    import killrun
    ref_out, ref = ptl_run
    out = tmp_path / "killed"
    for k, (point, holds) in enumerate(KILL_CHAIN):
        argv = TINY + ["--out", str(out), "--base-dir", base_dir] + (["--resume"] if k else [])
        code = killrun.killed(point, argv, tmp_path / f"kill{k}.log")  # a new process, SIGKILLed at the point
        assert code == -9, (f"kill point {point!r} was never reached (exit {code}): "
                            f"{(tmp_path / f'kill{k}.log').read_text()[-2000:]}")
        assert holds(out), f"after kill point {point!r} the run folder is not in the expected state"
    M = run(out, base_dir, "--resume")
    for key in ("acc", "pgke", "locator", "params", "experts_per_layer", "last", "avg", "bwt"):
        assert M[key] == ref[key], key
    for t in (0, 1):
        a = load_file(str(ref_out / f"task_{t}/model.safetensors"))
        b = load_file(str(out / f"task_{t}/model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (t, k)
    for task in ("sqa", "cls"):
        assert (out / f"predictions/{task}.jsonl").read_text() == (ref_out / f"predictions/{task}.jsonl").read_text()
    log = (out / "log.txt").read_text()
    assert log.count("resume:") == len(KILL_CHAIN) - 2  # the first two kills left no progress marker to resume from
    assert not list(out.glob("task_*/partial*")), "partial checkpoints are removed when a task finishes"


def test_eval_refuses_a_run_that_names_no_base(ptl_run, tmp_path):
    import shutil
    import eval as ev
    out = tmp_path / "nobase"
    shutil.copytree(ptl_run[0], out)
    m = json.loads((out / "metrics.json").read_text())
    del m["base"]
    (out / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="metrics name no base model"):
        ev.reevaluate(str(out))


def test_attention_experts_run_keeps_old_experts_and_reloads(tmp_path, base_dir, monkeypatch):
    """--attn-experts: q/k/v/o LoRA experts join each pool; task 1's experts on all seven projections and its
    routers stay bit-identical through task 2, and the checkpoints reload to the same predictions, re-evaluated from
    another directory than the one training ran in (the run's paths are relative ones)."""
    import eval as ev
    monkeypatch.chdir(os.path.dirname(base_dir))  # train with a relative --base-dir and --out
    rel = os.path.relpath(tmp_path / "attn")
    M = run(rel, os.path.basename(base_dir), "--attn-experts", "--locator", "oracle")
    out = tmp_path / "attn"
    assert not os.path.isabs(M["base"]["tiny"])
    a, b = load_file(str(out / "task_0/model.safetensors")), load_file(str(out / "task_1/model.safetensors"))
    frozen = [k for k in a if ".frozen_" in k]
    assert {k.split(".experts.lora.")[1].split(".")[0] for k in frozen} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert len(frozen) == 4 * 7 * 2 and all(torch.equal(b[k][: a[k].shape[0]], a[k]) for k in frozen)
    assert all(torch.equal(b[k], a[k]) for k in a if ".routers.0" in k)
    assert any(b[k].shape[0] > a[k].shape[0] for k in frozen)  # PGKE grew some layer (the check above is not empty)
    assert json.loads((out / "task_0/meta.json").read_text())["experts"]["attn"] is True
    preds = {f: (out / "predictions" / f).read_text() for f in ("sqa.jsonl", "cls.jsonl")}
    monkeypatch.chdir(tmp_path)  # where out/base/... names nothing
    assert ev.main([str(out)]) == 0  # rebuilt from the checkpoints, attention experts included: the same answers
    assert {f: (out / "predictions" / f).read_text() for f in preds} == preds
    assert json.loads((out / "metrics.json").read_text())["acc"] == M["acc"]


# ----------------------------------------------------------------------------------------------------------
# settings: TrainConfig fields as flags, --set, the --quick preset

def test_patch_merge_and_text_steps_base_is_cached_reloaded_and_refused_where_it_cannot_apply(tmp_path, base_dir):
    from data import preprocess
    import data
    import eval as ev
    out = tmp_path / "m2"
    m = train.main(TINY + ["--out", str(out), "--base-dir", base_dir, "--patch-merge", "2", "--tasks", "sqa",
                           "--locator-feature", "mean", "--text-steps", "4",
                           "--base-steps", "6", "--instruct-steps", "2", "--steps", "4"])  # shapes, not skill
    assert open(out / "log.txt").read().count("induction loss") == 4  # stage 0 began with the text pretraining
    model = ev.load_base(m["base"]["tiny"])
    px = preprocess(data.minicoin("cls", "test", 1)[0].image, data.IMAGE_SIZE)[None]
    assert model.projector.merge == 2 and model.image_features(px).shape == (1, 9, model.llm.cfg.dim)
    tok, template = data.tokenizer(train.TrainConfig(base_dir=base_dir))  # the "mean" PTL feature: 9 image slots
    ids = data.encode_prompt(tok, data.minicoin("cls", "test", 1)[0], template)
    feat = model.features([ids], px, kind="mean")[0]
    x, _, _ = model.splice(torch.tensor([ids]), px)
    h, _ = model.llm(inputs_embeds=x, return_hidden=True)
    p, D = ids.index(cmoe.IMAGE_TOKEN_ID), model.llm.cfg.dim
    torch.testing.assert_close(feat[:D], h[0, p:p + 9].mean(0))
    torch.testing.assert_close(feat[D:], torch.cat([h[0, :p], h[0, p + 9:]]).mean(0))
    with pytest.raises(SystemExit, match="--patch-merge 4 does not divide the tiny tower's 6 patches per side"):
        run(tmp_path / "m4", str(tmp_path / "base4"), "--patch-merge", "4")
    with pytest.raises(SystemExit, match="--patch-merge is for the tiny MiniCoIN base"):
        run(tmp_path / "real", base_dir, "--patch-merge", "2", "--llm", "x", "--vision", "y")
    with pytest.raises(SystemExit, match="--instruct-mc is for the tiny MiniCoIN base"):
        run(tmp_path / "real", base_dir, "--instruct-mc", "--llm", "x", "--vision", "y")


def test_every_train_flag_in_the_readme_is_a_setting():
    import glob
    import re
    root = os.path.join(os.path.dirname(__file__), "..")
    pages = [os.path.join(root, "README.md"), *sorted(glob.glob(os.path.join(root, "docs", "*.md")))]
    assert len(pages) > 1, pages  # README and docs/
    text = "".join(open(p).read() for p in pages)
    flags = set(re.findall(r"(?<![\w-])--([a-z][a-z0-9-]*)", text))
    others = {"show",  # data.py
              "compare",  # eval.py
              "dispatch", "reps", "forward", "dims", "batch",  # bench/bench_moe.py
              "no-",  # "--no-<field>" (every bool's off form)
              "standalone", "nproc", "whole",  # torchrun's own; bench/bench_eval.py
              "dry-run", "train", "train-limit", "peak-tflops"}  # bench/gpu_check.py
    fields = train.dataclasses.fields(train.TrainConfig)
    names = {f.name.replace("_", "-") for f in fields} | {"set", "help"}
    names |= {"no-" + f.name.replace("_", "-") for f in fields if f.type.startswith("bool")}  # --no-attn-experts
    assert len(flags - others) > 30 and flags - others <= names, sorted(flags - others - names)


def test_settings_from_flags_set_and_quick_preset(capsys):
    c = train.parse_args(["--quick", "--steps", "7", "--alpha", "-0.5", "--grad-ckpt", "--set", "lr=1e-3",
                          "--set", "train-n=none", "--method", "lora"])
    assert (c.steps, c.alpha, c.grad_ckpt, c.lr, c.train_n, c.method) == (7, -0.5, True, 1e-3, None, "lora")
    assert (c.probe_steps, c.tasks, c.out) == (train.QUICK["probe_steps"], "sqa,cls,count", "out/minicoin-quick-lora")
    d = train.parse_args([])
    assert (d.steps, d.tasks, d.max_len, d.out) == (300, None, 48, "out/minicoin-cmoe")
    assert (d.attn_experts, d.instruct_mc) == (True, None)  # attention experts; the multiple-choice stage 0b (tiny base)
    t = train.parse_args(["--steps", "50", "--task-steps", " ground=900, gqa=7,"])
    assert [t.steps_of(n) for n in ("ground", "gqa", "sqa")] == [900, 7, 50] and d.steps_of("ground") == 300
    e = train.parse_args(["--no-attn-experts", "--no-instruct-mc", "--expand", "all"])  # a bool's --no- form
    assert (e.attn_experts, e.instruct_mc, e.out) == (False, False, "out/minicoin-cmoe-expandall-ffn-nomc")
    names = d.tasks and d.tasks.split(",") or list(train.data.MINICOIN_TASKS)  # --unseen: auto, none, a list
    for argv, want in (([], ["textcolor", "position"]), (["--unseen", "none"], []), (["--set", "unseen=none"], []),
                       (["--unseen", "NONE"], []), (["--unseen", "textcolor"], ["textcolor"])):
        assert list(train.data.unseen_list(train.parse_args(argv), names)) == want, argv
    for bad, says in ((["--set", "rank=x"], "rank=x"), (["--set", "nope=1"], "NAME one of"),
                      (["--set", "method=bad"], "method must be one of"), (["--bad-images", "x"], "invalid choice"),
                      (["--grad-accum", "0"], "grad_accum must be at least 1"), (["--rank", "0"], "rank must be"),
                      (["--train-n", "0"], "train_n must be"), (["--reject-quantile", "1.5"], "reject_quantile must"),
                      (["--reject-quantile", "nan"], "reject_quantile must"), (["--gpu-mem", "inf"], "gpu_mem must"),
                      (["--text-steps", "-1"], "text_steps must be 0 or more"), (["--patch-merge", "0"], "patch_merge must"),
                      (["--device", "bogus"], "device must be a torch device"), (["--out", __file__], "is a file"),
                      (["--task-steps", "ground=0"], "task_steps: 'ground=0'"), (["--task-steps", "ground"], "NAME=N"),
                      (["--task-steps", "gqa=2,gqa=3"], "each task once"),
                      (["--batch-size", "2", "--batch-shards", "3"], "batch_shards (3) must be at most batch_size (2)")):
        with pytest.raises(SystemExit):
            train.parse_args(bad)
        assert says in capsys.readouterr().err, bad
    with pytest.raises(SystemExit):  # a run folder under a file: refused before anything is made
        train.parse_args(["--out", os.path.join(__file__, "run")])
    assert "is a file, so the run folder cannot be made under it" in capsys.readouterr().err
    coin = train.parse_args(["--quick", "--benchmark", "coin"])  # QUICK's MiniCoIN task list stays out of CoIN
    assert coin.tasks is None and coin.steps == train.QUICK["steps"]
    with pytest.raises(SystemExit, match="sqa listed twice"):
        train.data.task_list(train.parse_args(["--tasks", "sqa,cls,sqa"]))


def test_task_steps_set_one_tasks_length_and_joint_trains_their_sum(tmp_path, base_dir):
    import re
    extra = ("--locator", "oracle", "--unseen", "none", "--steps", "2", "--task-steps", "cls=3")
    run(tmp_path / "seq", base_dir, *extra)
    log = (tmp_path / "seq" / "log.txt").read_text()
    assert re.search(r"task0:sqa step\s+2/2 ", log) and re.search(r"task1:cls step\s+3/3 ", log), log
    run(tmp_path / "joint", base_dir, *extra, "--method", "joint")
    assert re.search(r"joint step\s+5/5 ", (tmp_path / "joint" / "log.txt").read_text())  # sqa's 2 + cls's 3
    with pytest.raises(SystemExit, match="--task-steps names ground: not a task of this run"):
        run(tmp_path / "bad", base_dir, "--task-steps", "ground=5")
    assert not (tmp_path / "bad").exists()  # refused before the run folder is made


def test_max_len_that_fits_no_example_is_refused_by_name(tmp_path, base_dir):
    stages = lambda: sorted(d for d in os.listdir(base_dir) if os.path.isdir(os.path.join(base_dir, d)))  # noqa: E731
    before = stages()
    with pytest.raises(SystemExit, match="task caption: none of its 64 examples fits --max-len 4"):
        run(tmp_path / "run", base_dir, "--max-len", "4")
    assert stages() == before  # no stage-0 folder begun
    with pytest.raises(SystemExit, match="--unseen: 'textcolour' is not a task"):  # a misspelt --unseen, likewise
        run(tmp_path / "run2", base_dir, "--unseen", "textcolour")
    assert stages() == before and not (tmp_path / "run2" / "log.txt").exists()


def test_resume_with_changed_settings_is_refused_before_anything_is_written(tmp_path):
    out = str(tmp_path / "run")
    first = train.parse_args(["--quick", "--out", out])
    os.makedirs(out)
    train.save_json(train.dataclasses.asdict(first), os.path.join(out, "config.json"))
    before = open(os.path.join(out, "config.json")).read()
    train.check_resume(train.parse_args(["--quick", "--out", out, "--resume", "--threads", "1"]))  # may change
    for argv, field in ((["--tasks", "sqa,cls"], "tasks"), (["--method", "lora"], "method"), (["--set", "lr=1"], "lr")):
        with pytest.raises(SystemExit, match=f"--resume: {field} is"):
            train.RunState(train.parse_args(["--quick", "--out", out, "--resume"] + argv))
    assert open(os.path.join(out, "config.json")).read() == before and os.listdir(out) == ["config.json"]



def test_unseen_task_bookkeeping_in_metrics(ptl_run):
    out, M = ptl_run
    u = json.loads((out / "metrics.json").read_text())["unseen"]
    assert u["tasks"] == ["textcolor", "position"] and len(u["zero_shot"]) == 2 and len(u["acc"]) == 2 == len(M["acc"])
    assert u["retention"] == [u["acc"][-1][k] / z if z else None for k, z in enumerate(u["zero_shot"])]
    rows = [json.loads(line) for line in (out / "predictions/textcolor.jsonl").read_text().splitlines()]
    assert sorted({r["stage"] for r in rows}) == [-1, 0, 1] and all(r["true_task"] is None for r in rows)
    for stage, acc in zip((-1, 0, 1), [u["zero_shot"][0]] + [a[0] for a in u["acc"]]):
        scored = [r["prediction"].strip().rstrip(".").lower() == r["answer"] for r in rows if r["stage"] == stage]
        assert acc == pytest.approx(100 * sum(scored) / len(scored))


def test_rejected_samples_are_answered_by_the_base_alone(ptl_run, tmp_path):
    """Every gate's bound set below any distance: with --reject every sample of every stage is rejected, so each stage's
    predictions are the bare base's (stage -1) exactly; the confusion gains the rejected counts."""
    import shutil
    import eval as ev
    from safetensors.torch import save_file
    out = tmp_path / "reject"
    shutil.copytree(ptl_run[0], out)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "reject": True}))
    for t in (0, 1):
        path = out / f"task_{t}/model.safetensors"
        sd = load_file(str(path))
        bounds = [k for k in sd if k.startswith("locator.gates.") and k.endswith(".bound")]
        assert len(bounds) == t + 1  # one gate per task seen, fitted whether or not the run used --reject
        sd.update({k: torch.tensor(float("-inf")) for k in bounds})
        save_file(sd, str(path))
    M = ev.reevaluate(str(out))
    for task in ("sqa", "cls", "textcolor", "position"):
        rows = [json.loads(line) for line in (out / f"predictions/{task}.jsonl").read_text().splitlines()]
        base = [r["prediction"] for r in rows if r["stage"] == -1]
        for stage in (0, 1):
            assert [r["prediction"] for r in rows if r["stage"] == stage] == base, (task, stage)
            assert all(r["located"] == -1 for r in rows if r["stage"] == stage)
    assert M["acc"] == [M["zero_shot"]] * 2 and M["locator"]["rejected"] == [8, 8] and M["locator"]["acc"] == 0.0
    assert M["unseen"]["retention"] == [1.0 if z else None for z in M["unseen"]["zero_shot"]]


def test_eval_refuses_a_locator_of_another_feature(ptl_run, tmp_path):
    import shutil
    import eval as ev
    out = tmp_path / "feature"
    shutil.copytree(ptl_run[0], out)
    cfg = json.loads((out / "config.json").read_text())
    other = "last" if cfg["locator_feature"] == "mean" else "mean"
    (out / "config.json").write_text(json.dumps({**cfg, "locator_feature": other}))
    with pytest.raises(ValueError, match="field 'locator_feature'"):
        ev.reevaluate(str(out))


def test_reject_bounds_recalibrated_from_the_training_data_equal_the_trained_ones(ptl_run, tmp_path):
    import shutil
    import eval as ev
    stored, recal = tmp_path / "stored", tmp_path / "recal"
    for d in (stored, recal):
        shutil.copytree(ptl_run[0], d)
    a = ev.reevaluate(str(stored), reject=True)
    b = ev.reevaluate(str(recal), reject=True, quantile=json.loads((recal / "config.json").read_text())["reject_quantile"])
    assert a["acc"] == b["acc"] and a["locator"] == b["locator"] and a["unseen"] == b["unseen"]
    for task in ("sqa", "cls", "textcolor", "position"):
        assert (stored / f"predictions/{task}.jsonl").read_text() == (recal / f"predictions/{task}.jsonl").read_text()


def test_reject_works_on_a_run_folder_from_before_the_gates(ptl_run, tmp_path):
    """An older checkpoint: VAEs with their 'accept_z' bound, no gates. --reject fits the gates from the run's
    training data, the way training fits them: the same predictions as the stored gates give."""
    import shutil
    import eval as ev
    from safetensors.torch import save_file
    stored, old = tmp_path / "stored", tmp_path / "old"
    for d in (stored, old):
        shutil.copytree(ptl_run[0], d)
    for t in (0, 1):
        sd = load_file(str(old / f"task_{t}/model.safetensors"))
        sd = {k: v for k, v in sd.items() if not k.startswith("locator.gates.")}
        sd.update({f"locator.vaes.{k}.accept_z": torch.tensor(3.0) for k in range(t + 1)})
        save_file(sd, str(old / f"task_{t}/model.safetensors"))
        meta = json.loads((old / f"task_{t}/meta.json").read_text())
        del meta["n_gate"]
        (old / f"task_{t}/meta.json").write_text(json.dumps(meta))
    plain = ev.reevaluate(str(old))  # without --reject the old folder evaluates as before
    assert plain["acc"] == json.loads((stored / "metrics.json").read_text())["acc"]
    a, b = ev.reevaluate(str(stored), reject=True), ev.reevaluate(str(old), reject=True)
    assert a["acc"] == b["acc"] and a["locator"] == b["locator"] and a["unseen"] == b["unseen"]
    for task in ("sqa", "cls", "textcolor", "position"):
        assert (stored / f"predictions/{task}.jsonl").read_text() == (old / f"predictions/{task}.jsonl").read_text()


def test_gates_of_another_feature_are_refitted_for_reject_and_refused_on_resume(ptl_run, tmp_path, base_dir):
    """A checkpoint whose gates model the instruction+image "mean" (no "gate_feature" in its meta, as before the
    instruction-only gates): --reject refits them from the training data, giving the stored gates' predictions; a
    --resume of such a run stops with the reason before it trains."""
    import shutil
    import eval as ev
    stored, older = tmp_path / "stored", tmp_path / "older"
    for d in (stored, older):
        shutil.copytree(ptl_run[0], d)
    for t in (0, 1):
        meta = json.loads((older / f"task_{t}/meta.json").read_text())
        assert meta.pop("gate_feature") == cmoe.REJECT_FEATURE == "text"
        (older / f"task_{t}/meta.json").write_text(json.dumps(meta))
    assert len(ev.load_task(ev.load_base(json.loads((older / "metrics.json").read_text())["base"]["tiny"]),
                            older / "task_1").gates) == 0  # not loaded: another feature's
    a, b = ev.reevaluate(str(stored), reject=True), ev.reevaluate(str(older), reject=True)
    assert a["acc"] == b["acc"] and a["locator"] == b["locator"] and a["unseen"] == b["unseen"]
    for task in ("sqa", "cls", "textcolor", "position"):
        assert (stored / f"predictions/{task}.jsonl").read_text() == (older / f"predictions/{task}.jsonl").read_text()
    state = json.loads((older / "metrics.json").read_text())
    (older / "state.json").write_text(json.dumps({**state, "finished_tasks": 1}))
    cfg = json.loads((older / "config.json").read_text())
    (older / "config.json").write_text(json.dumps({**cfg, "out": str(older)}))  # a copy: its own folder
    with pytest.raises(SystemExit, match="no reject gates over this code's feature 'text'"):
        run(older, base_dir, "--resume")


def test_compiled_stages_with_grown_pools_never_hit_the_recompile_limit(monkeypatch):
    """--compile on: each stage has a larger pool (new parameter shapes), so each recompiles; train_stage resets
    dynamo per stage, or over a run the recompiles pass dynamo's limit and later stages silently run eagerly. Here
    the limit is 1 and hitting it fails (two steps per stage: no recompile within one); dynamo's eager backend
    (tracing and guards, no code generation) keeps it cheap."""
    from test_method import _probe_setup
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compile_(m, backend="eager"))
    model, ds, g = _probe_setup(N=8)
    cmoe.probe_start(model.llm, generator=g)
    cfg = train.parse_args(["--compile", "on", "--batch-size", "4"])
    cfg.device = "cpu"
    try:
        with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
            for stage in range(2):
                for f in model.llm.expert_pools():  # the pool grows by one trainable expert; a new router over all
                    f.add_experts(1, generator=g)
                    f.routers = torch.nn.ParameterList(list(f.routers)[:1])
                    f.add_router()
                for n, p in model.named_parameters():
                    p.requires_grad_(".train_" in n or ".routers.1" in n)
                before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
                train.train_stage(model, ds, cfg, 2, 1e-2, 1, f"stage{stage}", lambda msg: None)
                after = [p for p in model.parameters() if p.requires_grad]
                assert any(not torch.equal(a, b) for a, b in zip(after, before))  # the compiled step trained
    finally:
        torch._dynamo.reset()


def test_isolated_trains_each_task_alone_from_the_base(tmp_path, base_dir):
    """--method isolated, the bound for tasks kept apart: its task 2 is cmoe trained on that task alone (the same
    experts and routers, bit for bit, and the same accuracy), and each task's checkpoint holds only its own fresh
    pool (--n-init experts per layer)."""
    M = run(tmp_path / "iso", base_dir, "--method", "isolated", "--unseen", "none")
    alone = run(tmp_path / "alone", base_dir, "--tasks", "cls", "--unseen", "none")
    a = load_file(str(tmp_path / "iso/task_1/model.safetensors"))
    b = {k: v for k, v in load_file(str(tmp_path / "alone/task_0/model.safetensors")).items() if "locator" not in k}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {v.shape[0] for k, v in a.items() if ".lora." in k and "frozen_A" in k} == {2}  # n_init, no other task's
    assert M["acc"][1][1] == alone["acc"][0][0]
    assert M["last"] == pytest.approx((M["acc"][0][0] + M["acc"][1][1]) / 2) and M["bwt"] is None
    assert M["params"][0]["added"] == M["params"][1]["added"] > 0  # a pool of the same size per task
