"""Bounded growth (--max-expert-params): merging two frozen experts against hand-built references, the router
remapping entry by entry, the budget's projection, and a tiny run that stays within its budget."""
import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import cmoe
import eval as ev
import train
from cmoe import ExpertConfig, Llama, LlamaConfig
from test_train import TINY

D, R = 16, 2
SIZES = (2, 3, 4)  # experts each task's router sees: tasks 0, 1, 2 (task 0: two experts, then one more per task)
USE = ([0.5, 0.5], [0.2, 0.1, 0.7], [0.1, 0.3, 0.2, 0.4])  # each task's usage share of each expert it sees


def tiny_llm(seed=0):
    """Two layers with experts on FFN and attention, three frozen tasks' experts and routers (SIZES) and usage."""
    torch.manual_seed(seed)
    llm = Llama(LlamaConfig(vocab_size=40, dim=D, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24),
                ExpertConfig(rank=R, alpha=4, top_k=2, attn=True))
    for pool in llm.expert_pools():
        for e_t in SIZES:
            pool.add_experts(e_t - pool.n_experts)
            pool.add_router(torch.randn(e_t, D))
            pool.freeze()
        with torch.no_grad():  # non-zero B so every expert changes the output
            for experts in pool.lora.values():
                experts.frozen_B.normal_(0, 0.3)
        pool.task_use = [torch.tensor(u) for u in USE]
    return llm


def svd_fit(a1, b1, a2, b2, w1, w2, rank):
    """Reference: the best rank-`rank` approximation of w1 a1 b1 + w2 a2 b2, by numpy's SVD in float64."""
    M = w1 * a1.double().numpy() @ b1.double().numpy() + w2 * a2.double().numpy() @ b2.double().numpy()
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return torch.from_numpy(U[:, :rank] @ np.diag(S[:rank]) @ Vt[:rank])


def test_merge_fits_the_usage_weighted_delta_and_remaps_every_router_entry_by_entry():
    llm = tiny_llm()
    pool = llm.layers[0].experts
    before = copy.deepcopy(pool)
    i, j = 1, 3
    cmoe.merge_experts(pool, i, j)
    u = [sum(t[e] for t in USE if e < len(t)) for e in range(4)]  # summed usage: 0.8, 0.9, 0.9, 0.4
    w_i, w_j = u[i] / (u[i] + u[j]), u[j] / (u[i] + u[j])
    assert pool.n_frozen == pool.n_experts == 3
    for name, e in pool.lora.items():
        old = before.lora[name]
        want = svd_fit(old.frozen_A[i], old.frozen_B[i], old.frozen_A[j], old.frozen_B[j], w_i, w_j, R)
        assert torch.allclose((e.frozen_A[i] @ e.frozen_B[i]).double(), want, atol=1e-5), name
        for new_e, old_e in ((0, 0), (2, 2)):  # the others unchanged, at their places (none after j to move)
            assert torch.equal(e.frozen_A[new_e], old.frozen_A[old_e]) and torch.equal(e.frozen_B[new_e], old.frozen_B[old_e])
    # routers entry by entry: tasks 0 and 1 never saw expert 3 (unchanged: their expert 1 is the merged one); task 2
    # saw both and used 3 (0.4) more than 1 (0.3): its row 1 is its old row 3, row 3 is gone, row 2 stays
    expect = {0: [0, 1], 1: [0, 1, 2], 2: [0, 3, 2]}
    for t, rows in expect.items():
        new, old = pool.routers[t], before.routers[t]
        assert new.shape == (len(rows), D) and not new.requires_grad
        for r, src in enumerate(rows):
            for d in range(D):
                assert new[r, d].item() == old[src, d].item(), (t, r, d)
    # usage records: j's share joins i's where a task saw j
    assert [u.tolist() for u in pool.task_use] == [pytest.approx(x) for x in ([0.5, 0.5], [0.2, 0.1, 0.7],
                                                                              [0.1, 0.7, 0.2])]


def test_merge_rows_mean_rule_and_bad_input():
    W = torch.arange(20.0).view(5, 4)
    out = cmoe.merge_rows(W, 1, 3, 1.0, 3.0, row="mean")
    want = [W[0].tolist(), [(1 * W[1, d].item() + 3 * W[3, d].item()) / 4 for d in range(4)], W[2].tolist(), W[4].tolist()]
    assert out.tolist() == want
    assert cmoe.merge_rows(W, 1, 3, 2.0, 2.0).tolist() == [W[0].tolist(), W[1].tolist(), W[2].tolist(), W[4].tolist()]
    pool = tiny_llm().layers[0].experts
    with pytest.raises(ValueError, match="0 <= i < j < 4"):
        cmoe.merge_experts(pool, 2, 2)
    pool.add_experts(1)
    with pytest.raises(ValueError, match="trainable"):
        cmoe.merge_experts(pool, 0, 1)


def test_merge_keeps_old_tasks_outputs_against_a_hand_built_reference():
    """Expert 2 is a re-factored copy of expert 1 (same delta: a PGKE copy not yet moved by training). Merging them
    keeps task 0's output exactly (its expert 1 is the merged one, the same delta); tasks 1 and 2 then equal a model
    built by hand with expert 2 removed and their routers remapped, to 1e-5."""
    llm = tiny_llm(1)
    with torch.no_grad():
        for pool in llm.expert_pools():
            for e in pool.lora.values():
                G = torch.randn(R, R) + 2 * torch.eye(R)
                e.frozen_A[2], e.frozen_B[2] = e.frozen_A[1] @ G, torch.linalg.solve(G, e.frozen_B[1])
    ref = copy.deepcopy(llm)
    with torch.no_grad():  # by hand: drop expert 2; task 1 used 2 (0.7) more than 1 (0.1), task 2 used 1 (0.3) more
        for pool in ref.expert_pools():
            for e in pool.lora.values():
                e._set("frozen", e.frozen_A[[0, 1, 3]].clone(), e.frozen_B[[0, 1, 3]].clone())
            r1, r2 = pool.routers[1].detach(), pool.routers[2].detach()
            pool.routers[1] = torch.nn.Parameter(r1[[0, 2]].clone(), requires_grad=False)
            pool.routers[2] = torch.nn.Parameter(r2[[0, 1, 3]].clone(), requires_grad=False)
    ids = torch.randint(0, 40, (6, 9))
    tasks = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.no_grad():
        before, _ = llm(ids, task_ids=tasks)
        for pool in llm.expert_pools():
            cmoe.merge_experts(pool, 1, 2)
        after, _ = llm(ids, task_ids=tasks)
        want, _ = ref(ids, task_ids=tasks)
    assert [p.n_experts for p in llm.expert_pools()] == [3, 3]
    assert torch.allclose(after[:2], before[:2], atol=1e-5)  # task 0: unchanged
    assert torch.allclose(after, want, atol=1e-5)
    assert not torch.allclose(after[2:], before[2:], atol=1e-3)  # (the routers' remap does change tasks 1 and 2)


def test_projected_params_equal_the_count_after_expand():
    llm = tiny_llm()
    cfg = train.TrainConfig(max_expert_params=10**9)
    decision = [True, False]
    probe_routers = [torch.randn(p.n_experts + 1, D) for p in llm.expert_pools()]
    want = train.projected_params(llm, decision, cfg.n_new)
    cmoe.expand(llm, decision, [0, 0], probe_routers, cfg.n_new)
    assert want == sum(p.numel() for pool in llm.expert_pools() for p in pool.parameters())


def test_fit_budget_merges_least_used_in_the_largest_layer_and_remaps_probe_routers_and_sources():
    llm = tiny_llm()
    pools = llm.expert_pools()
    pools[1].task_use[2] = torch.tensor([0.1, 0.25, 0.2, 0.9])
    # summed usage, layer 0: 0.8 0.9 0.9 0.4 -> experts 0 and 3; layer 1: 0.8 0.85 0.9 0.9 -> 0 and 1
    probe = [torch.randn(5, D) for _ in pools]
    probe0 = [p.clone() for p in probe]
    n_expert = cmoe.expert_numel(pools[0])
    expand, sources = [True, True], [3, 2]
    now = train.projected_params(llm, expand, 1)
    # one merge saves an expert, a row of task 2's router and a row of the new router: one parameter short
    cfg = train.TrainConfig(max_expert_params=now - n_expert - 2 * D - 1, budget_rule="merge")
    logs = []
    rec = train.fit_budget(llm, expand, sources, probe, [0.5, 0.4], cfg, 1, logs.append)
    assert rec == {"merged": [[0, 0, 3], [1, 0, 1]], "skipped": []}
    assert [p.n_experts for p in pools] == [3, 3] and expand == [True, True]
    assert sources == [0, 1]  # layer 0: 3 merged into 0; layer 1: 2 moved down to 1
    # probe routers: merged row = the row of the more-used of the pair by summed usage (layer 0: 0.8 > 0.4: row 0)
    assert torch.equal(probe[0], probe0[0][[0, 1, 2, 4]]) and torch.equal(probe[1], probe0[1][[1, 2, 3, 4]])
    assert train.projected_params(llm, expand, 1) <= cfg.max_expert_params
    # skip: drops the growth of the layer whose probe won least, and merges nothing while growth is left to drop
    llm = tiny_llm()
    expand, probe = [True, True], [torch.randn(5, D) for _ in llm.expert_pools()]
    cfg = train.TrainConfig(max_expert_params=train.projected_params(llm, [True, False], 1), budget_rule="skip")
    rec = train.fit_budget(llm, expand, [0, 0], probe, [0.5, 0.4], cfg, 1, logs.append)
    assert rec == {"merged": [], "skipped": [1]} and expand == [True, False]


def test_budget_run_stays_within_its_budget_and_reloads(tmp_path, base_dir):
    """Task 1 holds 156,672 expert + router parameters in the TINY model; under the merge rule a budget of 160,000
    makes task 2 merge experts (any growth is 19,456 per expert), which the checkpoint's shapes must follow."""
    out = tmp_path / "budget"
    M = train.main(TINY + ["--out", str(out), "--base-dir", base_dir, "--max-expert-params", "160000",
                           "--budget-rule", "merge"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["max_expert_params"] == 160000 and m["pgke"][0]["merged"]
    for t, p in enumerate(m["params"]):  # the record, and what the checkpoint actually holds
        held = sum(v.numel() for k, v in load_file(out / f"task_{t}" / "model.safetensors").items() if ".experts." in k)
        assert p["expert_params"] == held <= 160000, t
    meta = json.loads((out / "task_1" / "meta.json").read_text())
    assert len(meta["task_use"][0]) == 2 and len(meta["task_use"][0][1]) == m["experts_per_layer"][1][0]
    model = ev.load_model(m["base"], 0)
    ev.load_task(model, out / "task_1")
    assert [p.n_experts for p in model.llm.expert_pools()] == m["experts_per_layer"][1]
    assert M["last"] is not None
    with pytest.raises(SystemExit, match="first task alone holds 156672"):
        train.main(TINY + ["--out", str(tmp_path / "small"), "--base-dir", base_dir, "--max-expert-params", "1000"])


def test_skip_falls_back_on_a_merge_when_the_new_router_alone_passes_the_budget():
    llm = tiny_llm()
    expand, probe = [True, True], [torch.randn(5, D) for _ in llm.expert_pools()]
    cfg = train.TrainConfig(max_expert_params=train.projected_params(llm, [False, False], 1) - 1)
    rec = train.fit_budget(llm, expand, [0, 0], probe, [0.5, 0.4], cfg, 1, lambda msg: None)
    assert rec == {"merged": [[0, 0, 3]], "skipped": [1, 0]} and expand == [False, False]
