"""
Vision side of LLaVA: the CLIP ViT tower (HF CLIPVisionModel layout, loaded by load_clip with an explicit key table)
and the mlp2x_gelu projector. Image preprocessing is data.preprocess; the checkpoint readers are in data.py.

Each encoder layer carries an expert pool (cmoe.Experts.for_clip: LoRA experts on q/k/v/out_proj and fc1/fc2, routed per
token, one router per task), empty unless a run puts experts in the tower (train.py --experts-in vision|both).

Shape suffixes: B batch, C channels, S image side, P patches (CLS excluded), T tokens (= P + 1 with CLS),
D width, F mlp width, H heads, K head dim (D // H).
"""
import math
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from cmoe import ExpertConfig, Experts
from data import CheckpointError, MissingKeysError, load_mapped, open_hf_tensors, read_hf_config, read_safetensors, require

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
    PROJ = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}  # expert name -> projection

    def __init__(self, cfg):
        super().__init__()
        D, self.H = cfg.hidden_size, cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(D, D) for _ in range(4))

    def forward(self, x_BTD, delta=None):
        """delta: (expert name, its input) -> the routed experts' delta on that projection (cmoe.Experts.deltas)."""
        B, T, D = x_BTD.shape
        q_BHTK, k_BHTK, v_BHTK = (self.proj(n, x_BTD, delta).view(B, T, self.H, D // self.H).transpose(1, 2)
                                  for n in "qkv")
        y_BHTK = F.scaled_dot_product_attention(q_BHTK, k_BHTK, v_BHTK)  # no mask: every patch sees every patch
        return self.proj("o", y_BHTK.transpose(1, 2).reshape(B, T, D), delta)

    def proj(self, name, x, delta):
        y = getattr(self, self.PROJ[name])(x)
        return y if delta is None else y + delta(name, x)


class CLIPMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x_BTD, delta=None):
        h_BTF = self.fc1(x_BTD) if delta is None else self.fc1(x_BTD) + delta("fc1", x_BTD)
        a_BTF = h_BTF * torch.sigmoid(1.702 * h_BTF)  # quick_gelu, what OpenAI CLIP was trained with
        return self.fc2(a_BTF) if delta is None else self.fc2(a_BTF) + delta("fc2", a_BTF)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg, ecfg: ExpertConfig | None = None):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)
        self.experts = Experts.for_clip(cfg, ecfg or ExpertConfig())

    def forward(self, x_BTD, task_ids_B=None, use_experts=True):
        """Returns (output, balance loss), as cmoe.Block: experts on attention route each token once, at the layer's
        input, and that routing carries the MLP's experts too; MLP-only experts route at the MLP's input. Every token
        (CLS included) is routed; all are valid."""
        experts, on = self.experts, self.experts.active(use_experts)
        h_BTD = self.layer_norm1(x_BTD)
        routing = experts.route(h_BTD, task_ids_B) if on and experts.ecfg.attn else None
        x_BTD = x_BTD + self.self_attn(h_BTD, experts.deltas(routing, h_BTD) if routing else None)
        h_BTD = self.layer_norm2(x_BTD)
        if not on:
            y_BTD, aux = self.mlp(h_BTD), x_BTD.new_zeros(())
        else:
            routing = routing or experts.route(h_BTD, task_ids_B)
            y_BTD, aux = self.mlp(h_BTD, experts.deltas(routing, h_BTD)), routing.aux
        if experts.adapters_active(use_experts):  # MoE-Adapters: parallel to the MLP, on the un-normalised residual,
            y_BTD = y_BTD + experts.adapters(x_BTD, task_ids_B)  # gated on each image's CLS token (token 0)
        return x_BTD + y_BTD, aux


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

    def forward(self, pixel_values_BCSS, task_ids_B=None, use_experts=True):
        """The patch features [B, P, D] (routed through the layers' experts when their pools are active)."""
        return self.routed(pixel_values_BCSS, task_ids_B, use_experts)[0]

    def routed(self, pixel_values_BCSS, task_ids_B=None, use_experts=True):
        """(patch features [B, P, D], the balance loss summed over the layers: 0 without autograd or experts)."""
        S = self.cfg.image_size
        if tuple(pixel_values_BCSS.shape[1:]) != (self.cfg.num_channels, S, S):
            raise ValueError(f"pixel_values: expected (B, {self.cfg.num_channels}, {S}, {S}), "
                             f"found {tuple(pixel_values_BCSS.shape)}")
        x_BTD = self.pre_layrnorm(self.embeddings(pixel_values_BCSS))
        aux = x_BTD.new_zeros((), dtype=torch.float32)
        for layer in self.encoder.layers:
            x_BTD, a = layer(x_BTD, task_ids_B, use_experts)
            aux = aux + a
        return x_BTD[:, 1:], aux  # drop CLS: LLaVA feeds only the patch tokens to the projector

    def expert_pools(self):
        return [layer.experts for layer in self.encoder.layers]

    def experts_active(self, use_experts=True):
        return any(pool.active(use_experts) or pool.adapters_active(use_experts) for pool in self.expert_pools())


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
    load_mapped(model, tensors, clip_key_map(cfg, pre), skip=skip, source=folder, allow_unmapped=[r"\.experts\."])
    return model.eval()


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
