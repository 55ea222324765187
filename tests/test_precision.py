"""--precision bf16 on the CPU (the GPU's numerics: CPU autocast supports bf16): the frozen base is stored in bf16
and stays bit-identical through training, experts, routers and VAEs are fp32 in memory and in the checkpoint, and
the losses follow the fp32 run's; --compile on trains a fixed shape without recompiling."""
import re

import pytest
import torch
from safetensors.torch import load_file

import cmoe
import train
from test_train import TINY

ONE_TASK = [*TINY, "--tasks", "sqa"]  # the last --tasks wins: one task of TINY's (its stage-0 base is shared)
# largest |bf16 - fp32| of the logged training losses (12 steps of one task), measured 0.0033: bf16 rounds
# the frozen weights and the activations (8 mantissa bits), so the two runs drift apart by rounding, not by a bug
LOSS_TOL = 0.03


def losses(out):
    log = (out / "log.txt").read_text()
    return [float(x) for x in re.findall(r"(?:probe|task)\S* step +\d+/\d+ \| loss ([0-9.]+)", log)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base_dir, monkeypatch_module):
    """(fp32 run folder, bf16 run folder, the bf16 run's model and a copy of its frozen base as prepared)."""
    seen = {}
    prepare = train.prepare

    def spy(model, cfg):
        model = prepare(model, cfg)
        seen["model"], seen["base"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return model
    outs = {p: tmp_path_factory.mktemp(p) for p in ("fp32", "bf16")}
    train.main(ONE_TASK + ["--out", str(outs["fp32"]), "--base-dir", base_dir])
    monkeypatch_module.setattr(train, "prepare", spy)
    train.main(ONE_TASK + ["--out", str(outs["bf16"]), "--base-dir", base_dir, "--precision", "bf16"])
    return outs["fp32"], outs["bf16"], seen["model"], seen["base"]


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_cpu_default_is_fp32():
    assert train.parse_args([]).precision == ("bf16" if torch.cuda.is_available() else "fp32")
    assert train.parse_args(["--device", "cpu"]).precision == "fp32"


def test_bf16_base_is_bf16_and_unchanged_by_training(runs):
    _, _, model, base = runs
    assert model.precision == "bf16"
    n = 0
    for k, v in model.state_dict().items():
        if ".experts." in k:
            assert v.dtype == torch.float32, k  # master weights
        else:
            assert v.dtype == torch.bfloat16 and torch.equal(v, base[k]), k
            n += 1
    assert n > 50 and any(k.startswith("vision.") for k in base) and any(k.startswith("projector.") for k in base)


def test_bf16_checkpoint_holds_fp32_experts(runs):
    _, out, _, _ = runs
    sd = load_file(str(out / "task_0" / "model.safetensors"))
    kinds = {"experts": 0, "routers": 0, "locator": 0}
    for k, v in sd.items():
        kind = "experts" if ".experts.lora." in k else "routers" if ".experts.routers." in k else "locator"
        kinds[kind] += 1
        assert v.dtype == torch.float32, k
    assert min(kinds.values()) > 0 and not any(".ffn.gate_proj" in k for k in sd)  # no base weight in it


def test_bf16_losses_follow_fp32(runs):
    fp32, bf16 = losses(runs[0]), losses(runs[1])
    assert len(fp32) == len(bf16) > 3
    print(f"max |bf16 - fp32| loss: {max(abs(a - b) for a, b in zip(fp32, bf16)):.4f}")
    assert fp32 != bf16  # the runs differ in precision, so some loss must differ
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < LOSS_TOL


def test_compiled_bf16_training_step_compiles_once(monkeypatch):
    """--compile on (CUDA's default) on a tiny fixed shape, bf16: train.train_stage compiles the step, autocast and
    all, into one graph without a break, and recompiles at no later step (torch._dynamo.config.error_on_recompile
    turns a recompile into an error). AOT autograd's backend: dynamo's trace and guards and the joint forward/backward
    graph are what is checked; inductor's CPU C++ build would cost 30 s here, and on CUDA it emits Triton instead."""
    from vision import CLIPVision, Projector, VisionConfig
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **kw: compile_(m, backend="aot_eager", **kw))
    torch.manual_seed(0)
    cfg = train.TrainConfig(compile="on", precision="bf16", device="cpu", steps=4, batch_size=4, warmup=1,
                            top_k=1, n_init=2, rank=4)
    lc, vc = cmoe.LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64), VisionConfig.tiny()
    model = train.prepare(cmoe.LLaVA(CLIPVision(vc), Projector(vc.hidden_size, lc.dim), cmoe.Llama(lc)), cfg)
    cmoe.init_experts(model.llm, cfg.n_init)
    train.trainable_cl(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 64, (8, 10), generator=g)
    ids[:, 1] = cmoe.IMAGE_TOKEN_ID
    labels = ids.masked_fill(torch.arange(10) < 4, cmoe.IGNORE_INDEX)
    ds = {"input_ids": ids, "labels": labels, "task_ids": torch.zeros(8, dtype=torch.long),
          "images": torch.randn(8, vc.num_patches, lc.dim, generator=g)}
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    torch._dynamo.utils.counters.clear()
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    log = []
    train.train_stage(model, ds, cfg, cfg.steps, 1e-2, 0, "compiled", log.append)
    counters = torch._dynamo.utils.counters
    print(dict(counters["stats"]), dict(counters["graph_break"]))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # one graph, no break
    after = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in after) and any(not torch.equal(a, b) for a, b in zip(before, after))
    assert len(log) == cfg.steps and all(re.search(r"loss \d", m) for m in log)


def test_text_pretraining_runs_under_the_models_precision():
    """Stage 0's induction pretraining (--text-steps) runs the decoder under the model's autocast like every other
    stage: under bf16 its matmuls are bf16 (as a forward hook on the head sees), its fp32 master weights still move;
    under fp32 nothing is cast."""
    from vision import CLIPVision, Projector, VisionConfig
    lc, vc = cmoe.LlamaConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64), VisionConfig.tiny()
    for precision, want in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        torch.manual_seed(0)
        model = cmoe.LLaVA(CLIPVision(vc), Projector(vc.hidden_size, lc.dim), cmoe.Llama(lc))
        cmoe.set_precision(model, precision, cast=False)  # as build_base: stage 0 trains fp32 weights
        seen = []
        model.llm.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        before = model.llm.embed_tokens.weight.detach().clone()
        cfg = train.TrainConfig(text_steps=2, batch_size=2, warmup=1, device="cpu")
        train.pretrain_text(model, cfg, lambda m: None)
        assert seen == [want, want]
        assert model.llm.embed_tokens.weight.dtype == torch.float32
        assert not torch.equal(before, model.llm.embed_tokens.weight)
