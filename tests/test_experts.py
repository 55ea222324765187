"""Expert pools: fused dispatch vs the per-expert loop, per-sample routing, freezing, growth, compile."""
import pytest
import torch
import torch.nn.functional as F

import cmoe
from cmoe import ExpertConfig, Llama, LlamaConfig

D, FF, R = 16, 24, 4


def lora_loop(x_TD, a_EDR, b_ERO, w_TE, scale):
    """Reference: an obviously-correct loop over experts and the tokens routed to each."""
    out = torch.zeros(x_TD.shape[0], b_ERO.shape[-1], dtype=x_TD.dtype, device=x_TD.device)
    for e in range(a_EDR.shape[0]):
        rows = (w_TE[:, e] != 0).nonzero().flatten()
        if rows.numel():
            y = (x_TD[rows] @ a_EDR[e]) @ b_ERO[e]
            out = out.index_add(0, rows, w_TE[rows, e, None].to(y.dtype) * y * scale)
    return out


def set_dispatch(ffn, mode, monkeypatch):
    """dense / sparse, or "loop": the dense path with lora_loop in place of lora_dense (the reference)."""
    monkeypatch.setattr(cmoe, "lora_dense", lora_loop if mode == "loop" else REAL_DENSE)
    ffn.dispatch = "dense" if mode == "loop" else mode


REAL_DENSE = cmoe.lora_dense


class PoolFFN(cmoe.Experts):
    """A layer's expert pool with its FFN, run by cmoe.routed_ffn as cmoe.Block runs FFN-only experts. Returns
    (output, balance loss)."""

    def __init__(self, cfg, ecfg):
        super().__init__(*cmoe.llama_shapes(cfg), ecfg)
        self.ffn = cmoe.FFN(cfg)

    def forward(self, x_BTD, task_ids_B=None, valid_BT=None, use_experts=True):
        return cmoe.routed_ffn(self.ffn, self, x_BTD, task_ids_B, valid_BT, self.active(use_experts))


def make_ffn(E, k, n_tasks=1, seed=0):
    torch.manual_seed(seed)
    ffn = PoolFFN(LlamaConfig(dim=D, ffn_dim=FF, n_heads=2, n_kv_heads=1), ExpertConfig(rank=R, alpha=8, top_k=k))
    per_task = [max(1, E * (t + 1) // n_tasks) for t in range(n_tasks)]
    for t, e_t in enumerate(per_task):
        ffn.add_experts(e_t - ffn.n_experts)
        ffn.add_router(torch.randn(e_t, D))
        if t < n_tasks - 1:
            ffn.freeze()
    with torch.no_grad():  # non-zero B so every expert changes the output
        for experts in ffn.lora.values():
            experts.frozen_B.normal_(0, 0.3)
            experts.train_B.normal_(0, 0.3)
    return ffn


def hand_route(x_BTD, ffn, task_ids, k):
    """Independent routing: per token, softmax over its task's experts, keep the top-k, renormalise."""
    B, T, _ = x_BTD.shape
    w = torch.zeros(B, T, ffn.n_experts)
    for b in range(B):
        r = ffn.routers[int(task_ids[b])]
        for t in range(T):
            p = torch.softmax(r @ x_BTD[b, t], 0)
            top = p.topk(min(k, len(p)))
            w[b, t, top.indices] = top.values / top.values.sum()
    return w


def hand_ffn(x_BTD, ffn, w_BTE):
    """Independent FFN: W'_p(x) = W_p x + sum_e w_e s B_e A_e x for each projection, per token."""
    s = ffn.ecfg.scale
    out = torch.zeros_like(x_BTD)
    for b in range(x_BTD.shape[0]):
        for t in range(x_BTD.shape[1]):
            x = x_BTD[b, t]

            def proj(p, v, base):
                y = base(v)
                for e in range(ffn.n_experts):
                    if w_BTE[b, t, e] != 0:
                        y = y + w_BTE[b, t, e] * s * (v @ ffn.lora[p].A[e] @ ffn.lora[p].B[e])
                return y
            h = F.silu(proj("gate", x, ffn.ffn.gate_proj)) * proj("up", x, ffn.ffn.up_proj)
            out[b, t] = proj("down", h, ffn.ffn.down_proj)
    return out


@pytest.mark.parametrize("E", [1, 3, 8])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_fused_equals_loop_outputs_and_grads(E, k, mode, monkeypatch):
    ffn = make_ffn(E, k, n_tasks=2 if E > 1 else 1)
    x = torch.randn(3, 5, D)
    up = torch.randn(3, 5, D) * 0.1  # fixed upstream gradient
    tids = torch.tensor([0, 1, 1]) if E > 1 else torch.zeros(3, dtype=torch.long)
    results = {}
    for m in ("loop", mode):
        set_dispatch(ffn, m, monkeypatch)
        ffn.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        y, aux = ffn(xx, tids)
        ((y * up).sum() + aux).backward()
        grads = {n: p.grad.clone() for n, p in ffn.named_parameters() if p.grad is not None}
        results[m] = (y.detach(), xx.grad.clone(), grads)
    (y0, gx0, g0), (y1, gx1, g1) = results["loop"], results[mode]
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx1, gx0, atol=1e-5, rtol=1e-5)
    assert g0.keys() == g1.keys() and any(".train_" in n for n in g0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-5)
    # and both equal the per-token hand computation
    w = hand_route(x, ffn, tids, k)
    torch.testing.assert_close(y0, hand_ffn(x, ffn, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_experts_with_no_tokens_get_zero_grad_and_match_loop(mode, monkeypatch):
    ffn = make_ffn(8, 1)
    ffn.dispatch = mode
    x = torch.randn(1, 3, D)  # 3 tokens, top-1: at least 5 of 8 experts receive nothing
    w, _ = cmoe.route(x, *ffn.router_table(), torch.zeros(1, dtype=torch.long), 1)
    idle = (w.reshape(-1, 8) == 0).all(0)
    assert idle.sum() >= 5
    y, _ = ffn(x)
    y.sum().backward()
    assert (ffn.lora["gate"].train_B.grad[idle] == 0).all() and (ffn.lora["up"].train_A.grad[idle] == 0).all()
    set_dispatch(ffn, "loop", monkeypatch)
    torch.testing.assert_close(ffn(x)[0], y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("E, grad, sparse, dims", [
    (4, True, False, (512, 16)), (5, True, True, (512, 16)),  # the benchmark's layer: from E > 2 * top-k
    (16, True, False, (128, 8)), (17, True, True, (128, 8)),  # the MiniCoIN model's: only past E = 16
    (5, False, False, (D, R)), (12, False, False, (D, R)), (13, False, True, (D, R))])  # forward only: E > 6 * top-k
def test_auto_dispatch_crossover_with_and_without_autograd(E, grad, sparse, dims, monkeypatch):
    """auto: the block plan in training once E > 2*top-k and E * rank * dim > top-k * 16 * 512 (the measured
    crossovers at dim 512 rank 16 and dim 128 rank 8), without autograd once E > 6*top-k; the balance loss is a
    training term: 0 without autograd. Either way the output is the loop's."""
    dim, rank = dims
    torch.manual_seed(0)
    ffn = PoolFFN(LlamaConfig(dim=dim, ffn_dim=8, n_heads=2, n_kv_heads=1), ExpertConfig(rank=rank, alpha=8, top_k=2))
    ffn.add_experts(E)
    ffn.add_router(torch.randn(E, dim))
    with torch.no_grad():  # non-zero B so every expert changes the output
        for experts in ffn.lora.values():
            experts.train_B.normal_(0, 0.3)
    x, plans = torch.randn(2, 5, dim), []
    monkeypatch.setattr(cmoe, "dispatch_plan", lambda *a: plans.append(1) or REAL_PLAN(*a))
    with torch.set_grad_enabled(grad):
        y, aux = ffn(x)
    assert bool(plans) == sparse and (float(aux) > 0) == grad
    set_dispatch(ffn, "loop", monkeypatch)
    torch.testing.assert_close(ffn(x)[0], y, atol=1e-4, rtol=1e-4)


REAL_PLAN = cmoe.dispatch_plan


def test_mixed_batch_equals_each_sample_alone():
    ffn = make_ffn(6, 2, n_tasks=3)
    x = torch.randn(4, 5, D)
    tids = torch.tensor([2, 0, 1, 2])
    y, _ = ffn(x, tids)
    for b in range(4):
        yb, _ = ffn(x[b:b + 1], tids[b:b + 1])
        torch.testing.assert_close(y[b:b + 1], yb, atol=1e-6, rtol=1e-6)


def test_later_experts_invisible_to_earlier_router():
    ffn = make_ffn(2, 2)
    x = torch.randn(2, 4, D)
    t0 = torch.zeros(2, dtype=torch.long)
    before, _ = ffn(x, t0)
    ffn.freeze()
    ffn.add_experts(3)
    with torch.no_grad():
        ffn.lora["down"].train_B.normal_()
    ffn.add_router(torch.randn(5, D))
    after, _ = ffn(x, t0)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
    w, _ = cmoe.route(x, *ffn.router_table(), t0, 2)
    assert (w[..., 2:] == 0).all()


def test_copy_expert_and_zero_init():
    ffn = make_ffn(3, 2)
    ffn.freeze()
    ffn.add_experts(1, copy_from=1)
    for p in ("gate", "up", "down"):
        assert torch.equal(ffn.lora[p].A[3], ffn.lora[p].A[1]) and torch.equal(ffn.lora[p].B[3], ffn.lora[p].B[1])
    ffn.add_experts(1)
    assert (ffn.lora["up"].train_B[1] == 0).all() and ffn.lora["up"].train_A[1].abs().sum() > 0


def test_frozen_experts_and_routers_untouched_by_training():
    ffn = make_ffn(4, 2, n_tasks=2)
    frozen = {n: p.detach().clone() for n, p in ffn.named_parameters() if not p.requires_grad}
    assert any(".frozen_" in n for n in frozen) and "routers.0" in frozen
    opt = torch.optim.AdamW([p for p in ffn.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    x = torch.randn(2, 6, D)
    for _ in range(3):
        y, aux = ffn(x, torch.tensor([0, 1]))  # task-0 samples use frozen experts only
        (y.pow(2).mean() + aux).backward()
        opt.step()
        opt.zero_grad()
    for n, p in ffn.named_parameters():
        if n in frozen:
            assert p.grad is None
            assert torch.equal(p, frozen[n]), n
    assert not torch.equal(ffn.lora["gate"].train_B, torch.zeros_like(ffn.lora["gate"].train_B))


def test_balance_loss_hand_computed():
    ffn = make_ffn(3, 1)
    x = torch.randn(1, 4, D)
    w, p = cmoe.route(x, *ffn.router_table(), torch.zeros(1, dtype=torch.long), 1)
    frac = [(w[0, :, e] > 0).float().mean() for e in range(3)]
    prob = [p[0, :, e].mean() for e in range(3)]
    expect = 3 * sum(f * q for f, q in zip(frac, prob))
    torch.testing.assert_close(ffn.balance_loss(w, p, None), expect)


def test_zero_experts_is_the_base_ffn_and_model():
    cfg = LlamaConfig(vocab_size=50, dim=D, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=FF)
    torch.manual_seed(0)
    m = Llama(cfg)
    ids = torch.randint(0, 50, (2, 7))
    base, _ = m(ids)
    ffn = m.layers[0].ffn
    x = torch.randn(1, 3, D)
    torch.testing.assert_close(ffn(x), ffn.down_proj(F.silu(ffn.gate_proj(x)) * ffn.up_proj(x)), atol=0, rtol=0)
    cmoe.init_experts(m, 2)  # fresh experts start with B = 0: the function is unchanged
    grown, _ = m(ids)
    torch.testing.assert_close(grown, base, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("attn", [False, True], ids=["ffn", "ffn+attn"])
def test_pgke_grows_a_layer_by_a_copy_of_its_most_used_expert(attn):
    cfg = LlamaConfig(vocab_size=32, dim=D, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=FF)
    llm = Llama(cfg, ExpertConfig(rank=R, alpha=8, top_k=1, attn=attn))
    g = torch.Generator().manual_seed(0)
    cmoe.init_experts(llm, 3, generator=g)
    for ffn in llm.expert_pools():
        with torch.no_grad():  # distinct non-zero experts, so a copy of the wrong one shows
            for experts in ffn.lora.values():
                experts.train_B.normal_(generator=g)
        ffn.freeze()
    cmoe.probe_start(llm, generator=g)
    assert [f.n_experts for f in llm.expert_pools()] == [4, 4] and [len(f.routers) for f in llm.expert_pools()] == [2, 2]
    cmoe.set_counting(llm, True)
    # hand-made top-1 assignments, one token per row; the first token is padding and must not count
    valid = torch.tensor([[False, True, True, True, True]])
    hits = {0: [0, 2, 2, 1, 3], 1: [0, 1, 2, 3, 3]}  # layer 0: expert 2 wins; layer 1: experts 1 and 2 tie
    for layer, ids in hits.items():
        llm.layers[layer].experts.count(F.one_hot(torch.tensor([ids]), 4).float(), valid)
    usage = cmoe.read_usage(llm)
    assert [u.tolist() for u in usage] == [[0, 1, 2, 1], [0, 1, 1, 2]]
    assert cmoe.probe_frequencies(usage) == [0.25, 0.5]
    probe_router = [f.routers[-1].detach().clone() for f in llm.expert_pools()]
    sources = cmoe.copy_sources(usage)
    assert sources == [2, 1]  # most-used old expert (never the probe); a tie goes to the lowest index
    routers = cmoe.probe_end(llm)
    assert [f.n_experts for f in llm.expert_pools()] == [3, 3] and [len(f.routers) for f in llm.expert_pools()] == [1, 1]
    cmoe.expand(llm, [True, False], sources, routers, n_new=1)
    grown, kept = llm.expert_pools()
    assert grown.n_experts == 4 and kept.n_experts == 3 and grown.n_frozen == 3
    assert len(grown.lora) == (7 if attn else 3)  # with attention experts, q/k/v/o are copied with the rest
    for p in grown.lora:
        assert torch.equal(grown.lora[p].A[3], grown.lora[p].A[2]) and torch.equal(grown.lora[p].B[3], grown.lora[p].B[2]), p
    # one router per task, probes gone; the new router starts from the probe router, the grown row from the probe's
    assert [len(f.routers) for f in llm.expert_pools()] == [2, 2]
    assert torch.equal(grown.routers[1], torch.cat([probe_router[0][:3], probe_router[0][3:]]))
    assert torch.equal(kept.routers[1], probe_router[1][:3])
    assert grown.routers[1].requires_grad and not grown.routers[0].requires_grad


def test_read_usage_refuses_a_layer_that_never_counted():
    llm = Llama(LlamaConfig(vocab_size=32, dim=D, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=FF))
    cmoe.init_experts(llm, 2, generator=torch.Generator().manual_seed(0))
    llm.layers[0].experts.freeze()
    cmoe.probe_start(llm, generator=torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match="layer 0 is not counting"):
        cmoe.read_usage(llm)
    cmoe.set_counting(llm, True)  # counting, but no token seen (a torchrun rank without held-out rows): zeros
    assert [u.tolist() for u in cmoe.read_usage(llm)] == [[0.0, 0.0, 0.0]]


@pytest.mark.parametrize("mode,batch,backend,attn", [("dense", 2, "aot_eager", False), ("sparse", 1, "inductor", False),
                                                     ("sparse", 2, "aot_eager", True)])
def test_compiled_fused_matches_loop_without_recompiles(mode, batch, backend, attn, monkeypatch):
    """Both dispatches in the whole model under torch.compile(fullgraph=True) match the loop, and 3 steps do not
    recompile. Batch 2 mixes two tasks' routers; batch 1, on the sparse path whose row gathers have index backwards,
    is where inductor's CPU scatter-add backward once corrupted memory, so that case runs inductor's generated code.
    The dense case stops at AOT autograd's graphs (dynamo's full-graph trace, the recompile guards and the joint
    forward/backward are what it checks): inductor's cold C++ build costs 15-35 s per case on 2 cores, and on CUDA
    it would emit Triton, not this C++. The inductor case keeps inductor's defaults: with vectorisation off
    (cpp.vec_isa_ok=False, 13 s cheaper cold) the old index backward passes, so the case would stop guarding it.
    The other pairings are tested eagerly (test_fused_equals_loop_...). The third
    case, also through AOT autograd, has experts on attention too (the default pool: one routing per layer for
    q/k/v/o and the FFN)."""
    torch._dynamo.reset()
    cfg = LlamaConfig(vocab_size=40, dim=D, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=FF)
    torch.manual_seed(1)
    m = Llama(cfg, ExpertConfig(rank=R, top_k=2, attn=attn))
    for p in m.parameters():
        p.requires_grad_(False)
    ffn = m.layers[0].experts
    ffn.add_experts(3)
    ffn.add_router(torch.randn(3, D))
    ffn.freeze()
    ffn.add_experts(2, copy_from=0)
    ffn.add_router(torch.randn(5, D))
    with torch.no_grad():  # non-zero B where the output should feel the experts (q and o: attention's way in and out)
        for name in ["gate"] + (["q", "o"] if attn else []):
            ffn.lora[name].train_B.normal_()
    ids = torch.randint(0, 40, (batch, 6))  # batch 2 mixes tasks; batch 1 once broke the compiled router backward
    tids = torch.tensor([0, 1][-batch:])

    def step(mod):
        logits, aux = mod(ids, task_ids=tids)
        return logits.pow(2).mean() + 0.01 * aux

    set_dispatch(ffn, "loop", monkeypatch)
    ref = step(m)
    ref.backward()
    ref_grads = {name: e.train_B.grad.clone() for name, e in ffn.lora.items()}
    assert all(g.abs().sum() > 0 for g in ref_grads.values())  # every projection's experts reach the loss
    for e in ffn.lora.values():
        e.train_B.grad = None
    set_dispatch(ffn, mode, monkeypatch)
    compiled = torch.compile(m, fullgraph=True, backend=backend)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(3):
            loss = step(compiled)
            loss.backward()
            if i == 0:
                torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
                for name, e in ffn.lora.items():
                    torch.testing.assert_close(e.train_B.grad, ref_grads[name], atol=1e-5, rtol=1e-5,
                                               msg=lambda m, name=name: f"{name}: {m}")
            opt.step()
            opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------
# experts on attention too (ExpertConfig.attn): the layer routes once, at its input, for all seven projections

def hand_attention_block(blk, x_BTD, w_BTE, cos, sin):
    """Independent decoder layer with attention experts: every projection p of q, k, v, o, gate, up, down is
    W_p v + sum_e w_e s B_e A_e v, with w the routing of the layer's input (attn_norm(x)); attention by hand (causal
    softmax over the scores, GQA by repeating each kv head)."""
    pool, ffn, att, c = blk.experts, blk.ffn, blk.attn, blk.attn.cfg
    s, hd, B, T = pool.ecfg.scale, c.head_dim, x_BTD.shape[0], x_BTD.shape[1]

    def proj(p, v, base, b, t):
        y = base(v)
        for e in range(pool.n_experts):
            if w_BTE[b, t, e] != 0:
                y = y + w_BTE[b, t, e] * s * (v @ pool.lora[p].A[e] @ pool.lora[p].B[e])
        return y
    h = blk.attn_norm(x_BTD)
    out = torch.zeros_like(x_BTD)
    for b in range(B):
        qkv = {p: torch.stack([proj(p, h[b, t], getattr(att, f"{p}_proj"), b, t) for t in range(T)])
               for p in ("q", "k", "v")}
        q = qkv["q"].view(T, c.n_heads, hd).transpose(0, 1)
        k, v = (qkv[p].view(T, c.n_kv_heads, hd).transpose(0, 1).repeat_interleave(c.n_heads // c.n_kv_heads, 0)
                for p in ("k", "v"))
        q, k = cmoe.apply_rope(q[None], k[None], cos[:1], sin[:1])
        scores = (q[0] @ k[0].transpose(-1, -2)) / hd ** 0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, -1)
        for t in range(T):
            xa = x_BTD[b, t] + proj("o", y[t], att.o_proj, b, t)
            g = blk.ffn_norm(xa)
            m = F.silu(proj("gate", g, ffn.gate_proj, b, t)) * proj("up", g, ffn.up_proj, b, t)
            out[b, t] = xa + proj("down", m, ffn.down_proj, b, t)
    return out


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_attention_experts_equal_a_hand_written_layer(mode):
    cfg = LlamaConfig(vocab_size=40, dim=D, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=FF)
    torch.manual_seed(3)
    m = Llama(cfg, ExpertConfig(rank=R, alpha=8, top_k=2, attn=True))
    blk, ffn = m.layers[0], m.layers[0].experts
    assert sorted(ffn.lora) == ["down", "gate", "k", "o", "q", "up", "v"]
    ffn.add_experts(3)
    ffn.add_router(torch.randn(3, D))
    ffn.freeze()
    ffn.add_experts(2, copy_from=1)
    ffn.add_router(torch.randn(5, D))
    with torch.no_grad():  # non-zero B everywhere, so every projection's experts change the output
        for experts in ffn.lora.values():
            experts.frozen_B.normal_(0, 0.3)
            experts.train_B.normal_(0, 0.3)
    ffn.dispatch = mode
    x, tids = torch.randn(2, 6, D), torch.tensor([0, 1])
    cos, sin = m.rope(torch.arange(6)[None].expand(2, 6))
    y, aux = blk(x, cos, sin, task_ids=tids)
    w = hand_route(blk.attn_norm(x), ffn, tids, 2)  # routed at the layer's input, not the FFN's
    torch.testing.assert_close(y, hand_attention_block(blk, x, w, cos, sin), atol=1e-5, rtol=1e-5)
    aux.backward(retain_graph=True)  # the balance loss of that one routing reaches the trainable router
    assert ffn.routers[1].grad is not None and ffn.routers[1].grad.abs().sum() > 0
    y.sum().backward()  # every projection's trainable experts get a gradient; the frozen ones none
    for name, experts in ffn.lora.items():
        assert experts.train_B.grad.abs().sum() > 0 and experts.frozen_B.grad is None, name
    y0, _ = blk(x, cos, sin, task_ids=tids, use_experts=False)
    ref = Llama(cfg)  # no experts: the same layer is the plain Llama layer
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if ".experts." not in k and ".routers." not in k},
                        strict=False)  # (ref's empty FFN-only banks stay as they are)
    torch.testing.assert_close(y0, ref.layers[0](x, cos, sin)[0], atol=0, rtol=0)
