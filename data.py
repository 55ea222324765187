"""
Data for cmoe: files (the one atomic writer, JSON, safetensors, Hugging Face folders and key tables), LLaVA's image
preprocessing, the tiktoken tokenizer (Llama-3 file format), chat templates with answer-only labels, CoIN / LLaVA
JSON loading, MiniCoIN (a procedurally generated CoIN-like continual benchmark), static-shape datasets, scorers.

    python data.py --show --out minicoin.png     # contact sheet: a few samples of every MiniCoIN task

Shape legend: N examples, B batch, T tokens (max_len), C channels, S image side.
"""
import argparse
import base64
import binascii
import collections
import contextlib
import hashlib
import json
import os
import re
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import tiktoken
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

IMAGE_TOKEN_ID = -200  # LLaVA's placeholder id for "<image>" inside input_ids
IGNORE_INDEX = -100  # label value the loss ignores

# -----------------------------------------------------------------------------
# files: the one atomic writer (every file cmoe writes goes through it), the one JSON reader, safetensors; Hugging Face folders (config.json, shards)


class CheckpointError(ValueError):
    """A checkpoint or config that does not fit what the code expects."""


class MissingKeysError(KeyError, CheckpointError):
    """Required keys/fields are absent (a KeyError, but printed without KeyError's repr quotes)."""

    def __str__(self):
        return str(self.args[0])


@contextlib.contextmanager
def atomic_path(path):
    """The one atomic writer: yields a temp path in the target's folder; renamed over `path` when the block
    finishes, removed when it fails part-way. Readers see the old file or the whole new one, never half of it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_json(path):
    """The one JSON reader: parsed JSON of `path`, or the list of its lines' values for a .jsonl file (blank lines
    skipped); errors name the file and the line/column."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    n = 0
    try:
        with open(path, encoding="utf-8") as f:
            if not path.endswith(".jsonl"):
                return json.load(f)
            rows = []
            for n, line in enumerate(f, 1):
                if line.strip():
                    rows.append(json.loads(line))
            return rows
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: malformed JSON at line {n or e.lineno} column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e})") from e


def write_text(path, text):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def save_json(obj, path):
    write_text(path, json.dumps(obj, indent=1))


def save_safetensors(tensors: dict, path):
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)

def read_hf_config(folder):
    """folder/config.json as a dict."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: model folder not found")
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (a Hugging Face model folder needs a config.json)")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def require(cfg, key, source):
    """cfg[key], or an error naming the config file and the missing field."""
    if key not in cfg or cfg[key] is None:
        raise MissingKeysError(f"{source}: required field '{key}' is missing")
    return cfg[key]


def read_safetensors(path):
    """All tensors of one .safetensors file; errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: safetensors file not found")
    try:  # safe_open memory-maps the file, so tensors are paged in only when copied
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def open_hf_tensors(folder):
    """All tensors of a HF folder: model.safetensors, or the shards of model.safetensors.index.json."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: model folder not found")
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return read_safetensors(single)
    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.isfile(index):
        found = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin", ".pt", ".pth")))
        hint = " (pickle checkpoints are never loaded: convert them to safetensors)" if any(
            not f.endswith(".safetensors") for f in found) else ""
        raise FileNotFoundError(f"{folder}: neither model.safetensors nor model.safetensors.index.json found; "
                                f"weight files present: {found or 'none'}{hint}")
    weight_map = require(read_json(index), "weight_map", index)
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to shard files")
    tensors, where = {}, {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: shard listed in {index} not found")
        for k, t in read_safetensors(path).items():
            if k in tensors:
                raise CheckpointError(f"{index}: tensor '{k}' appears in both {where[k]} and {shard}")
            tensors[k], where[k] = t, shard
    absent = [f"{k} (in {s})" for k, s in weight_map.items() if k not in tensors or where[k] != s]
    if absent:
        raise MissingKeysError(f"{index}: {len(absent)} tensors listed in weight_map are not in their shard: "
                               + ", ".join(absent))
    return tensors


def load_mapped(module, tensors, mapping, skip=(), source="", allow_unmapped=()):
    """Copy tensors[hf_key] into module.state_dict()[mapping[hf_key]] after checking everything first:
    missing keys, unexpected keys (not mapped, not matched by a `skip` regex), shapes, and module
    entries no key maps to (unless matched by an `allow_unmapped` regex). Nothing is copied on error."""
    state = module.state_dict(keep_vars=True)  # keep_vars: the real Parameters, so copy_ writes into the module
    name = type(module).__name__
    problems = []
    bad_targets = sorted(set(v for v in mapping.values() if v not in state))
    if bad_targets:  # a bug in the caller's table, not in the checkpoint
        raise CheckpointError(f"{source}: mapping targets that {name} does not have: {', '.join(bad_targets)}")
    if len(set(mapping.values())) != len(mapping):
        raise CheckpointError(f"{source}: mapping sends two checkpoint keys to the same {name} entry")
    missing = [k for k in mapping if k not in tensors]
    if missing:
        problems.append(f"missing keys ({len(missing)}): " + ", ".join(missing))
    unexpected = [k for k in tensors if k not in mapping and not any(re.search(p, k) for p in skip)]
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    for k, dst in mapping.items():
        if k in tensors and tuple(tensors[k].shape) != tuple(state[dst].shape):
            problems.append(f"{k}: expected {tuple(state[dst].shape)}, found {tuple(tensors[k].shape)}")
    mapped = set(mapping.values())
    unmapped = [k for k in state if k not in mapped and not any(re.search(p, k) for p in allow_unmapped)]
    if unmapped:
        problems.append(f"{name} entries not loaded by any checkpoint key ({len(unmapped)}): " + ", ".join(unmapped))
    if problems:
        cls = MissingKeysError if missing else CheckpointError
        raise cls(f"{source}: cannot load into {name}:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for k, dst in mapping.items():
            state[dst].copy_(tensors[k])  # copy_ casts to the parameter's dtype and device
    return module


# -----------------------------------------------------------------------------
# images: LLaVA's preprocessing (pad to square with the mean colour, bicubic resize, CLIP normalisation)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_image(path):
    """Fully decoded PIL image; a missing, non-image or truncated file raises an error naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()  # decode now: PIL is lazy, and a truncated file only fails here
        return img
    except Exception as e:
        raise ValueError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e


def preprocess(image, size):
    """LLaVA 'pad' preprocessing -> FloatTensor[3, size, size]. `image`: PIL image or a path."""
    if not isinstance(image, Image.Image):
        image = load_image(image)
    img = image.convert("RGB")
    w, h = img.size
    if w != h:  # pad to square with CLIP's mean colour, image centred, so nothing is cropped away
        side = max(w, h)
        square = Image.new("RGB", (side, side), tuple(int(255 * m) for m in CLIP_MEAN))
        square.paste(img, ((side - w) // 2, (side - h) // 2))
        img = square
    img = img.resize((size, size), Image.BICUBIC)
    x_SSC = np.asarray(img, dtype=np.float32) / 255.0
    x_SSC = (x_SSC - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x_SSC.transpose(2, 0, 1)))



# -----------------------------------------------------------------------------
# tokenizer (tiktoken BPE in the Llama-3 tokenizer.model format: one "base64(token) rank" per line)

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_NAMES = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
SPECIAL_NAMES += [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(SPECIAL_NAMES) + 2)]
assert len(SPECIAL_NAMES) == 256
MINICOIN_VOCAB = 512  # BPE ranks incl. the 256 single bytes; tok.n_vocab = 512 + 256 specials


def load_tokenizer(path):
    """tiktoken.Encoding from a Llama-3 tokenizer.model file; the 256 special tokens follow the n ranks."""
    path = os.fspath(path)
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue  # tolerate blank lines (a trailing newline is normal)
            parts = line.split()
            try:
                if len(parts) != 2:
                    raise ValueError(f"expected 2 fields 'base64token rank', found {len(parts)}")
                token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
            except (ValueError, binascii.Error) as e:
                raise ValueError(f"{path}:{lineno}: malformed tokenizer line {line[:60]!r} ({e})") from None
            if rank != len(ranks):  # tiktoken files list ranks 0..n-1 in order; anything else is corrupt
                raise ValueError(f"{path}:{lineno}: rank {rank} out of order (expected {len(ranks)}: ranks are 0..n-1)")
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: token {token!r} repeated (first at rank {ranks[token]})")
            ranks[token] = rank
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:  # byte-level BPE must be able to encode any byte
        raise ValueError(f"{path}: {len(missing)} single-byte tokens missing (e.g. {bytes(missing[:5])!r})")
    n = len(ranks)
    return tiktoken.Encoding(name=f"llama3:{os.path.basename(path)}:{n}", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                             special_tokens={s: n + i for i, s in enumerate(SPECIAL_NAMES)})


def save_tokenizer(ranks, path):
    """Write ranks {bytes: rank} as a Llama-3 tokenizer.model file (atomic: temp file + rename)."""
    path = os.fspath(path)
    lines = [f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    write_text(path, "".join(lines))


def minicoin_corpus(per_task=40, seed=0):
    """MiniCoIN text (prompts and answers of the train split, all tasks + captions) to train the BPE on."""
    texts = []
    for task in MINICOIN_TASKS + ("caption", "instruct"):  # (INSTRUCT_MC: instruct's draws, its words: not again)
        for i in range(per_task):
            for user, asst in minicoin_sample(task, "train", i, seed, render=False).turns:
                texts += [user.replace("<image>", ""), asst]
    return "\n".join(texts)


def minicoin_tokenizer_path(folder, vocab_size=MINICOIN_VOCAB):
    """Cache file of the MiniCoIN BPE, named by a hash of the text it is trained on (never a stale file)."""
    digest = hashlib.sha1(f"{vocab_size}\n{minicoin_corpus()}".encode()).hexdigest()[:10]
    return os.path.join(folder, f"minicoin-tokenizer-{digest}.model")


def bpe_train(text, vocab_size, pattern=LLAMA3_PATTERN):
    """Byte-level BPE ranks {bytes: rank}: the 256 bytes, then the most frequent adjacent pair merged, again and again.
    The same ranks as tiktoken's educational trainer (ties go to the pair met first, scanning the text in order), but
    counted over the distinct pre-split words weighted by how often they occur: MiniCoIN's 7,000 words are 192 distinct
    ones, so 256 merges take milliseconds instead of seconds."""
    import regex  # the pre-split pattern needs \p{L}; tiktoken's own dependency
    counts = collections.Counter(regex.findall(pattern, text))  # keys in order of first appearance
    words, weights = [[bytes([b]) for b in w.encode("utf-8")] for w in counts], list(counts.values())
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size:
        stats = collections.Counter()
        for word, n in zip(words, weights):
            for pair in zip(word, word[1:]):
                stats[pair] += n
        if not stats:
            raise ValueError(f"no pair left to merge after {len(ranks)} ranks (vocab_size={vocab_size})")
        best = max(stats, key=stats.__getitem__)  # the first of the most frequent, in order of first appearance
        merged = best[0] + best[1]
        ranks[merged] = len(ranks)
        for k, word in enumerate(words):  # merge left to right, never overlapping
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            words[k] = out
    return ranks


def build_minicoin_tokenizer(path, vocab_size=MINICOIN_VOCAB):
    """Load the MiniCoIN BPE from `path`, training it first (deterministic) if the file is missing."""
    if not os.path.exists(path):
        try:
            ranks = bpe_train(minicoin_corpus(), vocab_size)
        except ValueError as e:
            raise ValueError(f"MiniCoIN corpus too small for vocab_size={vocab_size} ({e})") from None
        save_tokenizer(ranks, path)
    return load_tokenizer(path)


def special_id(tok, name):
    return tok.encode_single_token(name)


def pad_id(tok):
    return special_id(tok, "<|finetune_right_pad_id|>")  # never produced by text, so ids == pad marks padding


# -----------------------------------------------------------------------------
# examples and chat templates


@dataclass
class Example:
    image: object  # PIL.Image, a path str, or None (text-only, e.g. CoIN's ScienceQA without a picture; or not rendered)
    turns: list  # [(user, assistant), ...]; the first user text holds exactly one "<image>"; none at all: text-only
    task: str = ""
    answers: list = None  # VQA soft-accuracy answer list (10 human answers), else None
    meta: dict = field(default_factory=dict)

    @property
    def answer(self):
        return self.turns[-1][1]


@dataclass(frozen=True)
class ChatTemplate:
    """A chat format in strings with special tokens: begin, then per turn user.format(text) + assistant + answer + end."""
    name: str
    begin: str
    user: str  # contains "{}" where the user text goes
    assistant: str  # what precedes every answer
    end: str  # closes every answer; labelled (so the model learns to stop) and the generation stop token

    def _special(self, tok, s):
        return tok.encode(s, allowed_special="all") if s else []  # template text is trusted, user text never is

    def begin_ids(self, tok):
        return self._special(tok, self.begin)

    def user_parts(self, tok, text):
        """(before, body, after) ids of one user turn; body is the user's text with IMAGE_TOKEN_ID for "<image>"."""
        pre, post = self.user.split("{}")
        body = []
        for k, part in enumerate(text.split("<image>")):
            body += ([IMAGE_TOKEN_ID] if k else []) + tok.encode_ordinary(part)
        return self._special(tok, pre), body, self._special(tok, post) + self._special(tok, self.assistant)

    def answer_ids(self, tok, text):
        return tok.encode_ordinary(text) + self._special(tok, self.end)


LLAMA3 = ChatTemplate("llama3", "<|begin_of_text|>", "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
                      "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")
COMPACT = ChatTemplate("compact", "<|begin_of_text|>", "{}", "<|start_header_id|>", "<|eot_id|>")  # 1 token per role


def _text_only(ex):
    """No "<image>" in any turn and no image: the model masks this example's image slots out."""
    return ex.image is None and not any("<image>" in u for u, _ in ex.turns)


def _check_image_tokens(ex):
    counts = [u.count("<image>") for u, _ in ex.turns]
    if counts and _text_only(ex):
        return
    if not counts or counts[0] != 1 or sum(counts) != 1:
        raise ValueError(f"example {ex.meta}: the first user turn must hold exactly one '<image>' (found {counts}; "
                         f"none at all only in a text-only example, whose image is None)")


def _segments(tok, ex, template, with_final_answer):
    """[ids, kind] pieces of the conversation; kind 'user' may be truncated, 'answer' is labelled, 'fixed' neither."""
    _check_image_tokens(ex)
    segs = [[template.begin_ids(tok), "fixed"]]
    for k, (user, asst) in enumerate(ex.turns):
        pre, body, post = template.user_parts(tok, user)
        segs += [[pre, "fixed"], [body, "user"], [post, "fixed"]]
        if k < len(ex.turns) - 1 or with_final_answer:
            segs.append([template.answer_ids(tok, asst), "answer"])
    return segs


def _truncate(segs, max_len):
    """Drop user text tokens (oldest first, from the start of each user turn, keeping the image token) to fit max_len.
    Returns False if even the template, the image token and the answers alone do not fit."""
    over = sum(len(s) for s, _ in segs) - max_len
    for seg in segs:
        if over <= 0:
            break
        if seg[1] == "user":
            text_pos = [i for i, t in enumerate(seg[0]) if t != IMAGE_TOKEN_ID]
            drop = set(text_pos[:over])
            seg[0] = [t for i, t in enumerate(seg[0]) if i not in drop]
            over -= len(drop)
    return over <= 0


def encode(tok, ex, template, max_len):
    """(ids, labels) of a whole conversation, or None if the answers alone do not fit in max_len.
    labels = ids on every assistant answer (+ its end token), IGNORE_INDEX elsewhere; not shifted (the model shifts).
    max_len counts text tokens; the image placeholder counts as 1. A text-only example (no image, no "<image>") has no
    placeholder but keeps its slot free (max_len - 1 text tokens at most): the model puts its (masked) image slots
    there, so every row of a batch has the same spliced length."""
    segs = _segments(tok, ex, template, with_final_answer=True)
    if not _truncate(segs, max_len - _text_only(ex)):
        return None
    ids, labels = [], []
    for s, kind in segs:
        ids += s
        labels += s if kind == "answer" else [IGNORE_INDEX] * len(s)
    return ids, labels


def encode_prompt(tok, ex, template, max_len=None):
    """ids for generation: the conversation up to where the final answer starts (earlier answers included)."""
    segs = _segments(tok, ex, template, with_final_answer=False)
    if max_len is not None and not _truncate(segs, max_len - _text_only(ex)):  # as encode: one slot kept free
        raise ValueError(f"example {ex.meta}: prompt cannot fit in max_len={max_len} even with its text truncated")
    return [t for s, _ in segs for t in s]


def stop_ids(tok, template):
    return sorted(set(template._special(tok, template.end)) | {special_id(tok, "<|end_of_text|>")})


# -----------------------------------------------------------------------------
# static-shape datasets


def encode_dataset(examples, tok, template, max_len, image_size, task_id):
    """Pre-encode once: input_ids/labels [N,T] right-padded to max_len, pixel_values [N,3,S,S], task_ids [N],
    index [N] (row -> position in `examples`), skipped (int: examples whose answers do not fit). A text-only example
    gets zero pixels and ids without IMAGE_TOKEN_ID (LLaVA.splice masks its image slots out)."""
    rows, skipped = [], 0
    for i, ex in enumerate(examples):
        enc = encode(tok, ex, template, max_len)
        if enc is None:
            skipped += 1
        else:
            rows.append((i, ex, *enc))
    N, pad = len(rows), pad_id(tok)
    input_ids = torch.full((N, max_len), pad, dtype=torch.long)
    labels = torch.full((N, max_len), IGNORE_INDEX, dtype=torch.long)
    pixel_values = torch.zeros(N, 3, image_size, image_size)
    for r, (i, ex, ids, lab) in enumerate(rows):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        labels[r, :len(lab)] = torch.tensor(lab)
        if ex.image is not None:
            pixel_values[r] = preprocess(ex.image, image_size)  # a PIL image or a path
    return dict(input_ids=input_ids, labels=labels, pixel_values=pixel_values,
                task_ids=torch.full((N,), task_id, dtype=torch.long),
                index=torch.tensor([i for i, *_ in rows], dtype=torch.long), skipped=skipped)


# -----------------------------------------------------------------------------
# CoIN / LLaVA JSON, as CoIN ships it (github.com/zackschen/CoIN): Instructions_Original/<Task>/ (or
# Instruction_Type2/<Task>/) with train.json and a test file; image paths relative to CoIN's cl_dataset/ folder.

COIN_TASKS = [("ScienceQA", "coin-sqa"), ("TextVQA", "coin-textvqa"), ("ImageNet", "coin-imagenet"), ("GQA", "coin-gqa"),
              ("VizWiz", "coin-vizwiz"), ("Grounding", "coin-grounding"), ("VQAv2", "coin-vqav2"),
              ("OCR-VQA", "coin-ocrvqa")]  # CoIN's order; metric = CoIN's own eval script's rule (see "scoring")
COIN_FOLDER = {"OCR-VQA": "OCRVQA"}  # task -> its folder in Instructions_Original/ (and in CoIN's results/); else the name
COIN_TEST_FILE = {"TextVQA": "val.json", "VizWiz": "val.json", "VQAv2": "val.json"}  # the others: test.json
COIN_ANNOTATIONS = {"TextVQA": "TextVQA/TextVQA_0.5.1_val.json"}  # scoring files the test records lack, under cl_dataset/


def task_metric(task):
    """Scoring rule of a MiniCoIN or CoIN task; unknown names list the known ones."""
    table = {**TASK_METRIC, **dict(COIN_TASKS)}
    if task not in table:
        raise ValueError(f"unknown task {task!r}; known: MiniCoIN {list(TASK_METRIC)}, CoIN {[n for n, _ in COIN_TASKS]}")
    return table[task]


def coin_folder(task):
    return COIN_FOLDER.get(task, task)


def coin_files(root, task):
    """(train.json, test file) of a CoIN task under `root` (CoIN's Instructions_Original/ or Instruction_Type2/):
    <root>/<folder>/train.json and test.json, or val.json for TextVQA, VizWiz and VQAv2; the OCR-VQA folder is OCRVQA.
    A missing folder or file is an error naming it."""
    task_metric(task)
    folder = os.path.join(root, coin_folder(task))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"CoIN task {task}: folder {folder} not found (the CoIN root should hold CoIN's task "
                                f"folders: {', '.join(coin_folder(t) for t, _ in COIN_TASKS)})")
    paths = (os.path.join(folder, "train.json"), os.path.join(folder, COIN_TEST_FILE.get(task, "test.json")))
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"CoIN task {task}: folder {folder} lacks {' and '.join(missing)} "
                                f"(it holds {sorted(os.listdir(folder))})")
    return paths


class ExampleList(list):
    """A list of Examples that also says how many records were skipped (bad_images='skip')."""
    skipped = 0


def _read_records(path):
    """List of JSON objects from a .json array or a .jsonl file; malformed JSON names file, line and column."""
    recs = read_json(path)
    if not isinstance(recs, list):
        raise ValueError(f"{path}: expected a list of records, got {type(recs).__name__}")
    return recs


def _record(path, i, rec, key):
    name = f"{path}: record {i}" + (f" (id {rec.get(key)!r})" if isinstance(rec, dict) and key in rec else "")
    if not isinstance(rec, dict):
        raise ValueError(f"{name}: expected a JSON object, got {type(rec).__name__}")
    return name


def _require(name, rec, key, kind=str):
    if key not in rec:
        raise ValueError(f"{name}: missing {key!r}")
    if not isinstance(rec[key], kind):
        raise ValueError(f"{name}: {key!r} should be {getattr(kind, '__name__', kind)}, got {type(rec[key]).__name__}")
    return rec[key]


def _image_problem(path, decode=False):
    """None if `path` is a readable image, else why not. Default: PIL's verify (header and structure, no pixel
    decoding: fast on real datasets; it misses a truncated JPEG, which load_image then reports at encode time).
    decode=True decodes every image fully (slow on large sets)."""
    if not os.path.isfile(path):
        return "missing"
    try:
        if decode:
            load_image(path)
        else:
            with Image.open(path) as im:
                im.verify()
    except Exception as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def _check_images(examples, source, bad_images, decode):
    if bad_images not in ("fail", "skip"):
        raise ValueError(f"bad_images must be 'fail' or 'skip', got {bad_images!r}")
    paths = sorted({ex.image for ex in examples if ex.image is not None})  # None: a text-only record
    with ThreadPoolExecutor(8) as pool:  # file I/O bound: threads overlap the disk waits
        bad = {p: why for p, why in zip(paths, pool.map(lambda p: _image_problem(p, decode), paths)) if why}
    out = ExampleList(ex for ex in examples if ex.image is None or ex.image not in bad)
    out.skipped = len(examples) - len(out)
    if bad and bad_images == "fail":
        first = {ex.image: ex.meta for ex in reversed(examples)}  # each path's first record
        where = lambda m: f"record {m.get('index')}" + "".join(  # noqa: E731
            f" ({k} {m[k]!r})" for k in ("id", "question_id") if k in m) + ", field 'image'"
        raise ValueError(f"{source}: {len(bad)} bad image file(s) (pass bad_images='skip' to drop their records):\n"
                         + "\n".join(f"  {p}: {why} (first used by {where(first[p])})" for p, why in bad.items()))
    if bad:
        warnings.warn(f"{source}: skipped {out.skipped} record(s) with {len(bad)} bad image file(s), e.g. "
                      + "; ".join(f"{p}: {why}" for p, why in list(bad.items())[:3]))
    return out


def load_coin_train(json_path, image_root, bad_images="fail", task="", decode=False, n=None):
    """LLaVA conversation records {id, image?, conversations: [{from: human|gpt, value}, ...]} -> Examples.
    A record without 'image' is text-only (LLaVA's ScienceQA converter writes such records): Example.image is None and
    its text must hold no '<image>'. A record with an image but no '<image>' gets "<image>\n" at the front of its first
    turn, where LLaVA puts it. n: only the first n records (before their images are checked)."""
    if task:
        task_metric(task)
    examples = []
    for i, rec in enumerate(_read_records(json_path)[:n]):
        name = _record(json_path, i, rec, "id")
        image = _require(name, rec, "image") if "image" in rec else None
        conv = _require(name, rec, "conversations", list)
        if not conv or len(conv) % 2:
            raise ValueError(f"{name}: 'conversations' must hold human/gpt pairs, found {len(conv)} messages")
        for j, m in enumerate(conv):
            roles = ("human", "user") if j % 2 == 0 else ("gpt", "assistant")
            if not isinstance(m, dict) or m.get("from") not in roles or not isinstance(m.get("value"), str):
                raise ValueError(f"{name}: message {j} should be {{'from': {roles[0]!r}, 'value': <str>}}, got {m!r:.80}")
        turns = [(conv[k]["value"], conv[k + 1]["value"]) for k in range(0, len(conv), 2)]
        counts = [u.count("<image>") for u, _ in turns]
        if image is None and sum(counts):
            raise ValueError(f"{name}: no 'image' (a text-only record) but its text holds '<image>' (per turn: {counts})")
        if image is not None and sum(counts) == 0:
            turns[0] = ("<image>\n" + turns[0][0], turns[0][1])
        elif image is not None and (counts[0] != 1 or sum(counts) != 1):
            raise ValueError(f"{name}: the first human turn must hold exactly one '<image>' (per turn: {counts})")
        examples.append(Example(None if image is None else os.path.join(image_root, image), turns, task, None,
                                {"id": rec.get("id", i), "index": i}))
    return _check_images(examples, json_path, bad_images, decode)


def box_text(box, fmt="{:.2f}"):
    """LLaVA's grounding answer: [x1, y1, x2, y2] with two decimals, normalised to the (square) image. CoIN's
    reference boxes given as numbers keep full precision (fmt "{}"): the scorer reads them."""
    return "[" + ", ".join(fmt.format(float(v)) for v in box) + "]"


def coin_gold_box(text):
    """A Grounding reference box as eval_grounding.py reads 'answer_bbox': brackets removed, split on ',', floats."""
    return [float(v) for v in str(text).replace("[", "").replace("]", "").split(",")]


def load_coin_annotations(path):
    """{str(question_id): answers} from TextVQA's own annotation file (TextVQA_0.5.1_val.json: {"data": [{question_id,
    answers: 10 strings, ...}]}), the answers CoIN's eval_textvqa.py scores against; errors name file and record."""
    d = read_json(path)
    if not isinstance(d, dict) or not isinstance(d.get("data"), list):
        raise ValueError(f"{path}: expected an object with a 'data' list (TextVQA's annotation layout)")
    out = {}
    for i, rec in enumerate(d["data"]):
        name = _record(path, i, rec, "question_id")
        qid = _require(name, rec, "question_id", (str, int))
        answers = _require(name, rec, "answers", list)
        if len(answers) != 10 or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{name}: 'answers' should be 10 strings (m4c's VQA accuracy), got {answers!r:.80}")
        out[str(qid)] = answers  # eval_textvqa.py keys both sides by str(question_id)
    return out


def _test_answer(name, rec, task, answers, require_answer):
    """A CoIN test record's reference: 'answer_bbox' (Grounding; text or numbers) or 'answer', else the most common
    of 'answers'; checked against the task's form (an option letter, a box)."""
    field_ = "answer_bbox" if "answer_bbox" in rec else "answer"
    answer = rec.get(field_)
    if isinstance(answer, list) and field_ == "answer_bbox":  # a box given as numbers
        answer = box_text(answer, "{}")
    if answer is None and answers:
        answer = collections.Counter(answers).most_common(1)[0][0]
    if answer is None:
        if require_answer:
            raise ValueError(f"{name}: no 'answer' (nor 'answer_bbox' / 'answers'); a test record needs its "
                             f"reference answer (or run in prediction-only mode)")
        answer = ""
    if not isinstance(answer, str):
        raise ValueError(f"{name}: '{field_}' should be a string, got {type(answer).__name__}")
    if task == "ScienceQA" and answer and coin_letter(answer) not in SQA_OPTIONS:
        raise ValueError(f"{name}: 'answer' should be an option letter A-E, got {answer!r:.60}")
    if answer and (task == "Grounding" or field_ == "answer_bbox"):
        try:
            box = coin_gold_box(answer)
        except ValueError:
            box = []
        if len(box) != 4:
            raise ValueError(f"{name}: '{field_}' should be a box '[x1, y1, x2, y2]', got {answer!r:.80}")
    return answer

def load_coin_test(json_path, image_root, bad_images="fail", task="", decode=False, require_answer=True,
                   annotations=None, n=None):
    """CoIN question records {question_id, image?, text, answer} (Grounding: answer_bbox and size) -> Examples.
    question_id is kept as the record has it (str or int): CoIN's scripts match answer lines on it. A record with an
    image gets "<image>\n" in front of its text (as CoIN's model_vqa*.py do) unless the text already holds one; a
    record without one is text-only (Example.image None). The reference is 'answer_bbox' or 'answer', else the most
    common of LLaVA-style 'answers'; a record with none is an error unless require_answer=False (prediction-only
    runs: Example.answer ""). Example.answers: the 10 human answers TextVQA is scored on, from `annotations` (the path
    of TextVQA_0.5.1_val.json) or else the record's own 'answers' (kept only for TextVQA when `task` is given: the
    other CoIN scripts never read them). meta: question_id, index, and size ([w, h]) where the record has it.
    n: only the first n records (before their images are checked)."""
    if task:
        task_metric(task)
    ann = load_coin_annotations(annotations) if annotations else None
    examples = []
    for i, rec in enumerate(_read_records(json_path)[:n]):
        name = _record(json_path, i, rec, "question_id")
        qid = _require(name, rec, "question_id", (str, int))
        image = _require(name, rec, "image") if "image" in rec else None
        text = _require(name, rec, "text")
        n_img = text.count("<image>")
        if n_img > 1:
            raise ValueError(f"{name}: the question holds {n_img} '<image>' tokens (at most one allowed)")
        if n_img and image is None:
            raise ValueError(f"{name}: no 'image' (a text-only question) but 'text' holds '<image>'")
        answers = rec.get("answers")
        if answers is not None and not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
            raise ValueError(f"{name}: 'answers' should be a list of strings")
        answer, meta = _test_answer(name, rec, task, answers, require_answer), {"question_id": qid, "index": i}
        if task == "Grounding" or "answer_bbox" in rec:
            size = rec.get("size")
            if size is not None or task == "Grounding":
                if not (isinstance(size, list) and len(size) == 2 and all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in size)):
                    raise ValueError(f"{name}: 'size' should be the image's [width, height], got {size!r:.60}")
                meta["size"] = size
        if ann is not None:
            if str(qid) not in ann:
                raise ValueError(f"{name}: question_id {qid!r} is not in the annotation file {annotations}")
            answers = ann[str(qid)]
        elif task and task != "TextVQA":
            answers = None
        elif task == "TextVQA" and answers and len(answers) != 10:
            raise ValueError(f"{name}: 'answers' should be TextVQA's 10 human answers, got {len(answers)}")
        prompt = text if (n_img or image is None) else "<image>\n" + text
        examples.append(Example(None if image is None else os.path.join(image_root, image), [(prompt, answer)], task,
                                answers or None, meta))
    return _check_images(examples, json_path, bad_images, decode)


# -----------------------------------------------------------------------------
# scoring. Two families, never mixed:
# - CoIN ("coin-*" metrics of COIN_TASKS): exactly what CoIN's own ETrain/Eval/LLaVA/CoIN/eval_*.py compute, quirks
#   included, so a number stands next to a published one. Written here from those scripts' rules (see coin_score).
# - lenient ("letter", "exact", "substring", "iou", "vqa"): the project's normalised scorer, for MiniCoIN only.


def _norm(s):
    s = " ".join(str(s).strip().lower().split())
    return s[:-1].rstrip() if s.endswith(".") else s


def extract_letter(text):
    """Option letter from 'B', '(B)', 'B. red', 'B) red', 'The answer is B.'; None if there is none."""
    t = text.strip()
    m = (re.fullmatch(r"\(?([A-Za-z])\)?\.?", t) or re.match(r"\(?([A-Z])[.):](\s|$)", t)
         or re.search(r"answer(?: is)?\s*:?\s*\(?([A-Z])\b", t, re.I))
    return m.group(1).upper() if m else None


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def parse_box(text):
    """[x1, y1, x2, y2] floats from '[0.1, 0.2, 0.3, 0.4]', '(0.1,0.2,0.3,0.4)', '0.1 0.2 0.3 0.4' or such inside text."""
    if isinstance(text, (list, tuple)):
        vals = list(text)
    else:
        sep = r"\s*[,;\s]\s*"
        m = re.search(rf"[\[(]\s*({_NUM}){sep}({_NUM}){sep}({_NUM}){sep}({_NUM})\s*[\])]", str(text)) \
            or re.search(rf"(?<![\w.])({_NUM}){sep}({_NUM}){sep}({_NUM}){sep}({_NUM})(?![\w])", str(text))
        if not m:
            return None
        vals = m.groups()
    try:
        box = [float(v) for v in vals]
    except (TypeError, ValueError):
        return None
    return box if len(box) == 4 and all(np.isfinite(box)) else None


def box_iou(a, b):
    a, b = [[min(max(v, 0.0), 1.0) for v in box] for box in (a, b)]  # boxes are normalised: clip to the image
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0  # empty or inverted box
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


_NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}


def _vqa_norm(s):
    s = re.sub(r"(?<!\d)[.,](?!\d)|[?!;:\"'()]", " ", str(s).lower())  # punctuation out, but keep 1.5 and 1,000
    return " ".join(_NUMBER_WORDS.get(w, w) for w in s.split() if w not in ("a", "an", "the"))


LENIENT_METRICS = ("letter", "exact", "substring", "iou", "vqa")


def score(metric, prediction, answer, size=None):
    """Score in [0,1] of one prediction: a CoIN metric (COIN_METRICS) scores as CoIN's script does (coin_score; a
    list `answer` is TextVQA's human answers, `size` Grounding's image [w, h]); the others with score_lenient."""
    if metric in COIN_METRICS:
        listed = isinstance(answer, (list, tuple)) and metric == "coin-textvqa"
        return coin_score(metric, prediction, None if listed else answer, answers=answer if listed else None, size=size)
    return score_lenient(metric, prediction, answer)


def score_lenient(metric, prediction, answer):
    """MiniCoIN's lenient normalised scorer, in [0,1]. answer: the reference string, or a list (VQA: the human answers,
    min(#matches/3, 1); other metrics: best over the list). VQA with a single reference string is a normalised exact
    match. Not CoIN's rules: CoIN tasks are scored with coin_score."""
    answers = list(answer) if isinstance(answer, (list, tuple)) else [answer]
    if metric == "vqa":
        p, refs = _vqa_norm(prediction), [_vqa_norm(a) for a in answers]
        return float(refs.count(p) >= 1) if len(refs) == 1 else min(refs.count(p) / 3.0, 1.0)
    if metric not in LENIENT_METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(LENIENT_METRICS)} (MiniCoIN), "
                         f"{', '.join(COIN_METRICS)} (CoIN)")
    return max(_score_one(metric, str(prediction), a) for a in answers)


def _score_one(metric, pred, ans):
    if metric == "letter":
        p = extract_letter(pred)
        return float(p is not None and p == extract_letter(ans))
    if metric == "exact":
        return float(_norm(pred) == _norm(ans))
    if metric == "substring":
        p, a = _norm(pred), _norm(ans)
        return float(bool(p) and bool(a) and (p in a or a in p))
    p, a = parse_box(pred), parse_box(ans)
    return float(p is not None and a is not None and box_iou(p, a) > 0.5)


# CoIN's rules, script by script. Every "quirk" line is CoIN's own behaviour, reproduced on purpose.

COIN_METRICS = {m: t for t, m in COIN_TASKS}  # metric -> task
COIN_RULES = {
    "coin-sqa": "eval_science_qa.py: the parsed option letter equals the reference letter; every test question "
                "counts, an unanswered one is wrong",
    "coin-textvqa": "eval_textvqa.py + m4c_evaluator.py: VQA accuracy (leave-one-out min(1, matches/3) averaged over "
                    "the 10 human answers) after m4c's answer normalisation",
    "coin-imagenet": "eval_ImagetNet.py: reference in prediction or prediction in reference (case-sensitive); answer "
                     "lines paired with test records by position",
    "coin-gqa": "convert_gqa_for_eval.py + eval_gqa.py: prediction.rstrip('.').lower() equals the reference",
    "coin-vizwiz": "eval_vizwiz.py: case-insensitive exact match (upper() on both)",
    "coin-vqav2": "eval_vqav2.py: case-insensitive exact match (upper() on both)",
    "coin-ocrvqa": "eval_ocrvqa.py: lower-case exact match; a prediction holding 'Unanswerable' is wrong",
    "coin-grounding": "eval_grounding.py: IoU > 0.5 after its own parse of the predicted box text, boxes scaled by "
                      "max(size)",
}
TEXTVQA_FALLBACK = ("FALLBACK, not CoIN's number: m4c-normalised exact match against each record's single 'answer' (CoIN "
                    "scores TextVQA over the 10 human answers of cl_dataset/TextVQA/TextVQA_0.5.1_val.json: pass "
                    "--coin-annotations DIR)")


def coin_rule(metric, has_answers=True):
    """One line naming the rule `metric` scores with; TextVQA without its 10 answers per question says it fell back."""
    if metric == "coin-textvqa" and not has_answers:
        return TEXTVQA_FALLBACK
    return COIN_RULES[metric]


SQA_OPTIONS = ("A", "B", "C", "D", "E")  # eval_science_qa.py's --options


def coin_letter(text):
    """ScienceQA's answer parse (eval_science_qa.py), in order: the text if it is exactly one option letter A-E; its
    first character if that is an option letter followed by ". "; the first one-character word (one word character
    between word boundaries), upper-cased; else "FAILED". No stripping.
    Quirk: a lone lower-case letter or the article "a" reads as an option ("a cat" -> "A").
    Quirk: "It's B" -> "S" (the s after the apostrophe is a one-character word).
    Quirk: "(F)" -> "F", not an option: wrong."""
    t = str(text)
    if t in SQA_OPTIONS:
        return t
    if len(t) >= 3 and t[0] in SQA_OPTIONS and t[1:3] == ". ":
        return t[0]
    m = re.search(r"\b\w\b", t)
    return m.group(0).upper() if m else "FAILED"


# m4c_evaluator.py's EvalAIAnswerProcessor (the VQA answer normalisation), as data and rules:
# Contractions: each listed form is the expansion of its spellings with one apostrophe dropped (all dropped when it
# has one; any single one when it has several: "couldn'tve", "couldnt've", never "couldntve").
# Quirk: "somebody'd" maps the other way, to "somebodyd".
# Quirk: its capitalised keys (Im, Ive, Id've, I'dve) never match the lower-cased text, so they are left out here.
_M4C_CONTRACTED = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's isn't it'd it'd've it'll ma'am mightn't mightn't've might've mustn't must've "
    "needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've shouldn't shouldn't've somebody'd've "
    "somebody'll somebody's someone'd someone'd've someone'll someone's something'd something'd've something'll "
    "that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who's who've why'll "
    "why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're "
    "you've").split()


def _spellings(c):
    cuts = [i for i, ch in enumerate(c) if ch == "'"]
    return [c.replace("'", "")] if len(cuts) == 1 else [c[:i] + c[i + 1:] for i in cuts]


M4C_CONTRACTIONS = {k: c for c in _M4C_CONTRACTED for k in _spellings(c)}
M4C_CONTRACTIONS["somebody'd"] = "somebodyd"
M4C_NUMBERS = {**_NUMBER_WORDS, "none": "0"}
M4C_PUNCT = ';/[]"{}()=+\\_-><@`,?!'


def m4c_normalize(answer):
    """m4c's answer normalisation: lower-case; drop ',' and '?'; "'s" -> " 's"; newlines and tabs to spaces; strip; each
    of M4C_PUNCT deleted where the text has it next to a space, else replaced by a space; '.' not before a digit
    deleted; number words zero..ten and "none" -> digits; articles a/an/the dropped; contractions expanded.
    Quirk: its digit,digit comma test never fires (commas are already gone), so "3,000" -> "3000".
    Quirk: at most 32 periods are deleted (re.UNICODE is passed where sub() takes its count).
    Quirk: "none" -> "0"."""
    s = str(answer).lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    s = s.replace("\n", " ").replace("\t", " ").strip()
    out = s
    for p in M4C_PUNCT:  # the test looks at the text before any replacement
        out = out.replace(p, "" if (p + " " in s or " " + p in s) else " ")
    out = re.sub(r"\.(?!\d)", "", out, count=32)
    words = [M4C_NUMBERS.get(w, w) for w in out.split()]
    return " ".join(M4C_CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))


def vqa_accuracy(prediction, answers):
    """m4c's TextVQA accuracy of one prediction against the 10 human answers (both normalised): for each of the 10,
    min(1, matches among the other 9 / 3), averaged. By hand: an answer given by c of the 10 scores
    (c * min(1, (c-1)/3) + (10-c) * min(1, c/3)) / 10, i.e. 0.3, 0.6, 0.9, 1.0 for c = 1, 2, 3, >= 4."""
    if len(answers) != 10:
        raise ValueError(f"TextVQA accuracy needs the 10 human answers, got {len(answers)}")
    p = m4c_normalize(prediction)
    gts = [m4c_normalize(a) for a in answers]
    c = gts.count(p)
    return sum(min(1, float(c - (g == p)) / 3) for g in gts) / len(gts) if c else 0.0


def coin_pred_box(text):
    """A predicted box as eval_grounding.py reads it: '[' and ']' removed, then split on ',' and float() each part;
    None (scored wrong) unless that gives 4 numbers.
    Quirk: after removing the brackets it also drops the first and last characters, so "[0.1, 0.2, 0.3, 0.45]" reads
    [0.1, 0.2, 0.3, 0.4] and "[0.1, 0.2, 0.3, 0.4]" reads [0.1, 0.2, 0.3, 0.0]."""
    try:
        box = [float(v) for v in str(text).replace("[", "").replace("]", "")[1:-1].split(",")]
    except ValueError:
        return None
    return box if len(box) == 4 else None


def coin_iou(a, b):
    """eval_grounding.py's IoU of two [x1, y1, x2, y2] boxes.
    Quirk: no clipping and no check of x1 < x2: an inverted box has a negative area; a union <= 0 gives 0."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0


def coin_score(metric, prediction, answer, answers=None, size=None):
    """One answer line scored by CoIN's rule for `metric`, in [0,1]; prediction None = no answer line (0).
    answer: the test record's reference; answers: TextVQA's 10 human answers (without them: TEXTVQA_FALLBACK);
    size: Grounding's image [w, h] (boxes are scaled by max(size) before the IoU, as CoIN does)."""
    if metric not in COIN_METRICS:
        raise ValueError(f"unknown CoIN metric {metric!r}; known: {', '.join(COIN_METRICS)}")
    if prediction is None:
        return 0.0
    p, a = str(prediction), answer
    if metric == "coin-sqa":
        gold = coin_letter(a)  # the reference read with the same parse (CoIN reads it from problems.json: a letter)
        return float(gold in SQA_OPTIONS and coin_letter(p) == gold)
    if metric == "coin-textvqa":
        return vqa_accuracy(p, answers) if answers else float(m4c_normalize(p) == m4c_normalize(a))
    if metric == "coin-imagenet":  # Quirk: an empty prediction is in every reference: right
        return float(a in p or p in a)
    if metric == "coin-gqa":  # the reference is not lower-cased (GQA's answers are)
        return float(p.rstrip(".").lower() == a)
    if metric in ("coin-vizwiz", "coin-vqav2"):  # no strip: " yes" != "yes"
        return float(p.upper() == a.upper())
    if metric == "coin-ocrvqa":  # Quirk: 'Unanswerable' (case-sensitive) anywhere in the prediction is wrong
        return float("Unanswerable" not in p and p.lower() == a.lower())
    box = coin_pred_box(p)
    if box is None:
        return 0.0
    s = max(size) if size else 1  # without a size: unscaled (IoU is scale-free up to float rounding)
    return float(coin_iou([v * s for v in box], [v * s for v in coin_gold_box(a)]) > 0.5)


def coin_accuracy(metric, rows):
    """Percent of one task's test questions (rows in test order: 'prediction' (None: no answer line), 'answer',
    optional 'answers' and 'size'), aggregated as CoIN's script does; None when there is nothing to divide by.
    Quirk: ScienceQA divides by every test question; the other scripts divide by the answer lines.
    Quirk: ImageNet pairs the k-th answer line with the k-th test record, whatever the question_ids."""
    answered = [r for r in rows if r.get("prediction") is not None]
    if metric == "coin-sqa":
        correct = sum(coin_score(metric, r.get("prediction"), r["answer"]) for r in rows)
        return correct / len(rows) * 100 if rows else None
    if not answered:
        return None
    if metric == "coin-imagenet":
        golds = [r["answer"] for r in rows]
        right = sum(coin_score(metric, r["prediction"], g) for r, g in zip(answered, golds))
        return 100. * right / len(answered)
    sc = [coin_score(metric, r["prediction"], r.get("answer"), r.get("answers"), r.get("size")) for r in answered]
    if metric == "coin-textvqa":
        return 100. * (sum(sc) / len(sc))
    if metric == "coin-gqa":
        return float(sum(sc)) / len(sc) * 100
    return 100. * sum(sc) / len(sc)


# -----------------------------------------------------------------------------
# MiniCoIN: procedurally generated scenes on a 3x3 grid of 16 px cells (2x2 ViT patches each)
# v5 (MINICOIN_VERSION): v4's tasks and stage 0; the unseen tasks ask stage 0b's own questions. Since v4 no task
# asks to find an object by its colour or shape among others. v3's did, and the tiny 4-layer base never learned to
# search an image within the run's budget (docs/minicoin.md):
# sqa and cls ask about the one object, gqa about the larger of two, count counts every object, ground boxes the
# only one. Each task keeps its CoIN kind, prompt form, suffix and answer form.

MINICOIN_TASKS = ("sqa", "ocr", "cls", "gqa", "count", "ground")
# tasks outside the default sequence, for --tasks: pattern asks what the stage-0 tower never saw (FILLS), so a frozen
# tower may not separate it and experts in the tower (train.py --experts-in vision|both) have something to learn
EXTRA_TASKS = ("pattern",)
INSTRUCT_MC = "instruct-mc"  # stage 0b's default mix: "instruct" with lettered multiple choice (_make_instruct)
TASK_METRIC = {"sqa": "letter", "ocr": "exact", "cls": "substring", "gqa": "exact", "count": "exact", "ground": "iou",
               "caption": "exact", "instruct": "exact", INSTRUCT_MC: "exact", "textcolor": "exact", "position": "exact",
               "pattern": "exact"}
# scored after every stage, never trained: how much of the base's own ability a method keeps, so each asks one of
# stage 0b's questions word for word, on test scenes (asked in another form, a base's zero-shot score measured its
# guess at the form: 0-78 % across seeds, against 100 % for its own question). textcolor: near the trained tasks
# (ocr's text scenes, a colour question as sqa's and gqa's); position: another family, the scenes of 2-4 distinct
# objects no trained task shows, asked where one of them is
UNSEEN_TASKS = ("textcolor", "position")
IMAGE_SIZE = 48
MAX_LEN = 48  # COMPACT template: longest MiniCoIN sequence is 44 tokens (a 7-object caption); tasks need <= 33
MINICOIN_VERSION = 5  # bump when scenes, prompts or answers change: cached tiny bases are keyed by it
N_TRAIN, N_TEST = 1000, 100  # default sizes per task
BASE_SETS = {"caption": 4000, "instruct": 8000, INSTRUCT_MC: 8000}  # the tiny base's stage-0 sets
TEST_EVERY = 10  # a scene is test-only iff crc32(scene key) % TEST_EVERY == 0: splits can never share a scene


def is_test_scene(key):
    return zlib.crc32(key.encode()) % TEST_EVERY == 0
COLORS = {"red": (230, 45, 45), "green": (40, 190, 70), "blue": (50, 100, 255), "yellow": (240, 215, 40),
          "white": (235, 235, 235)}
SHAPES = ("circle", "square", "triangle", "cross", "ring")
# the pattern task's fills of a filled shape (not the ring), 2 px structure at a 4 px period: striped (horizontal or
# vertical bands), checkered (2 px checks), dotted (a 2 px dot per 4 px cell); all four at every size the task draws.
# The fill's off pixels keep FILL_OFF of the colour: a low-contrast texture on a whole silhouette (with FILL_OFF = 0,
# off pixels black, decoder experts on the frozen tower reached 97 % plasticity: nothing for the tower to learn).
# Stage 0 draws solid shapes only and never names a fill (tests/test_vision_experts.py checks its texts)
FILLS = ("solid", "striped", "checkered", "dotted")
FILL_OFF = 0.5
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses", "ring": "rings"}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
GLYPHS = {  # 5x7 bitmap letters drawn at 2x (10x14 px): large and unambiguous for patch-8 ViTs, no font files needed
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#")}
LETTERS = "".join(GLYPHS)
BACKGROUND = (0, 0, 0)


def _in_cell(rng, cell, s):
    """Top-left corner of an s px object at a random place inside a grid cell, >= 1 px from its edges."""
    return (cell % 3) * 16 + int(rng.integers(1, 16 - s)), (cell // 3) * 16 + int(rng.integers(1, 16 - s))


def _obj_scene(rng, n, unique, size=(10, 13)):
    """n objects in distinct grid cells; unique=True: distinct shapes and colours (so each is nameable)."""
    cells = rng.choice(9, n, replace=False)
    shapes = rng.choice(len(SHAPES), n, replace=not unique)
    colors = rng.choice(len(COLORS), n, replace=not unique)
    objs = []
    for cell, s_i, c_i in zip(cells, shapes, colors):
        s = int(rng.integers(*size))  # side in px (default 10..12) inside a 16 px cell, >= 1 px margin
        x, y = _in_cell(rng, cell, s)
        objs.append(dict(shape=SHAPES[s_i], color=list(COLORS)[c_i], x=x, y=y, s=s, cell=int(cell)))
    return dict(objs=sorted(objs, key=lambda o: o["cell"]), text=None)


def _single_scene(rng):
    s = int(rng.integers(20, 37))
    x, y = (int(v) for v in rng.integers(2, IMAGE_SIZE - s - 1, size=2))
    cell = min((y + s // 2) // 16, 2) * 3 + min((x + s // 2) // 16, 2)
    return dict(objs=[dict(shape=SHAPES[rng.integers(5)], color=list(COLORS)[rng.integers(5)], x=x, y=y, s=s,
                           cell=int(cell))], text=None)


def _text_scene(rng):
    n = int(rng.integers(2, 4))
    text = "".join(rng.choice(list(LETTERS), n))
    # one letter per 16 px cell (2x2 ViT patches), as shapes sit in cells: off-grid text (12 px pitch at any x) left
    # the tiny tower unable to read (OCR plasticity 0 % even with the whole LLM trained; on the grid, 96 %)
    return dict(objs=[], text=dict(text=text, color=list(COLORS)[rng.integers(5)],
                                   x=16 * int(rng.integers(0, 4 - n)) + 3, y=16 * int(rng.integers(0, 3)) + 1))


def _count_scene(rng):
    """1-6 objects of one shape in distinct cells, colours free: "How many circles" counts every object, no search."""
    scene = _obj_scene(rng, int(rng.integers(1, 7)), unique=False)
    shape = SHAPES[rng.integers(len(SHAPES))]
    for o in scene["objs"]:
        o["shape"] = shape
    return scene


def _pair_scene(rng):
    """A large object (as in _single_scene) and a small one (7-9 px) in a corner cell, 1 px clear of it."""
    while True:
        big = _single_scene(rng)["objs"][0]
        cell, s = int(rng.choice([0, 2, 6, 8])), int(rng.integers(7, 10))
        x, y = _in_cell(rng, cell, s)
        if (x + s < big["x"] or x > big["x"] + big["s"] or y + s < big["y"] or y > big["y"] + big["s"]):
            break
    small = dict(shape=SHAPES[rng.integers(5)], color=list(COLORS)[rng.integers(5)], x=x, y=y, s=s, cell=cell)
    return dict(objs=sorted([big, small], key=lambda o: o["cell"]), text=None)


def _scene_key(scene):
    """What makes two images the same scene; OCR: the string alone, so a test string is never seen in training."""
    if scene["text"]:
        return "text:" + scene["text"]["text"]
    return ";".join(f"{o['shape']},{o['color']},{o['x']},{o['y']},{o['s']}" + (f",{o['fill']}" if "fill" in o else "")
                    for o in scene["objs"])


def _fill_scene(rng):
    """The pattern task's scene: one large filled shape (as _single_scene, no ring) with a fill from FILLS."""
    scene = _single_scene(rng)
    o = scene["objs"][0]
    o["shape"] = SHAPES[rng.integers(4)]  # (the ring is an outline: nothing to fill)
    o["fill"] = FILLS[rng.integers(len(FILLS))]
    if o["fill"] == "striped":
        o["fill"] += "-" + "hv"[rng.integers(2)]  # the band direction: the answer is "striped" either way
    return scene


def fill_mask(fill, s):
    """[s, s] bool: which pixels of an s px object's box keep its colour under `fill` (FILLS; striped-h / striped-v)."""
    yy, xx = np.mgrid[0:s, 0:s]
    if fill == "solid":
        return np.ones((s, s), bool)
    if fill == "striped-h":
        return (yy // 2) % 2 == 0
    if fill == "striped-v":
        return (xx // 2) % 2 == 0
    if fill == "checkered":
        return ((yy // 2) + (xx // 2)) % 2 == 0
    if fill == "dotted":
        return ((yy % 4) < 2) & ((xx % 4) < 2) & ((yy // 4 + xx // 4) % 2 == 0)
    raise ValueError(f"unknown fill {fill!r}; known: solid, striped-h, striped-v, checkered, dotted")


def draw_scene(scene):
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in scene["objs"]:
        x, y, s, c = o["x"], o["y"], o["s"], COLORS[o["color"]]
        x1, y1 = x + s - 1, y + s - 1  # PIL boxes are inclusive
        if o["shape"] == "circle":
            d.ellipse([x, y, x1, y1], fill=c)
        elif o["shape"] == "square":
            d.rectangle([x, y, x1, y1], fill=c)
        elif o["shape"] == "triangle":
            d.polygon([(x + (s - 1) / 2, y), (x1, y1), (x, y1)], fill=c)
        elif o["shape"] == "cross":
            t = s // 3
            d.rectangle([x + t, y, x1 - t, y1], fill=c)
            d.rectangle([x, y + t, x1, y1 - t], fill=c)
        else:  # ring
            d.ellipse([x, y, x1, y1], outline=c, width=max(2, s // 5))
    for o in scene["objs"]:  # a fill keeps the shape's colour where its mask is on, FILL_OFF of it elsewhere
        if o.get("fill", "solid") != "solid":
            x, y, s = o["x"], o["y"], o["s"]
            box = np.asarray(img)[y:y + s, x:x + s].copy()
            off = ~fill_mask(o["fill"], s) & box.any(-1)  # (the shape's pixels only: the background stays)
            box[off] = np.round(box[off] * FILL_OFF).astype(np.uint8)
            img.paste(Image.fromarray(box), (x, y))
    if scene["text"]:
        t = scene["text"]
        for k, ch in enumerate(t["text"]):
            for r, row in enumerate(GLYPHS[ch]):
                for c, bit in enumerate(row):
                    if bit == "#":
                        px, py = t["x"] + k * 16 + 2 * c, t["y"] + 2 * r
                        d.rectangle([px, py, px + 1, py + 1], fill=COLORS[t["color"]])
    return img


def _caption(scene):
    if scene["text"]:
        return f'{scene["text"]["color"]} text "{scene["text"]["text"]}".'
    objs = scene["objs"]
    parts = [f"{'large ' if o['s'] > 16 else ''}{o['color']} {o['shape']} {POSITIONS[o['cell']]}" for o in objs]
    return f"{len(objs)} shape{'s' if len(objs) > 1 else ''}: " + ", ".join(parts) + "."


# CoIN's own instruction suffixes: the VQA-like tasks share one, as TextVQA / GQA / VQAv2 do in CoIN, so the
# locator meets CoIN's hard case (same suffix, different task)
SUFFIX_LETTER = "Answer with the option's letter from the given choices directly."
SUFFIX_SHORT = "Answer the question using a single word or phrase."
GROUND_PROMPT = "Please provide the bounding box coordinate of the region this sentence describes: "


def lettered(rng, right, pool, question, suffix):
    """(prompt, letter): the right answer among 1-3 others from pool, in a random order, one option per line."""
    opts = [right] + list(rng.choice([p for p in pool if p != right], int(rng.integers(1, 4)), replace=False))
    opts = [opts[i] for i in rng.permutation(len(opts))]
    options = "\n".join(f"{'ABCD'[i]}. {p}" for i, p in enumerate(opts))
    return f"{question}\n{options}\n{suffix}", "ABCD"[opts.index(right)]


def _task_sample(task, rng):
    """(scene, user text, answer) for one draw of a continual task."""
    if task == "sqa":  # the only object's colour among 2-4 lettered options
        scene = _single_scene(rng)
        prompt, letter = lettered(rng, scene["objs"][0]["color"], list(COLORS), "What color is the object?",
                                  SUFFIX_LETTER)
        return scene, "<image>\n" + prompt, letter
    if task == "ocr":
        scene = _text_scene(rng)
        return scene, f"<image>\nWhat is written in the image?\n{SUFFIX_SHORT}", scene["text"]["text"]
    if task == "cls":
        scene = _single_scene(rng)
        return scene, f"<image>\nWhat is the object in the image?\n{SUFFIX_SHORT}", scene["objs"][0]["shape"]
    if task == "gqa":  # an attribute of the larger of two objects
        scene = _pair_scene(rng)
        o = max(scene["objs"], key=lambda o: o["s"])
        attr = "color" if rng.random() < 0.5 else "shape"
        return scene, f"<image>\nWhat {attr} is the large object?\n{SUFFIX_SHORT}", o[attr]
    if task == "count":
        scene = _count_scene(rng)
        shape = scene["objs"][0]["shape"]
        return scene, f"<image>\nHow many {PLURAL[shape]} are there?\n{SUFFIX_SHORT}", str(len(scene["objs"]))
    if task == "ground":  # the only object, nearly filling its cell: a box from the right cell has IoU > 0.5
        scene = _obj_scene(rng, 1, unique=True, size=(13, 15))
        o = scene["objs"][0]
        box = [v / IMAGE_SIZE for v in (o["x"], o["y"], o["x"] + o["s"], o["y"] + o["s"])]
        return scene, f"<image>\n{GROUND_PROMPT}{o['color']} {o['shape']}.", box_text(box)
    if task == "textcolor":  # unseen: stage 0b's own question (on test scenes), as the base learned it
        scene = _text_scene(rng)
        return scene, "<image>\n" + _instruct_turn("text_color", rng, scene)[0], scene["text"]["color"]
    if task == "position":  # unseen: stage 0b's "where" on its multi-object scenes, as the base learned it
        scene = _obj_scene(rng, int(rng.integers(2, 5)), unique=True)
        question, answer = _instruct_turn("where", rng, scene)
        return scene, "<image>\n" + question, answer
    if task == "pattern":  # the fill of the one object (FILLS), a concept stage 0 never shows
        scene = _fill_scene(rng)
        return (scene, f"<image>\nWhat is the fill pattern of the object?\n{SUFFIX_SHORT}",
                scene["objs"][0]["fill"].split("-")[0])
    if task == "caption":  # stage 0, part 1: every kind of scene the tasks use, described in full
        scene = _any_scene(rng)
        return scene, "<image>\nDescribe the image.", _caption(scene)
    raise ValueError(f"unknown MiniCoIN task {task!r}; known: {list(MINICOIN_TASKS) + list(BASE_SETS)}")


def _any_scene(rng):
    kind = rng.integers(5)
    return (_obj_scene(rng, int(rng.integers(2, 5)), unique=True) if kind == 0 else _count_scene(rng)
            if kind == 1 else _single_scene(rng) if kind == 2 else _pair_scene(rng) if kind == 3 else _text_scene(rng))


# MiniCoIN-Instruct: stage 0, part 2, the miniature of LLaVA's general visual instruction tuning. Other question
# kinds and phrasings about the same kinds of scenes (existence, position, text colour, first letter, letter
# count, descriptions; some multi-turn) and plain-text turns (a blank image) whose answers are every token form
# the tasks answer with: bare colour and shape words, option letters, digits, letter strings, bracketed
# decimals. None of it uses a task's prompt or a task's question -> answer pairing (tests/test_data.py checks
# the prompts), so the tasks stay new to the base, as CoIN's are to LLaVA; but no answer token is untrained.
INSTRUCT_KINDS = ("exists", "where", "text_color", "first_letter", "letters", "describe", "multi",
                  "sum", "next_letter", "repeat", "list", "pick_word")


def _instruct_turn(kind, rng, scene):
    """One (question, answer) turn of an instruct kind about `scene` (None: the kind draws its own)."""
    objs = scene["objs"] if scene else []
    if kind == "exists":
        o = objs[rng.integers(len(objs))]
        if rng.random() < 0.5:
            return f"Is there a {o['color']} {o['shape']} in the image?", "yes"
        present = {(p["color"], p["shape"]) for p in objs}
        absent = [(c, sh) for c in COLORS for sh in SHAPES if (c, sh) not in present]
        c, sh = absent[rng.integers(len(absent))]
        return f"Is there a {c} {sh} in the image?", "no"
    if kind == "where":
        o = objs[rng.integers(len(objs))]
        return f"Where is the {o['color']} {o['shape']}?", POSITIONS[o["cell"]]
    if kind == "text_color":
        return "What color is the text?", scene["text"]["color"]
    if kind == "first_letter":
        return "What is the first letter of the text?", scene["text"]["text"][0]
    if kind == "letters":
        return "How many letters does the text have?", str(len(scene["text"]["text"]))
    if kind == "describe":
        return ("Describe the image." if rng.random() < 0.5 else "What do you see?"), _caption(scene)
    if kind == "sum":
        a, b = (int(v) for v in rng.integers(0, 5, size=2))
        return f"What is {a} plus {b}?", str(a + b)
    if kind == "next_letter":
        k = int(rng.integers(0, 25))
        return f"Which letter comes after {chr(65 + k)}?", chr(66 + k)
    if kind == "repeat":
        word = "".join(rng.choice(list(LETTERS), int(rng.integers(2, 4))))
        return f"Repeat the letters: {word}", word
    if kind == "list":
        vals = sorted(rng.integers(0, 101, size=4) / 100)
        return "Write these numbers as a list: " + " ".join(f"{v:.2f}" for v in vals), box_text(vals)
    if kind == "pick_word":
        c, sh = list(COLORS)[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
        want = "color" if rng.random() < 0.5 else "shape"
        pair = [c, sh] if rng.random() < 0.5 else [sh, c]
        return f"Which of these words is a {want}: {pair[0]} or {pair[1]}?", c if want == "color" else sh
    raise ValueError(f"unknown instruct kind {kind!r}")


INSTRUCT_WEIGHTS = np.array([3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1]) / 26  # mostly about images; a fifth plain text


# INSTRUCT_MC (the default stage 0b; --no-instruct-mc: "instruct"): the same stream with lettered multiple choice mixed
# in (3 draws in 29), "What color is the text?" (a property the base reads) with 2-4 options; as LLaVA-665K's A-OKVQA
# multiple choice teaches LLaVA to answer by letter before it meets ScienceQA. Its suffix is not sqa's, its question
# not a task's; only the option lines ("A. red") have sqa's layout. Measured on v3: lora on a one-object sqa 39->73 %;
# cmoe Last 45.0 -> 49.2 with FFN experts, 53.8 with attention experts too (docs/minicoin.md).
MC_SUFFIX = "Reply with the letter of the right option."


def _make_instruct(rng, mc=False):
    if mc and rng.random() < 3 / 29:
        scene = _text_scene(rng)
        return scene, [lettered(rng, scene["text"]["color"], list(COLORS), "What color is the text?", MC_SUFFIX)]
    kind = INSTRUCT_KINDS[rng.choice(len(INSTRUCT_KINDS), p=INSTRUCT_WEIGHTS)]
    if kind in ("sum", "next_letter", "repeat", "list", "pick_word"):  # plain text: the image is blank
        scene = dict(objs=[], text=None)
        return scene, [_instruct_turn(kind, rng, None)]
    if kind in ("text_color", "first_letter", "letters"):
        scene = _text_scene(rng)
        return scene, [_instruct_turn(kind, rng, scene)]
    if kind == "describe":
        scene = _any_scene(rng)
        return scene, [_instruct_turn(kind, rng, scene)]
    scene = _obj_scene(rng, int(rng.integers(2, 5)), unique=True)
    if kind == "multi":  # two turns about one image
        return scene, [_instruct_turn(k, rng, scene) for k in ("exists", "where")]
    return scene, [_instruct_turn(kind, rng, scene)]


def minicoin_sample(task, split, index, seed=0, render=True):
    """One MiniCoIN Example, a pure function of (task, split, index, seed)."""
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; known: train, test")
    stream = "instruct" if task == INSTRUCT_MC else task  # --instruct-mc: the instruct draws, MC turns mixed in
    rng = np.random.default_rng([zlib.crc32(f"{stream}/{split}".encode()), index, seed])  # stable across runs/machines
    while True:  # rejection sampling keeps train and test scenes disjoint whatever n and seed are
        if stream == "instruct":
            scene, turns = _make_instruct(rng, mc=task == INSTRUCT_MC)
        else:
            scene, user, answer = _task_sample(task, rng)
            turns = [(user, answer)]
        key = _scene_key(scene)
        if not key or is_test_scene(key) == (split == "test"):  # (no key: blank image)
            break
    turns[0] = (turns[0][0] if turns[0][0].startswith("<image>") else "<image>\n" + turns[0][0], turns[0][1])
    img = draw_scene(scene) if render else None  # render=False: text only (tokenizer corpus)
    return Example(img, turns, task, None, {"index": index, "split": split, "seed": seed, "scene": key})


def minicoin(task, split, n=None, seed=0):
    """n Examples (default N_TRAIN / N_TEST; BASE_SETS for the stage-0 sets) of a MiniCoIN task."""
    if task not in TASK_METRIC:
        raise ValueError(f"unknown MiniCoIN task {task!r}; known: {list(TASK_METRIC)}")
    if n is None:
        n = N_TEST if split == "test" else BASE_SETS.get(task, N_TRAIN)
    return [minicoin_sample(task, split, i, seed) for i in range(n)]


def induction_batch(gen, n, vocab, length=34):
    """Stage 0, part 0 of the tiny base (--text-steps): the miniature of the LLM's own pretraining. Random token
    strings in which a random span (4-14 tokens) comes back after a gap of 0-4; only the repeat is labelled, and
    predicting it needs an induction head (find the current token earlier, copy what followed it). A real LLM brings
    that circuit to LLaVA; the tiny decoder does not form it from captions and instructions, and without it cannot
    match an answer against listed options (docs/minicoin.md). Tokens are drawn from all `vocab` ids: over the
    MiniCoIN decoder's 768 the heads formed by step ~2,500, over 40 of them not by 4,000. Returns ids, labels [n, length]."""
    ids = torch.randint(0, vocab, (n, length), generator=gen)
    labels = torch.full((n, length), IGNORE_INDEX)
    for i in range(n):
        span, gap = int(torch.randint(4, 15, (1,), generator=gen)), int(torch.randint(0, 5, (1,), generator=gen))
        start = int(torch.randint(0, length - 2 * span - gap + 1, (1,), generator=gen))
        rep = start + span + gap
        ids[i, rep:rep + span] = ids[i, start:start + span]
        labels[i, rep + 1:rep + span] = ids[i, start + 1:start + span]  # the repeat's first token is not predictable
    return ids, labels



# -----------------------------------------------------------------------------
# a run's tasks and data, from its settings (train.TrainConfig, or a run folder's config.json)

def task_list(cfg):
    """(task names in training order, {task: metric}) of cfg.benchmark, from cfg.tasks or the full sequence."""
    if cfg.benchmark == "minicoin":
        known = {n: TASK_METRIC[n] for n in MINICOIN_TASKS + EXTRA_TASKS}
        names = cfg.tasks.split(",") if cfg.tasks else list(MINICOIN_TASKS)
    else:
        known, alias = dict(COIN_TASKS), {coin_folder(n): n for n, _ in COIN_TASKS}  # CoIN's folder names work too
        names = [alias.get(n, n) for n in cfg.tasks.split(",")] if cfg.tasks else [n for n, _ in COIN_TASKS]
    for n in names:
        if n not in known:
            raise SystemExit(f"unknown {'MiniCoIN' if cfg.benchmark == 'minicoin' else 'CoIN'} task '{n}'; "
                             f"known: {', '.join(known)}")
    if len(set(names)) < len(names):  # one router, one VAE and one predictions file per task
        raise SystemExit(f"--tasks: {', '.join(sorted({n for n in names if names.count(n) > 1}))} listed twice")
    return names, {n: known[n] for n in names}


def unseen_list(cfg, trained):
    """Held-out tasks scored after every stage and never trained: cfg.unseen (comma-separated, "none" for none),
    "auto" (None in older run folders): MiniCoIN's UNSEEN_TASKS (CoIN: none). {task: metric}."""
    if cfg.unseen in (None, "auto"):
        names = list(UNSEEN_TASKS) if cfg.benchmark == "minicoin" else []
    else:
        names = [n.strip() for n in cfg.unseen.split(",") if n.strip() and n.strip().lower() != "none"]
    known = TASK_METRIC if cfg.benchmark == "minicoin" else dict(COIN_TASKS)
    for n in names:
        if n not in known or n in trained or n in BASE_SETS:
            raise SystemExit(f"--unseen: '{n}' is not a task outside the trained sequence; known: "
                             f"{', '.join(k for k in known if k not in trained and k not in BASE_SETS)}")
    return {n: known[n] for n in names}


def load_examples(cfg, task, split):
    """The train or test examples of one task: MiniCoIN's generator, or CoIN's files under cfg.coin_root."""
    n = cfg.train_n if split == "train" else cfg.test_n
    if cfg.benchmark == "minicoin":
        return minicoin(task, split, n, seed=cfg.seed)
    if not cfg.coin_root:
        raise SystemExit("--benchmark coin needs --coin-root (and --image-root)")
    train_path, test_path = coin_files(cfg.coin_root, task)
    root = cfg.image_root or cfg.coin_root
    if split == "train":
        return load_coin_train(train_path, root, bad_images=cfg.bad_images, task=task, n=n)
    ann = COIN_ANNOTATIONS.get(task)
    ann = os.path.join(cfg.coin_annotations, ann) if ann and cfg.coin_annotations else None
    if ann and not os.path.isfile(ann):
        raise FileNotFoundError(f"--coin-annotations {cfg.coin_annotations}: {COIN_ANNOTATIONS[task]} not found "
                                f"(CoIN scores {task} against it; leave the flag out to use the logged fallback)")
    return load_coin_test(test_path, root, bad_images=cfg.bad_images, task=task, n=n,
                          require_answer=not cfg.predict_only, annotations=ann)


def tokenizer(cfg):
    """(tokenizer, chat template): --tokenizer's Llama-3 file with Llama-3's template, else MiniCoIN's compact one."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer), LLAMA3
    return build_minicoin_tokenizer(minicoin_tokenizer_path(cfg.base_dir)), COMPACT

# -----------------------------------------------------------------------------
# contact sheet


def contact_sheet(path, per_task=4, seed=0, zoom=4):
    from PIL import ImageFont
    import textwrap
    font = ImageFont.load_default()
    tasks = MINICOIN_TASKS + EXTRA_TASKS + tuple(BASE_SETS)
    cw, ch = IMAGE_SIZE * zoom + 16, IMAGE_SIZE * zoom + 110
    sheet = Image.new("RGB", (cw * per_task, ch * len(tasks)), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for r, task in enumerate(tasks):
        for c in range(per_task):
            ex = minicoin_sample(task, "train", c, seed)
            x, y = c * cw + 8, r * ch + 8
            sheet.paste(ex.image.resize((IMAGE_SIZE * zoom,) * 2, Image.NEAREST), (x, y))
            q = ex.turns[0][0].replace("<image>\n", "")
            lines = [f"[{task}]"] + textwrap.wrap(q, 34) + textwrap.wrap("-> " + ex.answer, 34)
            d.multiline_text((x, y + IMAGE_SIZE * zoom + 4), "\n".join(lines[:8]), fill=(0, 0, 0), font=font)
    with atomic_path(path) as tmp:  # (its folder is made if missing)
        sheet.save(tmp, format=image_format(path))


def image_format(path):
    """Pillow's format name for the file name's extension (.png -> PNG, .jpg -> JPEG), or a clear error."""
    fmt = Image.registered_extensions().get(os.path.splitext(os.fspath(path))[1].lower())
    if fmt is None:
        raise ValueError(f"{path}: not an image file name (use .png or .jpg)")
    return fmt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--show", action="store_true", help="write a contact sheet of MiniCoIN samples")
    ap.add_argument("--out", default="minicoin.png")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.show:
        ap.print_help()
        return
    try:
        image_format(args.out)  # before the minutes of rendering
        contact_sheet(args.out, seed=args.seed)
    except (OSError, ValueError) as e:
        ap.error(f"--out {args.out}: {e}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
