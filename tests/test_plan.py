"""train.py --plan: parameter counts against the models' published counts, the activation estimate against the bytes
autograd really keeps for backward in a training step (a tiny model on the CPU), and the error on a config that is not
a Llama. Configs are written as the HF folders hold them; only config.json is read."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import cmoe  # noqa: E402
import train  # noqa: E402
from vision import CLIPVision, Projector  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

# config.json of meta-llama/Llama-3.2-1B, meta-llama/Llama-3.1-8B and openai/clip-vit-large-patch14-336 (a CLIPModel:
# the vision tower's fields under "vision_config"), as published
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256}
# Llama-3.1-8B's config.json differs from that in these fields only (and has no head_dim: 4096 / 32 = 128)
LLAMA_31_8B = {**{k: v for k, v in LLAMA_32_1B.items() if k != "head_dim"}, "hidden_size": 4096,
               "intermediate_size": 14336, "num_hidden_layers": 32, "tie_word_embeddings": False,
               "rope_scaling": {**LLAMA_32_1B["rope_scaling"], "factor": 8.0}}
CLIP_L_336 = {
    "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "logit_scale_init_value": 2.6592,
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                    "projection_dim": 768, "max_position_embeddings": 77},
    "vision_config": {"hidden_act": "quick_gelu", "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "layer_norm_eps": 1e-05, "model_type": "clip_vision_model", "num_attention_heads": 16,
                      "num_channels": 3, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768}}

# CLIPVisionModel of ViT-L/14-336, by hand: its published 303,507,456 parameters
D_V, P_V = 1024, (336 // 14) ** 2
CLIP_EMB = D_V + 3 * 14 * 14 * D_V + (P_V + 1) * D_V  # class embedding, patch conv (no bias), 577 positions
CLIP_LAYER = 4 * (D_V * D_V + D_V) + (D_V * 4096 + 4096) + (4096 * D_V + D_V) + 2 * 2 * D_V  # q k v out, fc1, fc2, 2 LN
CLIP_FULL = CLIP_EMB + 2 * D_V + 24 * CLIP_LAYER + 2 * D_V  # + pre_layrnorm, 24 layers, post_layernorm
# what vision.CLIPVision builds: LLaVA reads hidden_states[-2], so neither the 24th layer nor post_layernorm exists
CLIP_BUILT = CLIP_FULL - CLIP_LAYER - 2 * D_V


def folder(tmp_path, name, cfg):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def plan(*flags):
    return train.plan(train.parse_args(["--plan", *flags]))


def test_clip_count_by_hand():
    assert CLIP_FULL == 303_507_456
    assert CLIP_BUILT == 303_507_456 - 12_596_224 - 2_048 == 290_909_184


@pytest.mark.parametrize("preset, cfg, llm, projector", [
    ("llama-3.2-1b", LLAMA_32_1B, 1_235_814_400, (1024 * 2048 + 2048) + (2048 * 2048 + 2048)),
    ("llama-3.1-8b", LLAMA_31_8B, 8_030_261_248, (1024 * 4096 + 4096) + (4096 * 4096 + 4096))])
@pytest.mark.parametrize("attn", [False, True], ids=["ffn", "attn"])
def test_published_parameter_counts(tmp_path, capsys, preset, cfg, llm, projector, attn):
    flags = ["--tasks", "8", "--max-len", "256", "--attn-experts" if attn else "--no-attn-experts"]
    got = plan("--llm", folder(tmp_path, "llm", cfg), "--vision", folder(tmp_path, "clip", CLIP_L_336), *flags)
    out = capsys.readouterr().out
    assert got["base"] == {"vision": CLIP_BUILT, "projector": projector, "llm": llm}
    assert f"CLIPVisionModel: {CLIP_FULL:,}" in out and f"LLM {llm:,}" in out
    # cmoe, rank 8, 2 experts at task 1, worst case one more in every layer per task: 9 experts after 8 tasks
    D, F, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    expert = 3 * 8 * (D + F)  # LoRA A (in x 8) and B (8 x out) on gate, up (D -> F) and down (F -> D)
    if attn:  # and on q (D -> D), k and v (D -> kv heads x head dim), o (D -> D)
        KV = cfg["num_key_value_heads"] * (D // cfg["num_attention_heads"])
        expert += 8 * (D + D) + 2 * 8 * (D + KV) + 8 * (D + D)
    assert got["first"] == L * (2 * expert + 2 * D)  # task 1: 2 experts + a router over them, per layer
    assert got["last"] == L * (expert + 9 * D)  # task 8: 1 new expert + a router over all 9
    assert got["added"] == L * (9 * expert + D * sum(range(2, 10)))  # routers of tasks 1..8 cover 2..9 experts
    assert got["S"] == 255 + 576 and got["experts"] == 9
    # --preset is the published config
    pre, _, _ = train.plan_configs(train.parse_args(["--plan", "--preset", preset]))
    assert pre == cmoe.LlamaConfig.from_hf(cfg) and pre.rope_scaling == cfg["rope_scaling"]


# ----------------------------------------------------------------------------------------------------------
# activations: the estimate against what autograd keeps in a real training step

TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
              "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "max_position_embeddings": 256}
TINY_CLIP = {"model_type": "clip_vision_model", "image_size": 48, "patch_size": 8, "hidden_size": 96,
             "intermediate_size": 384, "num_hidden_layers": 3, "num_attention_heads": 4, "hidden_act": "quick_gelu"}
B = 4


def training_step_saved(model, args):
    """One training step as train.train_stage takes it (pre-computed image features, forward with labels, loss +
    lambda_aux * aux, backward), with every tensor autograd saves for backward recorded. Returns (bytes of the unique
    storages saved, parameters excluded: the plan counts them as weights; per decoder layer, the bytes first saved
    while it ran, its inputs excluded: what recomputing it under --grad-ckpt adds)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # train.encode: the frozen tower runs once per dataset
        feats = model.image_features(torch.randn(B, 3, 48, 48, generator=g).to(model.llm.norm.weight.dtype))
    ids = torch.randint(1, 256, (B, args.max_len), generator=g)
    ids[:, 1] = cmoe.IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :args.max_len // 2] = cmoe.IGNORE_INDEX
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, per_layer, now = {}, [0] * len(model.llm.layers), {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr and ptr not in params and ptr not in saved:
            saved[ptr] = t.untyped_storage().nbytes()
            if now and ptr not in now["inputs"]:
                per_layer[now["i"]] += saved[ptr]
        return t

    def enter(i):
        return lambda mod, inputs: now.update(i=i, inputs={a.untyped_storage().data_ptr() for a in inputs
                                                           if isinstance(a, torch.Tensor)})
    hooks = [blk.register_forward_pre_hook(enter(i)) for i, blk in enumerate(model.llm.layers)]
    hooks += [blk.register_forward_hook(lambda *a: now.clear()) for blk in model.llm.layers]
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss, aux = model(ids, feats, labels, torch.zeros(B, dtype=torch.long))
        total = loss + args.lambda_aux * aux
    total.backward()
    for h in hooks:
        h.remove()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    return sum(saved.values()), per_layer


@pytest.mark.parametrize("dtype, n_init, top_k, attn", [("fp32", 2, 2, 0), ("fp32", 3, 1, 0), ("bf16", 2, 2, 0),
                                                      ("fp32", 2, 2, 1), ("fp32", 3, 1, 1), ("bf16", 2, 2, 1)],
                         ids=["fp32-dense", "fp32-sparse", "bf16-dense", "fp32-dense-attn", "fp32-sparse-attn",
                              "bf16-dense-attn"])
def test_activation_estimate_matches_saved_bytes(tmp_path, capsys, monkeypatch, dtype, n_init, top_k, attn):
    # the dispatch under test (sparse iff E > 2 * top-k), for the plan and the layers alike: at these tiny dims the
    # auto rule would always pick the dense one
    monkeypatch.setattr(cmoe, "sparse_wins", lambda E, top_k, grad, *dims: E > 2 * top_k)
    args = train.parse_args(["--plan", "--llm", folder(tmp_path, "llm", TINY_LLAMA), "--vision",
                             folder(tmp_path, "clip", TINY_CLIP), "--precision", dtype, "--tasks", "1",
                             "--max-len", "32", "--n-init", str(n_init), "--top-k", str(top_k)]
                            + [["--no-attn-experts"], ["--attn-experts"]][attn])
    got = train.plan(args)
    lc, vc, _ = train.plan_configs(args)
    torch.manual_seed(0)  # the model as train.py trains it: bf16, a bf16 base and fp32 experts under bf16 autocast
    model = train.prepare(cmoe.LLaVA(CLIPVision(vc), Projector(vc.hidden_size, lc.dim), cmoe.Llama(lc)), args)
    cmoe.init_experts(model.llm, n_init, generator=torch.Generator().manual_seed(0))
    train.trainable_cl(model)
    ffn = model.llm.layers[0].experts
    assert ffn.n_experts == got["experts"] and (ffn.n_experts > 2 * top_k) == (top_k == 1)  # the dispatch tested
    plain, per_layer = training_step_saved(model, args)
    model.llm.grad_ckpt = True
    ckpt = training_step_saved(model, args)[0] + max(per_layer)  # + one layer recomputed in backward
    dt, ecfg = 2 if dtype == "bf16" else 4, train.expert_config(args)
    for measured, ck in ((plain, False), (ckpt, True)):
        est = train.activation_bytes(lc, ecfg, got["experts"], got["S"], B, dt, ck)[0]
        print(f"{dtype} n_init {n_init} top-k {top_k} grad-ckpt {ck}: measured {measured:,} B, estimated {est:,} B "
              f"({est / measured - 1:+.1%})", file=sys.stderr)
        assert abs(est / measured - 1) < 0.10
        # the plan prints this estimate plus the loss peak as per sample + per step: exact for the dense dispatch;
        # the sparse one pads rows to 32-row blocks, a large share of this tiny batch
        per_sample, per_step = got["act"][ck]
        loss_peak = got["S"] * lc.vocab_size * (dt + 8)
        assert per_sample * B + per_step == pytest.approx(est + B * loss_peak, rel=0.05 if top_k == 1 else 1e-9)


# ----------------------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("change, words", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, ["model_type 'mistral'", "not a Llama"]),
    ({"architectures": ["LlamaForSequenceClassification"]}, ["LlamaForSequenceClassification", "not a Llama"]),
    ({"intermediate_size": None}, ["'intermediate_size' is missing"])])
def test_plan_rejects_what_is_not_a_llama(tmp_path, change, words):
    cfg = {k: v for k, v in {**LLAMA_32_1B, **change}.items() if v is not None}
    llm = folder(tmp_path, "llm", cfg)
    with pytest.raises(SystemExit) as e:
        train.main(["--plan", "--llm", llm, "--vision", folder(tmp_path, "clip", CLIP_L_336)])
    msg = str(e.value)
    assert msg.startswith("error: " + os.path.join(llm, "config.json") + ":"), msg
    for w in words:
        assert w in msg, msg


def test_plan_says_when_nothing_fits(tmp_path, capsys):
    plan("--llm", folder(tmp_path, "llm", LLAMA_32_1B), "--vision", folder(tmp_path, "clip", CLIP_L_336), "--gpu-mem", "2")
    out = capsys.readouterr().out
    assert "does not fit 2 GiB" in out and "micro-batch" not in out  # 1B in bf16 alone is 2.9 GiB


def test_plan_needs_a_model():
    with pytest.raises(SystemExit, match="--preset, or --llm and --vision"):
        train.main(["--plan"])


# ----------------------------------------------------------------------------------------------------------
# weights: the plan's bytes are those of the model train.py trains

def test_plan_weight_bytes_are_the_built_models(tmp_path, capsys):
    """--precision bf16: the plan's weights are the frozen base at 2 B, experts and routers at 4 B (fp32 master
    weights), RoPE's fp32 inverse frequencies; by hand from the parameter counts, and summed over a real model built
    on the CPU as train.py builds it (train.prepare, task 1's experts, then the plan's worst-case growth)."""
    args = train.parse_args(["--plan", "--llm", folder(tmp_path, "llm", TINY_LLAMA), "--vision",
                             folder(tmp_path, "clip", TINY_CLIP), "--tasks", "3", "--max-len", "32"])
    assert args.precision == "bf16"  # --plan describes a GPU run
    got = train.plan(args)
    assert "note:" not in capsys.readouterr().out
    head_dim = TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
    frozen = sum(got["base"].values())
    assert got["mem"]["weights"] == 2 * frozen + 4 * got["added"] + 4 * head_dim // 2
    assert got["mem"]["gradients"] == 4 * max(got["first"], got["last"]) and got["mem"]["AdamW"] == 8 * max(
        got["first"], got["last"])
    lc, vc, _ = train.plan_configs(args)
    model = train.prepare(cmoe.LLaVA(CLIPVision(vc), Projector(vc.hidden_size, lc.dim), cmoe.Llama(lc)), args)
    cmoe.init_experts(model.llm, args.n_init)
    for _ in range(2):
        for f in model.llm.expert_pools():
            f.freeze()
            f.add_experts(args.n_new)
            f.add_router()
    storages = {}  # every tensor the model holds, once per storage (the tied head shares the embedding's)
    buffers = dict(model.named_buffers())  # RoPE's inverse frequencies, PGKE's (empty) usage counts: fp32
    for name, t in [*model.named_parameters(remove_duplicate=False), *buffers.items()]:
        storages[t.untyped_storage().data_ptr() or name] = t.untyped_storage().nbytes()
        fp32 = ".experts." in name or name in buffers
        assert t.dtype == (torch.float32 if fp32 else torch.bfloat16), name
    assert got["mem"]["weights"] == sum(storages.values())


def test_8b_plan_fits_24_gib_as_trained(capsys):
    got = plan("--preset", "llama-3.1-8b", "--gpu-mem", "24")
    out = capsys.readouterr().out
    assert got["fit"][True] >= 1 and "micro-batch" in out and "note:" not in out and "fp32 weights" not in out
    assert got["mem"]["weights"] < 17 * 2**30  # 8.34B frozen parameters in bf16: 15.5 GiB, experts ~0.6 GiB
