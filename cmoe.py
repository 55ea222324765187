"""LLaVA-CMoE, the model half, read top to bottom: a Llama-3 decoder whose layers carry growing pools of LoRA
experts chosen per token by one router per task, the LLaVA wrapper that splices image features into the prompt, and
the method's model-side pieces. Where the paper's concepts live:

    expert, router     Experts (one block's pool: LoRAExperts banks per projection, routers[t] per task; for_llama,
                       for_clip: the decoder's layers, the CLIP tower's, LLaVA.expert_pools by experts_in), route
    dispatch           Experts.route -> Routing; lora_dense (masked-dense) or dispatch_plan + lora_sparse (blocks)
    PGKE               probe_start, set_counting / read_usage, probe_frequencies, pgke_decide, copy_sources,
                       probe_end, expand  (run in that order by train.pgke)
    bounded growth     merge_pair, merge_experts, merge_rows, expert_numel (train.fit_budget: --max-expert-params)
    PTL                TaskVAE, fit_vae, Locator.locate (fitted per task by train.fit_task_vae); the reject option:
                       TaskGate, fit_gate, Locator.add_gate
    HF checkpoints     LlamaConfig.from_hf, llama_key_map, load_llama
    D-MoLE             (--method dmole) dmole_candidates, dmole_allocate (budget rule), dmole_lr_scales (curriculum),
                       DMoLE / attach_dmole (experts on both towers' attention projections, forward hooks), dmole_rep,
                       TaskAE, fit_ae, route_by_errors, vote_eval, vote_train, AERouter (run by train.dmole_grow)
    MoE-Adapters4CL    (--method moe-adapters) AdapterConfig, AdapterPool (Experts.adapters: adapters parallel to the
                       FFN/MLP in both towers, noisy_top_k per sample, adapter_mix, activate_freeze), DDAS (DDASAE,
                       fit_ddas_ae, ddas_choose: the test-time selector with a reference autoencoder)

No distributed code: under torchrun, train.py hands the MoE-Adapters pools a `batch_sum` for their freeze counts.
Shape legend: B batch, T tokens, S spliced sequence, D model width, F ffn width, R lora rank, E experts,
K top-k, H heads, N tasks, P image patches, V vocab, Z latent, O a projection's output width (D or F).
LoRA matrices are lower-case (a_EDR, b_ERO): the capital B is the batch.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from data import IGNORE_INDEX, IMAGE_TOKEN_ID, load_mapped, open_hf_tensors, read_hf_config, require


# ----------------------------------------------------------------------------------------------------------
# Config

@dataclass
class LlamaConfig:
    vocab_size: int = 768
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 384
    head_dim: int = 0  # 0 -> dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF "llama3" rule: factor, low/high_freq_factor, original_max_position_embeddings
    max_seq_len: int = 2048
    tie_embeddings: bool = True

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads

    @classmethod
    def tiny(cls, vocab_size=768, **kw):
        return cls(vocab_size=vocab_size, **kw)

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json"):
        rp = d.get("rope_parameters") or {}  # transformers>=5 nests rope_theta and the scaling rule here
        scaling = d.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) not in ("llama3", "default"):
            raise ValueError(f"{source}: unsupported rope_scaling {scaling!r} (only 'llama3')")
        dim, heads = require(d, "hidden_size", source), require(d, "num_attention_heads", source)
        return cls(
            vocab_size=require(d, "vocab_size", source), dim=dim,
            n_layers=require(d, "num_hidden_layers", source), n_heads=heads,
            n_kv_heads=d.get("num_key_value_heads", heads), ffn_dim=require(d, "intermediate_size", source),
            head_dim=d.get("head_dim") or dim // heads, norm_eps=d.get("rms_norm_eps", 1e-6),  # HF's default
            rope_theta=d.get("rope_theta", rp.get("rope_theta", 10000.0)),
            rope_scaling=scaling if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3" else None,
            max_seq_len=d.get("max_position_embeddings", 2048), tie_embeddings=d.get("tie_word_embeddings", False))


@dataclass
class ExpertConfig:
    rank: int = 8
    alpha: float = 16.0
    top_k: int = 2
    attn: bool = False  # experts also on q/k/v/o (as CoIN's MoELoRA); the layer then routes once, at its input

    @property
    def scale(self):
        return self.alpha / self.rank


# ----------------------------------------------------------------------------------------------------------
# Llama building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics as in HF, so bf16 runs match
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = cfg.rope_scaling
    if s:  # Llama 3.1 rule: long wavelengths slowed by `factor`, short kept, a smooth blend in between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        blended = (1 - smooth) * inv / factor + smooth * inv
        inv = torch.where(wavelen > old / lo, inv / factor, torch.where(wavelen < old / hi, inv, blended))
    return inv.float()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q_BHTd, k_BHTd, cos_BTd, sin_BTd):
    cos, sin = cos_BTd[:, None], sin_BTd[:, None]
    return q_BHTd * cos + rotate_half(q_BHTd) * sin, k_BHTd * cos + rotate_half(k_BHTd) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x_BTD, cos, sin, mask_BTT=None, cache=None, t0=0, delta=None):
        """delta: (projection name, its input) -> the routed experts' delta on that projection (attention experts)."""
        B, T, _ = x_BTD.shape
        c, hd = self.cfg, self.cfg.head_dim
        q = self.proj("q", x_BTD, delta).view(B, T, c.n_heads, hd).transpose(1, 2)
        k = self.proj("k", x_BTD, delta).view(B, T, c.n_kv_heads, hd).transpose(1, 2)
        v = self.proj("v", x_BTD, delta).view(B, T, c.n_kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        if cache is not None:  # static-size cache; keys past t0+T are masked out by mask_BTT
            cache["k"][:, :, t0:t0 + T] = k
            cache["v"][:, :, t0:t0 + T] = v
            k, v = cache["k"], cache["v"]
        rep = c.n_heads // c.n_kv_heads  # GQA: each kv head serves `rep` query heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask_BTT is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BTT[:, None])
        return self.proj("o", y.transpose(1, 2).reshape(B, T, -1), delta)

    def proj(self, name, x, delta):
        y = getattr(self, f"{name}_proj")(x)
        return y if delta is None else y + delta(name, x)


# ----------------------------------------------------------------------------------------------------------
# Experts: LoRA experts on gate/up/down of one FFN (optionally also on attention's q/k/v/o), one router per task.

def route(x_BTD, router_NED, valid_NE, task_ids_B, k):
    """Per-sample routing: each sample uses its own task's router. Returns dense top-k weights [B,T,E]
    (zeros off the top-k, renormalised over it) and the softmax probabilities (for the balance loss)."""
    # pick each sample's router with a one-hot matmul, not an index: its backward is then a GEMM (the
    # compiled CPU scatter-add backward of an index corrupted memory at B=1 in torch 2.13)
    N, E, D = router_NED.shape
    with torch.autocast(x_BTD.device.type, enabled=False):  # router math in fp32, under bf16 autocast too: its
        onehot_BN = F.one_hot(task_ids_B, N).float()  # matmuls would otherwise run in bf16 and near-ties of the
        w_BED = (onehot_BN @ router_NED.float().flatten(1)).view(-1, E, D)  # top-k flip
        logits_BTE = torch.einsum("btd,bed->bte", x_BTD.float(), w_BED)
        valid_BE = (onehot_BN @ valid_NE.float()) > 0
    logits_BTE = logits_BTE.masked_fill(~valid_BE[:, None, :], float("-inf"))
    probs_BTE = logits_BTE.softmax(-1)
    top_BTK, idx_BTK = probs_BTE.topk(min(k, probs_BTE.shape[-1]), dim=-1)
    top_BTK = top_BTK / top_BTK.sum(-1, keepdim=True)
    return torch.zeros_like(probs_BTE).scatter(-1, idx_BTK, top_BTK), probs_BTE


def lora_dense(x_TD, a_EDR, b_ERO, w_TE, scale):
    """Masked-dense dispatch: one GEMM into every expert's rank space, gate it, one GEMM out.
    sum_e w_e * B_e A_e x  ==  ((x @ [A_1..A_E]) * w expanded over R) @ [B_1;..;B_E]"""
    E, D, R = a_EDR.shape
    h_TER = (x_TD @ a_EDR.permute(1, 0, 2).reshape(D, E * R)).view(-1, E, R)
    h_TER = h_TER * w_TE.to(h_TER.dtype)[:, :, None]
    return (h_TER.reshape(-1, E * R) @ b_ERO.reshape(E * R, -1)) * scale


class LoRAExperts(nn.Module):
    """E LoRA experts on one projection din -> dout: y = sum_e w_e * scale * B_e A_e x.

    Stacked tensors [E, ...] in two banks: frozen_A/frozen_B (experts of earlier tasks, requires_grad=False) and
    train_A/train_B (this task's). Separate tensors, not a requires_grad flag per slice, so autograd gives the frozen
    bank no gradient at all and torch.compile sees no flag flipping within a task."""

    def __init__(self, din, dout, rank):
        super().__init__()
        self.din, self.dout, self.rank = din, dout, rank
        for bank in ("frozen", "train"):
            self._set(bank, torch.zeros(0, din, rank), torch.zeros(0, rank, dout))

    def _set(self, bank, a_EDR, b_ERO):
        self.register_parameter(f"{bank}_A", nn.Parameter(a_EDR.contiguous(), requires_grad=bank == "train"))
        self.register_parameter(f"{bank}_B", nn.Parameter(b_ERO.contiguous(), requires_grad=bank == "train"))

    @property
    def A(self):
        return torch.cat([self.frozen_A, self.train_A])

    @property
    def B(self):
        return torch.cat([self.frozen_B, self.train_B])

    def __len__(self):
        return self.frozen_A.shape[0] + self.train_A.shape[0]

    def grow(self, n, copy_from: int | None = None, generator=None):
        """Append n trainable experts: copies of expert `copy_from`, or fresh (A random, B = 0: the output is
        unchanged until training moves B)."""
        dev = self.frozen_A.device
        if copy_from is not None:
            a_EDR, b_ERO = (W[copy_from].detach().clone().expand(n, *W.shape[1:]) for W in (self.A, self.B))
        else:
            a_EDR = torch.randn(n, self.din, self.rank, generator=generator).to(dev) / math.sqrt(self.din)
            b_ERO = torch.zeros(n, self.rank, self.dout, device=dev)
        self._set("train", torch.cat([self.train_A.detach(), a_EDR.to(dev)]),
                  torch.cat([self.train_B.detach(), b_ERO.to(dev)]))

    def drop(self):
        """Remove this task's trainable experts (PGKE discards its probes)."""
        self._set("train", self.train_A[:0].detach(), self.train_B[:0].detach())

    def freeze(self):
        """Task end: the trainable experts join the frozen bank."""
        self._set("frozen", self.A.detach(), self.B.detach())
        self.drop()

    def load(self, tensors, prefix, source=""):
        """Adopt the banks stored under `prefix` (their expert counts included), checking every shape."""
        for bank in ("frozen", "train"):
            pair = []
            for name, shape in (("A", (self.din, self.rank)), ("B", (self.rank, self.dout))):
                key = f"{prefix}{bank}_{name}"
                if key not in tensors:
                    raise KeyError(f"{source}: missing key {key}")
                if tuple(tensors[key].shape[1:]) != shape:
                    raise ValueError(f"{source}: {key}: expected (*, {shape[0]}, {shape[1]}), "
                                     f"found {tuple(tensors[key].shape)}")
                pair.append(tensors[key].to(self.frozen_A.device, torch.float32))
            self._set(bank, *pair)

    def forward(self, x_TD, w_TE, scale, plan=None, rows=None):
        if plan is None:
            return lora_dense(x_TD, self.A, self.B, w_TE, scale)
        return lora_sparse(x_TD, self.A, self.B, plan, scale, rows)  # the fast path (end of file)


def sparse_wins(E, top_k, grad, rank=16, dim=512):
    """The "auto" dispatch rule, from measured crossovers (bench/bench_moe.py, CPU): forward only (generation, PGKE's
    usage counts) the dense GEMM is faster up to E = 6 * top-k. In training (forward + backward) the sparse block
    dispatch pays a gather and a scatter per routed row, so it wins only once the rank-space work the dense GEMM
    wastes is large beside them: from E > 2 * top-k at dim 512, rank 16 (the benchmark's layer), and only past
    E = 16 at dim 128, rank 8 (the MiniCoIN model's; past E = 8 at rank 16): E * rank * dim > top-k * 16 * 512."""
    if not grad:
        return E > 6 * top_k
    return E > 2 * top_k and E * rank * dim > top_k * 16 * 512


class Routing(NamedTuple):
    """One layer's routing of its tokens, shared by every projection that carries experts."""
    w_TE: torch.Tensor  # each token's top-k weights over the pool (zeros off the top-k)
    plan: tuple | None  # the sparse block dispatch's plan (dispatch_plan), or None: masked-dense
    aux: torch.Tensor  # the balance loss (0 without autograd)


def llama_shapes(cfg: LlamaConfig):
    """(router width, ffn, attn projection shapes) of a decoder layer's pool: the SwiGLU FFN's gate, up, down;
    attention's q, k, v, o (GQA widths)."""
    D, Fd = cfg.dim, cfg.ffn_dim
    Q, KV = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return D, {"gate": (D, Fd), "up": (D, Fd), "down": (Fd, D)}, {"q": (D, Q), "k": (D, KV), "v": (D, KV), "o": (Q, D)}


def clip_shapes(vcfg):
    """(router width, ffn, attn projection shapes) of a CLIP ViT block's pool (vcfg: a vision.VisionConfig): the MLP's
    fc1, fc2; attention's q, k, v and o (its out_proj)."""
    D, Fd = vcfg.hidden_size, vcfg.intermediate_size
    return D, {"fc1": (D, Fd), "fc2": (Fd, D)}, {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D)}


class Experts(nn.Module):
    """One block's expert pool: E experts, each a LoRA set on the block's projections, and one router per task. The pool
    is described by its router's input width `dim` and its projections' shapes {name: (din, dout)}: `ffn` always
    carries experts, `attn` too with ExpertConfig.attn (for_llama: a decoder layer's gate/up/down and q/k/v/o;
    for_clip: a CLIP ViT block's fc1/fc2 and q/k/v/o). `routers[t]` is task t's [E_t, dim] weight over the first E_t
    experts (experts added later are invisible to it). Each token is routed once per block (route); the same top-k
    then carries every projection's delta (deltas)."""

    def __init__(self, dim: int, ffn: dict, attn: dict, ecfg: ExpertConfig):
        super().__init__()
        self.dim = dim
        self.ffn_shapes, self.attn_shapes = dict(ffn), dict(attn)
        self.reset(ecfg)
        self.dispatch = "auto"  # "auto" | "dense" (masked-dense) | "sparse" (block dispatch, the fast path)
        self.counting = False  # PGKE: accumulate per-expert assignment counts
        self.register_buffer("usage", torch.zeros(0), persistent=False)
        self.adapters = None  # --method moe-adapters: the block's AdapterPool, parallel to its FFN (add_adapters)

    @classmethod
    def for_llama(cls, cfg: LlamaConfig, ecfg: ExpertConfig):
        return cls(*llama_shapes(cfg), ecfg)

    @classmethod
    def for_clip(cls, vcfg, ecfg: ExpertConfig):
        return cls(*clip_shapes(vcfg), ecfg)

    def reset(self, ecfg: ExpertConfig):
        """No experts, no routers, at ecfg's rank."""
        self.ecfg = ecfg
        dev = next((p.device for p in self.parameters()), None)
        shapes = {**self.ffn_shapes, **(self.attn_shapes if ecfg.attn else {})}
        self.lora = nn.ModuleDict({name: LoRAExperts(din, dout, ecfg.rank) for name, (din, dout) in shapes.items()})
        self.routers = nn.ParameterList()
        self.task_use = []  # bounded growth: per task, its share of (token, slot) assignments per expert [E_t]
        if dev is not None:
            self.to(dev)

    def _first(self) -> LoRAExperts:
        return next(iter(self.lora.values()))  # every projection holds the same experts

    @property
    def device(self):
        return self._first().frozen_A.device

    @property
    def n_frozen(self):
        return self._first().frozen_A.shape[0]

    @property
    def n_experts(self):
        return len(self._first())

    def add_adapters(self, acfg: "AdapterConfig", generator=None):
        """MoE-Adapters: the block's static pool of adapter experts (no routers yet: AdapterPool.add_router per task)."""
        self.adapters = AdapterPool(self.dim, acfg, generator).to(self.device).train(self.training)  # (the mode of
        # the model it joins: a pool made in training mode would draw gate noise at test time)

    def adapters_active(self, use_experts=True):
        return self.adapters is not None and self.adapters.active(use_experts)

    # --- growing and freezing ------------------------------------------------------------------------
    def add_experts(self, n, copy_from: int | None = None, generator=None):
        for experts in self.lora.values():
            experts.grow(n, copy_from, generator)

    def drop_trainable(self):
        for experts in self.lora.values():
            experts.drop()

    def add_router(self, init_ED: torch.Tensor | None = None):
        """A new trainable router over all experts that exist now (init: given rows, else zeros = uniform)."""
        w = torch.zeros(self.n_experts, self.dim, device=self.device)
        if init_ED is not None:
            w[: init_ED.shape[0]] = init_ED.to(w)
        self.routers.append(nn.Parameter(w))

    def freeze(self):
        """Task end: trainable experts join the frozen bank; every router becomes frozen."""
        for experts in self.lora.values():
            experts.freeze()
        for r in self.routers:
            r.requires_grad_(False)

    def load(self, tensors, prefix, router_trainable, source=""):
        """Adopt a stored pool: banks and routers with their stored sizes; `router_trainable[t]` per router."""
        for name, experts in self.lora.items():
            experts.load(tensors, f"{prefix}lora.{name}.", source)
        self.routers = nn.ParameterList(nn.Parameter(tensors[f"{prefix}routers.{t}"].to(self.device, torch.float32),
                                                     requires_grad=flag) for t, flag in enumerate(router_trainable))

    def router_table(self):
        """All task routers padded to the current pool size, and which experts each may use."""
        E, dev = self.n_experts, self.device
        W_NED = torch.stack([F.pad(r, (0, 0, 0, E - r.shape[0])) for r in self.routers])
        sizes_N = torch.tensor([r.shape[0] for r in self.routers], device=dev)
        valid_NE = torch.arange(E, device=dev)[None, :] < sizes_N[:, None]
        return W_NED, valid_NE

    # --- forward -------------------------------------------------------------------------------------
    def active(self, use_experts=True):
        return use_experts and self.n_experts > 0 and len(self.routers) > 0

    def route(self, x_BTD, task_ids_B=None, valid_BT=None) -> Routing:
        """Each token's top-k experts under its sample's task router (the latest router when task_ids_B is None).
        Counted for PGKE when `counting`."""
        B, T, _ = x_BTD.shape
        if task_ids_B is None:
            task_ids_B = torch.full((B,), len(self.routers) - 1, dtype=torch.long, device=x_BTD.device)
        w_BTE, probs_BTE = route(x_BTD, *self.router_table(), task_ids_B, self.ecfg.top_k)
        aux = self.balance_loss(w_BTE, probs_BTE, valid_BT) if torch.is_grad_enabled() else x_BTD.new_zeros(())
        if self.counting:
            self.count(w_BTE, valid_BT)
        w_TE = w_BTE.reshape(B * T, -1)
        return Routing(w_TE, dispatch_plan(w_TE, self.ecfg.top_k) if self.sparse() else None, aux)

    def deltas(self, routing: Routing, x_BTD):
        """delta(name, x_in): the routed experts' delta on projection `name` for its input x_in [B, T, in]. The
        projections that read x_BTD itself (gate and up; q, k and v) share one gather of its rows."""
        rows = None if routing.plan is None else to_rows(x_BTD.flatten(0, 1), routing.plan)

        def delta(name, x_in):
            x_TI = x_in.reshape(-1, x_in.shape[-1])
            y = self.lora[name](x_TI, routing.w_TE, self.ecfg.scale, routing.plan, rows if x_in is x_BTD else None)
            return y.view(*x_in.shape[:-1], -1)
        return delta

    def sparse(self):
        if self.dispatch not in ("auto", "dense", "sparse"):
            raise ValueError(f"Experts.dispatch must be auto, dense or sparse, not {self.dispatch!r}")
        return self.dispatch == "sparse" or (
            self.dispatch == "auto" and sparse_wins(self.n_experts, self.ecfg.top_k, torch.is_grad_enabled(),
                                                    self.ecfg.rank, self.dim))

    def balance_loss(self, w_BTE, probs_BTE, valid_BT):
        """Switch-style load balance: E * sum_e (fraction of assignments to e) * (mean router prob of e), over this
        forward's tokens (a batch shard; DeepSpeed-MoE's gates, which MoE-LLaVA uses, also see only their own rank's
        tokens)."""
        m = torch.ones(w_BTE.shape[:2], device=w_BTE.device) if valid_BT is None else valid_BT.float()
        n, E = m.sum().clamp(min=1), probs_BTE.shape[-1]
        hits_E, psum_E = ((w_BTE > 0).float() * m[..., None]).sum((0, 1)), (probs_BTE * m[..., None]).sum((0, 1))
        frac_E = hits_E / (n * self.ecfg.top_k)
        prob_E = psum_E / n
        return E * (frac_E * prob_E).sum()

    @torch.no_grad()
    def count(self, w_BTE, valid_BT):
        hits_E = (w_BTE > 0).float()
        if valid_BT is not None:
            hits_E = hits_E * valid_BT[..., None].float()
        hits_E = hits_E.sum((0, 1))
        if self.usage.shape[0] != hits_E.shape[0]:
            self.usage = torch.zeros_like(hits_E)
        self.usage += hits_E


class FFN(nn.Module):
    """The frozen SwiGLU FFN; `delta` adds the routed experts' LoRA on gate, up and down."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x_BTD, delta=None):
        if delta is None:
            return self.down_proj(F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))
        h_BTF = F.silu(self.gate_proj(x_BTD) + delta("gate", x_BTD)) * (self.up_proj(x_BTD) + delta("up", x_BTD))
        return self.down_proj(h_BTF) + delta("down", h_BTF)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig, ecfg: ExpertConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = FFN(cfg)
        self.experts = Experts.for_llama(cfg, ecfg)

    def forward(self, x, cos, sin, mask=None, cache=None, t0=0, task_ids=None, valid=None, use_experts=True):
        """Returns (output, balance loss). Experts on attention route each token once, at the layer's input, and that
        routing carries the FFN's experts too; FFN-only experts route at the FFN's input."""
        experts, on = self.experts, self.experts.active(use_experts)
        h = self.attn_norm(x)
        routing = experts.route(h, task_ids, valid) if on and experts.ecfg.attn else None
        x = x + self.attn(h, cos, sin, mask, cache, t0, experts.deltas(routing, h) if routing else None)
        y, aux = routed_ffn(self.ffn, experts, self.ffn_norm(x), task_ids, valid, on, routing)
        if experts.adapters_active(use_experts):  # MoE-Adapters: parallel to the FFN, on the un-normalised residual,
            first_B = None if valid is None else valid.int().argmax(1)  # gated on each sample's first valid token
            y = y + experts.adapters(x, task_ids, first_B, cache, t0)
        return x + y, aux


def routed_ffn(ffn: FFN, experts: Experts, h_BTD, task_ids_B, valid_BT, on=True, routing=None):
    """(the FFN's output with its experts' deltas, the balance loss). The experts route h_BTD here unless the layer
    already routed its tokens (`routing`: attention experts); on=False: the frozen FFN alone."""
    if not on:
        return ffn(h_BTD), h_BTD.new_zeros(())
    if routing is None:
        routing = experts.route(h_BTD, task_ids_B, valid_BT)
    return ffn(h_BTD, experts.deltas(routing, h_BTD)), routing.aux


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig, ecfg: ExpertConfig | None = None):
        super().__init__()
        self.cfg, self.ecfg = cfg, ecfg or ExpertConfig()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, self.ecfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.grad_ckpt = False
        self.apply(self._init)

    def _init(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def rope(self, pos_BT):
        f_BTd = pos_BT[..., None].float() * self.inv_freq
        emb = torch.cat([f_BTd, f_BTd], -1)
        return emb.cos(), emb.sin()

    def forward(self, input_ids=None, inputs_embeds=None, pos_BT=None, mask_BTT=None, cache=None, t0=0,
                task_ids=None, valid_BT=None, use_experts=True, return_hidden=False):
        """Returns (logits [B,T,V], balance loss summed over layers: a training term, 0 without autograd); hidden
        states instead of logits when return_hidden. Without a mask, attention is plain causal (right padding needs
        none)."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        if pos_BT is None:
            pos_BT = torch.arange(t0, t0 + T, device=x.device)[None].expand(B, T)
        cos, sin = self.rope(pos_BT)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        aux = x.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            args = (x, cos, sin, mask_BTT, None if cache is None else cache[i], t0, task_ids, valid_BT, use_experts)
            if self.grad_ckpt and self.training and torch.is_grad_enabled():  # recompute activations in backward
                x, a = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                x, a = layer(*args)
            aux = aux + a
        x = self.norm(x)
        return (x if return_hidden else self.lm_head(x)), aux

    def expert_pools(self):
        return [layer.experts for layer in self.layers]


# ----------------------------------------------------------------------------------------------------------
# Loading HF Llama checkpoints

def llama_key_map(cfg: LlamaConfig, has_lm_head: bool) -> dict:
    """HF LlamaForCausalLM key -> our state_dict key."""
    m = {"model.embed_tokens.weight": "embed_tokens.weight", "model.norm.weight": "norm.weight"}
    for i in range(cfg.n_layers):
        h, o = f"model.layers.{i}.", f"layers.{i}."
        m.update({
            h + "input_layernorm.weight": o + "attn_norm.weight",
            h + "self_attn.q_proj.weight": o + "attn.q_proj.weight",
            h + "self_attn.k_proj.weight": o + "attn.k_proj.weight",
            h + "self_attn.v_proj.weight": o + "attn.v_proj.weight",
            h + "self_attn.o_proj.weight": o + "attn.o_proj.weight",
            h + "post_attention_layernorm.weight": o + "ffn_norm.weight",
            h + "mlp.gate_proj.weight": o + "ffn.gate_proj.weight",
            h + "mlp.up_proj.weight": o + "ffn.up_proj.weight",
            h + "mlp.down_proj.weight": o + "ffn.down_proj.weight",
        })
    if has_lm_head:
        m["lm_head.weight"] = "lm_head.weight"
    return m


def load_llama(folder, ecfg: ExpertConfig | None = None) -> Llama:
    """Load an HF Llama-3.x folder (config.json + model.safetensors or a sharded index)."""
    cfg = LlamaConfig.from_hf(read_hf_config(folder), os.path.join(folder, "config.json"))
    tensors = open_hf_tensors(folder)
    has_head = "lm_head.weight" in tensors
    cfg.tie_embeddings = not has_head  # tied exactly when the file has no separate head
    model = Llama(cfg, ecfg)
    load_mapped(model, tensors, llama_key_map(cfg, has_head), skip=[r"\.rotary_emb\.inv_freq$"], source=str(folder),
                allow_unmapped=[r"\.experts\.", r"^lm_head\.weight$"])
    return model


PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}


def set_precision(model: LLaVA, precision: str, cast=True):
    """The model's compute precision. bf16: its forward passes run under bf16 autocast (on whatever device holds the
    model: CUDA, or the CPU, whose autocast supports bf16 too) and, with `cast`, every frozen base parameter (vision
    tower, projector, LLM: not the experts and routers) is stored in bf16 in place, so autocast finds the weights
    in its dtype and keeps no copy of them; experts and routers stay fp32 (the master weights AdamW updates; autocast
    casts them per op). cast=False: bf16 autocast over fp32 weights (mixed precision for a base that still trains).
    fp32: no autocast, and (with `cast`) the base in fp32. Buffers keep their dtype (RoPE's inverse frequencies)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    for name, p in model.named_parameters() if cast else ():
        if ".experts." not in name:  # (Experts: each layer's LoRA banks and routers)
            p.data = p.data.to(PRECISIONS[precision])  # .data: the same Parameter (a tied head stays tied)
    model.precision = precision


# ----------------------------------------------------------------------------------------------------------
# LLaVA: vision tower -> projector -> image features spliced into the Llama prompt

def in_precision(method):
    """A LLaVA entry point that runs under the model's autocast (LLaVA.autocast), whoever calls it."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.autocast():
            return method(self, *args, **kwargs)
    return run


class LLaVA(nn.Module):
    def __init__(self, vision, projector, llm: Llama, pad_id: int = 0):
        super().__init__()
        self.vision, self.projector, self.llm = vision, projector, llm
        self.pad_id = pad_id
        self.precision = "fp32"  # set_precision
        self.experts_in = "llm"  # the towers whose pools carry experts: llm | vision | both (set_experts_in)

    def expert_pools(self):
        """The pools continual learning grows, in one order: the decoder's layers, then the vision tower's (as
        experts_in names them). PGKE's steps, init_experts and the freezing loop take this list like Llama's."""
        return self.tower_pools("llm") + self.tower_pools("vision")

    def tower_pools(self, tower):
        """One tower's pools (llm or vision) when experts_in puts experts there, else none."""
        if tower not in ("llm", "vision"):
            raise ValueError(f"tower must be llm or vision, not {tower!r}")
        if self.experts_in not in (tower, "both"):
            return []
        return self.llm.expert_pools() if tower == "llm" else self.vision.expert_pools()

    def autocast(self):
        """Every entry point below runs under this: bf16 autocast on the weights' device type under precision bf16
        (set_precision), else nothing (fp32)."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.llm.embed_tokens.weight.device.type, dtype=torch.bfloat16)

    @in_precision
    def image_features(self, pixel_values, task_ids=None, use_experts=True):
        """Projected patch features [B, P, D]: through the tower's experts (task_ids' routers) where its pools are
        active."""
        return self.image_tokens(pixel_values, task_ids, use_experts)[0]

    def image_tokens(self, images, task_ids=None, use_experts=True):
        """(projected image features, the vision experts' balance loss): `images` are pixel_values [B,3,H,W], or
        features [B,P,D] already projected (a frozen tower: no loss)."""
        if images.dim() != 4:
            return images, images.new_zeros((), dtype=torch.float32)
        if not self.vision.experts_active(use_experts):  # the frozen tower (no routing, no loss; use_experts=False:
            feats = self.vision(images, use_experts=False)  # not even an active pool's experts)
            return self.projector(feats), feats.new_zeros((), dtype=torch.float32)
        feats, aux = self.vision.routed(images, task_ids, use_experts)
        return self.projector(feats), aux

    def splice(self, input_ids_BT, images, labels_BT=None):
        """Replace each row's single IMAGE_TOKEN_ID by the P projected patch features (static shapes:
        S = T - 1 + P, built with gathers so it compiles without data-dependent shapes). `images` is
        pixel_values [B,3,H,W] or precomputed image features [B,P,D] (the tower is frozen in continual
        learning, so train.py computes them once per dataset).
        A row without IMAGE_TOKEN_ID is text-only and may share the batch: it still gets P image slots (static
        shapes), put in place of one padding token (the first when the row starts with padding, i.e. a left-padded
        prompt; else the last, i.e. a right-padded training row, which must end in padding) and marked invalid. So
        they are out of the attention keys where a mask is used (generation, features), after every real token of a
        causal right-padded row (training), out of the routing statistics, and never labelled: the real tokens see
        the text alone, at the positions they would have without an image."""
        img_BPD = self.image_features(images) if images.dim() == 4 else images
        B, T = input_ids_BT.shape
        P = img_BPD.shape[1]
        S = T - 1 + P
        is_ph_BT = input_ids_BT == IMAGE_TOKEN_ID
        has_img_B1 = is_ph_BT.any(1, keepdim=True)
        blank_B1 = torch.where(input_ids_BT[:, :1] == self.pad_id, 0, T - 1)  # text-only rows: where the slots go
        p_B1 = torch.where(has_img_B1, is_ph_BT.int().argmax(1, keepdim=True), blank_B1)
        j_1S = torch.arange(S, device=input_ids_BT.device)[None]
        rel_BS = j_1S - p_B1
        is_img_BS = (rel_BS >= 0) & (rel_BS < P)
        src_BS = torch.where(j_1S < p_B1, j_1S, j_1S - P + 1).clamp(0, T - 1)  # text position feeding slot j
        ids_BS = input_ids_BT.gather(1, src_BS)
        tok_BSD = self.llm.embed_tokens(ids_BS.clamp(min=0))
        img_BSD = img_BPD.gather(1, rel_BS.clamp(0, P - 1)[..., None].expand(B, S, img_BPD.shape[-1]))
        x_BSD = torch.where((is_img_BS & has_img_B1)[..., None], img_BSD.to(tok_BSD.dtype), tok_BSD)
        valid_BS = torch.where(is_img_BS, has_img_B1, ids_BS != self.pad_id)
        lab_BS = None
        if labels_BT is not None:
            lab_BS = labels_BT.gather(1, src_BS).masked_fill(is_img_BS, IGNORE_INDEX)
        return x_BSD, valid_BS, lab_BS

    @in_precision
    def forward(self, input_ids, images, labels=None, task_ids=None, use_experts=True):
        """Training forward on right-padded batches. Returns (logits, loss or None, balance loss: the decoder's pools'
        plus, when pixels meet active vision pools, the tower's)."""
        img, vis_aux = self.image_tokens(images, task_ids, use_experts)
        x, valid, lab = self.splice(input_ids, img, labels)
        logits, aux = self.llm(inputs_embeds=x, task_ids=task_ids, valid_BT=valid, use_experts=use_experts)
        if images.dim() == 4 and self.vision.experts_active(use_experts):
            aux = aux + vis_aux
        loss = None
        if lab is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), lab[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return logits, loss, aux

    def _left_pad(self, prompts, device):
        """Left-pad prompts to one length: generation then appends at the same index for every row. A text-only
        prompt (no IMAGE_TOKEN_ID) keeps at least one padding token in front: splice puts its masked image slots there."""
        T = max(len(p) + (IMAGE_TOKEN_ID not in p) for p in prompts)
        ids = torch.full((len(prompts), T), self.pad_id, dtype=torch.long)
        for b, p in enumerate(prompts):
            ids[b, T - len(p):] = torch.tensor(p)
        return ids.to(device)

    @torch.no_grad()
    @in_precision
    def features(self, prompts, images, kind="last"):
        """PTL feature of the frozen base model (no experts): "last", the paper's final hidden state at the last
        prompt token [B,D]; or "mean", the mean hidden state over the image slots beside the mean over the valid text
        (instruction) tokens [B,2D], which sees both what is shown and what is asked (a text-only prompt: zeros);
        "max", the same with the maximum over the tokens in place of the mean (D-MoLE's pooling, dmole_rep); "text",
        the mean over the instruction tokens alone [B,D] (what is asked: the reject option's REJECT_FEATURE); or
        "image", the frozen tower's projected patch features, mean-pooled [B,D] (the decoder not involved)."""
        if kind == "image":
            return self.image_features(images, use_experts=False).float().mean(1)
        ids = self._left_pad(prompts, images.device)
        x, valid, _ = self.splice(ids, self.image_features(images, use_experts=False))  # the frozen tower too
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        mask = self._mask(valid, x.shape[1], x.shape[1], 0)
        h_BSD, _ = self.llm(inputs_embeds=x, pos_BT=pos, mask_BTT=mask, use_experts=False, return_hidden=True)
        if kind == "last":
            return h_BSD[:, -1].float()
        if kind not in ("mean", "max", "text"):
            raise ValueError(f"locator feature must be 'last', 'mean' or 'image' (or dmole_rep's 'max', the reject "
                             f"gates' 'text'), not {kind!r}")
        P = x.shape[1] - ids.shape[1] + 1  # splice: S = T - 1 + P
        rel_BS = torch.arange(x.shape[1], device=x.device)[None] - (ids == IMAGE_TOKEN_ID).int().argmax(1, keepdim=True)
        img_BS = (rel_BS >= 0) & (rel_BS < P) & (ids == IMAGE_TOKEN_ID).any(1, keepdim=True)  # as splice places them
        masks = (img_BS, valid & ~img_BS)
        if kind == "max":  # an empty span (a text-only prompt's image slots): zeros, as the mean gives
            return torch.cat([h_BSD.float().masked_fill(~m[..., None], float("-inf")).amax(1).masked_fill(
                ~m.any(1, keepdim=True), 0.0) for m in masks], -1)
        means = [(h_BSD.float() * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
                 for m in (m.float() for m in (masks[1:] if kind == "text" else masks))]
        return torch.cat(means, -1)

    @staticmethod
    def _mask(valid_BS, Tq, Tk, t0):
        """Causal mask over a key buffer of length Tk for queries at t0..t0+Tq, hiding padded keys."""
        q = torch.arange(t0, t0 + Tq, device=valid_BS.device)[:, None]
        k = torch.arange(Tk, device=valid_BS.device)[None, :]
        keys_B1K = F.pad(valid_BS, (0, Tk - valid_BS.shape[1]), value=True)[:, None, :]
        # a pad query may always see itself: a fully masked row gives NaN in some SDPA kernels (CUDA mem-efficient)
        return ((k <= q)[None] & keys_B1K) | (k == q)[None]

    @torch.no_grad()
    @in_precision
    def generate(self, prompts, images, task_ids=None, max_new_tokens=16, stop_ids=(), use_experts=True):
        """Greedy decoding of a batch of prompts (lists of ids, one IMAGE_TOKEN_ID each, or none in a text-only
        prompt) -> new ids per row. use_experts=False: the frozen base alone."""
        dev = images.device
        ids = self._left_pad(prompts, dev)
        x, valid, _ = self.splice(ids, self.image_features(images, task_ids, use_experts))
        B, S, D = x.shape
        c = self.llm.cfg
        pos = (valid.long().cumsum(1) - 1).clamp(min=0)
        total = S + max_new_tokens
        shape = (B, c.n_kv_heads, total, c.head_dim)
        cache = [{"k": x.new_zeros(shape), "v": x.new_zeros(shape)} for _ in range(c.n_layers)]
        out = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        stop = torch.tensor(list(stop_ids) or [-1], device=dev)
        step_x, step_pos, t0 = x, pos, 0
        for _ in range(max_new_tokens):
            mask = self._mask(valid, step_x.shape[1], total, t0)
            h_BTD, _ = self.llm(inputs_embeds=step_x, pos_BT=step_pos, mask_BTT=mask, cache=cache, t0=t0,
                                task_ids=task_ids, valid_BT=valid if t0 == 0 else None, use_experts=use_experts,
                                return_hidden=True)  # (the prompt's valid tokens: where adapter gates read)
            nxt_B = self.llm.lm_head(h_BTD[:, -1]).argmax(-1)  # logits of the last position only
            for b in range(B):
                if not done[b]:
                    out[b].append(int(nxt_B[b]))
            done |= torch.isin(nxt_B, stop)
            if bool(done.all()):
                break
            t0 += step_x.shape[1]
            step_x = self.llm.embed_tokens(nxt_B)[:, None]
            step_pos = step_pos[:, -1:] + 1
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], 1)
        return [[t for t in o if t not in set(stop_ids)] for o in out]


# ----------------------------------------------------------------------------------------------------------
# PGKE: Probe-Guided Knowledge Extension (where to grow). train.pgke runs these steps in this order:
#   probe_start -> train the probes -> count (set_counting, a forward pass, read_usage) -> probe_frequencies ->
#   pgke_decide -> copy_sources -> probe_end -> expand

def probe_start(llm: Llama, generator=None):
    """Stage A: one temporary probe expert per layer (the last expert) and a probe router = latest router + a row
    of zeros for the probe."""
    for pool in llm.expert_pools():
        latest = pool.routers[-1].detach() if len(pool.routers) else None
        pool.add_experts(1, generator=generator)
        pool.add_router(latest)


def set_counting(llm: Llama, on: bool):
    """PGKE usage counts: switching on starts from zero; read_usage reads them."""
    for pool in llm.expert_pools():
        pool.counting = on
        if on:
            pool.usage = torch.zeros(0, device=pool.device)


def read_usage(llm: Llama) -> list[torch.Tensor]:
    """Per layer, the counted (token, top-k slot) assignments to each of its E experts [E] (zeros where nothing was
    counted: a torchrun rank without held-out rows); stops counting."""
    out = []
    for i, pool in enumerate(llm.expert_pools()):
        if not pool.counting:
            raise RuntimeError(f"read_usage: layer {i} is not counting (set_counting(llm, True), then run the held-out "
                               f"probe data)")
        out.append(pool.usage.clone() if pool.usage.numel() == pool.n_experts else torch.zeros(pool.n_experts,
                                                                                                device=pool.device))
        pool.counting, pool.usage = False, torch.zeros(0, device=pool.device)
    return out


def probe_frequencies(usage) -> list[float]:
    """freq_l = share of layer l's assignments that went to its probe (the last expert)."""
    return [float(u[-1] / u.sum().clamp(min=1)) if u.numel() else 0.0 for u in usage]


PGKE_TOL = 1e-9  # "greater" means greater by more than float rounding: equal frequencies never split


def pgke_decide(freq, alpha: float):
    """Expand layer l iff freq_l > mean(freq) - alpha * std(freq) (population std over layers)."""
    f = torch.tensor(freq, dtype=torch.float64)
    threshold = float(f.mean() - alpha * f.std(unbiased=False))
    return [bool(x > threshold + PGKE_TOL) for x in f], threshold


def copy_sources(usage) -> list[int | None]:
    """Per layer, the expert a new one is copied from: the most-used old expert during probing (ties: the lowest
    index). The probe (the last expert) is never a source, also where it won: probe_end drops it, and a copy of a
    briefly trained probe would start the task from less than the layer already knows. None: no old expert."""
    out = []
    for u in usage:
        old = u[:-1].tolist()
        out.append(old.index(max(old)) if old else None)  # list.index: the first (lowest) of tied maxima
    return out


def probe_end(llm: Llama) -> list[torch.Tensor]:
    """Drop the probes and their routers; return each layer's probe router (old rows + the probe's row), which
    initialises the task's real router."""
    probe_routers = []
    for pool in llm.expert_pools():
        probe_routers.append(pool.routers[-1].detach().clone())
        pool.routers = nn.ParameterList(list(pool.routers)[:-1])
        pool.drop_trainable()
    return probe_routers


def expand(llm: Llama, decision, sources, probe_routers, n_new: int = 1, generator=None):
    """Stage B: expanded layers get n_new copies of their source expert (fresh experts from `generator` only in a
    layer that has none to copy); every layer gets the new task's router over all experts that exist now (old rows
    from the probe router, new rows = the probe's row). Runs after probe_end: the pool holds the old experts only."""
    for pool, grow, src, pr in zip(llm.expert_pools(), decision, sources, probe_routers):
        n_old = pool.n_experts
        if grow:
            pool.add_experts(n_new, copy_from=src, generator=generator)
        init = torch.cat([pr[:n_old], pr[n_old:n_old + 1].expand(pool.n_experts - n_old, -1)], 0)
        pool.add_router(init)


def expert_numel(pool: Experts) -> int:
    """Parameters of one expert of the pool: its LoRA pair on every projection."""
    return sum(e.rank * (e.din + e.dout) for e in pool.lora.values())


# ----------------------------------------------------------------------------------------------------------
# Bounded growth (--max-expert-params): train.fit_budget makes room for a task's growth by skipping growth or by
# merging two frozen experts of a layer into one. The merge's defaults are the measured choices (bench/merge_rules.py):
# the two least-used experts, the rank-R SVD fit of their usage-weighted mean delta, each router keeping the row of
# the expert its task used more.

def merge_lora(a_i, b_i, a_j, b_j, w_i, w_j, fit="svd"):
    """One LoRA pair (a_DR, b_RO) standing for w_i * a_i b_i + w_j * a_j b_j (w_i + w_j = 1). svd: the truncated SVD of
    that delta, its least-squares best rank-R fit (Eckart-Young); mean: the weighted mean of the factors (exact only
    where the two experts share one factor)."""
    if fit == "mean":
        return w_i * a_i + w_j * a_j, w_i * b_i + w_j * b_j
    if fit != "svd":
        raise ValueError(f"merge fit must be svd or mean, not {fit!r}")
    R = a_i.shape[1]
    U, S, Vh = torch.linalg.svd(w_i * a_i.double() @ b_i.double() + w_j * a_j.double() @ b_j.double(),
                                full_matrices=False)
    s = S[:R].sqrt()  # singular values split evenly between the factors
    return (U[:, :R] * s).to(a_i.dtype), (s[:, None] * Vh[:R]).to(b_i.dtype)


def merge_rows(W_ED, i, j, u_i, u_j, row="keep"):
    """A router after merging expert j into i (i < j < E): row i becomes the row of the expert this router's task used
    more (keep; ties: i), or their usage-weighted mean (mean); row j goes, later rows move up one."""
    if row == "keep":
        merged = W_ED[j] if u_j > u_i else W_ED[i]
    elif row == "mean":
        merged = (u_i * W_ED[i] + u_j * W_ED[j]) / (u_i + u_j) if u_i + u_j > 0 else (W_ED[i] + W_ED[j]) / 2
    else:
        raise ValueError(f"merge row rule must be keep or mean, not {row!r}")
    return torch.cat([W_ED[:i], merged[None], W_ED[i + 1:j], W_ED[j + 1:]])


def expert_use(pool: Experts) -> torch.Tensor:
    """Each expert's usage summed over the tasks' recorded shares (Experts.task_use) [E]."""
    use_E = torch.zeros(pool.n_experts, dtype=torch.float64)
    for u in pool.task_use:
        use_E[: len(u)] += u.double().cpu()
    return use_E


@torch.no_grad()
def merge_pair(pool: Experts, rule="least") -> tuple[int, int]:
    """The two frozen experts (i < j) to merge. least: the two least-used (summed usage, expert_use; ties: the lower
    index); ward: the pair whose merge moves the used deltas least, Ward's cost u_i u_j / (u_i + u_j) * sum over
    projections |A_i B_i - A_j B_j|^2 (the usage-weighted squared change of both experts when they become their
    weighted mean). Measured on MiniCoIN (bench/merge_rules.py), least keeps old tasks better."""
    use_E = expert_use(pool)[: pool.n_frozen]
    if rule == "least":
        return tuple(sorted(sorted(range(len(use_E)), key=lambda e: (float(use_E[e]), e))[:2]))
    if rule != "ward":
        raise ValueError(f"merge pair rule must be ward or least, not {rule!r}")
    deltas = [torch.einsum("edr,ero->edo", e.frozen_A.double(), e.frozen_B.double()).flatten(1) for e in pool.lora.values()]
    dist_EE = sum(torch.cdist(d, d).pow(2) for d in deltas)
    u = use_E.clamp(min=1e-12)
    cost_EE = u[:, None] * u[None, :] / (u[:, None] + u[None, :]) * dist_EE
    pairs = [(i, j) for i in range(len(u)) for j in range(i + 1, len(u))]
    return min(pairs, key=lambda p: (float(cost_EE[p]), p))


@torch.no_grad()
def merge_experts(pool: Experts, i: int, j: int, fit="svd", row="keep"):
    """Merge frozen expert j into frozen expert i (i < j): expert i becomes one LoRA standing for their deltas weighted
    by their summed usage (merge_lora), expert j is removed and later experts move down one index. Every router that
    saw both gets merge_rows with its own task's usage of the two (equal without a record); a router that saw i only
    keeps its rows (its expert i is now the merged one); task usage records add j's share to i's."""
    if pool.n_experts > pool.n_frozen:
        raise ValueError("merge_experts merges frozen experts: this pool holds trainable ones (merge before expand)")
    if not 0 <= i < j < pool.n_frozen:
        raise ValueError(f"merge_experts: need 0 <= i < j < {pool.n_frozen} (frozen experts), got i={i}, j={j}")
    use_E = expert_use(pool)
    u_i, u_j = (float(use_E[i]), float(use_E[j])) if use_E[i] + use_E[j] > 0 else (1.0, 1.0)
    keep = [e for e in range(pool.n_frozen) if e != j]
    for e in pool.lora.values():
        A, B = e.frozen_A.detach().clone(), e.frozen_B.detach().clone()
        A[i], B[i] = merge_lora(A[i], B[i], A[j], B[j], u_i / (u_i + u_j), u_j / (u_i + u_j), fit)
        e._set("frozen", A[keep], B[keep])
    for t, r in enumerate(pool.routers):
        if r.shape[0] > j:
            u = pool.task_use[t] if t < len(pool.task_use) else torch.ones(r.shape[0])
            pool.routers[t] = nn.Parameter(merge_rows(r.detach(), i, j, float(u[i]), float(u[j]), row),
                                           requires_grad=r.requires_grad)
    for t, u in enumerate(pool.task_use):
        if len(u) > j:
            u = u.clone()
            u[i] += u[j]
            pool.task_use[t] = torch.cat([u[:j], u[j + 1:]])


def init_experts(llm: Llama, n: int, generator=None):
    """Task 1: every layer gets n fresh experts and the first task's router."""
    for pool in llm.expert_pools():
        pool.add_experts(n, generator=generator)
        pool.add_router(None if pool.n_experts == 0 else torch.randn(pool.n_experts, pool.dim, generator=generator) * 0.02)


# ----------------------------------------------------------------------------------------------------------
# PTL: Probabilistic Task Locator (which task's routers at test time)

class TaskVAE(nn.Module):
    """A small VAE over one task's standardised features; its reconstruction error says how well a new
    sample fits the task."""

    def __init__(self, dim, hidden=128, latent=16):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.GELU(), nn.Linear(hidden, dim))
        for name in ("feat_mean", "feat_std"):
            self.register_buffer(name, torch.zeros(dim) if name == "feat_mean" else torch.ones(dim))
        self.register_buffer("err_mean", torch.zeros(()))
        self.register_buffer("err_std", torch.ones(()))

    def loss(self, f_BD, beta=1e-3, generator=None):
        x = (f_BD - self.feat_mean) / self.feat_std
        mu, logvar = self.enc(x).chunk(2, -1)
        z = mu + torch.randn(mu.shape, generator=generator) * (0.5 * logvar).exp()
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1).mean()
        return F.mse_loss(self.dec(z), x) + beta * kl

    def recon_error(self, f_BD):
        x = (f_BD - self.feat_mean) / self.feat_std
        mu, _ = self.enc(x).chunk(2, -1)  # deterministic at test time: decode the mean
        return (self.dec(mu) - x).pow(2).mean(-1)


def fit_vae(features_ND, hidden=128, latent=16, steps=400, lr=3e-3, batch=64, seed=0) -> TaskVAE:
    g = torch.Generator().manual_seed(seed)  # batches and reparameterisation noise: the fit is a function of seed
    f = features_ND.detach().float().cpu()
    with torch.random.fork_rng(devices=[]):  # initial weights from `seed`, and the global generator untouched
        torch.manual_seed(seed)
        vae = TaskVAE(f.shape[1], hidden, latent)
    vae.feat_mean.copy_(f.mean(0))
    vae.feat_std.copy_(f.std(0).clamp(min=1e-4))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        idx = torch.randint(0, f.shape[0], (min(batch, f.shape[0]),), generator=g)
        loss = vae.loss(f[idx], generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        err = vae.recon_error(f)
        vae.err_mean.copy_(err.mean())
        vae.err_std.copy_(err.std().clamp(min=1e-6))
    return vae.eval()


# What the reject option's gates model, whatever feature the VAEs locate with: the instruction tokens' mean state.
# A task is its instruction: MiniCoIN's unseen tasks show the trained tasks' images (textcolor: ocr's very scenes),
# so a feature with the image half ("mean") lets a trained task's gate accept them (docs/minicoin.md).
REJECT_FEATURE = "text"
GATE_SHRINK = 1e-3  # covariance shrinkage towards its mean variance (a 128-d covariance from 400 samples)


class TaskGate(nn.Module):
    """The reject option's test for one task: a Gaussian over the frozen base's REJECT_FEATURE of the task's training
    examples; a sample's squared Mahalanobis distance d2(f) = (f - mu)^T C^-1 (f - mu) against the shrunk covariance
    C = (1 - s) S + s (tr S / D) I (S: sample covariance, s = GATE_SHRINK; Ledoit-Wolf's target). The Gaussian is the
    Mahalanobis detector of Lee et al., NeurIPS 2018, per task; rejecting what no task accepts is DDAS's rule
    (MoE-Adapters4CL, Yu et al., CVPR 2024: per-task autoencoders, the base model for inputs none accepts).
    S has rank <= N-1, so C is kept as S's top K = min(D, N-1) eigenvectors (basis_DK) and C's variances along them;
    every other direction has C's floor variance s tr(S)/D (D*K numbers, not D*D: a 4096-d LLM's 8192-d feature)."""

    def __init__(self, dim, k):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("basis", torch.zeros(dim, k))
        self.register_buffer("var", torch.ones(k))
        self.register_buffer("floor", torch.ones(()))
        self.register_buffer("bound", torch.tensor(float("nan")))  # the largest d2 accepted (calibrate)

    @torch.no_grad()
    def distance(self, f_BD):
        """Squared Mahalanobis distance [B] (float64: the floor term divides a difference of large norms by s)."""
        x_BD = f_BD.double().cpu() - self.mean.double()
        p_BK = x_BD @ self.basis.double()
        rest_B = (x_BD.pow(2).sum(-1) - p_BK.pow(2).sum(-1)).clamp(min=0) if self.basis.shape[1] < x_BD.shape[1] else 0
        return (p_BK.pow(2) / self.var.double()).sum(-1) + rest_B / self.floor.double()

    @torch.no_grad()
    def calibrate(self, held_out_ND, quantile=1.0):
        """bound = the `quantile` of d2 over held-out examples of the task (ones the Gaussian was not fitted on): with
        the default 1.0, the farthest of them; no margin beyond it."""
        self.bound.fill_(float(torch.quantile(self.distance(held_out_ND), quantile)))


def gate_rank(n, dim):
    """How many eigenvectors a gate fitted on n features of size dim keeps (its sample covariance's rank bound)."""
    return max(1, min(dim, n - 1))


@torch.no_grad()
def fit_gate(features_ND, held_out_ND=None, quantile=1.0, shrink=GATE_SHRINK) -> TaskGate:
    """A task's TaskGate from its training features [N, D], calibrated on held_out_ND when given (TaskGate.calibrate)."""
    f = features_ND.detach().double().cpu()
    N, D = f.shape
    if N < 2:
        raise ValueError(f"a reject gate needs at least 2 training features, got {N}")
    mu = f.mean(0)
    X_ND = f - mu  # S = X^T X / (N-1): its eigenvectors are X's right singular vectors, found without forming S
    _, sv, Vh = torch.linalg.svd(X_ND, full_matrices=False)  # (D x D would be 8192^2 for a 4096-wide LLM's feature)
    K = gate_rank(N, D)
    lam, U = (sv[:K].pow(2) / (N - 1)), Vh[:K].T
    floor = max(shrink * float(X_ND.pow(2).sum()) / (N - 1) / D, 1e-12)  # shrink * tr(S) / D
    gate = TaskGate(D, K)
    gate.mean.copy_(mu)
    gate.basis.copy_(U)
    gate.var.copy_((1 - shrink) * lam + floor)
    gate.floor.fill_(floor)
    if held_out_ND is not None:
        gate.calibrate(held_out_ND, quantile)
    return gate.eval()


class Locator(nn.Module):
    """One VAE per task seen; per sample, pick the task whose VAE explains the feature best (z-scored). The reject
    option adds one TaskGate per task over REJECT_FEATURE: a sample goes to the VAEs' best task among those whose
    gate accepts it, and to the base model alone where none does."""
    REJECTED = -1  # locate(reject=True): no task's gate accepts the sample

    def __init__(self, feature="last"):
        super().__init__()
        self.feature = feature  # which LLaVA.features the VAEs model: "last" (the paper's) or "mean"
        self.vaes = nn.ModuleList()
        self.gates = nn.ModuleList()

    def add_task(self, features_ND, **kw):
        self.vaes.append(fit_vae(features_ND, **kw))

    def add_gate(self, features_ND, held_out_ND, quantile=1.0):
        """The next task's gate, fitted on features_ND (REJECT_FEATURE of the examples its VAE was fitted on) and
        calibrated on held_out_ND."""
        self.gates.append(fit_gate(features_ND, held_out_ND, quantile))

    @torch.no_grad()
    def scores(self, f_BD):
        f = f_BD.float().cpu()
        return torch.stack([(v.recon_error(f) - v.err_mean) / v.err_std for v in self.vaes], -1)

    def locate(self, f_BD, reject=False, g_BD=None):
        """Hard, per-sample choice: argmin_t z_t. reject: only among the tasks whose gate accepts the sample's
        REJECT_FEATURE g_BD (d2_t <= bound_t); REJECTED where none does (the caller answers with the base model)."""
        z_BN = self.scores(f_BD)
        if not reject:
            return z_BN.argmin(-1)
        if len(self.gates) != len(self.vaes) or any(g.bound.isnan() for g in self.gates):
            raise ValueError(f"the locator has {len(self.gates)} calibrated reject gates for {len(self.vaes)} tasks "
                             f"(a checkpoint from before the gates: eval.reevaluate fits them from the run's data)")
        if g_BD is None:
            raise ValueError(f"locate(reject=True) needs the samples' '{REJECT_FEATURE}' features (g_BD)")
        ok_BN = torch.stack([g.distance(g_BD) <= g.bound for g in self.gates], -1)
        z_BN = z_BN.masked_fill(~ok_BN, float("inf"))
        return torch.where(ok_BN.any(-1), z_BN.argmin(-1), self.REJECTED)


# ----------------------------------------------------------------------------------------------------------
# D-MoLE (Ge et al., "Dynamic Mixture of Curriculum LoRA Experts for Continual Multimodal Instruction Tuning",
# ICML 2025; official code gcd19/D-MoLE @ 0725cd3, cited below as D-MoLE <path>). Per task: a zero-cost proxy
# (gradient norms of the frozen base's attention projections, train.dmole_scores) ranks every candidate module of both
# towers; the allocator (dmole_allocate) picks half of them, split between vision and language by gradient mass; each
# picked module gets one new LoRA expert for the task (DMoLE); per-task autoencoders (AERouter) choose, per batch, the
# tasks whose experts are on; the curriculum (dmole_lr_scales) scales each modality's learning rate by its difficulty.
# Candidate modules: each attention projection on its own (decoder q/k/v/o, ViT q/k/v/out_proj); D-MoLE scores the
# fused qkv and the output projection of InternVL2 (D-MoLE internvl/scorer/compute_zc_score.py), whose towers fuse
# q, k and v: here both towers keep them apart, and one LoRA per Linear keeps the unit the same in both.

DMOLE_MODULES = r"^(llm\.layers\.\d+\.attn\.[qkvo]_proj|vision\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj)$"
DMOLE_VOTE_SHARE = 0.3  # a second task joins the active set at this share of the votes (D-MoLE modeling_internvl_chat.py)


def dmole_candidates(model: nn.Module) -> list[str]:
    """The modules D-MoLE may give experts: every attention projection of the decoder and of the ViT (their paths in
    `model`, decoder first, in model order)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and re.match(DMOLE_MODULES, n)]


def is_vision_module(name: str) -> bool:
    return name.startswith("vision.")


def dmole_allocate(scores: dict, budget: float = 0.5, vision_floor: float = 0.25, generator=None) -> list[str]:
    """D-MoLE's budget rule (D-MoLE scripts/preprocess/get_dmole_arch.py): of M scored modules {name: s_m} pick
        B     = round(budget * M)
        B_vit = max(floor(vision_floor * B), round(B * share_vit)),  share_vit = sum_vit s_m / sum_all s_m
        B_llm = B - B_vit
    and take the top-B_vit vision modules and the top-B_llm language modules by score. A side with fewer modules than
    its share gives the rest to the other side. Ties in score are broken by a random order drawn from `generator`
    (the release: a seeded random.shuffle). Returns the chosen names in the order of `scores`."""
    names = list(scores)
    M = len(names)
    if M == 0:
        return []
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"D-MoLE budget must be in (0, 1], not {budget!r}")
    B = int(round(budget * M))
    vit = [n for n in names if is_vision_module(n)]
    llm = [n for n in names if not is_vision_module(n)]
    total = sum(scores.values())
    share = sum(scores[n] for n in vit) / total if total > 0 else len(vit) / M
    b_vit = min(len(vit), max(math.floor(vision_floor * B), int(round(B * share))))
    b_llm = min(len(llm), B - b_vit)
    b_vit = min(len(vit), B - b_llm)  # the language side short of modules: the rest to vision
    order = torch.randperm(M, generator=generator).tolist()  # tie-breaker rank of each name
    tie = {n: order[i] for i, n in enumerate(names)}

    def top(group, k):
        return set(sorted(group, key=lambda n: (-scores[n], tie[n]))[:k])
    chosen = top(vit, b_vit) | top(llm, b_llm)
    return [n for n in names if n in chosen]


def dmole_lr_scales(scores: dict, lo: float = 0.5, hi: float = 2.0) -> dict:
    """The inter-modal curriculum: a learning-rate factor per modality {"llm": r_L, "vision": r_V}.
    The paper (D-MoLE, abstract and its "gradient-based inter-modal continual curriculum") adjusts the update ratio of
    each module by the difficulty of each modality within the task; the released code has no such step (it only splits
    the expert budget by gradient mass, dmole_allocate). The formula used here: a modality's difficulty is the mean
    gradient norm of its scored modules under the task's loss on the frozen base,
        d_m = sum_{n in m} s_n / |m|,       r_m = clip(d_m / mean(d_L, d_V), lo, hi),
    and the new experts of modality m train at lr * r_m: the modality the task finds harder (whose modules the loss
    pulls harder) takes larger steps. A modality without scored modules gets 1."""
    d = {}
    for side in ("llm", "vision"):
        group = [s for n, s in scores.items() if is_vision_module(n) == (side == "vision")]
        if group:
            d[side] = sum(group) / len(group)
    mean = sum(d.values()) / len(d) if d else 0.0
    return {side: (min(hi, max(lo, d[side] / mean)) if side in d and mean > 0 else 1.0) for side in ("llm", "vision")}


def lora_numel(module: nn.Linear, rank: int) -> int:
    """Parameters of one rank-`rank` LoRA expert on a Linear: A [in, R] and B [R, out]."""
    return rank * (module.in_features + module.out_features)


def dmole_budget_numel(model: nn.Module, budget: float, rank: int) -> int:
    """The most expert parameters one D-MoLE task may add: the B = round(budget * M) largest candidate modules' LoRA."""
    sizes = sorted((lora_numel(model.get_submodule(n), rank) for n in dmole_candidates(model)), reverse=True)
    return sum(sizes[: int(round(budget * len(sizes)))])


class DMoLE(nn.Module):
    """D-MoLE's experts (D-MoLE internvl/dmole/layer.py, model.py): per candidate Linear (by its path in the model) a
    LoRAExperts bank holding one expert per task that chose the module (their task ids in `tasks[name]`, append-only),
    and the set of tasks whose experts are on (`active`). Forward hooks on the candidate Linears (attach) make each
        y = W0 x + scale * sum_{e : task_e in active} B_e A_e x
    a plain sum, no gate (the release's DMoLELinear.forward): the bank's dense dispatch with a fixed 0/1 weight per
    expert. A task's expert trains in the bank's train half; freeze() moves it to the frozen half (old experts get no
    gradient, also while they are on during a later task's training)."""

    def __init__(self, rank=8, alpha=16.0):
        super().__init__()
        self.rank, self.alpha = rank, alpha
        self.experts = nn.ModuleDict()  # key(name) -> LoRAExperts
        self.tasks: dict[str, list[int]] = {}
        self.active: tuple = ()
        self._handles = []

    @property
    def scale(self):
        return self.alpha / self.rank

    @staticmethod
    def key(name):
        return name.replace(".", "/")  # a module name may not contain "."

    def attach(self, model: nn.Module):
        """Hook every candidate projection of `model` (one without a bank adds nothing)."""
        for h in self._handles:
            h.remove()
        self._handles = [model.get_submodule(n).register_forward_hook(functools.partial(self._hook, n))
                         for n in dmole_candidates(model)]

    def _hook(self, name, module, inputs, out):
        k = self.key(name)
        if not self.active or k not in self.experts:
            return None  # the output as the base computed it
        on = [e for e, t in enumerate(self.tasks[name]) if t in self.active]
        if not on:
            return None
        bank, x = self.experts[k], inputs[0]
        x_TD = x.reshape(-1, x.shape[-1])
        w_E = torch.zeros(len(bank), device=x.device)
        w_E[on] = 1.0
        y_TO = bank(x_TD, w_E.expand(x_TD.shape[0], -1), self.scale)
        return out + y_TO.view(*out.shape[:-1], -1).to(out.dtype)

    @contextlib.contextmanager
    def using(self, tasks):
        """The experts of `tasks` on inside the block (() : the frozen base)."""
        before, self.active = self.active, tuple(int(t) for t in tasks)
        try:
            yield
        finally:
            self.active = before

    def grow(self, model: nn.Module, names, task: int, generator=None):
        """One new trainable expert (A random, B = 0: no change until it trains) for `task` on each module in names."""
        for n in names:
            k = self.key(n)
            if k not in self.experts:
                lin = model.get_submodule(n)
                self.experts[k] = LoRAExperts(lin.in_features, lin.out_features, self.rank).to(lin.weight.device)
                self.tasks[n] = []
            self.experts[k].grow(1, generator=generator)
            self.tasks[n].append(int(task))

    def freeze(self):
        for bank in self.experts.values():
            bank.freeze()

    def modules_of(self, task: int) -> list[str]:
        return [n for n, ts in self.tasks.items() if task in ts]

    def n_experts(self) -> int:
        return sum(len(ts) for ts in self.tasks.values())

    def load(self, model: nn.Module, tensors, tasks: dict, source=""):
        """Adopt stored banks (`tasks`: {module name: its experts' task ids}, from the checkpoint's meta.json)."""
        self.experts, self.tasks = nn.ModuleDict(), {}
        for n, ts in tasks.items():
            try:
                lin = model.get_submodule(n)
            except AttributeError:
                raise KeyError(f"{source}: D-MoLE experts for {n!r}, which this model does not have") from None
            bank = LoRAExperts(lin.in_features, lin.out_features, self.rank).to(lin.weight.device)
            bank.load(tensors, f"dmole.experts.{self.key(n)}.", source)
            if len(bank) != len(ts):
                raise ValueError(f"{source}: D-MoLE module {n}: {len(bank)} stored experts, {len(ts)} task ids")
            self.experts[self.key(n)], self.tasks[n] = bank, [int(t) for t in ts]


def attach_dmole(model: LLaVA, rank=8, alpha=16.0) -> DMoLE:
    """model.dmole: an empty DMoLE hooked onto every candidate projection of `model` (its parameters' names hold
    '.experts.', so checkpoints, parameter counts and the fp32 rule of set_precision treat them as experts)."""
    model.dmole = DMoLE(rank, alpha)
    model.dmole.attach(model)
    return model.dmole


@torch.no_grad()
def dmole_rep(model: LLaVA, prompts, pixels_BCSS) -> torch.Tensor:
    """D-MoLE's sequence representation (D-MoLE modeling_internvl_chat.py, dataset.py): the maximum over the image
    patches of the vision tower's output beside the maximum over the prompt's text tokens of the LLM's final hidden
    states, L2-normalised [B, Dv + D]; from the frozen base (every D-MoLE expert off). A text-only prompt (zero pixels)
    keeps the tower's output of a blank image."""
    dm = getattr(model, "dmole", None)
    with dm.using(()) if dm is not None else contextlib.nullcontext(), model.autocast():
        v_BPC = model.vision(pixels_BCSS)
        text_BD = model.features(prompts, model.projector(v_BPC), kind="max")[:, model.llm.cfg.dim:]
    return F.normalize(torch.cat([v_BPC.float().amax(1), text_BD.float()], -1), dim=-1)


class TaskAE(nn.Module):
    """A task's autoencoder (D-MoLE internvl/model/autoencoder.py: Linear(d, 128), ReLU, Linear(128, d), MSE), without
    the release's output Sigmoid: the input here is an L2-normalised vector with negative entries, which a sigmoid
    cannot reproduce. `tau`: the largest reconstruction error that still counts as the task's."""

    def __init__(self, dim, hidden=128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.register_buffer("tau", torch.tensor(float("nan")))

    def error(self, z_BD):
        return (self.net(z_BD) - z_BD).pow(2).mean(-1)


def fit_ae(z_ND, quantile=0.99, hidden=128, epochs=1000, lr=5e-3, lr_min=1e-3, batch=1024, patience=10,
           seed=0) -> TaskAE:
    """Train a TaskAE as D-MoLE scripts/preprocess/train_autoencoder.py does (Adam lr 5e-3, cosine to 1e-3 over the
    epochs, batch 1024, up to 1000 epochs, stopping after `patience` epochs without a lower epoch loss); tau = the
    `quantile` of the task's own training errors. The release writes no threshold (its script prints the error
    quantiles and reads a hand-made threshold.txt); 0.99 is the high quantile used here."""
    z = z_ND.detach().float().cpu()
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = TaskAE(z.shape[1], hidden)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    best, stale = float("inf"), 0
    for ep in range(epochs):
        for gr in opt.param_groups:
            gr["lr"] = lr_min + (lr - lr_min) * 0.5 * (1 + math.cos(math.pi * ep / epochs))
        perm, total = torch.randperm(z.shape[0], generator=g), 0.0
        for i in range(0, z.shape[0], batch):
            loss = ae.error(z[perm[i:i + batch]]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(perm[i:i + batch])
        if total < best - 1e-12:
            best, stale = total, 0
        else:
            stale += 1
            if stale >= patience:
                break
    with torch.no_grad():
        ae.tau.fill_(float(torch.quantile(ae.error(z), quantile)))
    return ae.eval()


def route_by_errors(err_BN, tau_N) -> torch.Tensor:
    """Each sample's task: argmin_i err_i among the tasks with err_i < tau_i; -1 (none) where no task passes."""
    masked = err_BN.masked_fill(~(err_BN < tau_N[None]), float("inf"))
    return torch.where(masked.isfinite().any(-1), masked.argmin(-1), -1)


def vote_eval(choices, share=DMOLE_VOTE_SHARE) -> list[int]:
    """The tasks whose experts answer an evaluation batch (D-MoLE modeling_internvl_chat.py): the most-voted task,
    and the second if its share of the valid votes is at least `share`; [] (the base model) when no sample voted.
    Ties: the lower task id."""
    valid = [int(c) for c in choices if int(c) >= 0]
    if not valid:
        return []
    count = {c: valid.count(c) for c in set(valid)}
    ranked = sorted(count, key=lambda c: (-count[c], c))
    return ranked[:1] + [ranked[1]] if len(ranked) > 1 and count[ranked[1]] / len(valid) >= share else ranked[:1]


def vote_train(choices, task: int, share=DMOLE_VOTE_SHARE) -> list[int]:
    """The tasks on while training `task` (`choices`: the batch's samples routed among the OLD tasks' autoencoders):
    the task itself and the most-voted old task if at least `share` of the batch voted for it (its expert on, frozen).
    The share is of the whole batch here, not of the valid votes: a batch the old autoencoders mostly reject keeps its
    old experts off. Ties: the lower task id."""
    valid = [int(c) for c in choices if int(c) >= 0 and int(c) != task]
    if not valid:
        return [task]
    count = {c: valid.count(c) for c in set(valid)}
    top = min(count, key=lambda c: (-count[c], c))
    return [task, top] if count[top] / max(len(choices), 1) >= share else [task]


class AERouter(nn.Module):
    """D-MoLE's task router: one TaskAE per task seen, over dmole_rep features."""
    NONE = -1

    def __init__(self):
        super().__init__()
        self.aes = nn.ModuleList()

    def __len__(self):
        return len(self.aes)

    def add_task(self, z_ND, quantile=0.99, seed=0):
        self.aes.append(fit_ae(z_ND, quantile, seed=seed))

    @torch.no_grad()
    def route(self, z_BD, n_tasks=None) -> torch.Tensor:
        """Per sample, its task among the first n_tasks autoencoders (all by default), -1 where none accepts it."""
        aes = list(self.aes)[: len(self.aes) if n_tasks is None else n_tasks]
        if not aes:
            return torch.full((z_BD.shape[0],), self.NONE, dtype=torch.long)
        z = z_BD.float().cpu()
        return route_by_errors(torch.stack([ae.error(z) for ae in aes], -1), torch.stack([ae.tau for ae in aes]))
# MoE-Adapters4CL (Yu et al., CVPR 2024) transplanted to LLaVA (train.py --method moe-adapters). Its pieces, each
# from the official code (JiazuoYu/MoE-Adapters4CL, mtil/clip/): a static pool of bottleneck adapter experts parallel
# to each block's FFN/MLP (AdapterPool, in Experts.adapters: the decoder's layers and the CLIP tower's), one router and
# one noise router per task with noisy top-k gating per sample on the block's first token (noisy_top_k), activate-freeze
# (AdapterPool.end_task: after each task a layer's most chosen experts are frozen), and DDAS, the test-time selector
# (DDAS: per-task autoencoders + a reference autoencoder; the bare base for what none accepts).

@dataclass
class AdapterConfig:
    n_experts: int = 12  # the static pool per block (train.py: 2 per task of the run, the official 22 for 11 tasks)
    dim: int = 16  # bottleneck (official: 64 at CLIP ViT-B/16's widths 768 / 512)
    scale: float = 0.1  # s (official adapter_scalar)
    top_k: int = 2  # experts per sample (official --topk)
    dropout: float = 0.0  # on the bottleneck (official 0.1)
    n_freeze: int = 2  # activate-freeze: a layer's most chosen experts frozen after each task (official: 2)


NOISE_EPS = 1e-2  # noisy top-k's floor on the noise's standard deviation (MoE-Adapters4CL mtil/clip/model.py)


def noisy_top_k(h0_BD, router_NED, noise_NED, task_ids_B, k, noisy, generator=None):
    """Each sample's gate [B, E] under its task's router (MoE-Adapters4CL mtil/clip/model.py, noisy top-k gating of
    Shazeer et al. 2017): clean = h0 W_r^T; training: logits = clean + N(0, 1) * (softplus(h0 W_n^T) + 1e-2), at test
    time logits = clean; the softmax over the k largest logits, scattered into E (zeros elsewhere). h0_BD: the block
    input's first token (CLS in the tower, the first valid token in the decoder)."""
    N, E, D = router_NED.shape
    with torch.autocast(h0_BD.device.type, enabled=False):  # gate math in fp32 (ties flip in bf16)
        onehot_BN = F.one_hot(task_ids_B, N).float()  # each sample's router by a one-hot GEMM, not an index (route)
        h0 = h0_BD.float()
        w_BED = (onehot_BN @ router_NED.float().flatten(1)).view(-1, E, D)
        logits_BE = torch.einsum("bd,bed->be", h0, w_BED)
        if noisy:
            n_BED = (onehot_BN @ noise_NED.float().flatten(1)).view(-1, E, D)
            std_BE = F.softplus(torch.einsum("bd,bed->be", h0, n_BED)) + NOISE_EPS
            eps_BE = torch.randn(logits_BE.shape, generator=generator).to(logits_BE.device)
            logits_BE = logits_BE + eps_BE * std_BE
        top_BK, idx_BK = logits_BE.topk(min(k, E), dim=-1)
        return torch.zeros_like(logits_BE).scatter(-1, idx_BK, top_BK.softmax(-1))


def adapter_mix(h_BTD, gate_BE, k, down_EDR, bdown_ER, up_ERD, bup_ED, scale, dropout=0.0, training=False):
    """sum over each sample's top-k experts e of g_e * s * (W_up_e Dropout(ReLU(W_down_e h + b_d_e)) + b_u_e) [B,T,D]
    (MoE-Adapters4CL mtil/clip/adapter.py: the scale multiplies up_proj's output, its bias included). Only the k chosen
    experts' weights are gathered per sample (one-hot GEMMs: their backward is a GEMM too, not a scatter-add)."""
    E, D, R = down_EDR.shape
    g_BK, idx_BK = gate_BE.topk(min(k, E), dim=-1)
    B, K = idx_BK.shape
    sel_BKE = F.one_hot(idx_BK, E).to(down_EDR.dtype)
    pick = lambda W: (sel_BKE.flatten(0, 1) @ W.flatten(1)).view(B, K, *W.shape[1:])  # noqa: E731
    z_BKTR = torch.relu(torch.einsum("btd,bkdr->bktr", h_BTD.to(down_EDR.dtype), pick(down_EDR))
                        + pick(bdown_ER)[:, :, None])
    if dropout and training:
        z_BKTR = F.dropout(z_BKTR, dropout, training=True)
    z_BKTR = z_BKTR * g_BK[:, :, None, None].to(z_BKTR.dtype)  # the gate in bottleneck space: the cheapest place
    y_BTD = torch.einsum("bktr,bkrd->btd", z_BKTR, pick(up_ERD)) + (g_BK[:, :, None].to(bup_ED.dtype) * pick(bup_ED)).sum(1)[:, None]
    return (y_BTD * scale).to(h_BTD.dtype)


ADAPTER_TENSORS = ("down", "bdown", "up", "bup")  # W_down [E,D,R], b_d [E,R], W_up [E,R,D], b_u [E,D]


class AdapterPool(nn.Module):
    """One block's MoE-Adapters pool: E bottleneck adapters parallel to the block's FFN/MLP, one router and one noise
    router [E, D] per task (zeros at first, as the official code), and the activate-freeze bookkeeping. The block adds
    sum_e g_e(h0) Adapter_e(h) to its output, h being the un-normalised residual after attention (mtil/clip/model.py:
    out = h + MLP(LN2(h)) + adapters(h)).

    The experts sit in two banks of stacked tensors, frozen_* (requires_grad=False: experts frozen after an earlier task)
    and train_*, as LoRAExperts: autograd and AdamW never touch a frozen expert. `frozen` [E] (bool) says which pool
    index is frozen; the banks hold their experts in index order. `chosen` [E] counts the samples whose top-k included
    each expert in this task's training steps; `counts` [N, E] keeps every finished task's."""

    def __init__(self, dim: int, acfg: AdapterConfig, generator=None):
        super().__init__()
        self.dim, self.acfg = dim, acfg
        E, R = acfg.n_experts, acfg.dim
        down = torch.empty(E, dim, R)
        for e in range(E):  # kaiming-uniform(a=sqrt(5)) on W_down (nn.Linear's default, fan_in = D): U(+-1/sqrt(D))
            down[e].uniform_(-dim ** -0.5, dim ** -0.5, generator=generator)
        zeros = {"down": down, "bdown": torch.zeros(E, R), "up": torch.zeros(E, R, dim), "bup": torch.zeros(E, dim)}
        for name, W in zeros.items():  # W_up and both biases start at zero: the adapter adds nothing until trained
            self.register_parameter(f"frozen_{name}", nn.Parameter(W[:0].clone(), requires_grad=False))
            self.register_parameter(f"train_{name}", nn.Parameter(W))
        self.register_buffer("frozen", torch.zeros(E, dtype=torch.bool))
        self.register_buffer("perm", torch.eye(E), persistent=False)  # row e: expert e's place in cat(frozen, train)
        self.register_buffer("chosen", torch.zeros(E))
        self.register_buffer("noise_seed", torch.zeros((), dtype=torch.long))  # the gate noise: training's k-th draw
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))  # is seeded (noise_seed, k), so a resumed
        # run draws what the uninterrupted one did (the checkpoint keeps the count)
        self.register_buffer("counts", torch.zeros(0, E))
        self.routers, self.noise = nn.ParameterList(), nn.ParameterList()
        self.batch_sum = None  # torchrun: sums `chosen` over the ranks before freezing (train.py sets it)

    @property
    def n_experts(self):
        return self.frozen.shape[0]

    def active(self, use_experts=True):
        return use_experts and len(self.routers) > 0

    def weights(self):
        """The pool's four tensors [E, ...] in expert order: the banks interleaved back by a permutation GEMM."""
        out = []
        for name in ADAPTER_TENSORS:
            W = torch.cat([getattr(self, f"frozen_{name}"), getattr(self, f"train_{name}")])
            out.append((self.perm.to(W.dtype) @ W.flatten(1)).view(W.shape))
        return out

    def add_router(self):
        """Task t's router and noise router over the whole pool, zeros (official init: uniform logits; training noise
        breaks the tie)."""
        dev = self.frozen.device
        self.routers.append(nn.Parameter(torch.zeros(self.n_experts, self.dim, device=dev)))
        self.noise.append(nn.Parameter(torch.zeros(self.n_experts, self.dim, device=dev)))
        self.chosen.zero_()

    def gate(self, h0_BD, task_ids_B=None):
        """Each sample's gate [B, E] (noisy_top_k; noise only in training mode). task_ids_B None: the latest router."""
        if task_ids_B is None:
            task_ids_B = torch.full((h0_BD.shape[0],), len(self.routers) - 1, dtype=torch.long, device=h0_BD.device)
        g = None
        if self.training:
            g = torch.Generator().manual_seed(int(self.noise_seed) * 1_000_003 + int(self.draws))
            self.draws += 1
        return noisy_top_k(h0_BD, torch.stack(list(self.routers)), torch.stack(list(self.noise)), task_ids_B,
                           self.acfg.top_k, self.training, g)

    def forward(self, h_BTD, task_ids_B=None, first_B=None, cache=None, t0=0):
        """The adapters' sum [B, T, D] for the block's residual h_BTD; the gate reads each sample's token first_B (None:
        token 0). Generation (`cache`, a layer's KV-cache dict): the prompt step (t0 = 0) stores the gate, later steps
        reuse it, so every generated token takes its sample's experts. Training steps count the chosen experts."""
        if cache is not None and t0 > 0:
            g_BE = cache["adapter_gate"]
        else:
            first_B = torch.zeros(h_BTD.shape[0], dtype=torch.long, device=h_BTD.device) if first_B is None else first_B
            h0_BD = h_BTD[torch.arange(h_BTD.shape[0], device=h_BTD.device), first_B]
            g_BE = self.gate(h0_BD, task_ids_B)
            if cache is not None:
                cache["adapter_gate"] = g_BE
        if self.training:
            with torch.no_grad():  # activate-freeze's counts (official choose_map: non-zero gates per expert)
                self.chosen += (g_BE > 0).float().sum(0)
        a = self.acfg
        return adapter_mix(h_BTD, g_BE, a.top_k, *self.weights(), a.scale, a.dropout, self.training)

    @torch.no_grad()
    def end_task(self):
        """Activate-freeze (MoE-Adapters4CL mtil/src/models/finetune.py): this task's counts join `counts`, the n_freeze
        most chosen experts (ties: the lower index) are frozen (already frozen ones stay so: the top-k of two tasks may
        overlap, so fewer than n_freeze may be added), and every router stops training. Returns the experts chosen."""
        chosen_E = self.chosen.clone() if self.batch_sum is None else self.batch_sum(self.chosen.clone())
        top = sorted(range(self.n_experts), key=lambda e: (-float(chosen_E[e]), e))[: self.acfg.n_freeze]
        self.counts = torch.cat([self.counts, chosen_E[None].to(self.counts)])
        self.chosen.zero_()
        frozen_E = self.frozen.clone()
        frozen_E[top] = True
        self._rebank(frozen_E)
        for r in (*self.routers, *self.noise):
            r.requires_grad_(False)
        return top

    def _rebank(self, frozen_E, tensors=None):
        """Rebuild the banks for the frozen mask frozen_E from `tensors` (the four [E, ...] in expert order; default
        the pool's own): frozen experts go to the frozen bank unchanged (copied bit for bit)."""
        full = [W.detach() for W in (tensors or self.weights())]
        for name, W in zip(ADAPTER_TENSORS, full):
            self.register_parameter(f"frozen_{name}", nn.Parameter(W[frozen_E].clone(), requires_grad=False))
            self.register_parameter(f"train_{name}", nn.Parameter(W[~frozen_E].clone()))
        self.frozen = frozen_E.clone()
        order_E = torch.cat([torch.nonzero(frozen_E).flatten(), torch.nonzero(~frozen_E).flatten()])
        self.perm = F.one_hot(torch.argsort(order_E), self.n_experts).float().to(frozen_E.device)

    def load(self, tensors, prefix, n_routers, router_trainable=False, source=""):
        """Adopt a stored pool (its frozen mask, banks, counts, and n_routers routers), checking every shape."""
        def get(key, shape=None):
            if prefix + key not in tensors:
                raise KeyError(f"{source}: missing key {prefix}{key}")
            v = tensors[prefix + key]
            if shape is not None and tuple(v.shape) != tuple(shape):
                raise ValueError(f"{source}: {prefix}{key}: expected {tuple(shape)}, found {tuple(v.shape)}")
            return v.to(self.frozen.device)
        E, D, R = self.n_experts, self.dim, self.acfg.dim
        frozen_E = get("frozen", (E,)).bool()
        nf = int(frozen_E.sum())
        shapes = {"down": (D, R), "bdown": (R,), "up": (R, D), "bup": (D,)}
        full = []
        for name in ADAPTER_TENSORS:
            fz, tr = get(f"frozen_{name}", (nf, *shapes[name])), get(f"train_{name}", (E - nf, *shapes[name]))
            W = torch.empty(E, *shapes[name], device=fz.device)
            W[frozen_E], W[~frozen_E] = fz.float(), tr.float()
            full.append(W)
        self._rebank(frozen_E, full)
        self.chosen = get("chosen", (E,)).float().clone()
        self.noise_seed, self.draws = get("noise_seed", ()).long().clone(), get("draws", ()).long().clone()
        self.counts = get("counts").float().clone()
        self.routers = nn.ParameterList(nn.Parameter(get(f"routers.{t}", (E, D)).float().clone(),
                                                     requires_grad=router_trainable and t == n_routers - 1)
                                        for t in range(n_routers))
        self.noise = nn.ParameterList(nn.Parameter(get(f"noise.{t}", (E, D)).float().clone(),
                                                   requires_grad=router_trainable and t == n_routers - 1)
                                      for t in range(n_routers))


def adapter_numel(pool: AdapterPool) -> int:
    """Parameters of one adapter expert."""
    return 2 * pool.dim * pool.acfg.dim + pool.acfg.dim + pool.dim


# DDAS (Distribution Discriminative Auto-Selector; MoE-Adapters4CL mtil/src/models/AutoEncoder.py, evaluation.py):
# r_i = MSE(AE_i(f), f) for the reference AE (i = 0) and each task's (i = 1..N); i* = argmin_i r_i; the bare base when
# i* = 0 or r_i* > tau, else task i*-1's routers.
# Departures, each for a reason:
# - the feature: the official one is ImageNet AlexNet's conv5 (downloaded at run time, unavailable offline). Here it is
#   the frozen base's own, LLaVA.features (train.py --locator-feature; the default, "mean": the frozen
#   decoder's mean hidden state over the image slots beside its mean over the instruction). MiniCoIN's tasks draw
#   their images from one scene generator and differ mostly in what they ask, so an image-only feature ("image": the
#   frozen tower's patch features, mean-pooled and projected, the official choice's analogue) cannot tell most of them
#   apart. Every AE sees the same input, sigmoid((f - mean) / std) with the reference set's statistics (the official
#   sigmoid on features in [0, 1]), so the errors compare across AEs as the official rule needs.
# - per sample, not per batch: the official MSE averages over an evaluation batch, one decision per batch, which
#   assumes single-dataset batches. eval.py does evaluate task by task (so the batch rule would be easy), but that is
#   the harness's layout, not knowledge a deployed model has; the per-sample rule is the honest one and the one the
#   locator accuracy (per sample) measures, as cmoe's PTL.
# - tau: the official one is a hand-set constant for AlexNet features (0.0655 full-shot). Here, unless given
#   (--ddas-tau), it is calibrated: DDAS_MARGIN x the largest error a task's AE makes on held-out examples of its own
#   task (the same held-out examples that calibrate cmoe's reject gates), the maximum over the tasks seen.
DDAS_MARGIN = 1.5


class DDASAE(nn.Module):
    """The official DDAS autoencoder: Linear(d, h) -> ReLU -> Linear(h, d) -> Sigmoid (h = 100), MSE to its input."""

    def __init__(self, dim, hidden=100):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.Sigmoid())

    def error(self, x_BD):
        """Per-sample reconstruction MSE [B] of inputs already in [0, 1] (DDAS.squash)."""
        return (self.net(x_BD) - x_BD).pow(2).mean(-1)


def fit_ddas_ae(x_ND, hidden=100, steps=300, lr=3e-3, batch=64, seed=0) -> DDASAE:
    """A DDASAE on squashed features [N, D] (Adam, MSE; official: 300 iterations per task at batch 64)."""
    g = torch.Generator().manual_seed(seed)
    x = x_ND.detach().float().cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = DDASAE(x.shape[1], hidden)
    opt = torch.optim.Adam(ae.parameters(), lr=lr, weight_decay=1e-4)  # official weight decay 1e-4
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=g)
        loss = ae.error(x[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return ae.eval()


def ddas_choose(r_BN1, tau):
    """The DDAS rule on reconstruction errors r_BN1 [B, 1+N] (column 0: the reference AE's): per sample the task
    i*-1 of i* = argmin r, or DDAS.REJECTED (the bare base) where i* = 0 or r_i* > tau."""
    best_B, i_B = r_BN1.min(-1)
    return torch.where((i_B == 0) | (best_B > tau), DDAS.REJECTED, i_B - 1)


class DDAS(nn.Module):
    """MoE-Adapters4CL's test-time selector: a reference autoencoder on task-agnostic data (here MiniCoIN's stage-0
    caption set: what the base was pretrained on, no task's instruction), one autoencoder per task, threshold tau.
    locate() has Locator's signature, so eval.choose_routers takes either."""
    REJECTED = -1

    def __init__(self, feature="mean", dim=0, hidden=100):
        super().__init__()
        self.feature, self.hidden = feature, hidden
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))
        self.register_buffer("tau", torch.tensor(float("nan")))  # set by calibrate (or given)
        self.register_buffer("bounds", torch.zeros(0))  # per task: the largest held-out error of its own AE
        self.ref = DDASAE(dim, hidden) if dim else None
        self.aes = nn.ModuleList()

    @property
    def vaes(self):  # the task count under Locator's name (eval: one per trained task)
        return self.aes

    def squash(self, f_BD):
        return torch.sigmoid((f_BD.float().cpu() - self.feat_mean) / self.feat_std)

    def fit_reference(self, f_ND, seed=0, steps=1000):
        """The reference AE and the shared standardisation, from task-agnostic features (official: 1000 iterations)."""
        f = f_ND.detach().float().cpu()
        self.feat_mean, self.feat_std = f.mean(0), f.std(0).clamp(min=1e-4)
        self.ref = fit_ddas_ae(self.squash(f), self.hidden, steps=steps, seed=seed)

    def add_task(self, f_ND, held_out_ND, seed=0, steps=300, tau=None):
        """Task t's AE on its features; its bound from held-out ones; tau = given, else DDAS_MARGIN x the largest
        bound."""
        self.aes.append(fit_ddas_ae(self.squash(f_ND), self.hidden, steps=steps, seed=seed))
        with torch.no_grad():
            b = self.aes[-1].error(self.squash(held_out_ND)).max()
        self.bounds = torch.cat([self.bounds, b[None]])
        self.tau = torch.tensor(float(tau) if tau is not None else DDAS_MARGIN * float(self.bounds.max()))

    @torch.no_grad()
    def errors(self, f_BD):
        """r [B, 1+N]: the reference AE's, then each task's."""
        x = self.squash(f_BD)
        return torch.stack([ae.error(x) for ae in (self.ref, *self.aes)], -1)

    def locate(self, f_BD, reject=True, g_BD=None):
        """Per sample: a task index, or REJECTED (the bare base). DDAS always rejects (its reference AE and tau)."""
        return ddas_choose(self.errors(f_BD), float(self.tau))


# ----------------------------------------------------------------------------------------------------------
# Fast path: sparse block dispatch (Experts.dispatch 'auto' picks it by sparse_wins: a large pool in training,
# E > 6 * top-k forward only): lora_dense's result, computed on each token's top-k experts only. Each (token, top-k slot)
# assignment gets one row in a buffer grouped by expert, each group padded to a multiple of BLOCK rows so that every
# block of rows belongs to one expert; then two batched GEMMs over blocks. All shapes are static
# (M = round_up(T*K + E*(BLOCK-1), BLOCK)), and a row's place comes from a cumsum over one-hot (no sort, bincount or
# nonzero, which break the graph).
BLOCK = 32


def dispatch_plan(w_TE, k, block=BLOCK):
    """Where every assignment goes; computed once per layer and shared by gate, up and down."""
    T, E = w_TE.shape
    K = min(k, E)
    w_TK, ids_TK = w_TE.topk(K, dim=-1)
    ids_N = ids_TK.reshape(-1)  # N = T*K assignments, token-major
    onehot_NE = F.one_hot(ids_N, E)
    padded_E = (onehot_NE.sum(0) + block - 1) // block * block
    start_E = padded_E.cumsum(0) - padded_E
    rank_N = (onehot_NE.cumsum(0) * onehot_NE).sum(1) - 1  # place of the assignment inside its expert's group
    pos_N = start_E[ids_N] + rank_N
    nb = -(-(T * K + E * (block - 1)) // block)
    M = nb * block
    zeros = torch.zeros(M, dtype=torch.long, device=w_TE.device)
    tok_M = zeros.scatter(0, pos_N, torch.arange(T * K, device=w_TE.device) // K)
    w_M = torch.zeros(M, dtype=w_TE.dtype, device=w_TE.device).scatter(0, pos_N, w_TK.reshape(-1))  # 0 on padding
    e_b = zeros.scatter(0, pos_N, ids_N).view(nb, block).amax(1)  # expert of each block
    return pos_N, tok_M, w_M, e_b


class _ToRows(torch.autograd.Function):
    """tokens [T,D] -> padded rows [M,D]; backward sums each token's K rows back (gathers only, no atomics)."""

    @staticmethod
    def forward(x_TD, tok_M, pos_N):
        return x_TD.index_select(0, tok_M)  # index_select: several times faster than x[idx] on the CPU

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])
        ctx.T = inputs[0].shape[0]

    @staticmethod
    def backward(ctx, g_MD):
        (pos_N,) = ctx.saved_tensors
        return g_MD.index_select(0, pos_N).view(ctx.T, -1, g_MD.shape[-1]).sum(1), None, None


class _FromRows(torch.autograd.Function):
    """padded rows [M,O] -> tokens [T,O] (sum of each token's K rows); backward gathers rows from tokens."""

    @staticmethod
    def forward(y_MO, tok_M, pos_N, T):
        return y_MO.index_select(0, pos_N).view(T, -1, y_MO.shape[-1]).sum(1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, g_TO):
        (tok_M,) = ctx.saved_tensors
        return g_TO.index_select(0, tok_M), None, None, None


class _PerBlock(torch.autograd.Function):
    """Each block's expert weights W[e_b] [nb,...]; backward sums the blocks' gradients per expert with a one-hot GEMM
    (the gradient of an index is a scatter-add, several times slower on the CPU)."""

    @staticmethod
    def forward(W_E, e_b):
        return W_E.index_select(0, e_b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.E = inputs[0].shape[0]

    @staticmethod
    def backward(ctx, g_b):
        (e_b,) = ctx.saved_tensors
        return (F.one_hot(e_b, ctx.E).to(g_b.dtype).T @ g_b.flatten(1)).view(ctx.E, *g_b.shape[1:]), None


def to_rows(x_TD, plan):
    """Each assignment's token row, grouped in blocks [nb, BLOCK, D]: shared by gate and up (the same input)."""
    pos_N, tok_M, _, e_b = plan
    return _ToRows.apply(x_TD, tok_M, pos_N).view(e_b.shape[0], -1, x_TD.shape[-1])


def lora_sparse(x_TD, a_EDR, b_ERO, plan, scale, x_bLD=None):
    """sum_e w_e * B_e A_e x over each token's top-k experts only, via the block plan (x_bLD: to_rows(x_TD, plan))."""
    pos_N, tok_M, w_M, e_b = plan
    nb, T = e_b.shape[0], x_TD.shape[0]
    x_bLD = to_rows(x_TD, plan) if x_bLD is None else x_bLD
    h_bLR = torch.bmm(x_bLD, _PerBlock.apply(a_EDR, e_b))
    h_bLR = h_bLR * (w_M.to(h_bLR.dtype) * scale).view(nb, -1, 1)  # gate in rank space: cheapest place
    return _FromRows.apply(torch.bmm(h_bLR, _PerBlock.apply(b_ERO, e_b)).flatten(0, 1), tok_M, pos_N, T)
