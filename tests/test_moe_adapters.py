"""--method moe-adapters (MoE-Adapters4CL on LLaVA): the adapter pool, noisy top-k gating, activate-freeze and DDAS
against hand computations, and a tiny end-to-end run."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import cmoe
import eval as ev
import train
from test_train import TINY


def _pool(D=12, E=5, R=4, n_routers=2, frozen=(1, 3), seed=0):
    """A pool with random experts (biases and W_up non-zero), `frozen` experts in the frozen bank, random routers.
    Returns (pool, its reference weights in expert order, the routers)."""
    g = torch.Generator().manual_seed(seed)
    pool = cmoe.AdapterPool(D, cmoe.AdapterConfig(n_experts=E, dim=R, scale=0.1, top_k=2))
    ref = [torch.randn(E, D, R, generator=g) / D ** 0.5, torch.randn(E, R, generator=g) * 0.1,
           torch.randn(E, R, D, generator=g) / R ** 0.5, torch.randn(E, D, generator=g) * 0.1]
    mask = torch.zeros(E, dtype=torch.bool)
    mask[list(frozen)] = True
    pool._rebank(mask, ref)
    routers = []
    for _ in range(n_routers):
        pool.add_router()
        with torch.no_grad():
            pool.routers[-1].copy_(torch.randn(E, D, generator=g))
            pool.noise[-1].copy_(torch.randn(E, D, generator=g))
        routers.append(pool.routers[-1].detach().clone())
    return pool, ref, routers


def _hand_gate(h0, W_ED, k=2):
    """softmax over the k largest logits of W h0, placed at their experts, zeros elsewhere (python lists)."""
    logits = [float(W_ED[e] @ h0) for e in range(W_ED.shape[0])]
    top = sorted(range(len(logits)), key=lambda e: -logits[e])[:k]
    z = [torch.tensor(logits[e]).exp().item() for e in top]
    gate = [0.0] * len(logits)
    for e, v in zip(top, z):
        gate[e] = v / sum(z)
    return gate


def test_gate_without_noise_is_softmax_over_the_two_largest_logits_and_noise_only_in_training():
    pool, _, routers = _pool()
    h0 = torch.randn(4, 12)
    tids = torch.tensor([0, 1, 1, 0])
    pool.eval()
    g = pool.gate(h0, tids)
    for b in range(4):
        assert g[b].tolist() == pytest.approx(_hand_gate(h0[b], routers[int(tids[b])]), abs=1e-6)
    assert torch.equal(pool.gate(h0, tids), g)  # deterministic at test time
    pool.train()
    a, b = pool.gate(h0, tids), pool.gate(h0, tids)
    assert not torch.equal(a, b) and not torch.equal(a, g)  # training draws noise
    assert ((a > 0).sum(-1) == 2).all() and torch.allclose(a.sum(-1), torch.ones(4))


def test_noise_scale_is_softplus_of_the_noise_router_plus_eps():
    """The noise's std is softplus(h0 W_n) + 1e-2: a very negative noise logit leaves the clean top-2 intact, a large
    one reshuffles it."""
    pool, _, routers = _pool(n_routers=1)
    h0 = torch.randn(64, 12)
    with torch.no_grad():
        pool.noise[0].copy_(-1e4 * torch.sign(h0[0])[None].expand(5, -1))  # h0 . W_n very negative for sample 0
    pool.train()
    g = pool.gate(h0[:1], torch.zeros(1, dtype=torch.long))
    clean = torch.tensor(_hand_gate(h0[0], routers[0]))
    assert torch.equal(g[0] > 0, clean > 0)  # std 1e-2 against logits of order 1: the same two experts


def test_adapter_pool_equals_a_per_sample_loop_over_its_top2_experts():
    pool, (Wd, bd, Wu, bu), routers = _pool()
    pool.eval()
    B, T, D = 3, 5, 12
    h = torch.randn(B, T, D)
    tids, first = torch.tensor([0, 1, 1]), torch.tensor([0, 2, 4])
    out = pool(h, tids, first)
    for b in range(B):
        gate = _hand_gate(h[b, first[b]], routers[int(tids[b])])
        ref = torch.zeros(T, D)
        for e, w in enumerate(gate):
            if w:
                ref += w * 0.1 * (torch.relu(h[b] @ Wd[e] + bd[e]) @ Wu[e] + bu[e])
        assert torch.allclose(out[b], ref, atol=1e-5), b


def test_generation_reuses_the_prompt_steps_gate():
    pool, _, _ = _pool()
    pool.eval()
    h = torch.randn(2, 4, 12)
    cache = {}
    full = pool(h, torch.tensor([0, 1]), None, cache, 0)
    step = pool(torch.randn(2, 1, 12), torch.tensor([0, 1]), None, cache, 4)  # a later token: the stored gate
    assert torch.equal(cache["adapter_gate"], pool.gate(h[:, 0], torch.tensor([0, 1])))
    assert full.shape == (2, 4, 12) and step.shape == (2, 1, 12)


def test_activate_freeze_freezes_the_two_most_chosen_and_keeps_them_bit_identical():
    pool, ref, _ = _pool(E=6, frozen=(), n_routers=1)
    with torch.no_grad():
        pool.chosen.copy_(torch.tensor([3.0, 9.0, 1.0, 9.0, 0.0, 2.0]))
    assert pool.end_task() == [1, 3]  # the two most chosen (a tie: both)
    assert pool.frozen.tolist() == [False, True, False, True, False, False]
    assert pool.counts.tolist() == [[3.0, 9.0, 1.0, 9.0, 0.0, 2.0]] and pool.chosen.sum() == 0
    assert not pool.routers[0].requires_grad and not pool.noise[0].requires_grad
    before = [W.detach().clone() for W in pool.weights()]
    router0 = pool.routers[0].detach().clone()
    pool.add_router()  # task 2 trains the other experts and its router; weight decay would move a frozen expert
    pool.train()
    opt = torch.optim.AdamW([p for p in pool.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        loss = pool(torch.randn(8, 3, 12), torch.ones(8, dtype=torch.long)).pow(2).sum() + pool.weights()[3].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = pool.weights()
    for W0, W1 in zip(before, after):
        assert torch.equal(W0[[1, 3]], W1[[1, 3]])
        assert not torch.equal(W0[[0, 2, 4, 5]], W1[[0, 2, 4, 5]])
    assert torch.equal(pool.routers[0], router0)
    assert pool.chosen.sum() == 8 * 5 * 2  # every training sample chose 2 experts
    # the next task's top-2 may be an already frozen expert: fewer than 2 new ones (the official behaviour)
    with torch.no_grad():
        pool.chosen.copy_(torch.tensor([0.0, 50.0, 0.0, 0.0, 7.0, 0.0]))
    assert pool.end_task() == [1, 4] and pool.frozen.tolist() == [False, True, False, True, True, False]


def test_ddas_rule_on_made_up_errors():
    r = torch.tensor([[0.50, 0.10, 0.20],   # task 0 best, under tau -> task 0
                      [0.05, 0.10, 0.20],   # the reference wins -> base
                      [0.90, 0.50, 0.40],   # task 1 best but above tau -> base
                      [0.90, 0.50, 0.25],   # task 1 best, under tau -> task 1
                      [0.30, 0.30, 0.30]])  # a tie goes to the first: the reference -> base
    assert cmoe.ddas_choose(r, 0.3).tolist() == [0, -1, -1, 1, -1]


def test_ddas_locate_is_the_rule_on_each_autoencoders_mse():
    torch.manual_seed(0)
    ddas = cmoe.DDAS("mean", dim=6, hidden=3)
    ddas.feat_mean, ddas.feat_std = torch.randn(6), torch.rand(6) + 0.5
    ddas.aes.extend([cmoe.DDASAE(6, 3), cmoe.DDASAE(6, 3)])
    ddas.tau = torch.tensor(0.02)
    f = torch.randn(40, 6) * 3
    got = ddas.locate(f).tolist()
    x = torch.sigmoid((f - ddas.feat_mean) / ddas.feat_std)
    for b in range(40):
        with torch.no_grad():
            r = [float(((ae.net(x[b]) - x[b]) ** 2).mean()) for ae in (ddas.ref, *ddas.aes)]
        i = min(range(3), key=lambda k: r[k])
        assert got[b] == (-1 if i == 0 or r[i] > 0.02 else i - 1), b


# --- in the blocks of both towers ---------------------------------------------------------------------------

def _randomise(pool, seed):
    """Non-zero W_up and biases, random routers: an adapter that changes its block's output."""
    g = torch.Generator().manual_seed(seed)
    E, D, R = pool.n_experts, pool.dim, pool.acfg.dim
    pool._rebank(pool.frozen, [torch.randn(E, D, R, generator=g) * 0.3, torch.randn(E, R, generator=g) * 0.1,
                               torch.randn(E, R, D, generator=g) * 0.3, torch.randn(E, D, generator=g) * 0.1])
    pool.add_router()
    with torch.no_grad():
        pool.routers[-1].copy_(torch.randn(E, D, generator=g))


def _tiny_llava():
    from vision import CLIPVision, Projector, VisionConfig
    torch.manual_seed(0)
    vc = VisionConfig.tiny(image_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                           num_attention_heads=2)
    lc = cmoe.LlamaConfig.tiny(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=48)
    model = cmoe.LLaVA(CLIPVision(vc), Projector(16, 32), cmoe.Llama(lc)).eval()
    for k, pool in enumerate(model.llm.expert_pools() + model.vision.expert_pools()):
        pool.add_adapters(cmoe.AdapterConfig(n_experts=4, dim=4))
        _randomise(pool.adapters, k)
    return model


def test_blocks_add_the_pool_on_the_residual_after_attention():
    """out(with adapters) - out(without) = the pool on h = x + Attn(Norm(x)), gated at the first valid token (decoder)
    or CLS (tower): the official block equation, the adapters seeing the un-normalised h."""
    model = _tiny_llava()
    layer = model.vision.encoder.layers[1]
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        h = x + layer.self_attn(layer.layer_norm1(x))
        diff = layer(x, torch.tensor([0, 0]))[0] - layer(x, use_experts=False)[0]
        assert torch.allclose(diff, layer.experts.adapters(h, torch.tensor([0, 0]), torch.tensor([0, 0])), atol=1e-5)
        block, llm = model.llm.layers[0], model.llm
        x = torch.randn(2, 6, 32)
        valid = torch.tensor([[True] * 6, [False, False, True, True, True, True]])
        cos, sin = llm.rope(torch.arange(6)[None].expand(2, 6))
        h = x + block.attn(block.attn_norm(x), cos, sin)
        diff = block(x, cos, sin, valid=valid)[0] - block(x, cos, sin, valid=valid, use_experts=False)[0]
        assert torch.allclose(diff, block.experts.adapters(h, None, torch.tensor([0, 2])), atol=1e-5)


def test_frozen_base_features_and_base_answers_ignore_the_adapters():
    """The selector's features and the base's answers (what DDAS rejects) come from the frozen base: adapters in
    either tower change neither (they do change the tower's output with experts on)."""
    from data import IMAGE_TOKEN_ID
    model = _tiny_llava()
    prompts = [[5, IMAGE_TOKEN_ID, 7, 9], [3, 4, IMAGE_TOKEN_ID, 8, 2, 6]]
    px = torch.randn(2, 3, 16, 16)
    with_ad = {k: model.features(prompts, px, k) for k in ("last", "mean", "image")}
    gen = model.generate(prompts, px, torch.tensor([0, 0]), 5, use_experts=False)
    tower_on = model.image_features(px, torch.tensor([0, 0]))
    assert not torch.allclose(tower_on, model.image_features(px, use_experts=False))  # the adapters do act
    for p in model.llm.expert_pools() + model.vision.expert_pools():
        p.adapters = None
    for k, f in with_ad.items():
        assert torch.equal(f, model.features(prompts, px, k)), k
    assert gen == model.generate(prompts, px, torch.tensor([0, 0]), 5, use_experts=False)


# --- end to end -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ma_run(tmp_path_factory, base_dir):
    out = tmp_path_factory.mktemp("moe_adapters")
    return out, train.main(TINY + ["--out", str(out), "--base-dir", base_dir, "--method", "moe-adapters",
                                   "--ddas-ref-n", "64"])


def test_tiny_run_saves_adapters_in_both_towers_and_freezes_them(ma_run):
    out, m = ma_run
    a, b = load_file(str(out / "task_0/model.safetensors")), load_file(str(out / "task_1/model.safetensors"))
    for tower in ("llm.layers.0", "vision.encoder.layers.0"):
        assert a[f"{tower}.experts.adapters.train_down"].numel() > 0
        assert f"{tower}.experts.adapters.routers.0" in a and f"{tower}.experts.adapters.routers.1" in b
    checked = 0
    for k in a:
        if not k.endswith(".adapters.frozen"):
            continue
        pre = k[: -len("frozen")]
        mask = a[k]
        assert int(mask.sum()) == 2 and torch.equal(b[k] & mask, mask)  # task 1's two frozen stay frozen
        for name in cmoe.ADAPTER_TENSORS:  # the frozen experts of task 1: bit-identical after task 2
            fa, fb = a[pre + f"frozen_{name}"], b[pre + f"frozen_{name}"]
            idx_b = torch.nonzero(b[k]).flatten().tolist()
            rows = [idx_b.index(e) for e in torch.nonzero(mask).flatten().tolist()]
            assert torch.equal(fb[rows], fa)
        assert torch.equal(a[pre + "routers.0"], b[pre + "routers.0"]) and torch.equal(a[pre + "noise.0"],
                                                                                        b[pre + "noise.0"])
        assert b[pre + "counts"].shape[0] == 2 and b[pre + "counts"][0].tolist() == a[pre + "counts"][0].tolist()
        checked += 1
    assert checked == 4 + 2  # every decoder layer and every built CLIP layer
    assert any(k.startswith("locator.ref.") for k in b) and any(k.startswith("locator.aes.1.") for k in b)
    assert len(m["acc"]) == 2 and m["locator"]["acc"] is not None
    assert m["params"][0]["added"] > 0 and m["params"][1]["added"] < m["params"][0]["added"]  # task 2: its routers
    assert [len(f["frozen"]) for f in m["activate_freeze"]] == [6, 6]


class Crash(Exception):
    pass


def test_resume_after_crash_equals_uninterrupted(tmp_path, base_dir, ma_run, monkeypatch):
    """Killed in task 2's training after a mid-task save: the resumed run's adapters, counts, routers and DDAS are
    those of the run that was never interrupted, bit for bit."""
    ref_out, ref = ma_run
    out = tmp_path / "crashed"
    log = train.Log.__call__

    def crash_after_step_10(self, msg):
        log(self, msg)
        if msg.startswith("task1:cls step    10/"):
            raise Crash(msg)
    argv = TINY + ["--out", str(out), "--base-dir", base_dir, "--method", "moe-adapters", "--ddas-ref-n", "64"]
    with monkeypatch.context() as m:
        m.setattr(train.Log, "__call__", crash_after_step_10)
        with pytest.raises(Crash):
            train.main(argv)
    assert (out / "task_1/partial.safetensors").is_file()
    M = train.main(argv + ["--resume"])
    assert "resume: 1 finished task(s), and a partial task 1" in (out / "log.txt").read_text()
    assert M["acc"] == ref["acc"] and M["activate_freeze"] == ref["activate_freeze"]
    a, b = load_file(str(ref_out / "task_1/model.safetensors")), load_file(str(out / "task_1/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_tiny_run_reloads_in_eval(ma_run):
    out, m = ma_run
    re = ev.reevaluate(str(out))
    assert re["acc"] == m["acc"]  # the same predictions from the reloaded adapters and DDAS
    assert re["locator"]["confusion"] == m["locator"]["confusion"]
    rows = ev.compare([str(out)], str(out / "cmp"))
    assert rows[0]["method"] == "moe-adapters" and rows[0]["locator"] == pytest.approx(m["locator"]["acc"])
