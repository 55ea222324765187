"""The real-checkpoint CoIN path of `python train.py --benchmark coin ...` end to end on CPU: a Llama-3 format
tokenizer, tiny HF Llama / CLIP folders and a LLaVA projector file (real key names), and a folder laid out as CoIN
ships Instructions_Original/ (ScienceQA with text-only records, TextVQA's val.json, the OCRVQA folder), PNG images
under a separate image root (cl_dataset/), and TextVQA's annotation file under --coin-annotations. Also the model side
of text-only samples (tiny llava of test_llama): masked image slots in training, generation and locator features."""
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
import eval as ev  # noqa: E402
import train  # noqa: E402
import vision  # noqa: E402
from test_llama import PAD, close, hf_config, hf_tensors, llava, llava_files, manual_splice, pixels  # noqa: E402,F401
from test_llama import greedy_reference, ref_llama_logits, write_folder  # noqa: E402
from test_vision import hf_vision_config, hf_vision_tensors  # noqa: E402

VCFG = vision.VisionConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=2)  # 4 patches; select_layer -2 runs 2 of the 3 layers
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
SQA_ANS, TVQA_ANS, OCR_ANS = "BACD", ["stop", "exit", "open", "sale"], ["The Hobbit", "Cooking", "Unanswerable", "Travel"]
SQA_SUFFIX = "Answer with the option's letter from the given choices directly."
VQA_SUFFIX = "Answer the question using a single word or phrase."
TEXT_ONLY = (1, 3)  # ScienceQA test questions without an image (train: every 4th record from 3)
# --test-n 4: the first 4 test questions of each task, and the answer the model is made to give to each (tag -> text).
# CoIN's scores of these answers, by hand from its scripts' rules:
SCRIPT = {
    # ScienceQA (golds B A C D): "B" exact -> B right; "It's A" -> first one-character word "s" -> S wrong;
    # "C. blue" -> "X. " prefix -> C right; "d" -> one-character word, upper-cased -> D right: 3/4 = 75.0
    "sqa0": "B", "sqa1": "It's A", "sqa2": "C. blue", "sqa3": "d",
    # TextVQA (m4c over the annotation file's 10 answers): "stop." -> "stop", given by 3 of 10 -> 0.9; "2" vs
    # 2x "two" + 2x "2" -> 4 matches -> 1.0; "Exit" -> "exit", 1 of 10 ("the exit" loses its article) -> 0.3;
    # "closed" -> 0: (0.9 + 1.0 + 0.3 + 0) / 4 = 55.0
    "tvqa0": "stop.", "tvqa1": "2", "tvqa2": "Exit", "tvqa3": "closed",
    # OCR-VQA (lower-case exact, 'Unanswerable' always wrong): "the hobbit" right; "Unanswerable" vs "Cooking" wrong;
    # "Unanswerable" vs "Unanswerable" wrong (quirk); "Travel." vs "Travel" wrong: 1/4 = 25.0
    "ocr0": "the hobbit", "ocr1": "Unanswerable", "ocr2": "Unanswerable", "ocr3": "Travel.",
}
WANT = [75.0, 55.0, 25.0]
TVQA_HUMANS = [["Stop"] * 3 + ["stop sign"] * 7, ["two"] * 2 + ["2"] * 2 + ["three"] * 6, ["the exit"] + ["way out"] * 9,
               ["open"] * 10, ["sale"] * 10, ["sale"] * 10]


def _md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def _coin_folder(root, img_root, ann_root):
    """CoIN's Instructions_Original layout under root: ScienceQA/{train,test}.json (text-only records: no 'image', no
    '<image>'), TextVQA/{train,val}.json, OCRVQA/{train,test}.json; images (non-square PNGs) under img_root, paths
    relative to it; ann_root/TextVQA/TextVQA_0.5.1_val.json holds TextVQA's 10 human answers per question."""
    for task, sub in (("ScienceQA", "sqa"), ("TextVQA", "tvqa"), ("OCRVQA", "ocr")):
        os.makedirs(os.path.join(img_root, sub), exist_ok=True)
        for i in range(4):
            Image.new("RGB", (20 + 4 * i, 14), COLOURS[i]).save(os.path.join(img_root, sub, f"{i}.png"))
        train_recs = []
        for i in range(16):
            c = i % 4
            if task == "ScienceQA":
                q, a = f"Which colour?\nA. red\nB. green\nC. blue\nD. yellow\n{SQA_SUFFIX}", "ABCD"[c]
            elif task == "TextVQA":
                q, a = f"What does the sign say?\n{VQA_SUFFIX}", TVQA_ANS[c]
            else:
                q, a = f"What is the title of this book?\n{VQA_SUFFIX}", OCR_ANS[c]
            rec = {"id": f"{sub}-{i}", "image": f"{sub}/{c}.png"}
            if task == "ScienceQA" and i % 4 == 3:  # text-only, as LLaVA's ScienceQA converter writes them
                rec = {"id": f"{sub}-{i}"}
            elif i != 1:  # record 1 has an image but no <image>: the loader puts it in front, as LLaVA does
                q = "<image>\n" + q
            conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            if i == 0:  # one multi-turn record
                conv += [{"from": "human", "value": "Are you sure?"}, {"from": "gpt", "value": "Yes."}]
            train_recs.append({**rec, "conversations": conv})
        _write_json(os.path.join(root, task, "train.json"), train_recs)
        test_recs = []
        for i in range(6):  # 6 records, --test-n 4: the first 4 are evaluated
            c = (i + 1) % 4
            if task == "ScienceQA":
                rec = {"question_id": f"sqa-q{i}", "image": f"{sub}/{c}.png", "answer": SQA_ANS[i % 4],
                       "text": f"Which colour? (sqa{i})\nA. red\nB. green\nC. blue\nD. yellow\n{SQA_SUFFIX}"}
                if i in TEXT_ONLY:
                    del rec["image"]
            elif task == "TextVQA":  # CoIN's val.json: int ids, one answer; the 10 humans live in the annotation file
                rec = {"question_id": 100 + i, "image": f"{sub}/{c}.png", "answer": TVQA_ANS[i % 4],
                       "text": f"What does the sign say? (tvqa{i})\n{VQA_SUFFIX}"}
            else:
                rec = {"question_id": f"ocr-{i}", "image": f"{sub}/{c}.png", "answer": OCR_ANS[i % 4],
                       "text": f"What is the title of this book? (ocr{i})\n{VQA_SUFFIX}"}
            test_recs.append(rec)
        _write_json(os.path.join(root, task, "val.json" if task == "TextVQA" else "test.json"), test_recs)
    _write_json(os.path.join(ann_root, "TextVQA", "TextVQA_0.5.1_val.json"),
                {"dataset_name": "textvqa",
                 "data": [{"question_id": 100 + i, "answers": TVQA_HUMANS[i]} for i in range(6)]})


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
    coin, images, ann = str(root / "Instructions_Original"), str(root / "cl_dataset"), str(root / "annotations")
    _coin_folder(coin, images, ann)
    return dict(root=root, tok=tok_path, llm=llm, llm_t=llm_t, clip=clip, clip_t=clip_t, proj=proj, proj_t=proj_t,
                coin=coin, images=images, ann=ann)


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def coin_argv(f, coin, out, tasks="ScienceQA,TextVQA,OCRVQA"):
    return ["--benchmark", "coin", "--coin-root", coin, "--image-root", f["images"], "--tasks", tasks,
            "--coin-annotations", f["ann"],
            "--llm", f["llm"], "--vision", f["clip"], "--projector", f["proj"], "--tokenizer", f["tok"],
            "--max-len", "64", "--steps", "3", "--probe-steps", "2", "--batch-size", "4", "--train-n", "16",
            "--test-n", "4", "--locator-n", "8", "--eval-batch", "8", "--max-new-tokens", "4", "--threads", "1",
            "--out", out, "--base-dir", str(f["root"] / "base")]


def scripted_generate(monkeypatch, tok, calls):
    """LLaVA.generate runs for real (text-only rows included), then each row's answer is replaced by SCRIPT's text
    for the tag in its prompt: the scores are then known by hand."""
    real = cmoe.LLaVA.generate

    def gen(self, prompts, images, *a, **k):
        outs = real(self, prompts, images, *a, **k)
        calls.append([(cmoe.IMAGE_TOKEN_ID in p, len(o)) for p, o in zip(prompts, outs)])
        texts = [tok.decode([t for t in p if t >= 0]) for p in prompts]
        return [tok.encode_ordinary(next(v for k_, v in SCRIPT.items() if f"({k_})" in t)) for t in texts]
    monkeypatch.setattr(cmoe.LLaVA, "generate", gen)


def _lines(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_coin_real_checkpoint_path(coin_files, monkeypatch):
    f = coin_files
    out = str(f["root"] / "run")
    hashes = {p: _md5(p) for p in (os.path.join(f["llm"], "model.safetensors"), os.path.join(f["llm"], "config.json"),
                                   os.path.join(f["clip"], "model.safetensors"), f["proj"], f["tok"])}
    built, calls = [], []
    real_build = train.build_base
    monkeypatch.setattr(train, "build_base", lambda *a, **k: built.append(real_build(*a, **k)) or built[-1])
    # (built holds (model, where it came from))
    scripted_generate(monkeypatch, data.load_tokenizer(f["tok"]), calls)

    M = train.main(coin_argv(f, f["coin"], out))

    # metrics: a 3x3 accuracy matrix (every task after every stage), all tasks finished, locator measured; every
    # cell is CoIN's score of the scripted answers, worked out by hand (SCRIPT)
    with open(os.path.join(out, "metrics.json")) as fh:
        saved = json.load(fh)
    for m in (M, saved):
        assert m["benchmark"] == "coin" and m["tasks"] == ["ScienceQA", "TextVQA", "OCR-VQA"]
        assert m["finished_tasks"] == 3
        assert len(m["acc"]) == 3 and all(r == pytest.approx(WANT) for r in m["acc"])
        assert m["scoring"]["TextVQA"].startswith("eval_textvqa.py") and "FALLBACK" not in json.dumps(m["scoring"])
    assert len(saved["pgke"]) == 2 and all(len(d["expand"]) == 2 for d in saved["pgke"])  # tasks 2, 3 probed 2 layers
    assert sum(map(sum, saved["locator"]["confusion"])) == 12  # 3 x 4 test questions located per sample
    # the text-only ScienceQA questions were generated by the model, in batches shared with image questions
    assert any(not has_img for c in calls for has_img, _ in c) and all(any(h for h, _ in c) for c in calls)

    # predictions: our jsonl, and CoIN's answer files holding the first --test-n question ids in order, in the
    # records' own types, as its eval scripts read them (results/CoIN/LLaVA/<folder>/<STAGE>/merge.jsonl)
    assert os.path.isfile(os.path.join(out, "predictions", "ScienceQA.jsonl"))
    for task, folder, test in (("ScienceQA", "ScienceQA", "test.json"), ("TextVQA", "TextVQA", "val.json"),
                               ("OCR-VQA", "OCRVQA", "test.json")):
        with open(os.path.join(f["coin"], folder, test)) as fh:
            recs = json.load(fh)[:4]
        for name in [f"{task}.coin.jsonl"] + [os.path.join("CoIN", folder, stage, "merge.jsonl")
                                              for stage in ("Finetune", "ScienceQA", "TextVQA", "OCRVQA")
                                              if stage != folder]:
            rows = _lines(os.path.join(out, "predictions", name))
            assert [r["question_id"] for r in rows] == [r["question_id"] for r in recs], name
            assert all(type(r["question_id"]) is type(q["question_id"]) for r, q in zip(rows, recs))
            for r, q in zip(rows, recs):
                assert {"question_id", "prompt", "text", "answer_id", "model_id"} <= set(r)
                assert r["text"] == SCRIPT[q["text"].split("(")[1].split(")")[0]]
                assert r["prompt"] == ("<image>\n" if "image" in q else "") + q["text"]  # CoIN's prompt field

    # task checkpoints: only continual-learning tensors (experts, routers, locator VAEs), never base weights
    for t in range(3):
        path = os.path.join(out, f"task_{t}", "model.safetensors")
        assert os.path.isfile(path) and os.path.isfile(os.path.join(out, f"task_{t}", "meta.json"))
        keys = list(data.read_safetensors(path))
        assert any(".experts.lora." in k for k in keys)
        assert any(".experts.routers." in k for k in keys) and any(k.startswith("locator.") for k in keys)
        bad = [k for k in keys if not (k.startswith("locator.") or any(
            s in k for s in (".experts.lora.", ".experts.routers.")))]
        assert not bad, f"task_{t} checkpoint holds non-CL keys: {bad[:5]}"

    # the base is untouched: files byte-identical, and the trained in-memory model still equals the checkpoints
    assert {p: _md5(p) for p in hashes} == hashes
    ((model, _),) = built
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


def _copy_coin(f, dst, edit=None):
    """A copy of the CoIN folder; edit(task folder, file name, records) may change records in place."""
    for folder in ("ScienceQA", "TextVQA", "OCRVQA"):
        for name in os.listdir(os.path.join(f["coin"], folder)):
            with open(os.path.join(f["coin"], folder, name)) as fh:
                recs = json.load(fh)
            if edit:
                edit(folder, name, recs)
            _write_json(os.path.join(dst, folder, name), recs)
    return dst


def test_coin_missing_image_names_the_path(coin_files, tmp_path):
    f = coin_files

    def edit(folder, name, recs):
        if folder == "ScienceQA" and name == "train.json":
            recs[5]["image"] = "sqa/missing-5.png"
    coin = _copy_coin(f, str(tmp_path / "coin"), edit)
    missing = os.path.join(f["images"], "sqa/missing-5.png")
    with pytest.raises(ValueError, match="missing") as e:
        data.load_coin_train(os.path.join(coin, "ScienceQA", "train.json"), f["images"])
    assert missing in str(e.value) and "record 5 (id 'sqa-5'), field 'image'" in str(e.value)
    with pytest.raises(ValueError) as e:  # the same through the CLI entry point, before any training step
        train.main(coin_argv(f, coin, str(tmp_path / "run")))
    assert missing in str(e.value) and "train.json" in str(e.value)
    assert not os.path.exists(os.path.join(tmp_path, "run", "task_0"))


def test_coin_bad_folders_and_records_stop_before_training(coin_files, tmp_path):
    f = coin_files
    # a task whose folder is absent: the error names the folder (CoIN's name for it)
    with pytest.raises(FileNotFoundError, match=r"CoIN task VizWiz: folder .*VizWiz not found"):
        train.main(coin_argv(f, f["coin"], str(tmp_path / "run1"), tasks="ScienceQA,VizWiz"))
    # TextVQA's test file is val.json: a folder holding test.json instead is named, with what it holds
    coin = _copy_coin(f, str(tmp_path / "c2"))
    os.rename(os.path.join(coin, "TextVQA", "val.json"), os.path.join(coin, "TextVQA", "test.json"))
    with pytest.raises(FileNotFoundError, match=r"TextVQA lacks val\.json \(it holds \['test\.json', 'train\.json'\]\)"):
        train.main(coin_argv(f, coin, str(tmp_path / "run2")))

    # a test record with no answer at all: file and record named; prediction-only mode accepts it
    def edit(folder, name, recs):
        if folder == "OCRVQA" and name == "test.json":
            del recs[2]["answer"]
    coin = _copy_coin(f, str(tmp_path / "c3"), edit)
    with pytest.raises(ValueError, match=r"OCRVQA/test\.json: record 2 \(id 'ocr-2'\): no 'answer'"):
        train.main(coin_argv(f, coin, str(tmp_path / "run3")))
    assert not os.path.exists(os.path.join(tmp_path, "run3", "task_0"))
    exs = data.load_coin_test(os.path.join(coin, "OCRVQA", "test.json"), f["images"], task="OCR-VQA",
                              require_answer=False)
    assert [e.answer for e in exs][:3] == ["The Hobbit", "Cooking", ""]


def test_coin_prediction_only_and_textvqa_fallback(coin_files, tmp_path, monkeypatch):
    """Prediction-only: test records without answers, answer files written, no accuracy. (One task, one step.)"""
    f = coin_files

    def edit(folder, name, recs):
        if name != "train.json":
            for r in recs:
                r.pop("answer", None)
    coin = _copy_coin(f, str(tmp_path / "coin"), edit)
    scripted_generate(monkeypatch, data.load_tokenizer(f["tok"]), [])
    out = str(tmp_path / "run")
    argv = coin_argv(f, coin, out, tasks="TextVQA") + ["--predict-only", "--steps", "1", "--train-n", "8"]
    argv.remove("--coin-annotations")
    argv.remove(f["ann"])
    M = train.main(argv)
    assert M["acc"] == [[None]] and M["scoring"]["TextVQA"].startswith("prediction-only")
    rows = _lines(os.path.join(out, "predictions", "CoIN", "TextVQA", "Finetune", "merge.jsonl"))
    assert [r["question_id"] for r in rows] == [100, 101, 102, 103] and rows[0]["text"] == "stop."
    # without --coin-annotations TextVQA falls back, and says so: m4c-normalised exact match on the single answer:
    # "stop." -> "stop" == "stop" right; "2" vs "exit", "Exit" vs "open", "closed" vs "sale" wrong: 1/4 = 25.0
    # (CoIN's rule over the 10 human answers: 55.0)
    tests = {"TextVQA": data.load_coin_test(os.path.join(f["coin"], "TextVQA", "val.json"), f["images"],
                                            task="TextVQA", n=4)}
    rules = ev.scoring_rules(train.parse_args(["--benchmark", "coin"]), ["TextVQA"], {"TextVQA": "coin-textvqa"},
                             tests, log=lambda m: None)
    assert rules["TextVQA"].startswith("FALLBACK") and "--coin-annotations" in rules["TextVQA"]
    pred_rows = [{"prediction": SCRIPT[f"tvqa{i}"], "answer": ex.answer, "answers": ex.answers}
                 for i, ex in enumerate(tests["TextVQA"])]
    assert ev.task_accuracy(pred_rows, "coin-textvqa") == 25.0


# ----------------------------------------------------------------------------------------------------------
# text-only samples in the model: masked image slots (tiny llava of test_llama: P = 4, dim 32)

IMG = cmoe.IMAGE_TOKEN_ID


@torch.no_grad()
def test_text_only_row_trains_as_plain_text_beside_an_image_row(llava, llava_files):
    """A right-padded training batch mixing an image row and a text-only row (no IMAGE_TOKEN_ID, one spare pad):
    the text-only row's logits at its real tokens are the plain-text LM's, its P image slots are invalid and
    unlabelled, and the batch loss is the hand-made mean over both rows' answer tokens."""
    EMB, t, c = llava_files["llm_t"]["model.embed_tokens.weight"], llava_files["llm_t"], llava_files["cfg"]
    rows = [[1, 4, IMG, 9, 10, 20, 21, 2, PAD], [1, 5, 6, 7, 30, 31, 32, 2, PAD]]  # text-only row: 8 real + 1 pad
    answer_from = [5, 4]
    ids = torch.tensor(rows)
    labels = torch.full_like(ids, cmoe.IGNORE_INDEX)
    for b, a in enumerate(answer_from):
        n = len([x for x in rows[b] if x != PAD])
        labels[b, a:n] = ids[b, a:n]
    px = pixels(2, seed=6)
    x, valid, lab = llava.splice(ids, px, labels)
    P = 4
    assert x.shape[1] == 9 - 1 + P
    assert valid[1].tolist() == [True] * 8 + [False] * P and lab[1, 8:].eq(cmoe.IGNORE_INDEX).all()
    close(x[1, :8], EMB[rows[1][:8]], atol=0)
    logits, loss, _ = llava(ids, px, labels)
    feats = llava.image_features(px)
    refs = [ref_llama_logits(t, c, None, embeds_BTD=manual_splice(EMB, rows[0], feats[0])[None])[0],
            ref_llama_logits(t, c, torch.tensor([rows[1][:8]]))[0]]
    close(logits[1, :8], refs[1])
    total, count = 0.0, 0
    for b, ref in enumerate(refs):
        text = [x for x in rows[b] if x != PAD]
        shift = P - 1 if b == 0 else 0  # positions after the image move by P - 1 in the spliced row
        for i in range(answer_from[b], len(text)):
            s = i + (shift if b == 0 and i > rows[0].index(IMG) else 0)
            total += -float(torch.log_softmax(ref[s - 1], -1)[text[i]])
            count += 1
    assert abs(float(loss) - total / count) < 1e-4


@torch.no_grad()
def test_text_only_prompt_generates_and_locates_as_plain_text(llava, llava_files):
    """Left-padded generation and PTL features over [image prompt, text-only prompt]: the text-only row equals the
    plain-text model alone (its image slots hidden from attention and from the positions)."""
    EMB, t, c = llava_files["llm_t"]["model.embed_tokens.weight"], llava_files["llm_t"], llava_files["cfg"]
    prompts = [[1, 4, IMG, 9, 10], [3, 5, 6, 8, 11, 12, 13]]  # the text-only one is the longest: one pad is reserved
    px = pixels(2, seed=8)
    x, valid, _ = llava.splice(llava._left_pad(prompts, torch.device("cpu")), px)
    assert valid[1].tolist() == [False] * 4 + [True] * 7 and valid[0].sum() == 4 + 4
    n, text = 5, list(prompts[1])
    want = []
    for _ in range(n):  # plain greedy decoding of the text alone, no image anywhere
        nxt = int(ref_llama_logits(t, c, torch.tensor([text]))[0, -1].argmax())
        want.append(nxt)
        text.append(nxt)
    out = llava.generate(prompts, px, max_new_tokens=n)
    assert out[1] == want and out[0] == greedy_reference(llava, EMB, prompts[0], llava.image_features(px)[0], n)
    f = llava.features(prompts, px)
    close(f[1], ref_llama_logits(t, c, torch.tensor([prompts[1]]), return_hidden=True)[0, -1])
    close(f[0], llava.features(prompts[:1], px[:1])[0])  # the image row is unaffected by its text-only neighbour
