"""Tests for data.py: MiniCoIN determinism/splits/scoring, tokenizer file format, templates and labels, CoIN loading."""
import base64
import hashlib
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
from data import COMPACT, IGNORE_INDEX, IMAGE_TOKEN_ID, LLAMA3, Example  # noqa: E402

ALL_TASKS = data.MINICOIN_TASKS + ("caption",)


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    return data.build_minicoin_tokenizer(str(tmp_path_factory.mktemp("tok") / "tokenizer.model"))


def _img_hash(ex):
    return hashlib.sha256(ex.image.tobytes()).hexdigest()


# ----------------------------------------------------------------------------- MiniCoIN


@pytest.mark.parametrize("task", ALL_TASKS)
def test_minicoin_deterministic(task):
    a, b = data.minicoin_sample(task, "train", 3, seed=1), data.minicoin_sample(task, "train", 3, seed=1)
    assert a.image.tobytes() == b.image.tobytes() and a.turns == b.turns
    assert a.image.size == (data.IMAGE_SIZE, data.IMAGE_SIZE) and a.turns[0][0].count("<image>") == 1
    c = data.minicoin_sample(task, "train", 4, seed=1)
    assert (a.image.tobytes(), a.turns) != (c.image.tobytes(), c.turns)
    d = data.minicoin_sample(task, "train", 3, seed=2)
    assert (a.image.tobytes(), a.turns) != (d.image.tobytes(), d.turns)


def test_minicoin_train_test_disjoint():
    for task in ALL_TASKS:
        train, test = data.minicoin(task, "train"), data.minicoin(task, "test")
        assert len(train) == (data.N_CAPTION if task == "caption" else data.N_TRAIN) and len(test) == data.N_TEST
        assert not {_img_hash(e) for e in train} & {_img_hash(e) for e in test}, task
        assert not {e.meta["scene"] for e in train} & {e.meta["scene"] for e in test}, task
    ocr_train = {e.answer for e in data.minicoin("ocr", "train")}
    assert not ocr_train & {e.answer for e in data.minicoin("ocr", "test")}  # test strings are never trained on


def _wrong(task, ex):
    a = ex.answer
    if task == "sqa":
        return "ABCD"[("ABCD".index(a) + 1) % 4]
    if task in ("cls", "gqa"):
        pool = data.SHAPES if a in data.SHAPES else list(data.COLORS)
        return pool[(list(pool).index(a) + 1) % len(pool)]
    if task == "count":
        return str(int(a) + 1)
    if task == "ground":  # the same box moved right by its own width: no overlap (or clipped to nothing)
        x1, y1, x2, y2 = data.parse_box(a)
        return f"[{x2:.2f},{y1:.2f},{x2 + (x2 - x1):.2f},{y2:.2f}]"
    return a + "X"


@pytest.mark.parametrize("task", ALL_TASKS)
def test_minicoin_answers_score_with_own_metric(task):
    metric = data.TASK_METRIC[task]
    for ex in data.minicoin(task, "test", 40):
        assert data.score(metric, ex.answer, ex.answer) == 1.0, (task, ex.answer)
        assert data.score(metric, _wrong(task, ex), ex.answer) == 0.0, (task, ex.answer)


def test_minicoin_answers_match_scene():
    ex = data.minicoin_sample("ground", "test", 0)
    arr = np.asarray(ex.image)
    x1, y1, x2, y2 = (round(v * data.IMAGE_SIZE) for v in data.parse_box(ex.answer))
    inside = arr[y1:y2, x1:x2].reshape(-1, 3)
    named = ex.turns[0][0].split("box of the ")[1].split()[0]  # "... the red circle."
    assert (inside == data.COLORS[named]).all(-1).any()  # the named colour is drawn inside the box
    for ex in data.minicoin("count", "test", 20):  # count = number of that shape in the scene description
        shape = next(s for s in data.SHAPES if data.PLURAL[s] in ex.turns[0][0])
        assert int(ex.answer) == sum(part.split(",")[0] == shape for part in ex.meta["scene"].split(";"))


def test_unknown_task_and_split():
    with pytest.raises(ValueError, match="known.*sqa"):
        data.minicoin("vqa", "train", 1)
    with pytest.raises(ValueError, match="ScienceQA"):
        data.task_metric("ImageNet-R")
    with pytest.raises(ValueError, match="train, test"):
        data.minicoin("ocr", "val", 1)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_file_roundtrip_and_specials(tok, tmp_path):
    assert tok.n_vocab == data.MINICOIN_VOCAB + 256
    n = data.MINICOIN_VOCAB
    assert tok.encode("<|begin_of_text|><|eot_id|>", allowed_special="all") == [n, n + 9]
    assert data.special_id(tok, "<|finetune_right_pad_id|>") == n + 4
    assert data.special_id(tok, "<|reserved_special_token_246|>") == n + 255
    # save -> load reproduces the ranks exactly
    ranks = {bytes([i]): i for i in range(256)} | {b"ab": 256, b"abc": 257}
    data.save_tokenizer(ranks, tmp_path / "t.model")
    t2 = data.load_tokenizer(tmp_path / "t.model")
    assert t2._mergeable_ranks == ranks and t2.n_vocab == 258 + 256
    assert t2.encode_ordinary("abc") == [257]
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]  # atomic write leaves no temp file


def test_tokenizer_multibyte_and_special_text(tok):
    s = "héllo wörld — 日本語 🙂 <|eot_id|> ok"
    ids = tok.encode_ordinary(s)
    assert tok.decode(ids) == s and max(ids) < data.MINICOIN_VOCAB
    ex = Example(None, [("<image>\nsay <|eot_id|><|begin_of_text|>", "fine <|eot_id|>")])
    ids, labels = data.encode(tok, ex, COMPACT, 100)
    specials = [t for t in ids if t >= data.MINICOIN_VOCAB]
    assert specials == [data.special_id(tok, s) for s in ("<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>")]


def test_tokenizer_malformed_lines(tmp_path):
    good = [f"{base64.b64encode(bytes([i])).decode()} {i}" for i in range(256)]
    for bad, what in [("!!notbase64 256", "malformed"), ("YWI= x", "malformed"), ("YWI= 256 7", "malformed"),
                      ("YWI= 300", "rank 300")]:
        p = tmp_path / "bad.model"
        lines = good[:2] + [bad] + good[2:] if what == "malformed" else good + [bad]
        p.write_text("\n".join(lines) + "\n")
        line = lines.index(bad) + 1
        with pytest.raises(ValueError, match=rf"bad\.model:{line}: .*{what}"):
            data.load_tokenizer(p)
    p.write_text("\n".join(good[:255]) + "\n")
    with pytest.raises(ValueError, match="single-byte"):
        data.load_tokenizer(p)


def test_tokenizer_cache_not_rebuilt(tok, tmp_path, monkeypatch):
    import tiktoken._educational as edu
    path = tmp_path / "tk.model"
    data.save_tokenizer(tok._mergeable_ranks, path)
    monkeypatch.setattr(edu, "bpe_train", lambda *a, **k: pytest.fail("retrained although the file exists"))
    assert data.build_minicoin_tokenizer(str(path))._mergeable_ranks == tok._mergeable_ranks


# ----------------------------------------------------------------------------- templates and labels


def _sp(tok, name):
    return tok.encode_single_token(name)


def test_encode_labels_compact_multiturn(tok):
    enc = tok.encode_ordinary
    ex = Example(None, [("<image>\nWhat is it?", "a red ring"), ("And the count?", "3")])
    bos, sh, eot = _sp(tok, "<|begin_of_text|>"), _sp(tok, "<|start_header_id|>"), _sp(tok, "<|eot_id|>")
    want_ids = ([bos, IMAGE_TOKEN_ID] + enc("\nWhat is it?") + [sh] + enc("a red ring") + [eot]
                + enc("And the count?") + [sh] + enc("3") + [eot])
    want_labels = ([IGNORE_INDEX] * (2 + len(enc("\nWhat is it?")) + 1) + enc("a red ring") + [eot]
                   + [IGNORE_INDEX] * (len(enc("And the count?")) + 1) + enc("3") + [eot])
    ids, labels = data.encode(tok, ex, COMPACT, 64)
    assert ids == want_ids and labels == want_labels
    assert data.encode_prompt(tok, ex, COMPACT) == want_ids[:-len(enc("3")) - 1]
    assert data.stop_ids(tok, COMPACT) == sorted([eot, _sp(tok, "<|end_of_text|>")])


def test_encode_labels_llama3(tok):
    enc = tok.encode_ordinary
    ex = Example(None, [("Look: <image>", "blue")])
    sh, eh, eot = _sp(tok, "<|start_header_id|>"), _sp(tok, "<|end_header_id|>"), _sp(tok, "<|eot_id|>")
    prompt = ([_sp(tok, "<|begin_of_text|>"), sh] + enc("user") + [eh] + enc("\n\n") + enc("Look: ") + [IMAGE_TOKEN_ID]
              + [eot, sh] + enc("assistant") + [eh] + enc("\n\n"))
    ids, labels = data.encode(tok, ex, LLAMA3, 64)
    assert ids == prompt + enc("blue") + [eot]
    assert labels == [IGNORE_INDEX] * len(prompt) + enc("blue") + [eot]


def test_truncation_keeps_answer_and_image(tok):
    enc = tok.encode_ordinary
    words = " ".join(f"w{i}" for i in range(60))
    ex = Example(None, [("<image>\n" + words, "red circle")])
    ids, labels = data.encode(tok, ex, COMPACT, 20)
    assert len(ids) == 20 and ids.count(IMAGE_TOKEN_ID) == 1 and ids[1] == IMAGE_TOKEN_ID
    answer = enc("red circle") + [_sp(tok, "<|eot_id|>")]
    assert ids[-len(answer):] == answer and [t for t in labels if t != IGNORE_INDEX] == answer
    kept = ids[2:-len(answer) - 1]  # the text that survived: the END of the user text (question last)
    assert kept == enc("\n" + words)[-len(kept):]
    assert data.encode(tok, Example(None, [("<image>", "long " * 40)]), COMPACT, 20) is None
    assert len(data.encode_prompt(tok, ex, COMPACT, 12)) == 12


def test_encode_dataset_and_batches(tok):
    exs = data.minicoin("count", "train", 10)
    exs[3] = Example(exs[3].image, [("<image>", "far too long " * 30)], "count")
    ds = data.encode_dataset(exs, tok, COMPACT, data.MAX_LEN, data.IMAGE_SIZE, task_id=2)
    assert ds["skipped"] == 1 and ds["index"].tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert ds["input_ids"].shape == ds["labels"].shape == (9, data.MAX_LEN)
    assert ds["pixel_values"].shape == (9, 3, data.IMAGE_SIZE, data.IMAGE_SIZE) and (ds["task_ids"] == 2).all()
    ids, labels = data.encode(tok, exs[4], COMPACT, data.MAX_LEN)
    row = ds["input_ids"][3].tolist()
    assert row[:len(ids)] == ids and set(row[len(ids):]) == {data.pad_id(tok)}
    assert ds["labels"][3].tolist() == labels + [IGNORE_INDEX] * (data.MAX_LEN - len(labels))
    train = list(data.batches(ds, 4, shuffle=True, seed=0))
    assert [len(b["input_ids"]) for b in train] == [4, 4]  # drop_last: fixed shapes
    assert train[0]["index"].tolist() == list(data.batches(ds, 4, shuffle=True, seed=0))[0]["index"].tolist()
    assert len(set(torch.cat([b["index"] for b in train]).tolist())) == 8
    ev = list(data.batches(ds, 4))
    assert [len(b["index"]) for b in ev] == [4, 4, 1] and torch.equal(torch.cat([b["index"] for b in ev]), ds["index"])
    assert set(ev[0]) == {"input_ids", "labels", "pixel_values", "task_ids", "index"}


# ----------------------------------------------------------------------------- scoring


def test_scorers():
    for pred in ["B", "(B)", "B. red", "B) red", "The answer is B.", "Answer: (B)", "b"]:
        assert data.score("letter", pred, "B") == 1.0, pred
    for pred in ["A", "C. blue", "", "red", "A red circle"]:
        assert data.score("letter", pred, "B") == 0.0, pred
    assert data.score("exact", "  Red. ", "red") == 1.0 and data.score("exact", "reds", "red") == 0.0
    assert data.score("substring", "a golden retriever", "Golden Retriever") == 1.0
    assert data.score("substring", "dog", "hot dog") == 1.0 and data.score("substring", "", "dog") == 0.0
    assert data.score("substring", "cat", "dog") == 0.0
    # VQA soft accuracy: min(#humans who gave the answer / 3, 1)
    humans = ["two"] * 2 + ["2"] * 0 + ["three"] * 8
    assert data.score("vqa", "2", humans) == pytest.approx(2 / 3) and data.score("vqa", "Three.", humans) == 1.0
    assert data.score("vqa", "four", humans) == 0.0 and data.score("vqa", "yes", "Yes") == 1.0
    with pytest.raises(ValueError, match="known"):
        data.score("bleu", "a", "a")


def test_parse_box_and_iou():
    want = [0.1, 0.2, 0.5, 0.6]
    for s in ["[0.1, 0.2, 0.5, 0.6]", "0.1,0.2,0.5,0.6", "(0.1,0.2,0.5,0.6)", "The box is [0.10,0.20,0.50,0.60].",
              "0.1 0.2 0.5 0.6", want]:
        assert data.parse_box(s) == pytest.approx(want), s
    for s in ["[0.1, 0.2, 0.5]", "no box", "[a, b, c, d]", "[nan, 0, 1, 1]"]:
        assert data.parse_box(s) is None, s
    # hand IoU: [0,0,.5,.5] vs [.25,0,.75,.5]: inter .125, union .375 -> 1/3
    assert data.box_iou([0, 0, .5, .5], [.25, 0, .75, .5]) == pytest.approx(1 / 3)
    assert data.score("iou", "[0.1,0.2,0.5,0.6]", "[0.12,0.2,0.5,0.62]") == 1.0
    assert data.score("iou", "[0, 0, .5, .5]", "[.25, 0, .75, .5]") == 0.0
    assert data.score("iou", "[-0.5,0.2,0.5,0.6]", "[0,0.2,0.5,0.6]") == 1.0  # out of range: clipped to the image
    assert data.score("iou", "[0.5,0.6,0.1,0.2]", "[0.1,0.2,0.5,0.6]") == 0.0  # inverted box is invalid
    assert data.score("iou", "[2,3,4,5]", "[0.1,0.2,0.5,0.6]") == 0.0  # clips to an empty box
    assert data.score("iou", "I cannot tell", "[0.1,0.2,0.5,0.6]") == 0.0


# ----------------------------------------------------------------------------- CoIN / LLaVA JSON


def _png(path, color=(255, 0, 0), size=(20, 10)):
    Image.new("RGB", size, color).save(path)


def _dump(path, obj):
    path.write_text(json.dumps(obj, indent=1))
    return str(path)


@pytest.fixture
def coin_dir(tmp_path):
    (tmp_path / "img").mkdir()
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", (0, 0, 255), (10, 20))
    return tmp_path


def _conv(*msgs):
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": m} for i, m in enumerate(msgs)]


def test_coin_load_train_and_test(coin_dir, tok):
    root = str(coin_dir / "img")
    train = _dump(coin_dir / "train.json", [
        {"id": "x1", "image": "a.png", "conversations": _conv("<image>\nWhat color?", "Red")},
        {"id": "x2", "image": "b.png", "conversations": _conv("<image>\nColor?", "Blue", "Shape?", "Rectangle")}])
    exs = data.load_coin_train(train, root, task="GQA")
    assert [e.turns for e in exs] == [[("<image>\nWhat color?", "Red")],
                                      [("<image>\nColor?", "Blue"), ("Shape?", "Rectangle")]]
    assert exs[1].image == os.path.join(root, "b.png") and exs[1].meta["id"] == "x2" and exs.skipped == 0
    ids, labels = data.encode(tok, exs[1], LLAMA3, 128)  # multi-turn: both answers labelled
    eot = _sp(tok, "<|eot_id|>")
    assert [t for t in labels if t != IGNORE_INDEX] == tok.encode_ordinary("Blue") + [eot] + tok.encode_ordinary(
        "Rectangle") + [eot]
    ds = data.encode_dataset(exs, tok, LLAMA3, 128, 16, 0)  # images load from disk and pad to square
    assert ds["pixel_values"].shape == (2, 3, 16, 16)
    test = _dump(coin_dir / "test.json", [
        {"question_id": 7, "image": "a.png", "text": "What color is it?", "answer": "red"},
        {"question_id": 8, "image": "b.png", "text": "How many?", "answers": ["2"] * 4 + ["3"] * 6},
        {"question_id": 9, "image": "a.png", "text": "Box of <image> the cat", "answer_bbox": [0.1, 0.2, 0.5, 0.6]}])
    tst = data.load_coin_test(test, root)
    assert [e.meta["question_id"] for e in tst] == [7, 8, 9]
    assert tst[0].turns == [("<image>\nWhat color is it?", "red")] and tst[0].answers is None
    assert tst[1].answer == "3" and tst[1].answers == ["2"] * 4 + ["3"] * 6
    assert tst[2].turns[0][0] == "Box of <image> the cat" and data.parse_box(tst[2].answer) == [0.1, 0.2, 0.5, 0.6]
    jl = coin_dir / "test.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in json.load(open(test))) + "\n")
    assert [e.turns for e in data.load_coin_test(str(jl), root)] == [e.turns for e in tst]


def test_coin_malformed_json(coin_dir):
    p = coin_dir / "train.json"
    p.write_text('[\n {"id": 1,\n  "image": "a.png"\n  "conversations": []}\n]')
    with pytest.raises(ValueError, match=r"train\.json: malformed JSON at line 4 column 3"):
        data.load_coin_train(str(p), str(coin_dir / "img"))
    q = coin_dir / "q.jsonl"
    q.write_text('{"question_id": 1, "image": "a.png", "text": "x", "answer": "y"}\n{"question_id": 2,,}\n')
    with pytest.raises(ValueError, match=r"q\.jsonl: malformed JSON at line 2 column"):
        data.load_coin_test(str(q), str(coin_dir / "img"))


@pytest.mark.parametrize("rec, msg", [
    ({"id": "r1", "conversations": _conv("<image>\nq", "a")}, r"record 1 \(id 'r1'\): missing 'image'"),
    ({"id": "r1", "image": "a.png"}, r"record 1 \(id 'r1'\): missing 'conversations'"),
    ({"id": "r1", "image": "a.png", "conversations": _conv("q", "a")}, r"record 1 \(id 'r1'\).*exactly one '<image>'"),
    ({"id": "r1", "image": "a.png", "conversations": _conv("<image><image> q", "a")}, r"id 'r1'.*exactly one"),
    ({"id": "r1", "image": "a.png", "conversations": _conv("<image> q", "a", "<image>", "b")}, r"id 'r1'.*exactly one"),
    ({"id": "r1", "image": "a.png", "conversations": _conv("<image> q")}, r"id 'r1'.*pairs"),
    ({"image": "a.png", "conversations": [{"from": "gpt", "value": "<image>"}, {"from": "gpt", "value": "a"}]},
     r"record 1: message 0 should be"),
])
def test_coin_bad_records(coin_dir, rec, msg):
    good = {"id": "ok", "image": "a.png", "conversations": _conv("<image>\nq", "a")}
    path = _dump(coin_dir / "train.json", [good, rec])
    with pytest.raises(ValueError, match=msg):
        data.load_coin_train(path, str(coin_dir / "img"))


def test_coin_bad_test_records(coin_dir):
    root = str(coin_dir / "img")
    with pytest.raises(ValueError, match=r"record 0: missing 'question_id'"):
        data.load_coin_test(_dump(coin_dir / "t.json", [{"image": "a.png", "text": "q", "answer": "a"}]), root)
    with pytest.raises(ValueError, match=r"record 0 \(id 5\): the question holds 2"):
        data.load_coin_test(_dump(coin_dir / "t.json", [{"question_id": 5, "image": "a.png", "text": "<image><image>",
                                                          "answer": "a"}]), root)


def test_coin_bad_images(coin_dir):
    root = coin_dir / "img"
    (root / "text.jpg").write_text("not an image")
    full = (root / "a.png").read_bytes()
    (root / "trunc.png").write_bytes(full[:len(full) // 2])
    recs = [{"id": i, "image": name, "conversations": _conv("<image>\nq", "a")}
            for i, name in enumerate(["a.png", "missing.png", "text.jpg", "b.png", "trunc.png", "missing.png"])]
    path = _dump(coin_dir / "train.json", recs)
    with pytest.raises(ValueError) as err:  # default: fail at load time listing every bad file
        data.load_coin_train(path, str(root))
    msg = str(err.value)
    assert "3 bad image file(s)" in msg and all(os.path.join(str(root), n) in msg
                                                for n in ["missing.png", "text.jpg", "trunc.png"])
    with pytest.warns(UserWarning, match="skipped 4 record"):
        exs = data.load_coin_train(path, str(root), bad_images="skip")
    assert [e.meta["id"] for e in exs] == [0, 3] and exs.skipped == 4
    with pytest.raises(ValueError, match="bad_images"):
        data.load_coin_train(path, str(root), bad_images="ignore")
