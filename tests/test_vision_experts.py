"""Experts in the CLIP vision tower (cmoe.Experts.for_clip in vision.CLIPEncoderLayer): a ViT block with routed LoRA
experts against a hand-written block that loops over tokens, heads and experts."""
import math

import pytest
import torch
import torch.nn.functional as F

import cmoe
import vision as V
from cmoe import ExpertConfig

CFG = V.VisionConfig(image_size=16, patch_size=8, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                     num_attention_heads=2, select_layer=-1)


def make_layer(attn, E=3, k=2, n_tasks=2, seed=0):
    """One CLIP block whose pool holds E experts over n_tasks routers (earlier tasks' experts frozen), every expert
    with non-zero A and B, and non-zero biases in the base projections."""
    torch.manual_seed(seed)
    layer = V.CLIPEncoderLayer(CFG, ExpertConfig(rank=4, alpha=8, top_k=k, attn=attn))
    pool = layer.experts
    for t in range(n_tasks):
        n = max(1, E * (t + 1) // n_tasks) - pool.n_experts
        pool.add_experts(n)
        pool.add_router(torch.randn(pool.n_experts, CFG.hidden_size))
        if t < n_tasks - 1:
            pool.freeze()
    with torch.no_grad():
        for e in pool.lora.values():
            for p in (e.frozen_B, e.train_B):
                p.normal_(0, 0.3)
        for m in layer.modules():
            if isinstance(m, torch.nn.Linear):
                m.bias.normal_(0, 0.1)
    return layer


def hand_weights(h_TD, router_ED, k):
    """Per token: softmax over the router's experts, the top-k kept and renormalised, zeros elsewhere."""
    w = torch.zeros(h_TD.shape[0], router_ED.shape[0])
    for t in range(h_TD.shape[0]):
        p = torch.softmax(router_ED @ h_TD[t], 0)
        top = p.topk(min(k, len(p)))
        w[t, top.indices] = top.values / top.values.sum()
    return w


def hand_layer(layer, x_TD, task):
    """One sample through the block: each projection W x + b + sum_e w_e * scale * (x A_e) B_e, attention per head."""
    pool, s = layer.experts, layer.experts.ecfg.scale
    A = {n: e.A for n, e in pool.lora.items()}
    B = {n: e.B for n, e in pool.lora.items()}
    router = pool.routers[task]
    E_t = router.shape[0]  # experts added after the task are invisible to its router

    def proj(name, lin, v_TI, w_TE):
        y = v_TI @ lin.weight.T + lin.bias
        if name in A:
            for t in range(v_TI.shape[0]):
                for e in range(E_t):
                    if w_TE[t, e] != 0:
                        y[t] = y[t] + w_TE[t, e] * s * (v_TI[t] @ A[name][e] @ B[name][e])
        return y

    h = F.layer_norm(x_TD, (CFG.hidden_size,), layer.layer_norm1.weight, layer.layer_norm1.bias, CFG.layer_norm_eps)
    w = hand_weights(h, router, pool.ecfg.top_k) if pool.ecfg.attn else None
    at = layer.self_attn
    q, kk, v = (proj(n, getattr(at, f"{n}_proj"), h, w) for n in "qkv")
    H, K = CFG.num_attention_heads, CFG.hidden_size // CFG.num_attention_heads
    y = torch.zeros_like(q)
    for hd in range(H):
        sl = slice(hd * K, (hd + 1) * K)
        att = torch.softmax(q[:, sl] @ kk[:, sl].T / math.sqrt(K), -1)
        y[:, sl] = att @ v[:, sl]
    x = x_TD + proj("o", at.out_proj, y, w)
    h2 = F.layer_norm(x, (CFG.hidden_size,), layer.layer_norm2.weight, layer.layer_norm2.bias, CFG.layer_norm_eps)
    if w is None:  # MLP-only experts route at the MLP's input
        w = hand_weights(h2, router, pool.ecfg.top_k)
    f = proj("fc1", layer.mlp.fc1, h2, w)
    return x + proj("fc2", layer.mlp.fc2, f * torch.sigmoid(1.702 * f), w)


@pytest.mark.parametrize("attn", [True, False])
@pytest.mark.parametrize("dispatch", ["dense", "sparse"])
def test_vision_block_equals_a_per_expert_loop(attn, dispatch):
    layer = make_layer(attn)
    layer.experts.dispatch = dispatch
    assert set(layer.experts.lora) == ({"fc1", "fc2", "q", "k", "v", "o"} if attn else {"fc1", "fc2"})
    x = torch.randn(3, 5, CFG.hidden_size)
    tasks = torch.tensor([1, 0, 1])  # a mixed batch: each sample its own task's router
    with torch.no_grad():
        y, aux = layer(x, tasks)
    assert float(aux) == 0  # no balance loss without autograd
    for b in range(3):
        torch.testing.assert_close(y[b], hand_layer(layer, x[b], int(tasks[b])), atol=1e-5, rtol=1e-5)
    # use_experts=False, or a tower without routers: the frozen block
    ref = V.CLIPEncoderLayer(CFG)
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("experts.")}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(layer(x, tasks, use_experts=False)[0], ref(x)[0], atol=0, rtol=0)


def test_vision_experts_train_and_balance_loss_flows():
    """The tower's balance loss reaches LLaVA's and the trainable experts and router get gradients; frozen ones none."""
    layer = make_layer(attn=True)
    x = torch.randn(2, 5, CFG.hidden_size)
    y, aux = layer(x, torch.tensor([1, 1]))
    assert float(aux.detach()) > 0
    (y.square().mean() + aux).backward()
    pool = layer.experts
    assert pool.routers[1].grad is not None and pool.routers[1].grad.abs().sum() > 0
    assert not pool.routers[0].requires_grad and pool.routers[0].grad is None
    for e in pool.lora.values():
        assert e.train_A.grad is not None and not e.frozen_A.requires_grad


def test_clip_pool_shapes_follow_the_tower():
    """The pool's LoRA shapes are the ViT's projections: width D, MLP width F; router width D."""
    pool = cmoe.Experts.for_clip(CFG, ExpertConfig(rank=3, attn=True))
    pool.add_experts(2)
    D, Fd = CFG.hidden_size, CFG.intermediate_size
    want = {"fc1": (D, Fd), "fc2": (Fd, D), "q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D)}
    assert {n: (e.din, e.dout) for n, e in pool.lora.items()} == want
    pool.add_router()
    assert pool.routers[0].shape == (2, D)
    assert cmoe.expert_numel(pool) == sum(3 * (i + o) for i, o in want.values())


# ----------------------------------------------------------------------------------------------------------
# --experts-in vision|both through train.py: frozen old experts, checkpoints, --plan

import json  # noqa: E402

import numpy as np  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import data  # noqa: E402
import eval as ev  # noqa: E402
import train  # noqa: E402
from test_train import TINY  # noqa: E402


@pytest.fixture(scope="module")
def both_run(tmp_path_factory, base_dir):
    out = tmp_path_factory.mktemp("both")
    return out, train.main(TINY + ["--out", str(out), "--base-dir", base_dir, "--experts-in", "both"])


def test_old_vision_experts_and_routers_bit_identical_after_a_later_task(both_run):
    out, m = both_run
    a, b = load_file(str(out / "task_0/model.safetensors")), load_file(str(out / "task_1/model.safetensors"))
    vis = [k for k in a if k.startswith("vision.encoder.layers.")]
    n_vis = len(model_layers := {k.split(".experts.")[0] for k in vis})
    assert n_vis == 2  # the tiny tower runs 2 of its 3 layers (select_layer -2)
    checked = 0
    for k in vis:
        if ".frozen_" in k:
            assert a[k].shape[0] == 2 and torch.equal(b[k][: a[k].shape[0]], a[k]), k  # a prefix of the grown bank
            checked += 1
        if ".routers.0" in k:
            assert torch.equal(b[k], a[k]), k
            checked += 1
    assert checked == n_vis * (6 * 2 + 1)  # q, k, v, o, fc1, fc2 (A and B) + task 1's router, per layer
    meta = json.loads((out / "task_1/meta.json").read_text())
    assert meta["experts_in"] == "both" and len(meta["vision_router_trainable"]) == 2
    # PGKE decided per tower and recorded both: 4 decoder layers, then 2 tower layers
    p = m["pgke"][0]
    assert len(p["expand"]) == 6 and p["towers"] == {"llm": [0, 4], "vision": [4, 6]}
    assert p["expand"][4:] == cmoe.pgke_decide(p["freq"][4:], 1.0)[0]
    assert p["expand"][:4] == cmoe.pgke_decide(p["freq"][:4], 1.0)[0]
    assert m["expert_layers"] == ["llm.0", "llm.1", "llm.2", "llm.3", "vision.0", "vision.1"]
    for layer in model_layers:  # grown layers hold 3 experts after task 2, the others 2
        assert b[f"{layer}.experts.lora.fc1.frozen_A"].shape[0] in (2, 3)


def test_vision_pools_checkpoint_round_trip(both_run, tmp_path):
    """eval.py RUN rebuilds the towers' pools from the checkpoints: same predictions, same accuracy rows."""
    out, m = both_run
    before = {f.name: f.read_text() for f in (out / "predictions").glob("*.jsonl")}
    assert ev.main([str(out)]) == 0
    after = {f.name: f.read_text() for f in (out / "predictions").glob("*.jsonl")}
    assert before == after
    assert json.loads((out / "metrics.json").read_text())["acc"] == m["acc"]
    # the reloaded model routes the tower: its task-2 pools are those of the checkpoint
    model = ev.load_base(m["base"]["tiny"])
    ev.load_task(model, out / "task_1")
    sd = load_file(str(out / "task_1/model.safetensors"))
    assert model.experts_in == "both"
    for i, pool in enumerate(model.vision.expert_pools()):
        assert torch.equal(pool.lora["fc1"].A, sd[f"vision.encoder.layers.{i}.experts.lora.fc1.frozen_A"])
        assert len(pool.routers) == 2 and not any(r.requires_grad for r in pool.routers)


def test_default_checkpoints_hold_no_vision_keys(tmp_path, base_dir):
    out = tmp_path / "llm"
    train.main(TINY + ["--out", str(out), "--base-dir", base_dir, "--tasks", "sqa", "--steps", "2"])
    sd = load_file(str(out / "task_0/model.safetensors"))
    assert sd and not any(k.startswith("vision.") for k in sd)
    assert "experts_in" not in json.loads((out / "task_0/meta.json").read_text())


def test_plan_counts_vision_expert_parameters(capsys):
    """--plan --experts-in: the tower's pools add, per CLIP layer it builds, each expert's LoRA pairs on q, k, v, o
    (D x D) and fc1, fc2 (D x F) and each task router's rows (D wide), counted here by hand."""
    args = ["--plan", "--preset", "llama-3.2-1b", "--tasks", "3"]
    got = {w: train.plan(train.parse_args(args + ["--experts-in", w])) for w in ("llm", "vision", "both")}
    D, Fd, R, layers = 1024, 4096, 8, 23  # CLIP ViT-L/14-336 as LLaVA builds it: 23 of 24 layers
    per_expert = R * (4 * 2 * D + 2 * (D + Fd))
    experts, rows = 2 + 1 + 1, 2 + 3 + 4  # cmoe: 2 experts at task 1, +1 per layer per later task (the worst case)
    hand = layers * (experts * per_expert + rows * D)
    assert got["vision"]["added"] == hand
    assert got["both"]["added"] == got["llm"]["added"] + hand
    assert f"vision experts   {hand:,}" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# the pattern task

def hand_fill(img):
    """The fill of the one object, read off the pixels: solid (every row and column of lit pixels is one run),
    striped (lit rows, or columns, each one run, in separate bands), else checkered (lit 2 px checks touch
    diagonally: a lit pixel 2 px down and right of a lit one) or dotted (the next dot is 4 px away at least)."""
    lum = np.asarray(img).astype(int).sum(-1)
    lit = lum == lum.max()  # the one object's full colour (a fill's off pixels are dimmer, the background black)
    assert (lum[(lum > 0) & ~lit] < 0.75 * lum.max()).all()  # off pixels: FILL_OFF of the colour
    ys, xs = np.nonzero(lit)
    box = lit[ys.min():ys.max() + 1, xs.min():xs.max() + 1]

    def runs(line):
        return int(np.sum(np.diff(np.concatenate([[0], line.astype(int), [0]])) == 1))
    rows_one = all(runs(r) <= 1 for r in box)
    cols_one = all(runs(c) <= 1 for c in box.T)
    if rows_one and cols_one:
        return "solid"
    for lines in (box, box.T):  # horizontal bands: every lit row is one run, rows lit in pairs
        lit_rows = [bool(r.any()) for r in lines]
        if all(runs(r) <= 1 for r in lines) and runs(np.array(lit_rows)) > 1:
            return "striped"
    return "checkered" if (box[:-2, :-2] & box[2:, 2:]).any() else "dotted"


def test_pattern_answers_are_what_the_renderer_drew():
    exs = data.minicoin("pattern", "train", 40)
    seen = set()
    for ex in exs:
        assert hand_fill(ex.image) == ex.answer, (ex.meta, ex.answer)
        assert ex.turns[0][0].startswith("<image>\nWhat is the fill pattern of the object?")
        seen.add(ex.answer)
    assert seen == set(data.FILLS)
    # train and test scenes never share a scene; the task is a --tasks name, not in the default sequence
    test = data.minicoin("pattern", "test", 20)
    assert not {e.meta["scene"] for e in exs} & {e.meta["scene"] for e in test}
    assert "pattern" not in data.MINICOIN_TASKS and "pattern" in data.EXTRA_TASKS


def test_stage_0_never_shows_or_names_a_fill():
    words = {"pattern", "fill", "solid", "striped", "stripe", "checkered", "dotted", "dot"}
    for task in ("caption", "instruct", data.INSTRUCT_MC):
        for i in range(600):
            ex = data.minicoin_sample(task, "train", i, render=False)
            text = " ".join(u + " " + a for u, a in ex.turns).lower()
            assert not words & set(text.replace(".", " ").replace("?", " ").replace(",", " ").split()), (task, text)
            assert not any(f in ex.meta["scene"] for f in data.FILLS), ex.meta["scene"]


def test_base_only_answers_ignore_active_vision_experts(both_run):
    """use_experts=False (the base answering a rejected sample, PTL's features) is the frozen tower even while the
    tower's pools are active: the same as the tower with its pools emptied."""
    out, m = both_run
    model = ev.load_base(m["base"]["tiny"])
    ev.load_task(model, out / "task_1")
    assert model.vision.experts_active()
    S = model.vision.cfg.image_size
    px = torch.rand(2, 3, S, S)
    with torch.no_grad():
        off, _ = model.image_tokens(px, torch.tensor([1, 1]), use_experts=False)
        on, _ = model.image_tokens(px, torch.tensor([1, 1]), use_experts=True)
        for pool in model.vision.expert_pools():
            pool.reset(pool.ecfg)
        plain, _ = model.image_tokens(px)
    assert torch.equal(off, plain) and not torch.allclose(on, plain)


def test_tower_probe_learns_a_class_one_coordinate_decides_and_not_labels_independent_of_the_input():
    """bench/tower_probe.probe, the measurement behind README's pattern paragraph: a class that is the sign of one
    input coordinate is learned (linear and with a hidden layer); labels drawn apart from the input stay near chance."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
    from tower_probe import probe
    g = torch.Generator().manual_seed(0)
    x_ND = torch.randn(600, 8, generator=g)
    x_ND[:, 3] += x_ND[:, 3].sign()  # a margin of 2 between the classes
    y_N = (x_ND[:, 3] > 0).long()
    for hidden in (0, 32):
        assert probe(x_ND[:400], y_N[:400], x_ND[400:], y_N[400:], 2, hidden) >= 95
    noise_N = torch.randint(0, 2, (600,), generator=g)
    assert probe(x_ND[:400], noise_N[:400], x_ND[400:], noise_N[400:], 2) <= 65
