"""The real-checkpoint CoIN path of `python train.py --benchmark coin ...` end to end on CPU: a Llama-3 format
tokenizer, tiny HF Llama / CLIP folders and a LLaVA projector file (real key names), and a two-task CoIN folder
(LLaVA conversation train.json, question-record test.json, PNG images under a separate image root)."""
import hashlib
import json
import os
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import cmoe  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
import vision  # noqa: E402
from test_llama import hf_config, hf_tensors, write_folder  # noqa: E402
from test_vision import hf_vision_config, hf_vision_tensors  # noqa: E402

VCFG = vision.VisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2)  # 4 patches; select_layer -2 runs 2 of the 3 layers
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
SQA_ANS, TVQA_ANS = "ABCD", ["stop", "exit", "open", "sale"]


def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _coin_folder(root, img_root):
    """<root>/{ScienceQA,TextVQA}/{train,test}.json; images (non-square PNGs) under img_root, paths relative to it."""
    for task, sub in (("ScienceQA", "sqa"), ("TextVQA", "tvqa")):
        os.makedirs(os.path.join(img_root, sub), exist_ok=True)
        for i in range(4):
            Image.new("RGB", (20 + 4 * i, 14), COLOURS[i]).save(os.path.join(img_root, sub, f"{i}.png"))
        train_recs = []
        for i in range(16):
            c = i % 4
            if task == "ScienceQA":
                q, a = "<image>\nWhich colour?\nA. red\nB. green\nC. blue\nD. yellow", SQA_ANS[c]
            else:
                q, a = "<image>\nWhat does the sign say?", TVQA_ANS[c]
            conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            if i == 0:  # one multi-turn record
                conv += [{"from": "human", "value": "Are you sure?"}, {"from": "gpt", "value": "Yes."}]
            train_recs.append({"id": f"{sub}-{i}", "image": f"{sub}/{c}.png", "conversations": conv})
        _write_json(os.path.join(root, task, "train.json"), train_recs)
        test_recs = []
        for i in range(6):  # 6 records, --test-n 4: the first 4 are evaluated
            c = (i + 1) % 4
            if task == "ScienceQA":
                rec = {"question_id": f"sqa-q{i}", "image": f"{sub}/{c}.png", "answer": SQA_ANS[c],
                       "text": "Which colour?\nA. red\nB. green\nC. blue\nD. yellow\nAnswer with the option's letter."}
            else:
                rec = {"question_id": 100 + i, "image": f"{sub}/{c}.png", "text": "<image>\nWhat does the sign say?",
                       "answer": TVQA_ANS[c], "answers": [TVQA_ANS[c]] * 9 + ["none"]}
            test_recs.append(rec)
        _write_json(os.path.join(root, task, "test.json"), test_recs)


@pytest.fixture(scope="module")
def coin_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("coin_path")
    tok_path = str(root / "tokenizer.model")
    tok = data.build_minicoin_tokenizer(tok_path)  # the Llama-3 tokenizer.model format; n_vocab incl. 256 specials
    c = hf_config(vocab_size=tok.n_vocab, tie_word_embeddings=True)  # dim 32, 2 layers, GQA 4:2
    llm_t = hf_tensors(c, lm_head=False, seed=3)
    llm = write_folder(str(root / "llm"), c, llm_t)
    clip_t = hf_vision_tensors(VCFG, seed=4)
    clip = write_folder(str(root / "clip"), hf_vision_config(VCFG), clip_t)
    g = torch.Generator().manual_seed(5)
    proj_t = {"model.mm_projector.0.weight": torch.randn(32, 32, generator=g) * 0.3,
              "model.mm_projector.0.bias": torch.randn(32, generator=g) * 0.1,
              "model.mm_projector.2.weight": torch.randn(32, 32, generator=g) * 0.3,
              "model.mm_projector.2.bias": torch.randn(32, generator=g) * 0.1}
    proj = str(root / "mm_projector.safetensors")
    save_file(proj_t, proj)
    coin, images = str(root / "coin"), str(root / "images")
    _coin_folder(coin, images)
    return dict(root=root, tok=tok_path, llm=llm, llm_t=llm_t, clip=clip, clip_t=clip_t, proj=proj, proj_t=proj_t,
                coin=coin, images=images)


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def coin_argv(f, coin, out):
    return ["--benchmark", "coin", "--coin-root", coin, "--image-root", f["images"], "--tasks", "ScienceQA,TextVQA",
            "--llm", f["llm"], "--vision", f["clip"], "--projector", f["proj"], "--tokenizer", f["tok"],
            "--max-len", "64", "--steps", "3", "--probe-steps", "2", "--batch-size", "4", "--train-n", "16",
            "--test-n", "4", "--locator-n", "8", "--eval-batch", "8", "--max-new-tokens", "4", "--threads", "1",
            "--out", out, "--base-dir", str(f["root"] / "base")]


def test_coin_real_checkpoint_path(coin_files, monkeypatch):
    f = coin_files
    out = str(f["root"] / "run")
    hashes = {p: _md5(p) for p in (os.path.join(f["llm"], "model.safetensors"), os.path.join(f["llm"], "config.json"),
                                   os.path.join(f["clip"], "model.safetensors"), f["proj"], f["tok"])}
    built = []
    real_build = train.build_base
    monkeypatch.setattr(train, "build_base", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])

    M = train.main(coin_argv(f, f["coin"], out))

    # metrics: a 2x2 accuracy matrix (every task after every stage), both tasks finished, locator measured
    with open(os.path.join(out, "metrics.json")) as fh:
        saved = json.load(fh)
    for m in (M, saved):
        assert m["benchmark"] == "coin" and m["tasks"] == ["ScienceQA", "TextVQA"]
        assert m["finished_tasks"] == 2
        assert len(m["acc"]) == 2 and all(len(r) == 2 for r in m["acc"])
        assert all(0.0 <= a <= 100.0 for r in m["acc"] for a in r)
    assert len(saved["pgke"]) == 1 and len(saved["pgke"][0]["expand"]) == 2  # task 2 probed both layers
    assert sum(map(sum, saved["locator"]["confusion"])) == 8  # 4 + 4 test questions located per sample

    # predictions: our jsonl, and LLaVA/CoIN answer files holding the first --test-n question ids in order
    assert os.path.isfile(os.path.join(out, "predictions", "ScienceQA.jsonl"))
    for task in ("ScienceQA", "TextVQA"):
        with open(os.path.join(out, "predictions", f"{task}.coin.jsonl")) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        with open(os.path.join(f["coin"], task, "test.json")) as fh:
            want = [r["question_id"] for r in json.load(fh)][:4]
        assert [r["question_id"] for r in rows] == want
        for r in rows:
            assert {"question_id", "prompt", "text", "answer_id", "model_id"} <= set(r)
            assert isinstance(r["text"], str) and isinstance(r["prompt"], str) and r["prompt"]

    # task checkpoints: only continual-learning tensors (experts, routers, locator VAEs), never base weights
    for t in range(2):
        path = os.path.join(out, f"task_{t}", "model.safetensors")
        assert os.path.isfile(path) and os.path.isfile(os.path.join(out, f"task_{t}", "meta.json"))
        keys = list(cmoe.load_safetensors(path))
        assert any(".ffn.train_" in k or ".ffn.frozen_" in k for k in keys)
        assert any(".ffn.routers." in k for k in keys) and any(k.startswith("locator.") for k in keys)
        bad = [k for k in keys if not (k.startswith("locator.") or any(
            s in k for s in (".ffn.frozen_", ".ffn.train_", ".ffn.routers.")))]
        assert not bad, f"task_{t} checkpoint holds non-CL keys: {bad[:5]}"

    # the base is untouched: files byte-identical, and the trained in-memory model still equals the checkpoints
    assert {p: _md5(p) for p in hashes} == hashes
    (model,) = built
    sd = model.state_dict()
    for hf_key, ours in (("model.embed_tokens.weight", "llm.embed_tokens.weight"),
                         ("model.layers.1.mlp.down_proj.weight", "llm.layers.1.ffn.down_proj.weight"),
                         ("model.layers.0.self_attn.q_proj.weight", "llm.layers.0.attn.q_proj.weight"),
                         ("model.norm.weight", "llm.norm.weight")):
        assert torch.equal(sd[ours].cpu(), f["llm_t"][hf_key]), ours
    assert torch.equal(sd["vision.encoder.layers.0.mlp.fc1.weight"].cpu(),
                       f["clip_t"]["vision_model.encoder.layers.0.mlp.fc1.weight"])
    assert torch.equal(sd["projector.2.weight"].cpu(), f["proj_t"]["model.mm_projector.2.weight"])
    assert model.llm.cfg.tie_embeddings and model.llm.cfg.vocab_size == data.load_tokenizer(f["tok"]).n_vocab


def test_coin_missing_image_names_the_path(coin_files, tmp_path):
    f = coin_files
    coin = str(tmp_path / "coin")
    for task in ("ScienceQA", "TextVQA"):
        for split in ("train", "test"):
            with open(os.path.join(f["coin"], task, f"{split}.json")) as fh:
                recs = json.load(fh)
            if task == "ScienceQA" and split == "train":
                recs[5]["image"] = "sqa/missing-5.png"
            _write_json(os.path.join(coin, task, f"{split}.json"), recs)
    missing = os.path.join(f["images"], "sqa/missing-5.png")
    with pytest.raises(ValueError, match="missing") as e:
        data.load_coin_train(os.path.join(coin, "ScienceQA", "train.json"), f["images"])
    assert missing in str(e.value)
    with pytest.raises(ValueError) as e:  # the same through the CLI entry point, before any training step
        train.main(coin_argv(f, coin, str(tmp_path / "run")))
    assert missing in str(e.value) and "train.json" in str(e.value)
    assert not os.path.exists(os.path.join(tmp_path, "run", "task_0"))
