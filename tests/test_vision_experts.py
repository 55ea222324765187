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
