"""D-MoLE (--method dmole) against hand computations: the budget rule, the zero-cost proxy, the curriculum's factors,
the autoencoder router's votes, the expert sum, and a tiny end-to-end run whose checkpoints reload in eval."""
import json
import math
import types

import pytest
import torch
from safetensors.torch import load_file

import cmoe
import eval as ev
import train
from cmoe import LLaVA, Llama, LlamaConfig
from test_train import TINY
from vision import CLIPVision, Projector, VisionConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def llm(i, p):
    return f"llm.layers.{i}.attn.{p}_proj"


def vit(i, p):
    return f"vision.encoder.layers.{i}.self_attn.{p}_proj"


# ----------------------------------------------------------------------------------------------------------
# the allocator (budget rule)

def test_allocator_splits_the_budget_by_gradient_mass():
    # M = 12 -> B = 6; vision mass 38 of 76 -> share 0.5 -> B_vit = max(floor(1.5), round(3)) = 3, B_llm = 3
    scores = {llm(0, "q"): 10, llm(0, "k"): 9, llm(0, "v"): 8, llm(0, "o"): 7, llm(1, "q"): 1, llm(1, "k"): 1.5,
              llm(1, "v"): 0.5, llm(1, "o"): 1, vit(0, "q"): 20, vit(0, "k"): 15, vit(0, "v"): 2, vit(0, "out"): 1}
    chosen = cmoe.dmole_allocate(scores, 0.5, generator=torch.Generator().manual_seed(0))
    assert chosen == [llm(0, "q"), llm(0, "k"), llm(0, "v"), vit(0, "q"), vit(0, "k"), vit(0, "v")]


def test_allocator_gives_vision_its_floor():
    # M = 16 -> B = 8; vision share 0.36 / 52.36 -> round(8 * 0.007) = 0 < floor(0.25 * 8) = 2: B_vit = 2, B_llm = 6
    scores = {llm(i, p): s for (i, p), s in zip([(i, p) for i in range(3) for p in "qkvo"],
                                                [10, 9, 8, 7, 6, 5, 4, 3, 0, 0, 0, 0])}
    scores.update({vit(0, "q"): 0.1, vit(0, "k"): 0.2, vit(0, "v"): 0.05, vit(0, "out"): 0.01})
    chosen = cmoe.dmole_allocate(scores, 0.5, generator=torch.Generator().manual_seed(0))
    assert chosen == [llm(0, "q"), llm(0, "k"), llm(0, "v"), llm(0, "o"), llm(1, "q"), llm(1, "k"),
                      vit(0, "q"), vit(0, "k")]
    # a larger budget: M = 16, budget 0.75 -> B = 12, B_vit = max(3, 0) = 3, B_llm = 9
    chosen = cmoe.dmole_allocate(scores, 0.75, generator=torch.Generator().manual_seed(0))
    assert sum(map(cmoe.is_vision_module, chosen)) == 3 and len(chosen) == 12


def test_allocator_breaks_ties_by_its_generator():
    scores = {llm(i, p): 1.0 for i in range(4) for p in "qkvo"}  # 16 tied language modules
    scores.update({vit(0, p): 0.0 for p in ("q", "k", "v", "out")})  # M = 20 -> B = 10, B_vit = floor(2.5) = 2
    picks = [tuple(cmoe.dmole_allocate(scores, 0.5, generator=torch.Generator().manual_seed(s))) for s in range(6)]
    for p in picks:
        assert sum(map(cmoe.is_vision_module, p)) == 2 and len(p) == 10
    assert picks[0] == tuple(cmoe.dmole_allocate(scores, 0.5, generator=torch.Generator().manual_seed(0)))
    assert len({frozenset(n for n in p if not cmoe.is_vision_module(n)) for p in picks}) > 1  # the seed decides


# ----------------------------------------------------------------------------------------------------------
# the curriculum's learning-rate factors

def test_curriculum_scales_by_mean_module_gradient():
    # language mean (4 + 2) / 2 = 3, vision mean 1, mean of the two 2 -> 1.5 and 0.5
    s = cmoe.dmole_lr_scales({llm(0, "q"): 4.0, llm(0, "k"): 2.0, vit(0, "q"): 1.0})
    assert s == pytest.approx({"llm": 1.5, "vision": 0.5})
    # language mean 10, vision mean 0.1 -> 10 / 5.05 = 1.98, 0.1 / 5.05 clipped up to 0.5
    s = cmoe.dmole_lr_scales({llm(0, "q"): 10.0, vit(0, "q"): 0.1, vit(0, "k"): 0.1})
    assert s == pytest.approx({"llm": 10 / 5.05, "vision": 0.5})
    assert cmoe.dmole_lr_scales({llm(0, "q"): 3.0}) == {"llm": 1.0, "vision": 1.0}


# ----------------------------------------------------------------------------------------------------------
# the autoencoder router

def test_route_by_errors_takes_the_best_task_under_its_threshold():
    err = torch.tensor([[0.1, 0.3, 0.2],  # all pass -> 0
                        [0.5, 0.3, 0.2],  # 0 fails its tau 0.4; 2 beats 1 -> 2
                        [0.5, 0.9, 0.2],  # only 2 passes (0.2 < 0.25)
                        [0.5, 0.9, 0.3]])  # none passes -> -1
    tau = torch.tensor([0.4, 0.8, 0.25])
    assert cmoe.route_by_errors(err, tau).tolist() == [0, 2, 2, -1]


def test_votes_evaluation_and_training():
    # evaluation: share of the valid votes
    assert cmoe.vote_eval([0, 0, 0, 1, 1, -1, -1]) == [0, 1]  # 2 of 5 valid = 0.4 >= 0.3
    assert cmoe.vote_eval([0, 0, 0, 0, 1, -1]) == [0]  # 1 of 5 = 0.2
    assert cmoe.vote_eval([2, 2, 1, 1, 1, 0]) == [1, 2]  # 3 votes for 1, 2 for 2 (2 / 6 >= 0.3)
    assert cmoe.vote_eval([-1, -1, -1]) == []  # none -> the base model
    assert cmoe.vote_eval([1, 1, 0, 0]) == [0, 1]  # a tie: the lower id first
    # training task 3: the task + the most-voted old task at >= 0.3 of the batch
    assert cmoe.vote_train([-1] * 7 + [0, 0, 0], 3) == [3, 0]  # 3 of 10
    assert cmoe.vote_train([-1] * 8 + [0, 0], 3) == [3]  # 2 of 10
    assert cmoe.vote_train([1, 1, 1, 1, 0, 0, 0, 0, 0, -1], 3) == [3, 0]


def test_ae_router_accepts_its_tasks_and_rejects_the_rest():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(16)[:3] * 4
    data = [torch.nn.functional.normalize(c + 0.3 * torch.randn(200, 16, generator=g), dim=-1) for c in centres]
    router = cmoe.AERouter()
    for t in range(2):  # tasks 0 and 1; the third cluster is never trained
        router.add_task(data[t][:150], quantile=0.99, seed=t)
        assert router.aes[t].tau > 0
    held = [d[150:] for d in data]
    assert (router.route(held[0]) == 0).float().mean() > 0.8
    assert (router.route(held[1]) == 1).float().mean() > 0.8
    assert (router.route(held[2]) == -1).float().mean() > 0.8  # unseen: no autoencoder accepts it
    assert (router.route(held[1], n_tasks=1) == -1).float().mean() > 0.8  # training task 1 consults task 0 only
    assert cmoe.vote_eval(router.route(held[2]).tolist()) in ([], [0], [1]) and cmoe.vote_eval(
        router.route(held[0]).tolist())[0] == 0


# ----------------------------------------------------------------------------------------------------------
# a tiny model: the proxy and the expert sum

def tiny_model(seed=0):
    torch.manual_seed(seed)
    vc, lc = VisionConfig.tiny(image_size=16, patch_size=8), LlamaConfig.tiny(vocab_size=64, n_layers=2, dim=32,
                                                                               n_heads=2, n_kv_heads=1, ffn_dim=48)
    model = LLaVA(CLIPVision(vc), Projector(vc.hidden_size, lc.dim), Llama(lc), pad_id=0)
    cfg = types.SimpleNamespace(method="dmole", experts_in="llm", precision="fp32", rank=4, lora_alpha=8.0, top_k=2, attn_experts=True,
                                moelora_experts=4, grad_ckpt=False, batch_size=4, dmole_portion=0.5, seed=3,
                                device="cpu", dmole_budget=0.5)
    return train.prepare(model, cfg), cfg


def tiny_data(n=12, T=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, T), generator=g)
    ids[:, 1] = cmoe.IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :4] = cmoe.IGNORE_INDEX
    return dict(input_ids=ids, labels=labels, images=torch.randn(n, 3, 16, 16, generator=g),
                task_ids=torch.zeros(n, dtype=torch.long))


def test_gradnorm_scores_match_a_hand_computation_and_leave_the_base_untouched():
    model, cfg = tiny_model()
    ds = tiny_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = 1
    scores = train.dmole_scores(model, ds, cfg, t)
    # hand: ceil(0.5 * ceil(12 / 4)) = 2 batches of the task's stream, their losses summed, one gradient
    names = cmoe.dmole_candidates(model)
    assert len(names) == 2 * 4 + model.vision.cfg.run_layers * 4
    params = {n: list(model.get_submodule(n).parameters()) for n in names}
    flat = [p for n in names for p in params[n]]
    for p in flat:
        p.requires_grad_(True)
    loss = 0
    for i in range(2):
        b = train.batch_at(ds, i, 4, cfg.seed + 7919 * t)
        loss = loss + model(b["input_ids"], b["images"], b["labels"])[1]
    grads = torch.autograd.grad(loss, flat)
    for p in flat:
        p.requires_grad_(False)
    k = 0
    for n in names:
        want = sum(float(g.norm()) for g in grads[k:k + len(params[n])])
        k += len(params[n])
        assert scores[n] == pytest.approx(want, rel=1e-5), n
    assert any(scores[n] > 0 for n in names if cmoe.is_vision_module(n))  # the tower's modules see the loss
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for n, p in model.named_parameters() if not ev.is_cl_key(n))  # the base: frozen
    assert all(p.grad is None for p in model.parameters())


def test_forward_is_the_base_plus_the_active_experts_sum():
    model, _ = tiny_model()
    dm = model.dmole
    q, vq = llm(0, "q"), vit(0, "q")
    g = torch.Generator().manual_seed(1)
    dm.grow(model, [q, vq], 0, generator=g)
    for bank in dm.experts.values():  # B = 0 at birth: give the experts a delta to see
        bank.train_B.data.normal_(generator=g)
    dm.freeze()
    dm.grow(model, [q], 1, generator=g)
    dm.experts[dm.key(q)].train_B.data.normal_(generator=g)
    x = torch.randn(2, 5, 32, generator=g)
    lin = model.get_submodule(q)
    A, B = dm.experts[dm.key(q)].A, dm.experts[dm.key(q)].B  # [2, 32, 4], [2, 4, 32]; expert e is task e's
    for active in ([], [0], [1], [0, 1], [5]):
        want = x @ lin.weight.T
        for e in active:
            if e < 2:
                want = want + dm.scale * (x @ A[e] @ B[e])
        with dm.using(active):
            got = lin(x)
        assert torch.allclose(got, want, atol=1e-5), active
    # old experts bit-identical after training task 1 with task 0's expert on
    old = {k: v.clone() for k, v in model.state_dict().items() if ".frozen_" in k}
    train.trainable_cl(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ds = tiny_data()
    for step in range(3):
        with dm.using([1, 0]):
            loss = model(ds["input_ids"], ds["images"], ds["labels"])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in old.items()) and old
    assert not torch.equal(dm.experts[dm.key(q)].train_B, B[1:].detach())  # the new one did train


# ----------------------------------------------------------------------------------------------------------
# end to end

@pytest.fixture(scope="module")
def dmole_run(tmp_path_factory, base_dir):
    out = tmp_path_factory.mktemp("dmole")
    return out, train.main(TINY + ["--out", str(out), "--base-dir", base_dir, "--method", "dmole"])


def test_dmole_run_checkpoints_vision_experts_within_the_budget(dmole_run):
    out, m = dmole_run
    assert m["finished_tasks"] == 2 and len(m["dmole"]) == 2
    sd = load_file(str(out / "task_1/model.safetensors"))
    meta = json.loads((out / "task_1/meta.json").read_text())
    vision_keys = [k for k in sd if k.startswith("dmole.experts.vision/") and sd[k].numel()]
    assert vision_keys, "the vision tower holds D-MoLE experts"
    assert meta["n_ae"] == 2 and all(f"locator.aes.{t}.tau" in sd for t in range(2))
    # added parameters per task = the chosen modules' LoRA, by hand from the tiny model's shapes; never past the budget
    model = ev.load_base(m["base"]["tiny"])
    for t, (p, d) in enumerate(zip(m["params"], m["dmole"])):
        want = sum(8 * (model.get_submodule(n).in_features + model.get_submodule(n).out_features) for n in d["chosen"])
        assert p["added"] == want
        assert p["added"] <= m["budget_params"]
        assert len(d["chosen"]) == round(0.5 * len(d["scores"]))
        assert meta["dmole"]["tasks"] and all(t in meta["dmole"]["tasks"][n] for n in d["chosen"])
    assert m["params"][-1]["expert_params"] == sum(p["added"] for p in m["params"])
    assert m["locator"]["confusion"] is not None  # the selector's accuracy is reported


def test_dmole_run_reloads_in_eval(dmole_run):
    out, m = dmole_run
    again = ev.reevaluate(str(out))
    assert again["acc"] == m["acc"]  # the same experts, autoencoders and thresholds give the same answers
    assert again["locator"]["confusion"] == m["locator"]["confusion"]
    rows = ev.compare([str(out)], str(out / "cmp"))
    assert rows[0]["method"] == "dmole" and rows[0]["added"] == sum(p["added"] for p in m["params"])


class Crash(Exception):
    pass


def test_dmole_resume_after_crash_equals_uninterrupted(tmp_path, base_dir, dmole_run, monkeypatch):
    ref_out, ref = dmole_run
    out = tmp_path / "crashed"
    log = train.Log.__call__

    def crash_after_step_10(self, msg):  # the run dies right after logging step 10 of task 2 (partial save at 8)
        log(self, msg)
        if msg.startswith("task1:cls step    10/"):
            raise Crash(msg)
    argv = TINY + ["--out", str(out), "--base-dir", base_dir, "--method", "dmole"]
    with monkeypatch.context() as m:
        m.setattr(train.Log, "__call__", crash_after_step_10)
        with pytest.raises(Crash):
            train.main(argv)
    assert (out / "task_1/partial.safetensors").is_file()
    M = train.main(argv + ["--resume"])
    assert "resume: 1 finished task(s), and a partial task 1" in (out / "log.txt").read_text()
    assert M["acc"] == ref["acc"] and M["dmole"] == ref["dmole"] and M["locator"] == ref["locator"]
    a, b = load_file(str(ref_out / "task_1/model.safetensors")), load_file(str(out / "task_1/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
