"""Tests for data.py: MiniCoIN determinism/splits/scoring, tokenizer file format, templates and labels, CoIN loading."""
import base64
import hashlib
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import data  # noqa: E402
from data import COMPACT, IGNORE_INDEX, IMAGE_TOKEN_ID, LLAMA3, Example  # noqa: E402

ALL_TASKS = data.MINICOIN_TASKS + tuple(data.BASE_SETS)


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
    test_scenes = set()
    for task in data.MINICOIN_TASKS:
        train, test = data.minicoin(task, "train"), data.minicoin(task, "test")
        assert len(train) == data.N_TRAIN and len(test) == data.N_TEST
        assert not {_img_hash(e) for e in train} & {_img_hash(e) for e in test}, task
        assert not {e.meta["scene"] for e in train} & {e.meta["scene"] for e in test}, task
        test_scenes |= {e.meta["scene"] for e in test}
    for task in data.BASE_SETS:  # stage 0 never shows the base a scene of any task's test set
        assert not {data.minicoin_sample(task, "train", i, render=False).meta["scene"] for i in range(2000)} & test_scenes
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


def _pixels_of(img):
    """{colour name: pixel count} of the MiniCoIN colours drawn in an image."""
    arr = np.asarray(img).reshape(-1, 3)
    return {name: int((arr == rgb).all(-1).sum()) for name, rgb in data.COLORS.items()}


def test_minicoin_answers_match_scene():
    """v4's answers read back from the rendered pixels (boxes, colours, counts); shapes, which pixels do not name
    simply, from the scene key the image was drawn from."""
    for i in range(20):
        ex = data.minicoin_sample("ground", "test", i)  # the box is the drawn object's exact pixel extent
        ys, xs = np.nonzero(np.asarray(ex.image).any(-1))
        assert [round(v * data.IMAGE_SIZE) for v in data.parse_box(ex.answer)] == [xs.min(), ys.min(), xs.max() + 1,
                                                                                   ys.max() + 1]
        named = ex.turns[0][0].split(data.GROUND_PROMPT)[1].split()[0]  # "...describes: red circle."
        assert _pixels_of(ex.image)[named] == len(xs)  # the only object, in the named colour
    for ex in data.minicoin("sqa", "test", 20):  # the answer's option line names the one colour drawn
        drawn = [c for c, n in _pixels_of(ex.image).items() if n]
        option = next(line for line in ex.turns[0][0].split("\n") if line.startswith(ex.answer + ". "))
        assert drawn == [option[3:]], (drawn, option)
    for ex in data.minicoin("gqa", "test", 40):  # the large object's colour covers the most pixels
        q, objs = ex.turns[0][0], [part.split(",") for part in ex.meta["scene"].split(";")]
        assert len(objs) == 2 and sorted(int(o[4]) for o in objs)[0] < 10 < 20 <= max(int(o[4]) for o in objs)
        if "color" in q:
            px = _pixels_of(ex.image)
            assert ex.answer == max(px, key=px.get), (q, ex.answer, px)
        else:
            assert ex.answer == max(objs, key=lambda o: int(o[4]))[0]
    for ex in data.minicoin("count", "test", 20):  # count = occupied cells, and every object has the asked shape
        arr = np.asarray(ex.image).any(-1)
        cells = sum(arr[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16].any() for r in range(3) for c in range(3))
        assert int(ex.answer) == cells
        shape = next(s for s in data.SHAPES if data.PLURAL[s] in ex.turns[0][0])
        assert {part.split(",")[0] for part in ex.meta["scene"].split(";")} == {shape}


def test_tasks_use_coin_instruction_suffixes():
    ends = {"sqa": data.SUFFIX_LETTER, "ocr": data.SUFFIX_SHORT, "cls": data.SUFFIX_SHORT, "gqa": data.SUFFIX_SHORT,
            "count": data.SUFFIX_SHORT}
    assert data.SUFFIX_SHORT == "Answer the question using a single word or phrase."
    assert data.SUFFIX_LETTER == "Answer with the option's letter from the given choices directly."
    for task in data.MINICOIN_TASKS:
        for i in range(30):
            user = data.minicoin_sample(task, "train", i, render=False).turns[0][0]
            if task == "ground":
                assert user.startswith("<image>\nPlease provide the bounding box coordinate of the region this "
                                       "sentence describes: ") and user.endswith(".")
            else:
                assert user.split("\n")[-1] == ends[task], (task, user)
    assert data.minicoin_sample("cls", "train", 0, render=False).turns[0][0] == (
        "<image>\nWhat is the object in the image?\nAnswer the question using a single word or phrase.")
    box = data.minicoin_sample("ground", "train", 0, render=False).answer
    assert re.fullmatch(r"\[(0\.\d\d|1\.00), (0\.\d\d|1\.00), (0\.\d\d|1\.00), (0\.\d\d|1\.00)\]", box), box


def test_instruct_mix_covers_answer_tokens_but_not_task_prompts(tok):
    task_lines, task_tokens = set(), set()
    for task in data.MINICOIN_TASKS:
        for i in range(200):
            user, answer = data.minicoin_sample(task, "train", i, render=False).turns[0]
            task_lines |= {line for line in user.split("\n")[1:] if line}  # the question and the suffix
            task_tokens |= set(data.encode(tok, Example(None, [(user, answer)]), COMPACT, 200)[1]) - {IGNORE_INDEX}
    mix_lines, mix_tokens = [], set()
    for i in range(3000):
        ex = data.minicoin_sample("instruct", "train", i, render=False)
        mix_lines += [line for user, _ in ex.turns for line in user.split("\n")]
        mix_tokens |= set(data.encode(tok, ex, COMPACT, 400)[1]) - {IGNORE_INDEX}
    # no task question, suffix or grounding request appears in the mix, not even as part of a line
    assert not [m for m in mix_lines for t in task_lines if t in m or data.GROUND_PROMPT.strip() in m]
    missing = task_tokens - mix_tokens  # every token a task answers with was an output target in stage 0
    assert not missing, [tok.decode([t]) for t in missing]


def test_unseen_tasks_ask_stage_0b_questions_word_for_word_on_test_scenes():
    """An unseen task scores what the base learned: stage 0b's own prompt, on scenes stage 0b never showed, answered
    as stage 0b answers it (position: the named object's grid cell, computed here from the scene's geometry)."""
    mix = set()
    for i in range(3000):
        mix |= {user.removeprefix("<image>\n") for user, _ in data.minicoin_sample("instruct", "train", i, render=False).turns}
    cells = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
    for i in range(40):
        ex = data.minicoin_sample("textcolor", "test", i, render=False)
        assert ex.turns == [("<image>\nWhat color is the text?", ex.turns[0][1])] and ex.turns[0][1] in data.COLORS
        assert "What color is the text?" in mix and data.is_test_scene(ex.meta["scene"])
        ex = data.minicoin_sample("position", "test", i, render=False)
        (user, answer), = ex.turns
        q = user.removeprefix("<image>\n")
        assert q in mix and data.is_test_scene(ex.meta["scene"]), q  # the very prompt, on a test scene
        color, shape = re.fullmatch(r"Where is the (\w+) (\w+)\?", q).groups()
        objs = [o.split(",") for o in ex.meta["scene"].split(";")]
        (x, y, size), = [tuple(map(int, o[2:5])) for o in objs if o[:2] == [shape, color]]
        assert 2 <= len(objs) <= 4 and answer == cells[(y + size // 2) // 16 * 3 + (x + size // 2) // 16]


def test_instruct_mc_mixes_lettered_choices_whose_letter_names_the_text_colour():
    mc, task_lines = 0, set()
    for task in data.MINICOIN_TASKS:
        for i in range(200):
            user = data.minicoin_sample(task, "train", i, render=False).turns[0][0]
            task_lines |= {line for line in user.split("\n")[1:] if line and line[1:3] != ". "}  # not the options
    for k in range(300):
        scene, turns = data._make_instruct(np.random.default_rng(k), mc=True)
        user, letter = turns[0]
        if not user.endswith(data.MC_SUFFIX):
            continue
        mc += 1
        question, *opts, suffix = user.split("\n")
        assert question == "What color is the text?" and 2 <= len(opts) <= 4
        assert [o[:3] for o in opts] == [f"{c}. " for c in "ABCD"[:len(opts)]]
        words = [o[3:] for o in opts]
        assert len(set(words)) == len(words) and set(words) <= set(data.COLORS)
        assert words["ABCD".index(letter)] == scene["text"]["color"]  # the letter of the text's colour, by hand
        assert question not in task_lines and suffix not in task_lines
    assert 15 <= mc <= 50  # 3 draws in 29: about 31 of 300
    assert data.MC_SUFFIX != data.SUFFIX_LETTER
    ex = data.minicoin(data.INSTRUCT_MC, "train", 40)  # the stage-0b set --instruct-mc trains on
    assert any(e.turns[0][0].endswith(data.MC_SUFFIX) for e in ex) and all(e.image is not None for e in ex)
    plain = [e.turns for e in data.minicoin("instruct", "train", 40)]
    assert not any(t[0][0].endswith(data.MC_SUFFIX) for t in plain)  # the default mix has none


def test_induction_batch_labels_exactly_a_repeated_span():
    ids, labels = data.induction_batch(torch.Generator().manual_seed(0), 64, 40)
    assert ids.shape == labels.shape == (64, 34) and int(ids.max()) < 40
    for row, lab in zip(ids.tolist(), labels.tolist()):
        at = [t for t, v in enumerate(lab) if v != -100]
        assert 3 <= len(at) <= 13 and at == list(range(at[0], at[0] + len(at)))  # one contiguous run
        assert all(lab[t] == row[t] for t in at)  # labels are the ids themselves (the model shifts)
        # the run (and the token before it, unlabelled) copies an earlier span 4-18 tokens back
        d = [d for d in range(4, 19) if all(row[t] == row[t - d] for t in [at[0] - 1] + at)]
        assert d, row


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
    assert os.listdir(tmp_path) == ["t.model"]  # the atomic write leaves no temp file


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
    path = tmp_path / "tk.model"
    data.save_tokenizer(tok._mergeable_ranks, path)
    monkeypatch.setattr(data, "bpe_train", lambda *a, **k: pytest.fail("retrained although the file exists"))
    assert data.build_minicoin_tokenizer(str(path))._mergeable_ranks == tok._mergeable_ranks


@pytest.mark.parametrize("text", ["aaabdaaabac aaabdaaabac abab ba ba ba cdcd", None])
def test_bpe_train_makes_tiktokens_reference_merges(text):
    """The word-weighted trainer against tiktoken's educational one (every word, every pass): the same ranks in the
    same order, ties included (the first text has several equally frequent pairs at once: a trainer that takes the last of
    them fails both cases)."""
    from tiktoken._educational import bpe_train as reference
    text = text or data.minicoin_corpus(per_task=2, seed=3)
    n = 256 + (12 if len(text) < 100 else 120)
    ranks = data.bpe_train(text, n)
    assert list(ranks.items()) == list(reference(text, n, data.LLAMA3_PATTERN, visualise=None).items())
    with pytest.raises(ValueError, match="no pair left to merge"):
        data.bpe_train("ab ab", 259)


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


def test_encode_dataset_and_training_batches(tok):
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
    import train  # training batches: the step-th batch is a function of (seed, step) alone
    b0, b1, b2 = (train.batch_at(ds, step, 4, seed=0) for step in range(3))
    assert len(b0["input_ids"]) == len(b1["input_ids"]) == len(b2["input_ids"]) == 4  # fixed shapes
    assert torch.equal(b0["index"], train.batch_at(ds, 0, 4, seed=0)["index"])  # resume-exact
    assert len(set(b0["index"].tolist() + b1["index"].tolist())) == 8  # an epoch (9 // 4 batches) repeats nothing
    assert set(b0) == {"input_ids", "labels", "pixel_values", "task_ids", "index"}


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
    ({"id": "r1", "conversations": _conv("<image>\nq", "a")}, r"record 1 \(id 'r1'\): no 'image' .*holds '<image>'"),
    ({"id": "r1", "image": 3, "conversations": _conv("<image>\nq", "a")}, r"id 'r1'\): 'image' should be str"),
    ({"id": "r1", "image": "a.png"}, r"record 1 \(id 'r1'\): missing 'conversations'"),
    ({"id": "r1", "image": "a.png", "conversations": _conv("q <image>", "a", "<image>", "b")}, r"id 'r1'.*exactly one"),
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


# ----------------------------------------------------------------------------- CoIN as CoIN ships it


def test_coin_files_follow_coins_layout(tmp_path):
    """Instructions_Original/<folder>/: train.json everywhere; val.json for TextVQA, VizWiz, VQAv2; OCR-VQA is OCRVQA."""
    want = {"ScienceQA": "ScienceQA/test.json", "TextVQA": "TextVQA/val.json", "ImageNet": "ImageNet/test.json",
            "GQA": "GQA/test.json", "VizWiz": "VizWiz/val.json", "Grounding": "Grounding/test.json",
            "VQAv2": "VQAv2/val.json", "OCR-VQA": "OCRVQA/test.json"}
    assert list(want) == [t for t, _ in data.COIN_TASKS]
    for task, test in want.items():
        folder = tmp_path / test.split("/")[0]
        folder.mkdir()
        (folder / "train.json").write_text("[]")
        (tmp_path / test).write_text("[]")
        assert data.coin_files(str(tmp_path), task) == (str(folder / "train.json"), str(tmp_path / test))
    (tmp_path / "VQAv2" / "val.json").rename(tmp_path / "VQAv2" / "test.json")
    with pytest.raises(FileNotFoundError, match=r"VQAv2: folder .*VQAv2 lacks val\.json"):
        data.coin_files(str(tmp_path), "VQAv2")
    with pytest.raises(FileNotFoundError, match=r"OCR-VQA: folder .*OCRVQA not found"):
        data.coin_files(str(tmp_path / "nowhere"), "OCR-VQA")


def test_coin_text_only_records_and_image_placement(coin_dir, tok):
    root = str(coin_dir / "img")
    long_q = "Which word comes first in a dictionary? " * 30
    train = _dump(coin_dir / "train.json", [
        {"id": "t1", "conversations": _conv(f"{long_q}\nA. cat\nB. dog", "A")},  # text-only (no image, no <image>)
        {"id": "i1", "image": "a.png", "conversations": _conv("What color?", "Red")}])  # image, no <image>
    exs = data.load_coin_train(train, root, task="ScienceQA")
    assert exs[0].image is None and exs[0].turns[0][0].startswith(long_q)
    assert exs[1].turns == [("<image>\nWhat color?", "Red")]  # put in front of the first turn, as LLaVA does
    ids, labels = data.encode(tok, exs[0], LLAMA3, 40)  # no placeholder, one slot left free for the masked image
    assert IMAGE_TOKEN_ID not in ids and len(ids) == 39
    assert [t for t in labels if t != IGNORE_INDEX] == tok.encode_ordinary("A") + [_sp(tok, "<|eot_id|>")]
    assert IMAGE_TOKEN_ID not in data.encode_prompt(tok, exs[0], LLAMA3, 40)
    ds = data.encode_dataset(exs, tok, LLAMA3, 40, 16, 0)  # text-only and image rows in one static-shape dataset
    assert ds["input_ids"].shape == (2, 40) and ds["pixel_values"][0].eq(0).all() and ds["pixel_values"][1].ne(0).any()
    assert (ds["input_ids"] == IMAGE_TOKEN_ID).sum(1).tolist() == [0, 1]
    test = _dump(coin_dir / "test.json", [{"question_id": "q1", "text": "Pick one.\nA. x\nB. y", "answer": "B"},
                                          {"question_id": 2, "image": "a.png", "text": "Color?", "answer": "A"}])
    tst = data.load_coin_test(test, root, task="ScienceQA")
    assert tst[0].image is None and tst[0].turns == [("Pick one.\nA. x\nB. y", "B")]
    assert tst[1].turns == [("<image>\nColor?", "A")] and [e.meta["question_id"] for e in tst] == ["q1", 2]
    with pytest.raises(ValueError, match=r"record 0 \(id 't1'\): no 'image' .*holds '<image>'"):
        data.load_coin_train(_dump(coin_dir / "bad.json", [{"id": "t1", "conversations": _conv("<image>\nq", "a")}]), root)


def test_coin_test_record_errors_name_file_record_and_field(coin_dir):
    root = str(coin_dir / "img")
    t = lambda recs, **kw: data.load_coin_test(_dump(coin_dir / "t.json", recs), root, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"t\.json: record 1 \(id 'q2'\): no 'answer'"):
        t([{"question_id": "q1", "text": "a", "answer": "b"}, {"question_id": "q2", "image": "a.png", "text": "c"}])
    assert t([{"question_id": 1, "text": "c"}], require_answer=False)[0].answer == ""  # prediction-only
    with pytest.raises(ValueError, match=r"record 0 \(id 4\): 'size' should be the image's \[width, height\]"):
        t([{"question_id": 4, "image": "a.png", "text": "box", "answer_bbox": "[0.1, 0.2, 0.3, 0.4]"}], task="Grounding")
    with pytest.raises(ValueError, match=r"record 0 \(id 4\): 'answer_bbox' should be a box"):
        t([{"question_id": 4, "image": "a.png", "text": "box", "answer_bbox": "[0.1, 0.2]", "size": [4, 3]}])
    with pytest.raises(ValueError, match=r"record 0 \(id 5\): 'answer' should be an option letter"):
        t([{"question_id": 5, "text": "q", "answer": "dog"}], task="ScienceQA")
    g = t([{"question_id": 4, "image": "a.png", "text": "box", "answer_bbox": [0.1234567, 0.2, 0.5, 0.6], "size": [4, 3]}])
    assert g[0].meta["size"] == [4, 3] and data.coin_gold_box(g[0].answer) == [0.1234567, 0.2, 0.5, 0.6]  # full precision
    # TextVQA's 10 human answers come from its own annotation file, keyed by str(question_id)
    ann = coin_dir / "TextVQA_0.5.1_val.json"
    ann.write_text(json.dumps({"data": [{"question_id": 7, "answers": ["a"] * 10}]}))
    rec = {"question_id": 7, "image": "a.png", "text": "q", "answer": "a", "answers": ["b"] * 10}
    assert t([rec], task="TextVQA", annotations=str(ann))[0].answers == ["a"] * 10
    assert t([rec], task="VQAv2")[0].answers is None  # CoIN's other scripts never read 'answers'
    with pytest.raises(ValueError, match=r"record 0 \(id 7\): 'answers' should be TextVQA's 10 human answers, got 9"):
        t([{**rec, "answers": ["b"] * 9}], task="TextVQA")
    with pytest.raises(ValueError, match=r"record 0 \(id 8\): question_id 8 is not in the annotation file .*val\.json"):
        t([{**rec, "question_id": 8}], task="TextVQA", annotations=str(ann))
    ann.write_text(json.dumps({"data": [{"question_id": 7, "answers": ["a"] * 9}]}))
    with pytest.raises(ValueError, match=r"val\.json: record 0 \(id 7\): 'answers' should be 10 strings"):
        t([rec], task="TextVQA", annotations=str(ann))


def test_coin_science_qa_letter_rules():
    """eval_science_qa.py: exact letter, else an "X. " prefix, else the first one-character word upper-cased."""
    cases = {"A": "A", "B. red": "B", "B. ": "B", "B.red": "B", "(C)": "C", "The answer is D.": "D", "Answer: (A)": "A",
             "b": "B", " B": "B", "E": "E", "It's B": "S", "a cat": "A", "F": "F", "": "FAILED", "AB": "FAILED",
             "1": "1"}
    for text, want in cases.items():
        assert data.coin_letter(text) == want, text
    assert data.score("coin-sqa", "It's B", "B") == 0.0 and data.score("coin-sqa", "b", "B") == 1.0
    assert data.score("coin-sqa", "F", "F") == 0.0  # not one of A-E
    # every test question counts: an unanswered one is wrong. A right, S wrong, C right, none wrong, E right: 3/5
    rows = [{"prediction": p, "answer": a} for p, a in zip(["A", "It's B", "(C)", None, "e"], "ABCDE")]
    assert data.coin_accuracy("coin-sqa", rows) == 60.0


def test_coin_textvqa_m4c_normalisation_and_vqa_accuracy():
    cases = {"Two.": "2", "the dog": "dog", "1.5": "1.5", "3,000": "3000", "dont": "don't", "don't": "don't",
             "Man's hat": "man 's hat", "none": "0", "yes!": "yes", "black-and-white": "black and white",
             "t - shirt": "t shirt", "somebody'd": "somebodyd", "A": "", "What?": "what", "a.b.": "ab"}
    for text, want in cases.items():
        assert data.m4c_normalize(text) == want, text
    humans = ["two"] * 2 + ["2"] + ["three"] * 7  # after normalisation: "2" x3, "3" x7
    # an answer given by c of the 10: mean over the 10 leave-one-out sets of min(1, matches / 3)
    assert data.vqa_accuracy("Two.", humans) == pytest.approx(0.9)  # c=3: (3 * 2/3 + 7 * 1) / 10
    assert data.vqa_accuracy("3", humans) == 1.0 and data.vqa_accuracy("4", humans) == 0.0
    assert data.vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)  # c=1: 9 * 1/3 / 10
    assert data.vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)  # c=2: (2 * 1/3 + 8 * 2/3) / 10
    # where the project's lenient scorer said 58.3, CoIN's rule says 70.0 (the TextVQA-shaped set):
    rows = [{"prediction": "dont", "answers": ["don't"] * 3 + ["dont"] + ["no"] * 6},  # m4c: c=4 -> 1.0; lenient 1/3
            {"prediction": "red", "answers": ["red"] + ["blue"] * 9},  # 0.3; lenient 1/3
            {"prediction": "red", "answers": ["red"] * 2 + ["blue"] * 8},  # 0.6; lenient 2/3
            {"prediction": "red", "answers": ["red"] * 3 + ["blue"] * 7}]  # 0.9; lenient 1
    assert data.coin_accuracy("coin-textvqa", rows) == pytest.approx(70.0)
    assert 100 * np.mean([data.score("vqa", r["prediction"], r["answers"]) for r in rows]) == pytest.approx(175 / 3)
    assert data.score("coin-textvqa", "Two", "2") == 1.0  # fallback without the 10 answers: normalised exact match
    with pytest.raises(ValueError, match="10 human answers"):
        data.vqa_accuracy("a", ["a"] * 9)


def test_coin_exact_and_substring_rules():
    s = data.score
    # ImageNet: either way substring, case-sensitive; an empty prediction is inside every reference
    assert [s("coin-imagenet", p, "golden retriever") for p in
            ["a golden retriever", "retriever", "Golden Retriever", "", "dog"]] == [1, 1, 0, 1, 0]
    # ... and the k-th answer line meets the k-th test record: a gap shifts the pairs (fox vs dog): 1/2
    rows = [{"prediction": p, "answer": a} for p, a in zip(["cat", None, "fox"], ["cat", "dog", "fox"])]
    assert data.coin_accuracy("coin-imagenet", rows) == 50.0
    # GQA: prediction.rstrip('.').lower() == reference (the reference is not lower-cased)
    assert [s("coin-gqa", p, "yes") for p in ["Yes.", "yes", "yes..", " yes"]] == [1, 1, 1, 0]
    assert s("coin-gqa", "yes", "Yes") == 0.0
    # VQAv2, VizWiz: upper() on both, nothing stripped; the denominator is the answer lines
    for m in ("coin-vqav2", "coin-vizwiz"):
        assert [s(m, p, "yes") for p in ["YES", "yes.", " yes", "Yes"]] == [1, 0, 0, 1] and s(m, "Two", "2") == 0
        rows = [{"prediction": p, "answer": a} for p, a in [("YES", "yes"), (None, "no"), ("no", "no")]]
        assert data.coin_accuracy(m, rows) == 100.0
    # OCR-VQA: lower() on both; 'Unanswerable' in the prediction is wrong, even when it is the reference
    assert [s("coin-ocrvqa", p, "Harry Potter") for p in ["harry potter", "Harry Potter.", "HARRY POTTER"]] == [1, 0, 1]
    assert s("coin-ocrvqa", "Unanswerable", "Unanswerable") == 0.0 and s("coin-ocrvqa", "unanswerable", "Unanswerable")
    rows = [{"prediction": p, "answer": "a"} for p in ["a", "A", "b", "Unanswerable a"]]
    assert data.coin_accuracy("coin-ocrvqa", rows) == 50.0


def test_coin_grounding_iou_edge_and_box_parse():
    gold, size = "[0.0, 0.0, 0.5, 1.0]", [640, 480]  # area 0.5 (x640 in both sides before the IoU)
    g = lambda p, a=gold: data.score("coin-grounding", p, a, size=size)  # noqa: E731
    assert g("[0.0, 0.0, 0.98, 1.00]") == 1.0  # reads [0, 0, .98, 1.0]: IoU .5 / .98 = 0.510 > 0.5
    assert g("[0.0, 0.0, 1.0, 1.00]") == 0.0  # reads [0, 0, 1, 1]: IoU exactly 0.5, not > 0.5
    assert g("[0.0, 0.0, 0.5, 1.0]") == 1.0  # reads [0, 0, .5, 1.] ("1.0" loses its last character): 1.0
    assert g("0.0, 0.0, 0.5, 1.00") == 1.0  # no brackets: still first/last characters dropped -> [0, 0, .5, 1.0]
    assert g("[0.0, 0.0, 0.5, 0.6]", "[0.0, 0.0, 0.5, 0.6]") == 0.0  # the exact box reads y2 = "0." = 0: IoU 0
    assert g("[0.0, 0.0, 0.5, 1]") == 0.0  # last number "1" dropped entirely: 3 numbers and a blank -> unparsed
    assert g("The box is [0.0, 0.0, 0.5, 1.00]") == 0.0 and g("[0.0, 0.0, 0.5]") == 0.0
    assert g("[0.5, 0.0, 0.0, 1.00]") == 0.0  # inverted: no intersection, union 0 -> IoU 0
    assert data.coin_pred_box("[0.1, 0.2, 0.3, 0.45]") == [0.1, 0.2, 0.3, 0.4]
    assert data.coin_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)  # inter 1, union 4 + 4 - 1
    rows = [{"prediction": p, "answer": gold, "size": size} for p in ["[0.0, 0.0, 0.98, 1.00]", "[0.0, 0.0, 1.0, 1.00]",
                                                                      "[0.0, 0.0, 0.5, 1.0]", "x"]]
    assert data.coin_accuracy("coin-grounding", rows) == 50.0


def test_lenient_scorer_is_minicoin_only():
    assert set(data.TASK_METRIC.values()) <= set(data.LENIENT_METRICS)
    assert {data.task_metric(t) for t, _ in data.COIN_TASKS} == set(data.COIN_METRICS)
    assert not set(data.COIN_METRICS) & set(data.LENIENT_METRICS)
    assert data.score("exact", "Red.", "red") == 1.0 and data.score("coin-vqav2", "Red.", "red") == 0.0
    with pytest.raises(ValueError, match="unknown CoIN metric"):
        data.coin_score("coin-bleu", "a", "a")


def test_show_writes_the_contact_sheet_into_a_new_folder_and_refuses_a_non_image_name(tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "sheet.png"
    data.main(["--show", "--out", str(out)])
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 100
    assert f"wrote {out}" in capsys.readouterr().out and not list(out.parent.glob("*.tmp*"))
    with pytest.raises(SystemExit):
        data.main(["--show", "--out", str(tmp_path / "sheet.txt")])
    assert "sheet.txt: not an image file name" in capsys.readouterr().err
