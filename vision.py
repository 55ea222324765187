"""
Vision side of LLaVA: the CLIP ViT tower, the mlp2x_gelu projector, image preprocessing; and the file helpers every
module uses: the one atomic writer, the one JSON reader, safetensors, Hugging Face folders (config.json, shards,
explicit key tables, also used by cmoe.load_llama).

Shape suffixes: B batch, C channels, S image side, P patches (CLS excluded), T tokens (= P + 1 with CLS),
D width, F mlp width, H heads, K head dim (D // H).
"""
import contextlib
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# -----------------------------------------------------------------------------
# files: the one atomic writer, the one JSON reader, safetensors; Hugging Face folders (config.json, shards)


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
# CLIP vision tower


@dataclass
class VisionConfig:
    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    layer_norm_eps: float = 1e-5
    select_layer: int = -2  # LLaVA-1.5 uses the penultimate layer's output
    num_channels: int = 3

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        n = self.num_hidden_layers
        if not -(n + 1) <= self.select_layer <= n:
            raise ValueError(f"select_layer {self.select_layer} out of range for {n} layers")

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @property
    def run_layers(self):
        """Encoder layers needed to reach hidden_states[select_layer] (hidden_states[0] = embeddings)."""
        return self.select_layer % (self.num_hidden_layers + 1)

    @classmethod
    def tiny(cls, **kw):
        return cls(**{**dict(image_size=48, patch_size=8, hidden_size=96, intermediate_size=384,
                             num_hidden_layers=3, num_attention_heads=4), **kw})

    @classmethod
    def clip_vit_large_patch14_336(cls, **kw):
        return cls(**{**dict(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                             num_hidden_layers=24, num_attention_heads=16), **kw})

    @classmethod
    def from_hf(cls, d, source="config.json", select_layer=-2):
        """From a CLIPVisionConfig dict or a CLIPModel config (which nests it under "vision_config")."""
        if "vision_config" in d:
            d, source = d["vision_config"], f"{source} [vision_config]"
        act = d.get("hidden_act", "quick_gelu")  # CLIPVisionConfig's default
        if act != "quick_gelu":
            raise CheckpointError(f"{source}: hidden_act '{act}' is not supported (only quick_gelu)")
        fields = ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads")
        return cls(**{k: require(d, k, source) for k in fields}, layer_norm_eps=d.get("layer_norm_eps", 1e-5),
                   num_channels=d.get("num_channels", 3), select_layer=select_layer)


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D = cfg.hidden_size
        self.class_embedding = nn.Parameter(torch.randn(D) * D ** -0.5)
        self.patch_embedding = nn.Conv2d(cfg.num_channels, D, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, D)

    def forward(self, x_BCSS):
        x_BDpp = self.patch_embedding(x_BCSS.to(self.patch_embedding.weight.dtype))
        x_BPD = x_BDpp.flatten(2).transpose(1, 2)  # patches in row-major order, as HF
        cls_B1D = self.class_embedding.to(x_BPD.dtype).expand(x_BPD.shape[0], 1, -1)
        return torch.cat([cls_B1D, x_BPD], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        D, self.H = cfg.hidden_size, cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x_BTD):
        B, T, D = x_BTD.shape
        q_BHTK, k_BHTK, v_BHTK = (p(x_BTD).view(B, T, self.H, D // self.H).transpose(1, 2)
                                  for p in (self.q_proj, self.k_proj, self.v_proj))
        y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK)  # no mask: every patch sees every patch
        return self.out_proj(y_BHTK.transpose(1, 2).reshape(B, T, D))


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x_BTD):
        h_BTF = self.fc1(x_BTD)
        return self.fc2(h_BTF * torch.sigmoid(1.702 * h_BTF))  # quick_gelu, what OpenAI CLIP was trained with


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x_BTD):
        x_BTD = x_BTD + self.self_attn(self.layer_norm1(x_BTD))
        return x_BTD + self.mlp(self.layer_norm2(x_BTD))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.run_layers))


class CLIPVision(nn.Module):
    """HF CLIPVisionModel minus its `vision_model.` prefix, post_layernorm and the layers after select_layer
    (they never influence LLaVA's features, so they are not even built)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF's spelling
        self.encoder = CLIPEncoder(cfg)
        for m in self.modules():  # small normal init (as HF) so the tiny tower also trains from scratch
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, pixel_values_BCSS):
        S = self.cfg.image_size
        if tuple(pixel_values_BCSS.shape[1:]) != (self.cfg.num_channels, S, S):
            raise ValueError(f"pixel_values: expected (B, {self.cfg.num_channels}, {S}, {S}), "
                             f"found {tuple(pixel_values_BCSS.shape)}")
        x_BTD = self.pre_layrnorm(self.embeddings(pixel_values_BCSS))
        for layer in self.encoder.layers:
            x_BTD = layer(x_BTD)
        return x_BTD[:, 1:]  # drop CLS: LLaVA feeds only the patch tokens to the projector


def clip_key_map(cfg, prefix="vision_model."):
    """Explicit table HF key -> CLIPVision state_dict key, for the layers that CLIPVision builds."""
    keys = ["embeddings.class_embedding", "embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
            "pre_layrnorm.weight", "pre_layrnorm.bias"]
    for i in range(cfg.run_layers):
        for sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                    "layer_norm1", "mlp.fc1", "mlp.fc2", "layer_norm2"):
            keys += [f"encoder.layers.{i}.{sub}.weight", f"encoder.layers.{i}.{sub}.bias"]
    return {prefix + k: k for k in keys}


def load_clip(folder, select_layer=-2):
    """CLIPVision from a HF CLIPVisionModel or CLIPModel folder (single or sharded safetensors)."""
    folder = os.fspath(folder)
    cfg = VisionConfig.from_hf(read_hf_config(folder), os.path.join(folder, "config.json"), select_layer)
    tensors = open_hf_tensors(folder)
    # CLIPModel and transformers<5 CLIPVisionModel files say vision_model.*; transformers>=5 CLIPVisionModel does not
    pre = "vision_model." if any(k.startswith("vision_model.") for k in tensors) else ""
    P = re.escape(pre)
    skip = [r"^text_model\.", r"^(visual|text)_projection\.", r"^logit_scale$", r"\.position_ids$",
            rf"^{P}post_layernorm\."]  # what LLaVA never uses
    skip += [rf"^{P}encoder\.layers\.{i}\." for i in range(cfg.run_layers, cfg.num_hidden_layers)]
    model = CLIPVision(cfg)
    load_mapped(model, tensors, clip_key_map(cfg, pre), skip=skip, source=folder)
    return model.eval()


# -----------------------------------------------------------------------------
# images


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
# projector


class Projector(nn.Sequential):
    """LLaVA mlp2x_gelu; a Sequential so state_dict keys are 0.* and 2.* like model.mm_projector.*.
    merge > 1 (tiny base only; LLaVA uses 1): each image token is the m x m neighbouring patches' features, side by
    side (nanoVLM's pixel shuffle), so one MiniCoIN scene cell (2 x 2 patches) holds one object in one token."""

    def __init__(self, vision_dim, llm_dim, merge=1):
        super().__init__(nn.Linear(vision_dim * merge * merge, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        self.merge = merge

    def forward(self, x_BPC):
        m = self.merge
        if m > 1:
            B, P, C = x_BPC.shape
            g = math.isqrt(P)  # patches per image side
            if g * g != P or g % m:
                raise ValueError(f"patch merge {m}: needs a square patch grid whose side divides by {m}, got {P} patches")
            x_BPC = x_BPC.reshape(B, g // m, m, g // m, m, C).transpose(2, 3).reshape(B, P // (m * m), m * m * C)
        return super().forward(x_BPC)


def load_projector(path):
    """Projector from model.mm_projector.{0,2}.{weight,bias} in a .safetensors file (or a HF folder)."""
    path = os.fspath(path)
    tensors = open_hf_tensors(path) if os.path.isdir(path) else read_safetensors(path)
    pre = "model.mm_projector."
    w0 = tensors.get(pre + "0.weight")
    if w0 is None or w0.dim() != 2:
        found = "missing" if w0 is None else f"shape {tuple(w0.shape)}"
        raise MissingKeysError(f"{path}: need a 2-D '{pre}0.weight' (llm_dim, vision_dim), found {found}")
    proj = Projector(w0.shape[1], w0.shape[0])
    mapping = {pre + k: k for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
    return load_mapped(proj, tensors, mapping, skip=(r"^(?!model\.mm_projector\.)",), source=path)
