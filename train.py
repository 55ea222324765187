"""Continual training of LLaVA-CMoE (and its baselines) over a task sequence.

    python train.py                      # MiniCoIN, cmoe (PGKE + PTL), whatever device exists
    python train.py --quick              # the same pipeline on a small slice (about a minute on a CPU)
    python train.py --method lora        # baselines: lora | moelora | joint | isolated; siblings: dmole |
                                         # moe-adapters; ablations: --expand all, ...
    python train.py --benchmark coin --coin-root DIR --image-root DIR --llm L --vision V --projector P --tokenizer T
    python train.py --steps 100 --set lr=1e-3    # any TrainConfig field: --field-name VALUE or --set field=VALUE
    python train.py --plan --preset llama-3.1-8b --gpu-mem 24    # the memory of a real run, from configs alone

Where the method lives (the model-side pieces are in cmoe.py, whose docstring has the same map):
    the loop       run: for each task, grow -> train_stage -> freeze -> fit_task_vae -> evaluate -> save
    PGKE           pgke: 1 probe (cmoe.probe_start, train_stage) -> 2 count (count_usage) -> 3 decide
                   (cmoe.pgke_decide) -> 4 expand (cmoe.copy_sources, probe_end, expand); ablation decide_by_gradnorm
    PTL            fit_task_vae (cmoe.Locator: a VAE and a reject gate per task); at test time eval.choose_routers
    bounded growth fit_budget (--max-expert-params), inside pgke before it expands
    D-MoLE         --method dmole: dmole_grow (dmole_scores -> cmoe.dmole_allocate -> cmoe.DMoLE.grow), then
                   dmole_train_routing (votes of the old tasks' autoencoders per batch), fit_task_ae
    MoE-Adapters   --method moe-adapters: add_adapter_pools (static pools in both towers), activate_freeze after each
                   task, fit_ddas (DDAS's reference and task autoencoders)
    torchrun       one marked section ("the rank plumbing"): every torch.distributed call of training
    precision      prepare: the frozen base in --precision (bf16 on CUDA), experts fp32

One run writes one folder (--out): per-task checkpoints (safetensors + JSON), metrics.json, log.txt, predictions/,
and at the end report.md with figures/.
Shape legend: B batch, T tokens, P patches, D width, N examples.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import cmoe
import data
import eval as ev
from cmoe import LLaVA, Llama, LlamaConfig, ExpertConfig
from eval import Log
from data import CheckpointError, read_hf_config, read_json, read_safetensors, save_json, save_safetensors
from vision import CLIPVision, Projector, VisionConfig


# ----------------------------------------------------------------------------------------------------------
# settings: one dataclass; --quick is a preset of it

@dataclasses.dataclass
class TrainConfig:
    # run
    benchmark: str = "minicoin"  # minicoin | coin
    method: str = "cmoe"  # cmoe | lora | moelora | joint | isolated | dmole | moe-adapters (baselines: one shared
    # pool; joint: all tasks at once; isolated: each task alone from the base with fresh experts as cmoe's first task
    # gets, the oracle's routers: the bound for tasks kept apart) | dmole (D-MoLE, ICML 2025: per task one LoRA expert
    # on the attention projections of both towers that the frozen base's gradient norms rank highest, routed per batch
    # by task autoencoders) | moe-adapters (MoE-Adapters4CL, Yu et al. CVPR 2024: a static pool of adapter experts in
    # both towers, activate-freeze, DDAS; see cmoe.AdapterPool and cmoe.DDAS)
    expand: str = "probe"  # PGKE: grow where probes say (probe), every layer (all), or by probe gradient norm (gradnorm)
    locator: str = "ptl"  # router choice at test time: ptl | oracle (the true task)
    locator_feature: str = "mean"  # PTL's (and DDAS's) input: mean (image and instruction means; it separates the
    # tasks on every seed, docs/minicoin.md) | last (the paper's last prompt token) | image (the tower's mean patch)
    reject: bool = False  # a sample no task's gate (cmoe.TaskGate) accepts is answered by the base model without experts
    reject_quantile: float = 1.0  # a gate accepts distances up to this quantile of its held-out ones
    calib_n: int = 200  # held-out training examples per task that calibrate its reject bound
    unseen: str = "auto"  # scored every stage, never trained: a,b,c | none | auto (MiniCoIN: textcolor; CoIN: none)
    tasks: str | None = None  # comma-separated task names (default: the benchmark's full sequence)
    out: str | None = None  # run folder (default out/<benchmark>-<method>[-ablations])
    quick: bool = False  # a small slice of everything (QUICK): a pipeline check in about a minute
    resume: bool = False  # continue from the last finished task / last saved step
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    compile: str = "auto"  # torch.compile the training step: auto (on CUDA) | on | off
    precision: str | None = None  # bf16 | fp32; None: bf16 on CUDA (and for --plan), fp32 elsewhere. bf16: the frozen
    # base (vision tower, projector, LLM) stored in bf16, forward passes under bf16 autocast, experts, routers and
    # VAEs fp32 (the master weights). The tiny base's stage 0 trains fp32 weights (bf16 autocast on CUDA under bf16)
    threads: int = 0  # CPU threads (0: torch's default)
    # model: real checkpoints, or the tiny MiniCoIN base (stage 0: captions, then MiniCoIN-Instruct; cached)
    llm: str | None = None  # HF Llama-3.x folder
    vision: str | None = None  # HF CLIP folder (CLIPVisionModel or CLIPModel)
    projector: str | None = None  # LLaVA mm_projector .safetensors (none: a fresh one, trained on align_json if given)
    tokenizer: str | None = None  # Llama-3 tokenizer.model (tiktoken BPE file)
    align_json: str | None = None  # LLaVA-format caption json for projector alignment
    base_dir: str = "out/base"  # cache of pretrained tiny base models
    base_steps: int = 1000  # stage 0a: caption pretraining steps
    instruct_steps: int = 500  # stage 0b: MiniCoIN-Instruct tuning steps
    text_steps: int = 0  # tiny base: stage 0 begins with this many steps of plain-text induction pretraining
    instruct_mc: bool | None = None  # tiny base: stage 0b also answers lettered multiple choice (data.INSTRUCT_MC);
    # None: on for the tiny base (a real LLaVA brings its own instruction tuning), --no-instruct-mc: off
    patch_merge: int = 1  # tiny base: m x m patches per image token (2: one token per scene cell; LLaVA: 1)
    # experts and method
    rank: int = 8
    lora_alpha: float = 16.0
    top_k: int = 2
    n_init: int = 2  # experts per layer at task 1
    n_new: int = 1  # experts added to an expanded layer
    alpha: float = 1.0  # PGKE: expand iff freq > mean - alpha * std
    probe_frac: float = 0.1  # share of the task's data used to probe
    probe_steps: int = 60
    lambda_aux: float = 0.01  # weight of the load-balance loss
    moelora_experts: int = 4
    max_expert_params: int | None = None  # bound on expert + router parameters after any task (None: unbounded);
    # PGKE's growth past it makes room by budget_rule (fit_budget)
    budget_rule: str = "skip"  # skip: drop growth where the probe won least | merge: merge a layer's two least-used
    # frozen experts (either falls back on the other when it has nothing left to do; skip measured better:
    # docs/minicoin.md, "Bounded growth")
    attn_experts: bool = True  # experts on attention's q/k/v/o too (as CoIN's MoELoRA); --no-attn-experts: FFN only
    experts_in: str = "llm"  # the towers whose blocks carry expert pools: llm (the paper's) | vision (the CLIP tower's
    # layers: q/k/v/out_proj, fc1/fc2) | both. Every method puts its pools there; PGKE probes and decides per tower
    dmole_budget: float = 0.5  # dmole: share of the candidate modules (both towers' attention projections) per task
    dmole_portion: float = 0.01  # dmole: share of an epoch's batches the zero-cost proxy backpropagates (at least one)
    dmole_quantile: float = 0.99  # dmole: a task autoencoder's threshold, this quantile of its training errors
    dmole_curriculum: bool = True  # dmole: each modality's experts train at lr x its difficulty (cmoe.dmole_lr_scales)
    # moe-adapters (MoE-Adapters4CL's settings, scaled to the tiny model where they depend on its width)
    adapters_in: str = "both"  # the towers whose blocks carry adapter pools: llm | vision | both (the official: both)
    adapter_experts: int | None = None  # the static pool per block; None: 2 per task of the run (the official sizing,
    # 22 for MTIL's 11 tasks: each task's 2 most chosen experts are frozen after it, so the pool never runs out)
    adapter_dim: int = 16  # bottleneck (official: 64 at widths 768 / 512; the tiny decoder is 128 wide, its tower 96)
    adapter_scale: float = 0.1  # s in s * (W_up ReLU(W_down h + b_d) + b_u)
    adapter_dropout: float = 0.0  # on the bottleneck (official: 0.1)
    ddas_tau: float | None = None  # DDAS threshold; None: calibrated (cmoe.DDAS_MARGIN x the largest held-out error)
    ddas_ref_n: int = 400  # task-agnostic examples (MiniCoIN stage-0 captions) of DDAS's reference autoencoder
    # optimisation
    steps: int = 300  # training steps per task
    task_steps: str = ""  # per-task overrides of steps, "name=N,...": e.g. ground=900
    batch_size: int = 32
    batch_shards: int = 2  # each batch is computed as this many row shards (rows s::N), a forward and backward each;
    # torchrun's ranks share them out, so N ranks and one process run the same arithmetic (bit for bit when N equal)
    grad_accum: int = 1
    lr: float = 5e-3
    base_lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.0
    grad_ckpt: bool = False  # gradient checkpointing of decoder layers
    save_every: int = 100  # mid-task checkpoint interval (steps)
    # data
    train_n: int | None = None  # training examples per task (default: 1000 on MiniCoIN, all on CoIN)
    test_n: int | None = None  # test examples per task (default: 100 on MiniCoIN, all on CoIN)
    caption_n: int = data.BASE_SETS["caption"]  # stage 0a examples
    instruct_n: int = data.BASE_SETS["instruct"]  # stage 0b examples
    max_len: int = data.MAX_LEN  # text tokens per sample (the image placeholder counts as one)
    max_new_tokens: int = 24  # a MiniCoIN box answer is 21 tokens with its end
    eval_batch: int = 128
    locator_n: int = 400  # training features per task for its VAE
    coin_root: str | None = None  # CoIN's Instructions_Original/ (or Instruction_Type2/): <Task>/train.json, test.json
    image_root: str | None = None  # root the CoIN image paths are relative to (CoIN's cl_dataset/)
    coin_annotations: str | None = None  # CoIN's cl_dataset/ layout holding TextVQA/TextVQA_0.5.1_val.json
    predict_only: bool = False  # CoIN: test records may lack answers; write the answer files, report no accuracy
    bad_images: str = "fail"  # fail | skip
    # memory plan (--plan): parameters, memory, largest micro-batch of a real run, from configs alone
    plan: bool = False
    preset: str | None = None  # implies --plan: a published Llama config + CLIP ViT-L/14-336 (PRESETS)
    gpu_mem: float = 80.0  # GiB of GPU memory

    def steps_by_task(self) -> dict:
        """--task-steps "ground=900,gqa=600" -> {"ground": 900, "gqa": 600}; the other tasks train --steps."""
        out = {}
        for item in filter(None, (i.strip() for i in self.task_steps.split(","))):
            name, n = (part.strip() for part in item.partition("=")[::2])
            if not name or not n.isdigit() or int(n) < 1 or name in out:
                raise ValueError(f"task_steps: {item!r} is not NAME=N with N >= 1 and each task once "
                                 f"(e.g. ground=900,gqa=600)")
            out[name] = int(n)
        return out

    def steps_of(self, task: str) -> int:
        return self.steps_by_task().get(task, self.steps)

    def __post_init__(self):
        if self.method == "moe-adapters" and self.reject:
            raise ValueError("reject is cmoe's option; moe-adapters always rejects through DDAS (--ddas-tau)")
        if self.precision is None:  # --plan describes a GPU run
            self.precision = "bf16" if self.plan or self.preset or str(self.device).startswith("cuda") else "fp32"
        for name, options in CHOICES.items():
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {', '.join(map(str, options))}, not {getattr(self, name)!r}")
        for name in AT_LEAST_ONE:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        if self.batch_shards > self.batch_size:
            raise ValueError(f"batch_shards ({self.batch_shards}) must be at most batch_size ({self.batch_size}): "
                             f"every shard of a batch needs a row")
        if self.text_steps < 0:
            raise ValueError(f"text_steps must be 0 or more, not {self.text_steps!r}")
        self.steps_by_task()  # a malformed --task-steps fails here, before anything runs
        if self.max_expert_params is not None and self.method != "cmoe":
            raise ValueError(f"max_expert_params bounds cmoe's growth; method {self.method!r} does not grow")
        for name in ("dmole_budget", "dmole_portion", "dmole_quantile"):
            if not 0.0 < getattr(self, name) <= 1.0:  # also refuses nan
                raise ValueError(f"{name} must be in (0, 1], not {getattr(self, name)!r}")
        if self.method == "moe-adapters" and self.experts_in != "llm":
            raise ValueError(f"experts_in: moe-adapters places its adapter pools by --adapters-in, not --experts-in "
                             f"{self.experts_in}")
        if self.method == "dmole" and self.experts_in != "llm":
            raise ValueError(f"experts_in: dmole places its experts in both towers by its gradient-norm scores; "
                             f"--experts-in {self.experts_in} is for the pooled methods")
        if self.method == "dmole" and self.reject:
            raise ValueError("reject: dmole's task autoencoders have their own thresholds (--dmole-quantile); "
                             "a batch none accepts is answered by the base model")
        if not 0.0 <= self.reject_quantile <= 1.0:  # also refuses nan
            raise ValueError(f"reject_quantile must be in [0, 1], not {self.reject_quantile!r}")
        if not 0.0 < self.gpu_mem < float("inf"):
            raise ValueError(f"gpu_mem must be a positive number of GiB, not {self.gpu_mem!r}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device must be a torch device (cpu, cuda, cuda:1, ...), not {self.device!r}") from None


QUICK = dict(base_steps=150, instruct_steps=100, steps=40, probe_steps=15, train_n=96, test_n=24, caption_n=512,
             instruct_n=512, batch_size=16, locator_n=96, save_every=20, warmup=5, tasks="sqa,cls,count")
CHOICES = dict(benchmark=("minicoin", "coin"),
               method=("cmoe", "lora", "moelora", "joint", "isolated", "dmole", "moe-adapters"),
               experts_in=("llm", "vision", "both"),
               expand=("probe", "all", "gradnorm"), budget_rule=("merge", "skip"), locator=("ptl", "oracle"),
               locator_feature=("last", "mean", "image"), adapters_in=("llm", "vision", "both"),
               compile=("auto", "on", "off"), bad_images=("fail", "skip"),
               precision=("bf16", "fp32"), preset=(None, "llama-3.2-1b", "llama-3.1-8b"))
AT_LEAST_ONE = ("patch_merge", "rank", "top_k", "n_init", "n_new", "batch_size", "batch_shards", "grad_accum",
                "eval_batch", "save_every", "max_new_tokens", "locator_n", "train_n", "test_n", "max_expert_params",
                "adapter_experts", "adapter_dim", "ddas_ref_n")
RESUME_MAY_CHANGE = ("resume", "device", "threads")  # everything else must match the interrupted run's config.json
FLAGS = {"method": "continual method", "expand": "PGKE: grow where probes say, or every layer", "locator":
         "router choice at test time", "benchmark": "MiniCoIN (built in) or CoIN (files)", "tasks": "task names, a,b,c",
         "out": "run folder", "quick": "small slice of everything", "resume": "continue an interrupted run",
         "device": "cpu, cuda, cuda:1, ...", "precision": "bf16 | fp32 (None: bf16 on CUDA and for --plan, else fp32)",
         "llm": "HF Llama-3.x folder", "vision": "HF CLIP folder",
         "projector": "LLaVA mm_projector .safetensors", "tokenizer": "Llama-3 tokenizer.model",
         "coin_root": "CoIN's Instructions_Original/", "image_root": "CoIN's cl_dataset/",
         "plan": "print the memory plan of the run and exit", "preset": "--plan for a published Llama",
         "batch_shards": "row shards per batch, a forward and backward each (torchrun's ranks share them out)",
         "attn_experts": "experts on attention q/k/v/o too (--no-attn-experts: FFN only)",
         "experts_in": "the towers carrying expert pools: llm | vision (the CLIP layers) | both",
         "max_expert_params": "cmoe: expert + router parameters after any task at most this (None: unbounded)",
         "budget_rule": "how growth past --max-expert-params makes room: merge frozen experts, or skip layers",
         "instruct_mc": "lettered multiple choice in the tiny base's stage 0b (None: on; --no-instruct-mc: off)"}


def parse_args(argv=None) -> TrainConfig:
    """Every TrainConfig field is a flag (--field-name VALUE; a bool is a bare --flag) or --set field=VALUE; --help
    describes the FLAGS and lists the others with their defaults. --quick applies QUICK under the given values."""
    fields = dataclasses.fields(TrainConfig)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="other settings (defaults): " + ", ".join(
        f"--{f.name.replace('_', '-')} {f.default}" for f in fields if f.name not in FLAGS))
    for f in fields:
        help_ = f"{FLAGS[f.name]} (default: {f.default})" if f.name in FLAGS else argparse.SUPPRESS
        if f.type.startswith("bool"):  # --flag / --no-flag
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, help=help_)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=parser_of(f.type), choices=CHOICES.get(f.name), help=help_)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="any setting, e.g. --set lr=1e-3")
    ns = p.parse_args(argv)
    given = {k: v for k, v in vars(ns).items() if v is not None and k != "set"}
    types = {f.name: f.type for f in fields}
    for item in ns.set:
        name, _, value = item.partition("=")
        if name.replace("-", "_") not in types or not _:
            p.error(f"--set {item}: expected NAME=VALUE with NAME one of {', '.join(types)}")
        try:
            given[name.replace("-", "_")] = parser_of(types[name.replace("-", "_")])(value)
        except (KeyError, ValueError):
            p.error(f"--set {item}: invalid value for a {types[name.replace('-', '_')]} setting")
    try:
        quick = {k: v for k, v in QUICK.items() if k != "tasks" or given.get("benchmark", "minicoin") == "minicoin"}
        cfg = TrainConfig(**{**(quick if given.get("quick") else {}), **given})  # QUICK's tasks are MiniCoIN's
    except ValueError as e:
        p.error(str(e))
    if cfg.out is None:
        tag = cfg.method + ("" if cfg.expand == "probe" else f"-expand{cfg.expand}") + (
            "-oracle" if cfg.locator == "oracle" else "") + (
            "" if cfg.locator_feature == "mean" else f"-{cfg.locator_feature}") + (
            "" if cfg.method != "moe-adapters" or cfg.adapters_in == "both" else f"-{cfg.adapters_in}") + (
            "-reject" if cfg.reject else "") + ("" if cfg.attn_experts else "-ffn") + (
            "-nomc" if cfg.instruct_mc is False else "") + (
            "" if cfg.max_expert_params is None else f"-budget{cfg.max_expert_params}") + (
            "" if cfg.experts_in == "llm" else f"-{cfg.experts_in}")
        cfg.out = os.path.join("out", f"{cfg.benchmark}{'-quick' if cfg.quick else ''}-{tag}")
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        p.error(f"--out {cfg.out}: is a file, not a run folder")
    above = os.path.dirname(os.path.abspath(cfg.out))
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        p.error(f"--out {cfg.out}: {above} is a file, so the run folder cannot be made under it")
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {cfg.device}: this torch sees no CUDA device (torch.cuda.is_available() is False)")
    return cfg


def parser_of(kind):
    """Text -> value for a field's annotation: 'int', 'float', 'str' or 'bool', optionally '| None' ('none')."""
    base = kind.split(" |")[0]

    def parse(text):
        if "None" in kind and text.lower() == "none":
            return None
        if base == "bool":
            return {"true": True, "1": True, "false": False, "0": False}[text.lower()]
        return {"int": int, "float": float, "str": str}[base](text)
    parse.__name__ = base  # argparse names the type in its error messages
    return parse


# ----------------------------------------------------------------------------------------------------------
# pre-encoded datasets

@torch.no_grad()
def encode(model: LLaVA, examples, tok, template, cfg, task_id, feats=True):
    """Pre-encode a dataset once: ids/labels padded to max_len, and (frozen tower) projected image features."""
    ds = data.encode_dataset(examples, tok, template, cfg.max_len, model.vision.cfg.image_size, task_id)
    if examples and not len(ds["index"]):
        raise SystemExit(f"task {examples[0].task or task_id}: none of its {len(examples)} examples fits --max-len "
                         f"{cfg.max_len} (the template, the image token and the answers alone are longer)")
    if feats:
        model.eval()
        px = ds.pop("pixel_values")
        ds["images"] = torch.cat([model.image_features(px[i:i + 256].to(cfg.device)).cpu() for i in range(0, len(px), 256)])
    else:
        ds["images"] = ds.pop("pixel_values")
    return ds


def batch_at(ds, step, bs, seed):
    """The step-th batch of a stateless shuffled stream (same seed+step -> same batch): resume-exact."""
    N = ds["input_ids"].shape[0]
    bs = min(bs, N)
    per_epoch = N // bs
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    idx = perm[i * bs:(i + 1) * bs]
    return {k: v[idx] for k, v in ds.items() if isinstance(v, torch.Tensor)}


def subset(ds, idx):
    return {k: (v[idx] if isinstance(v, torch.Tensor) else v) for k, v in ds.items()}


def concat(dss):
    return {k: torch.cat([d[k] for d in dss]) for k in dss[0] if isinstance(dss[0][k], torch.Tensor)}


def trim_padding(ds, pad_id):
    """Drop the columns that are padding in every row but one: causal attention makes trailing padding dead weight,
    and a task's rows are often far shorter than max_len (MiniCoIN's ocr / cls / gqa / count: 22-26 of 48 tokens;
    a step ~1.4x faster). One width per dataset keeps shapes static for torch.compile; the column kept is where
    LLaVA.splice puts a text-only row's image slots."""
    N, T = ds["input_ids"].shape
    if N == 0:
        return ds
    longest = int(((ds["input_ids"] != pad_id) * torch.arange(1, T + 1)).max())  # right padding: last real + 1
    L = min(T, longest + 1)
    return {k: (v[:, :L].contiguous() if k in ("input_ids", "labels") else v) for k, v in ds.items()}


# ----------------------------------------------------------------------------------------------------------
# the base model (stage 0)

def build_base(cfg, tok, template, log) -> tuple[LLaVA, dict]:
    """The frozen base and where it comes from (kept in metrics.json, so eval.reevaluate loads the same model):
    real checkpoints (a projector without a file is saved into the run folder), or the tiny MiniCoIN base."""
    if cfg.llm:
        if not cfg.vision:
            raise SystemExit("--llm needs --vision (a CLIP folder)")
        if cfg.patch_merge != 1:
            raise SystemExit("--patch-merge is for the tiny MiniCoIN base: a LLaVA projector takes one patch per token")
        if cfg.instruct_mc:
            raise SystemExit("--instruct-mc is for the tiny MiniCoIN base's stage 0b: a real LLaVA brings its own")
        base = {"llm": cfg.llm, "vision": cfg.vision, "projector": cfg.projector}
        model = ev.load_model(base, data.pad_id(tok))
        cmoe.set_precision(model, cfg.precision)  # before the move: the device never holds fp32 copies under bf16
        model = model.to(cfg.device)
        if not cfg.projector:
            if cfg.align_json:  # the projector trains in fp32 (master weights) under the frozen bf16 tower and LLM
                model.projector.float()
                exs = data.load_coin_train(cfg.align_json, cfg.image_root, bad_images=cfg.bad_images)
                model.requires_grad_(False).projector.requires_grad_(True)
                train_stage(model, encode(model, exs, tok, template, cfg, 0, feats=False), cfg, cfg.base_steps,
                            cfg.base_lr, 0, "align", log, experts=False)
            base["projector"] = os.path.join(cfg.out, "projector.safetensors")
            if ev.rank_world()[0] == 0:
                save_safetensors({f"model.mm_projector.{k}": v for k, v in model.projector.state_dict().items()},
                                 base["projector"])
        return model, base
    # tiny MiniCoIN base, made the way LLaVA is (captions, then general instructions); each stage's result is
    # cached under a key of everything that shaped it, so changing stage 0b reuses stage 0a
    stages = [("base", "caption", cfg.caption_n, cfg.base_steps),
              ("instruct", "instruct" if cfg.instruct_mc is False else data.INSTRUCT_MC, cfg.instruct_n,
               cfg.instruct_steps)]
    shaped_by = [cfg.seed, cfg.max_len, cfg.base_lr, cfg.batch_size, tok.name, data.MINICOIN_VERSION, data.IMAGE_SIZE,
                 "stage 0b: tower frozen", cfg.warmup, cfg.weight_decay, cfg.grad_accum]
    shaped_by += [f"patch merge {cfg.patch_merge}"] if cfg.patch_merge != 1 else []  # (defaults: cached bases keep
    shaped_by += [f"text steps {cfg.text_steps}"] if cfg.text_steps else []  # their keys)
    shaped_by += [f"batch shards {cfg.batch_shards}"] if cfg.batch_shards != 1 else []
    model = None  # stage 0 trains fp32 weights, as the cache keeps them (bf16 autocast over them on CUDA under bf16)
    mixed = "bf16" if cfg.precision == "bf16" and cfg.device.startswith("cuda") else "fp32"
    for k, (tag, task, n, steps) in enumerate(stages):
        key = hashlib.sha1(json.dumps(shaped_by + stages[: k + 1]).encode()).hexdigest()[:10]
        folder = os.path.join(cfg.base_dir, f"minicoin-{tag}-{key}")
        if os.path.isfile(os.path.join(folder, "meta.json")):
            log(f"base: stage 0 '{tag}' reused from {folder}")
            model = ev.load_base(folder).to(cfg.device)
            cmoe.set_precision(model, mixed, cast=False)
            continue
        if model is None:
            torch.manual_seed(cfg.seed)
            vcfg, lcfg = VisionConfig.tiny(image_size=data.IMAGE_SIZE), LlamaConfig.tiny(vocab_size=tok.n_vocab)
            if (data.IMAGE_SIZE // vcfg.patch_size) % cfg.patch_merge:
                raise SystemExit(f"--patch-merge {cfg.patch_merge} does not divide the tiny tower's "
                                 f"{data.IMAGE_SIZE // vcfg.patch_size} patches per side")
            model = LLaVA(CLIPVision(vcfg), Projector(vcfg.hidden_size, lcfg.dim, cfg.patch_merge),
                          Llama(lcfg), data.pad_id(tok))
            model = model.to(cfg.device)
            cmoe.set_precision(model, mixed, cast=False)
            pretrain_text(model, cfg, log)
        log(f"base: stage 0 '{tag}' on {n} MiniCoIN {task} examples for {steps} steps")
        ds = encode(model, data.minicoin(task, "train", n, seed=cfg.seed), tok, template, cfg, 0, feats=False)
        model.vision.requires_grad_(tag == "base")  # as LLaVA: the tower learns to see in 0a, is frozen in 0b
        for pool in model.llm.expert_pools() + model.vision.expert_pools():  # empty until the continual stage:
            pool.requires_grad_(False)  # (under torchrun DDP needs every parameter that trains to be used)
        train_stage(model, ds, cfg, steps, cfg.base_lr, 0, tag, log, experts=False)
        if ev.rank_world()[0] == 0:
            ev.save_base(model, folder)
    return model, {"tiny": folder}


def pretrain_text(model: LLaVA, cfg, log):
    """Stage 0, part 0 (--text-steps): the decoder alone learns to repeat spans of random tokens
    (data.induction_batch), which forms the induction heads a real LLM brings to LLaVA. Under the model's precision
    (its autocast), as every other stage."""
    llm = model.llm
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(llm.parameters(), lr=cfg.base_lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    for step in range(cfg.text_steps):
        ids, labels = (t.to(cfg.device) for t in data.induction_batch(gen, cfg.batch_size, llm.cfg.vocab_size))
        for g in opt.param_groups:
            g["lr"] = cfg.base_lr * min(1.0, (step + 1) / max(1, cfg.warmup))  # no decay: the heads form late
        with model.autocast():
            logits, _ = llm(ids)
        loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(),
                               ignore_index=cmoe.IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % max(1, cfg.text_steps // 10) == 0:
            log(f"text step {step + 1:5d}/{cfg.text_steps} | induction loss {loss.item():.4f}")


# ----------------------------------------------------------------------------------------------------------
# one training stage: AdamW, warm-up + cosine, grad accumulation, NaN guard, mid-stage checkpoints

def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_stage(model: LLaVA, ds, cfg, steps, lr, task_id, tag, log, experts=True, task_ids_fixed=None,
                ckpt=None, start=None, on_batch=None, lr_scale=None):
    """Train the parameters that have requires_grad on `ds`. `ckpt(step, opt)` saves a resumable state;
    `start` = (step, optimizer state) to continue from; `on_batch(b)`: called with each micro-batch before its forward
    (dmole: the batch's active experts); `lr_scale(name)`: a parameter's factor on the schedule's lr (default 1)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = {}
    for n, p in named:
        groups.setdefault(1.0 if lr_scale is None else float(lr_scale(n)), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "scale": f} for f, ps in groups.items()], lr=lr,
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    step0 = 0
    if start is not None:
        step0 = start[0]
        load_optimizer(opt, named, start[1])
    compiled = cfg.compile == "on" or (cfg.compile == "auto" and cfg.device.startswith("cuda"))
    world = ev.rank_world()[1]
    fwd = data_parallel(model)
    if compiled:  # every stage brings new shapes (a grown pool): without a reset the recompiles add up over the run,
        torch._dynamo.reset()  # and past dynamo's limit (8: task ~5 of cmoe) the rest would run eagerly, silently
        fwd = torch.compile(fwd)
    model.train()
    t_last, tok_count, interval = time.time(), 0, max(1, steps // 10)
    for step in range(step0, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, cfg.warmup) * g["scale"]
        loss_sum = aux_sum = 0.0  # the step's, for the log
        for micro in range(cfg.grad_accum):
            b = batch_at(ds, step * cfg.grad_accum + micro, cfg.batch_size, cfg.seed + 7919 * task_id)
            if on_batch is not None:  # on the whole batch: under torchrun every rank then takes the same choice
                on_batch(b)
            for shard, share in batch_shards(b, cfg.batch_shards):  # this process's: a forward and backward each
                x = {k: v.to(cfg.device) for k, v in shard.items()}
                tids = x["task_ids"] if task_ids_fixed is None else torch.full_like(x["task_ids"], task_ids_fixed)
                _, loss, aux = fwd(x["input_ids"], x["images"], x["labels"], tids if experts else None,
                                   use_experts=experts)
                # the balance loss is each shard's own (its routing statistics), averaged over the shards
                total = loss * share + cfg.lambda_aux * aux * (world / cfg.batch_shards)
                if not all_finite(total):
                    raise FloatingPointError(f"non-finite loss ({float(total.detach())}) in stage '{tag}' at step "
                                             f"{step + 1}: stopping; checkpoints already on disk are untouched")
                (total / cfg.grad_accum).backward()
                loss_sum += float(loss.detach()) * share / world / cfg.grad_accum
                aux_sum += float(aux.detach()) / cfg.batch_shards / cfg.grad_accum
                tok_count += int((x["input_ids"] != model.pad_id).sum())
        loss_sum, aux_sum = sum_over_ranks(torch.tensor([loss_sum, aux_sum], dtype=torch.float64)).tolist()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % interval == 0 or step + 1 == steps:
            dt = time.time() - t_last
            log(f"{tag} step {step + 1:5d}/{steps} | loss {loss_sum:.4f} | aux {aux_sum:.3f} | "
                f"{tok_count / max(dt, 1e-9):,.0f} tok/s | eta {dt / interval * (steps - step - 1):4.0f}s")
            t_last, tok_count = time.time(), 0
        if ckpt is not None and (step + 1) % cfg.save_every == 0 and step + 1 < steps:
            ckpt(step + 1, optimizer_state(opt, named))
    model.eval()


def optimizer_state(opt, named) -> dict:
    """AdamW state keyed by parameter name (not position), so it survives a rebuilt model."""
    out = {}
    for n, p in named:
        for k, v in opt.state.get(p, {}).items():
            out[f"opt.{n}.{k}"] = v if isinstance(v, torch.Tensor) else torch.tensor(v)
    return out


def load_optimizer(opt, named, tensors):
    for n, p in named:
        st = {k.split(".")[-1]: v.to(p.device) for k, v in tensors.items() if k.startswith(f"opt.{n}.")}
        if st:
            opt.state[p] = st


# ----------------------------------------------------------------------------------------------------------
# torchrun: the rank plumbing. Every torch.distributed call of training is in this section; with one process each
# helper is the identity (batch_shards: every shard). The ranks share out every batch's shards, DDP averages the
# gradients, and what decides the method's course (PGKE's counts, the VAEs and gates) is summed or sent so every rank
# agrees.

def init_distributed(cfg):
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, one GPU per rank; gloo on CPU). Returns
    this process's rank (0 in a plain run)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_shards % world:  # checked before joining: every rank stops at once, none waits for the others
        raise SystemExit(f"torchrun started {world} ranks but --batch-shards is {cfg.batch_shards}: the ranks share "
                         f"out each batch's shards, so their number must divide it (--batch-shards {world}: the run "
                         f"`python train.py --batch-shards {world}` computes)")
    if world > 1 and not dist.is_initialized():
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(cfg.device)
        # on CUDA the VAEs and gates (CPU tensors) travel over gloo, the rest over NCCL
        dist.init_process_group("cpu:gloo,cuda:nccl" if cfg.device.startswith("cuda") else "gloo")
    return ev.rank_world()[0]


def leave_distributed():
    """The end of a run, however it ends: leave the process group (torchrun)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(model):
    """DDP over the trainable parameters, rebuilt per stage (PGKE grows them); the model itself in one process."""
    return DistributedDataParallel(model, broadcast_buffers=False) if ev.rank_world()[1] > 1 else model


def batch_shards(b, n):
    """This process's shards of the global batch b, cut into n row shards (shard s: rows s::n); rank r of `world`
    takes shards r, r + world, ... (one process: all). Each comes with `share`, its token-mean loss's factor that makes
    DDP's mean of the ranks' gradients the gradient of the token-mean loss over the whole batch: world x (the shard's
    labelled tokens) / (the batch's). With n = world every rank's forward and backward is one of one process's, and
    its gradient exactly `world` times that shard's: DDP's mean then gives one process's sum, bit for bit."""
    rank, world = ev.rank_world()
    n_all = max(int((b["labels"] != cmoe.IGNORE_INDEX).sum()), 1)
    for s in range(rank, n, world):
        shard = {k: v[s::n] for k, v in b.items()}
        yield shard, world * int((shard["labels"] != cmoe.IGNORE_INDEX).sum()) / n_all


def all_finite(x):
    """torch.isfinite(x), agreed by every rank (one rank's NaN stops them all at the same step)."""
    bad = (~torch.isfinite(x.detach())).float().reshape(1)
    if ev.rank_world()[1] > 1:
        dist.all_reduce(bad)
    return not bool(bad)


def sum_over_ranks(x):
    """x summed over the ranks (a copy; x itself in one process)."""
    x = x.detach().clone()
    if ev.rank_world()[1] > 1:
        dist.all_reduce(x)
    return x


def broadcast_from_rank0(tensors):
    """Every rank's `tensors` (in place) become rank 0's."""
    for v in tensors if ev.rank_world()[1] > 1 else ():
        dist.broadcast(v, 0)



# ----------------------------------------------------------------------------------------------------------
# the continual loop

def run(cfg: TrainConfig):
    """The paper's algorithm. For each task: grow (task 1: fresh experts; later: PGKE probe -> decide -> expand),
    train the task's experts and router, freeze them, fit the task's VAE (PTL), evaluate every task, save.
    The baselines take the same loop with one shared pool; joint takes it once, over every task's data; isolated
    starts every task from a fresh pool (each task's row is its own model's)."""
    r = RunState(cfg)
    model, bench, locator = r.start()
    for t in range(r.first, r.n_stages):
        clock = r.begin(t, model)
        exs, ds = stage_data(cfg, model, r, t)
        decision, start = r.restore_partial(model) if r.partial else (None, None)
        if start is None:
            with clock("probe"):
                decision = grow(model, ds, cfg, t, r.log)
        trainable_cl(model)
        clock.trainable = ev.count_params(model)[0]
        joint, dmole = cfg.method == "joint", cfg.method == "dmole"
        if dmole:  # the rows' representations (the task's autoencoder) and votes among the old tasks' (training's
            with clock("locator"):  # active experts)
                reps, on_batch = dmole_train_routing(model, locator, exs, ds, r, cfg, t)
        with clock("train"):
            steps = sum(map(cfg.steps_of, r.names)) if joint else cfg.steps_of(r.names[t])  # joint: every task's
            train_stage(model, ds, cfg, steps, cfg.lr, 0 if cfg.method == "isolated" else t,  # (its batch order)
                        "joint" if joint else f"task{t}:{r.names[t]}", r.log,
                        task_ids_fixed=None if cfg.method in ("cmoe", "moe-adapters") else 0,
                        ckpt=r.checkpointer(model, decision), start=start, on_batch=on_batch if dmole else None,
                        lr_scale=dmole_lr_scale(model, decision) if dmole else None)
        if dmole:  # the task's experts are final; its autoencoder on its first locator_n rows (rank 0's, broadcast)
            model.dmole.active = ()
            model.dmole.freeze()
            with clock("locator"):
                fit_task_ae(locator, reps, cfg, t)
        if cfg.method == "cmoe" and cfg.max_expert_params is not None:  # what fit_budget's later merges weigh
            record_task_use(model, ds, cfg)  # (forward only)
        if cfg.method in ("cmoe", "isolated"):  # the task's experts and router are final
            for pool in model.expert_pools():
                pool.freeze()
        if cfg.method == "moe-adapters":  # activate-freeze: each pool's most chosen experts of the task
            decision = activate_freeze(model, cfg, t, r.log)
        if cfg.method == "cmoe":
            with clock("locator"):  # PTL: this task's VAE on frozen-base features of its training data
                fit_task_vae(model, locator, exs, r, cfg, t)
        if cfg.method == "moe-adapters":
            with clock("locator"):  # DDAS: this task's autoencoder (the reference one first)
                fit_ddas(model, locator, exs, r, cfg, t)
        with clock("eval"):
            result = bench.evaluate(model, locator, t)
        r.finish_stage(t, model, locator, result, decision)
    return r.finish()


def fit_task_ae(locator, reps, cfg, t):
    """dmole: task t's autoencoder (cmoe.AERouter) on the representations of its first locator_n training rows; under
    torchrun rank 0 fits it and broadcasts it."""
    if ev.rank_world()[0] == 0:
        locator.add_task(reps[: cfg.locator_n], cfg.dmole_quantile, seed=stage_seed(cfg, t, "vae"))
    else:
        locator.aes.append(cmoe.TaskAE(reps.shape[1]).eval())
    broadcast_from_rank0(list(locator.aes[-1].state_dict().values()))


def fit_task_vae(model: LLaVA, locator, exs, r, cfg, t):
    """PTL for task t: a VAE on locator_n training examples' features; the reject option's gate on the same examples,
    its bound from the next calib_n (data neither saw). Under torchrun rank 0 fits them and broadcasts them."""
    rank, world = ev.rank_world()
    if rank == 0:  # the tower runs once over the fitted examples: the VAE's and the gate's features share it
        images = ev.image_features(model, exs[: cfg.locator_n], cfg)
        feats = ev.task_features(model, exs[: cfg.locator_n], r.tok, r.template, cfg, images)
        locator.add_task(feats, seed=stage_seed(cfg, t, "vae"))
        locator.add_gate(*ev.gate_features(model, exs, r.tok, r.template, cfg, images), cfg.reject_quantile)
        if len(exs) <= cfg.locator_n:
            r.log(f"note: task {t} has no training example beyond the VAE's {cfg.locator_n}: its reject bound is "
                  f"calibrated on the features the VAE was fitted on (raise --train-n or lower --locator-n)")
    else:
        locator.vaes.append(cmoe.TaskVAE(model.llm.cfg.dim * (2 if cfg.locator_feature == "mean" else 1)).eval())
        dim = model.llm.cfg.dim * (2 if cmoe.REJECT_FEATURE == "mean" else 1)
        locator.gates.append(cmoe.TaskGate(dim, cmoe.gate_rank(len(exs[: cfg.locator_n]), dim)).eval())
    broadcast_from_rank0([*locator.vaes[-1].state_dict().values(), *locator.gates[-1].state_dict().values()])


def grow(model: LLaVA, ds, cfg, t, log):
    """Experts before stage t: cmoe's first task gets n_init fresh experts per layer, each later task PGKE; the
    baselines' one shared pool is made at the first stage (lora: one expert; moelora, joint: a dense pool);
    isolated: every task a fresh pool as cmoe's first task (the previous task's is in its checkpoint)."""
    if cfg.method == "cmoe" and t > 0:
        return pgke(model, ds, cfg, t, log)
    if cfg.method == "dmole":
        return dmole_grow(model, ds, cfg, t, log)
    if cfg.method == "moe-adapters":  # the static pools at the first task; every task its routers
        if t == 0:
            add_adapter_pools(model, cfg, len(data.task_list(cfg)[0]))
        for pool in adapter_pools(model):
            pool.add_router()
        return None
    if cfg.method == "isolated":
        for pool in model.expert_pools():
            pool.reset(model.llm.ecfg)
    if t == 0 or cfg.method == "isolated":  # isolated: each task as if it were cmoe's first (= --tasks T)
        n = first_pool_size(cfg)
        cmoe.init_experts(model, n, generator=stage_rng(cfg, 0, "init"))
        if cfg.max_expert_params is not None and ev.count_params(model)[1] > cfg.max_expert_params:
            raise SystemExit(f"--max-expert-params {cfg.max_expert_params}: the first task alone holds "
                             f"{ev.count_params(model)[1]} expert and router parameters ({n} experts per layer); "
                             f"raise the budget or lower --n-init / --rank")
    return None


# ----------------------------------------------------------------------------------------------------------
# moe-adapters (MoE-Adapters4CL): the pools, activate-freeze, DDAS. The model-side pieces are cmoe.AdapterPool and
# cmoe.DDAS; the loop is run's, with grow -> add_router, freeze -> activate_freeze, the locator -> fit_ddas.

def adapter_config(cfg, n_tasks) -> cmoe.AdapterConfig:
    return cmoe.AdapterConfig(n_experts=cfg.adapter_experts or 2 * n_tasks, dim=cfg.adapter_dim,
                              scale=cfg.adapter_scale, top_k=cfg.top_k, dropout=cfg.adapter_dropout)


def add_adapter_pools(model: LLaVA, cfg, n_tasks):
    """Every block of the towers --adapters-in names gets its static adapter pool (in its cmoe.Experts), drawn from one
    seeded generator; under torchrun each pool's activate-freeze counts are summed over the ranks."""
    g = stage_rng(cfg, 0, "init")
    pools = model.llm.expert_pools() if cfg.adapters_in in ("llm", "both") else []
    pools += model.vision.expert_pools() if cfg.adapters_in in ("vision", "both") else []
    for k, pool in enumerate(pools):
        pool.add_adapters(adapter_config(cfg, n_tasks), generator=g)
        pool.adapters.noise_seed.fill_(stage_seed(cfg, 0, "init") * 1000 + k)
        if ev.rank_world()[1] > 1:
            pool.adapters.batch_sum = sum_over_ranks


def adapter_pools(model: LLaVA):
    """The AdapterPools of both towers, decoder first."""
    return [p.adapters for p in model.llm.expert_pools() + model.vision.expert_pools() if p.adapters is not None]


def activate_freeze(model: LLaVA, cfg, t, log):
    """After task t, each pool freezes its n_freeze most chosen experts (cmoe.AdapterPool.end_task). Returns the record
    kept in metrics.json: per pool (decoder layers, then tower layers) the experts frozen now and the frozen count."""
    chosen = [pool.end_task() for pool in adapter_pools(model)]
    frozen = [int(pool.frozen.sum()) for pool in adapter_pools(model)]
    log(f"activate-freeze task {t}: most chosen " + " ".join("/".join(map(str, c)) for c in chosen)
        + f" | frozen per pool {frozen} of {adapter_pools(model)[0].n_experts}")
    return {"task": t, "frozen": chosen, "n_frozen": frozen}


def fit_ddas(model: LLaVA, ddas: cmoe.DDAS, exs, r, cfg, t):
    """DDAS for task t: at the first task its reference autoencoder on ddas_ref_n task-agnostic examples (MiniCoIN's
    stage-0 caption set, what the base was pretrained on); then task t's autoencoder on locator_n training examples'
    features, its bound from the next calib_n (eval.reject_features). Every rank fits the same (seeded) autoencoders;
    rank 0's are broadcast so that all agree bit for bit."""
    feats = lambda e: ev.task_features(model, e, r.tok, r.template, cfg)  # noqa: E731
    if t == 0:
        ref = data.minicoin("caption", "train", cfg.ddas_ref_n, seed=cfg.seed)
        ddas.fit_reference(feats(ref), seed=stage_seed(cfg, t, "vae"))
    ddas.add_task(feats(exs[: cfg.locator_n]), ev.reject_features(model, exs, r.tok, r.template, cfg),
                  seed=stage_seed(cfg, t, "vae"), tau=cfg.ddas_tau)
    broadcast_from_rank0(list(ddas.state_dict().values()))
    r.log(f"DDAS task {t}: held-out bound {float(ddas.bounds[-1]):.4f} | tau {float(ddas.tau):.4f}")


def first_pool_size(cfg):
    """Experts per layer of the first task's pool (isolated: of every task's)."""
    return {"cmoe": cfg.n_init, "isolated": cfg.n_init, "lora": 1}.get(cfg.method, cfg.moelora_experts)


def pgke(model: LLaVA, ds, cfg, t, log):
    """PGKE for task t >= 1 (the paper's Probe-Guided Knowledge Extension), its four steps in order:
    1. probe   one temporary probe expert per layer and a probe router, trained on a small share of the task;
    2. count   on held-out probe data, how often each layer's tokens go to each expert (its probe included);
    3. decide  grow layer l iff its probe's share freq_l > mean(freq) - alpha * std(freq);
    4. expand  drop the probes, then give each growing layer n_new copies of its most-used old expert, and every
               layer the task's router (initialised from the probe router); under --max-expert-params, fit_budget
               first makes room for that growth.
    With experts in both towers every step runs on all pools (model.expert_pools(): the decoder's layers, then the
    tower's), except the decision, taken per tower over its own layers' frequencies (their scales differ).
    Returns the decision record kept in metrics.json (lists over model.expert_pools(); thresholds per tower)."""
    probe_train, probe_hold = probe_split(ds, cfg, t)
    cmoe.probe_start(model, generator=stage_rng(cfg, t, "probe"))  # 1. probe
    trainable_cl(model)
    train_stage(model, probe_train, cfg, cfg.probe_steps, cfg.lr, t, f"probe{t}", log)
    usage = count_usage(model, probe_hold, cfg)  # 2. count
    freq = cmoe.probe_frequencies(usage)
    towers = tower_slices(model)
    expand, thrs = [], {}
    for tower, sl in towers.items():  # 3. decide
        e, thrs[tower] = cmoe.pgke_decide(freq[sl], cfg.alpha)
        expand += e
    thr = next(iter(thrs.values()))
    if cfg.expand == "all":  # ablation: grow every layer
        expand = [True] * len(expand)
    score = freq  # what the decision valued per layer (--max-expert-params drops the lowest growth first)
    if cfg.expand == "gradnorm":  # ablation: as many layers, chosen by the probes' gradient norms (needs the probes)
        expand, score = decide_by_gradnorm(model, probe_hold, cfg, sum(expand), t, log)
    sources = cmoe.copy_sources(usage)  # 4. expand
    probe_routers = cmoe.probe_end(model)
    budget = {} if cfg.max_expert_params is None else fit_budget(model, expand, sources, probe_routers, score, cfg, t,
                                                                 log)
    cmoe.expand(model, expand, sources, probe_routers, cfg.n_new, generator=stage_rng(cfg, t, "expand"))
    copied = [src if grow else None for grow, src in zip(expand, sources)]
    per = lambda xs, show, sep=" ": " / ".join(sep.join(map(show, xs[sl])) for sl in towers.values())  # noqa: E731
    log(f"PGKE task {t}: " + ("" if list(towers) == ["llm"] else "(" + " / ".join(towers) + ") ") + "probe freq "
        + per(freq, lambda f: f"{f:.2f}") + " | threshold " + " / ".join(f"{v:.3f}" for v in thrs.values())
        + " | expand " + per(expand, lambda e: "1" if e else "0", "") + " | copied from "
        + per(copied, lambda c: "-" if c is None else str(c)))
    record = {"task": t, "freq": freq, "threshold": thr, "expand": expand, "copied_from": copied, **budget}
    if list(towers) != ["llm"]:
        record.update(towers={k: [sl.start, sl.stop] for k, sl in towers.items()}, thresholds=thrs)
    return record


def tower_slices(model: LLaVA) -> dict:
    """{tower: its slice of model.expert_pools()} for the towers carrying experts (llm first)."""
    n_llm, n_vis = len(model.tower_pools("llm")), len(model.tower_pools("vision"))
    out = {"llm": slice(0, n_llm)} if n_llm else {}
    return {**out, **({"vision": slice(n_llm, n_llm + n_vis)} if n_vis else {})}


def projected_params(model: LLaVA, expand, n_new):
    """Expert and router parameters after cmoe.expand(model, expand, ...) on the pools as they are now."""
    return sum(sum(p.numel() for p in pool.parameters()) + g * n_new * cmoe.expert_numel(pool)
               + (pool.n_experts + g * n_new) * pool.dim for pool, g in zip(model.expert_pools(), expand))


def fit_budget(model: LLaVA, expand, sources, probe_routers, score, cfg, t, log):
    """--max-expert-params: before PGKE expands, make room until the parameters after the task (its new experts and
    router included) fit the budget. Rule skip (the default): drop the growth of the growing layer the decision valued
    least (`score`: the probe's frequency, or with --expand gradnorm its gradient norm), so growth stays where the
    probes say it buys most; old tasks keep their experts and routers untouched.
    Rule merge: merge the two least-used frozen experts (cmoe.merge_pair, usage summed over the tasks' records,
    record_task_use) of the layer that would hold most experts after growing (ties: a growing one), with
    cmoe.merge_experts. Each falls back on the other when it has nothing left (skip merges once no layer grows and the
    new router alone passes the budget). Measured on MiniCoIN (bench/merge_rules.py): merging costs old tasks dearly,
    because the balance loss spreads every task's tokens over all of a layer's experts, so a merge moves experts every
    later task relies on. Updates expand, sources and probe_routers in place (indices after any merge); returns the
    record kept in metrics.json."""
    pools, merged, skipped = model.expert_pools(), [], []
    while projected_params(model, expand, cfg.n_new) > cfg.max_expert_params:
        can_merge = [l for l, pool in enumerate(pools) if pool.n_frozen >= 2]
        if any(expand) and (cfg.budget_rule == "skip" or not can_merge):
            l = min((l for l, g in enumerate(expand) if g), key=lambda l: score[l])
            expand[l] = False
            skipped.append(l)
            continue
        if not can_merge:
            raise SystemExit(f"--max-expert-params {cfg.max_expert_params}: task {t} cannot fit even without growth and "
                             f"with every layer merged to one expert ({projected_params(model, expand, cfg.n_new)} "
                             f"parameters, its router included); raise the budget")
        l = max(can_merge, key=lambda l: (pools[l].n_experts + expand[l] * cfg.n_new, expand[l], -l))
        use_E = cmoe.expert_use(pools[l])
        i, j = cmoe.merge_pair(pools[l])
        cmoe.merge_experts(pools[l], i, j)
        probe_routers[l] = cmoe.merge_rows(probe_routers[l], i, j, float(use_E[i]), float(use_E[j]))
        if sources[l] is not None:  # the copy source follows its expert (j is now i; later ones moved down one)
            sources[l] = i if sources[l] == j else sources[l] - (sources[l] > j)
        merged.append([l, i, j])
    log(f"budget task {t}: {projected_params(model, expand, cfg.n_new)} of {cfg.max_expert_params} expert parameters"
        + "".join(f" | layer {l}: merged experts {i} and {j}" for l, i, j in merged)
        + "".join(f" | layer {l}: growth skipped" for l in skipped))
    return {"merged": merged, "skipped": skipped}


@torch.no_grad()
def record_task_use(model: LLaVA, ds, cfg):
    """Bounded growth: each layer's share of the just-trained task's assignments per expert, counted with its own
    router on its first locator_n training rows (forward only), appended to Experts.task_use."""
    usage = count_usage(model, subset(ds, torch.arange(min(cfg.locator_n, ds["input_ids"].shape[0]))), cfg)
    for pool, u in zip(model.expert_pools(), usage):
        pool.task_use.append((u / u.sum().clamp(min=1)).cpu())


def probe_split(ds, cfg, t):
    """PGKE's data: probe_frac of the task, four fifths to train the probes, one fifth held out to count on."""
    N = ds["input_ids"].shape[0]
    perm = torch.randperm(N, generator=stage_rng(cfg, t, "split"))
    n_probe = max(8, int(cfg.probe_frac * N))
    n_hold = max(4, n_probe // 5)
    return subset(ds, perm[:n_probe - n_hold]), subset(ds, perm[n_probe - n_hold:n_probe])


@torch.no_grad()
def count_usage(model: LLaVA, ds, cfg):
    """Per layer, the (token, top-k slot) assignments to each expert on `ds` [E] (forward only; under torchrun each
    rank counts its share and the counts are summed, so every rank takes the same decision)."""
    rank, world = ev.rank_world()
    mine = subset(ds, torch.arange(rank, ds["input_ids"].shape[0], world))
    cmoe.set_counting(model, True)
    for i in range(0, mine["input_ids"].shape[0], cfg.eval_batch):
        b = {k: v[i:i + cfg.eval_batch].to(cfg.device) for k, v in mine.items() if isinstance(v, torch.Tensor)}
        model(b["input_ids"], b["images"], None, b["task_ids"])
    return [sum_over_ranks(u) for u in cmoe.read_usage(model)]


def decide_by_gradnorm(model: LLaVA, ds, cfg, n_layers, t, log):
    """--expand gradnorm (D-MoLE's allocation signal at the probe rule's budget): grow the n_layers layers whose probe
    expert has the largest gradient norm of the task loss over `ds`. Returns (the decision, the norms)."""
    norms = probe_gradnorms(model, ds, cfg)
    log(f"PGKE task {t}: probe gradient norm per layer " + " ".join(f"{g:.3g}" for g in norms))
    top = sorted(range(len(norms)), key=lambda l: -norms[l])[:n_layers]
    return [l in top for l in range(len(norms))], norms


def probe_gradnorms(model: LLaVA, ds, cfg):
    """Per layer, the gradient norm of the task loss w.r.t. the layer's probe expert (its trainable A and B of every
    projection) over `ds`."""
    n = ds["input_ids"].shape[0]
    batches = [({k: v[i:i + cfg.eval_batch] for k, v in ds.items() if isinstance(v, torch.Tensor)},
                min(cfg.eval_batch, n - i) / n) for i in range(0, n, cfg.eval_batch)]
    groups = [[p for e in pool.lora.values() for p in (e.train_A, e.train_B)] for pool in model.expert_pools()]
    grads = loss_gradients(model, batches, [p for g in groups for p in g], cfg.device)
    norms, k = [], 0
    for g in groups:
        norms.append(math.sqrt(sum(float(x.pow(2).sum()) for x in grads[k:k + len(g)])))
        k += len(g)
    return norms


def loss_gradients(model: LLaVA, batches, params, device):
    """The gradients of sum_b weight_b * (task loss on batch b) w.r.t. `params` ((batch, weight) pairs: one backward
    each, accumulated; no optimizer step). Parameters that are frozen take part for the pass (their requires_grad is
    restored after it), and every .grad of the model is cleared again: the weights are never touched. A parameter the
    loss does not reach gets zeros."""
    flags = [p.requires_grad for p in params]
    model.zero_grad(set_to_none=True)
    try:
        for p in params:
            p.requires_grad_(True)
        for b, w in batches:
            b = {k: v.to(device) for k, v in b.items()}
            _, loss, _ = model(b["input_ids"], b["images"], b["labels"], b["task_ids"])
            (loss * w).backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------------------
# D-MoLE (--method dmole; the model side, its formulas and sources: cmoe.py's D-MoLE section)

def dmole_scores(model: LLaVA, ds, cfg, t) -> dict:
    """D-MoLE's zero-cost proxy (D-MoLE internvl/scorer/compute_zc_score.py): on the frozen pretrained base (every
    D-MoLE expert off), the task loss's gradients accumulated over the first ceil(dmole_portion x the batches of one
    epoch) training batches (at least one; the batches task t's training starts with), and per candidate module
    s_m = sum over its parameters p of ||grad_p||_2. `ds` holds pixels (the tower's modules need its forward)."""
    names = cmoe.dmole_candidates(model)
    N = ds["input_ids"].shape[0]
    n_batches = max(1, math.ceil(cfg.dmole_portion * math.ceil(N / min(cfg.batch_size, N))))
    batches = [(batch_at(ds, i, cfg.batch_size, cfg.seed + 7919 * t), 1.0) for i in range(n_batches)]
    groups = [list(model.get_submodule(n).parameters()) for n in names]
    with model.dmole.using(()):
        grads = loss_gradients(model, batches, [p for g in groups for p in g], cfg.device)
    scores, k = {}, 0
    for n, g in zip(names, groups):
        scores[n] = sum(float(x.float().norm()) for x in grads[k:k + len(g)])
        k += len(g)
    return scores


def dmole_grow(model: LLaVA, ds, cfg, t, log):
    """D-MoLE before task t: score (dmole_scores), allocate (cmoe.dmole_allocate, ties from the stage's generator), one
    new expert for t on each chosen module; the curriculum's learning-rate factors (cmoe.dmole_lr_scales). Returns the
    record kept in metrics.json (metrics["dmole"]) and in a partial checkpoint."""
    scores = dmole_scores(model, ds, cfg, t)
    chosen = cmoe.dmole_allocate(scores, cfg.dmole_budget, generator=stage_rng(cfg, t, "split"))
    model.dmole.grow(model, chosen, t, generator=stage_rng(cfg, t, "expand"))
    total = sum(scores.values())
    share = sum(s for n, s in scores.items() if cmoe.is_vision_module(n)) / total if total > 0 else 0.0
    scales = cmoe.dmole_lr_scales(scores) if cfg.dmole_curriculum else {"llm": 1.0, "vision": 1.0}
    n_vit = sum(map(cmoe.is_vision_module, chosen))
    log(f"D-MoLE task {t}: {len(chosen)} of {len(scores)} modules ({len(chosen) - n_vit} language, {n_vit} vision; "
        f"vision share of the gradient norm {share:.3f}) | lr x {scales['llm']:.2f} language, {scales['vision']:.2f} "
        f"vision | " + " ".join(n.replace("layers.", "").replace("encoder.", "").replace("self_attn.", "")
                                .replace("attn.", "").replace("_proj", "") for n in chosen))
    return {"task": t, "scores": scores, "chosen": chosen, "vision_share": share, "lr_scale": scales}


def dmole_lr_scale(model: LLaVA, decision):
    """lr_scale for train_stage: a D-MoLE expert's curriculum factor by the modality of the module it sits on."""
    side = {f"dmole.experts.{cmoe.DMoLE.key(n)}.": "vision" if cmoe.is_vision_module(n) else "llm"
            for n in model.dmole.tasks}
    scales = decision["lr_scale"]

    def scale(param_name):
        for prefix, s in side.items():
            if param_name.startswith(prefix):
                return scales[s]
        return 1.0
    return scale


def dmole_train_routing(model: LLaVA, locator, exs, ds, r, cfg, t):
    """What D-MoLE needs from task t's training rows: their representations (rows in ds order; the first locator_n
    fit the task's autoencoder) and each row's vote among the OLD tasks' autoencoders (ds["dmole_vote"], -1: none),
    from which train_stage's on_batch sets [t] + the batch's most-voted old task (cmoe.vote_train)."""
    z = ev.dmole_reps(model, [exs[int(i)] for i in ds["index"]], r.tok, r.template, cfg, ds["images"])
    ds["dmole_vote"] = locator.route(z, n_tasks=t)

    def on_batch(b):
        model.dmole.active = tuple(cmoe.vote_train(b["dmole_vote"].tolist(), t))
    return z, on_batch


def stage_data(cfg, model, r, t):
    """(the task's training examples, its encoded dataset); joint: every task's data in one dataset."""
    # a frozen tower: its features once per dataset; else pixels, every step (dmole: for the tower's experts and its
    # gradient-norm scores)
    feats = not ev.pixels_needed(cfg)
    if cfg.method != "joint":
        exs = data.load_examples(cfg, r.names[t], "train")
        ds = encode(model, exs, r.tok, r.template, cfg, t, feats)
    else:
        exs, ds = None, concat([encode(model, data.load_examples(cfg, n, "train"), r.tok, r.template, cfg, i, feats)
                                for i, n in enumerate(r.names)])
    return exs, trim_padding(ds, model.pad_id)


STAGES = ("init", "split", "probe", "expand", "vae")


def stage_seed(cfg, t, stage):
    """The seed of one random stage of task t, a function of (seed, task, stage) alone: a task's result then
    depends only on the checkpointed state, never on what ran before it in the process."""
    return (cfg.seed * 1_000_003 + t) * len(STAGES) + STAGES.index(stage)


def stage_rng(cfg, t, stage):
    return torch.Generator().manual_seed(stage_seed(cfg, t, stage))


def set_experts(llm: Llama, ecfg: ExpertConfig, vision: CLIPVision | None = None):
    """Expert settings of a fresh (expert-free) model; `vision`: the tower's pools take them too."""
    pools = llm.expert_pools() + ([] if vision is None else vision.expert_pools())
    if any(pool.n_experts for pool in pools):
        raise ValueError("set_experts is for a model without experts (the banks would lose their experts)")
    llm.ecfg = ecfg
    for pool in pools:
        pool.reset(ecfg)


def expert_config(cfg):
    ecfg = ExpertConfig(rank=cfg.rank, alpha=cfg.lora_alpha, top_k=cfg.top_k, attn=cfg.attn_experts)
    if cfg.method == "lora":
        ecfg.top_k = 1
    if cfg.method in ("moelora", "joint"):
        ecfg.top_k = cfg.moelora_experts  # CoIN's MoELoRA: a dense softmax over all experts
    return ecfg


def freeze_base(model):
    for p in model.parameters():
        p.requires_grad_(False)


def prepare(model: LLaVA, cfg) -> LLaVA:
    """The model as the continual stages train it, from its base; run() and --plan (on the meta device) both build it
    here, so the plan counts the tensors a run holds. The base frozen and in cfg.precision (bf16: vision tower,
    projector and LLM stored in bf16, no fp32 copy; forward passes under bf16 autocast), empty expert pools of the
    run's ExpertConfig (experts and routers are made fp32 as they grow), gradient checkpointing as set."""
    freeze_base(model)
    cmoe.set_precision(model, cfg.precision)
    model.experts_in = cfg.experts_in  # (the tower's pools stay empty and frozen unless it carries experts)
    set_experts(model.llm, expert_config(cfg), model.vision if model.tower_pools("vision") else None)
    if cfg.method == "dmole":  # its experts hang on both towers' attention projections (cmoe.DMoLE); the pools stay empty
        cmoe.attach_dmole(model, cfg.rank, cfg.lora_alpha)
    model.llm.grad_ckpt = cfg.grad_ckpt
    return model


def trainable_cl(model):
    """Only continual-learning parameters that the current stage owns stay trainable."""
    for n, p in model.named_parameters():
        if not ev.is_cl_key(n):
            p.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# a run folder's bookkeeping, kept out of the loop

class Clock:
    """Seconds per stage of one task, and its parameter counts."""

    def __init__(self, name, n_before):
        self.name, self.seconds = name, {"task": name, "probe": 0.0, "train": 0.0, "locator": 0.0, "eval": 0.0}
        self.n_before, self.trainable = n_before, None

    @contextlib.contextmanager
    def __call__(self, stage):
        t0 = time.time()
        yield
        self.seconds[stage] += time.time() - t0


def check_resume(cfg: TrainConfig):
    """--resume continues the run in cfg.out with the settings it was started with (its config.json): a changed
    setting would mix two runs in one folder, so it is refused, naming the setting, before anything is written."""
    path = os.path.join(cfg.out, "config.json")
    if not cfg.resume or not os.path.isfile(path):
        return
    saved = read_json(path)
    for name, value in dataclasses.asdict(cfg).items():
        if name not in RESUME_MAY_CHANGE and name in saved and saved[name] != value:
            raise SystemExit(f"--resume: {name} is {value!r} but the run in {cfg.out} was started with {saved[name]!r} "
                             f"({path}); resume with the same settings, or start a new run with another --out")


class RunState:
    """Log, metrics (state.json, which doubles as the progress marker), the resume point, timing and checkpoints:
    task_t/model.safetensors + meta.json after each task, task_t/partial.* every save_every steps."""

    def __init__(self, cfg: TrainConfig):
        check_resume(cfg)
        self.cfg, self.t_start = cfg, time.time()
        self.rank = init_distributed(cfg)
        self.names, metric = data.task_list(cfg)
        data.unseen_list(cfg, self.names)  # a misspelt --unseen stops here, not after stage 0
        unknown = sorted(set(cfg.steps_by_task()) - set(self.names))
        if unknown:  # before the run folder exists
            raise SystemExit(f"--task-steps names {', '.join(unknown)}: not a task of this run ({', '.join(self.names)})")
        os.makedirs(cfg.out, exist_ok=True)
        self.log = Log(os.path.join(cfg.out, "log.txt"))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.n_stages = 1 if cfg.method == "joint" else len(self.names)
        self.tok, self.template = data.tokenizer(cfg)
        self.state_path = os.path.join(cfg.out, "state.json")
        if not cfg.resume and self.rank == 0:
            for f in ("state.json", "metrics.json"):  # a fresh run must not inherit an old run's progress
                if os.path.exists(os.path.join(cfg.out, f)):
                    os.remove(os.path.join(cfg.out, f))
        if self.rank == 0:
            save_json(dataclasses.asdict(cfg), os.path.join(cfg.out, "config.json"))
        world = ev.rank_world()[1]
        self.log(f"run {cfg.out}: {cfg.method} on {cfg.benchmark} tasks {self.names} device {cfg.device}"
                 + (f", {world} ranks (torchrun: DDP, batches split, evaluation sharded)" if world > 1 else ""))
        self.metrics = {"benchmark": cfg.benchmark, "method": cfg.method, "expand": cfg.expand, "locator": cfg.locator,
                  "tasks": self.names, "metric": metric, "acc": [], "params": [], "experts_per_layer": [], "pgke": [],
                  "locator_acc": [], "time": {"base": 0.0, "tasks": []}, "finished_tasks": 0,
                  "max_expert_params": cfg.max_expert_params}
        self.first, self.partial = 0, None

    def start(self):
        """The frozen base with empty expert pools, the test side, the locator; a resumed run's finished tasks and
        mid-task save; row 0 (the base's zero-shot accuracy)."""
        cfg, t0 = self.cfg, time.time()
        model, base = build_base(cfg, self.tok, self.template, self.log)
        model = prepare(model, cfg)
        t_base = time.time() - t0
        bench = ev.Benchmark(cfg, model, self.tok, self.template, self.log)
        locator = (cmoe.AERouter() if cfg.method == "dmole" else cmoe.DDAS(cfg.locator_feature)
                   if cfg.method == "moe-adapters" else cmoe.Locator(cfg.locator_feature))
        if cfg.resume and os.path.exists(self.state_path):
            self.metrics = read_json(self.state_path)
            self.first = self.metrics["finished_tasks"]
            if self.first:
                locator = ev.load_task(model, os.path.join(cfg.out, f"task_{self.first - 1}"))
                if isinstance(locator, cmoe.Locator) and len(locator.gates) < len(locator.vaes):
                    raise SystemExit(f"--resume: {cfg.out} has no reject gates over this code's feature "
                                     f"'{cmoe.REJECT_FEATURE}' (older code made it): start the run afresh (its "
                                     f"finished tasks re-evaluate with `python eval.py {cfg.out} --reject`)")
            stem = os.path.join(cfg.out, f"task_{self.first}", "partial")
            if os.path.exists(stem + ".safetensors"):
                self.partial = (read_safetensors(stem + ".safetensors"), read_json(stem + ".json"))
            partial = f", and a partial task {self.first}" if self.partial else ""
            self.log(f"resume: {self.first} finished task(s){partial}")
        self.metrics["time"]["base"] += t_base
        self.metrics["base"], self.metrics["scoring"] = base, bench.scoring
        if cfg.experts_in != "llm":  # what experts_per_layer's and PGKE's per-layer lists hold, in their order
            self.metrics["expert_layers"] = [f"{tower}.{i}" for tower in ("llm", "vision")
                                             for i in range(len(model.tower_pools(tower)))]
        self.metrics["cwd"] = os.getcwd()  # the run's relative paths are relative to it (eval.reevaluate)
        if "zero_shot" not in self.metrics:  # row 0 of the accuracy matrix: the frozen base, before any expert exists
            self.metrics["unseen"] = {"tasks": bench.unseen, "acc": []}
            ev.record(self.metrics, bench.evaluate(model, None, -1), -1)
            self.log("base zero-shot: " + " ".join(f"{n}={ev.fmt(a)}" for n, a in zip(
                self.names + bench.unseen, self.metrics["zero_shot"] + self.metrics["unseen"]["zero_shot"])))
        return model, bench, locator

    def begin(self, t, model):
        name = "joint" if self.cfg.method == "joint" else self.names[t]
        self.log(f"=== task {t + 1}/{self.n_stages}: {name} ===")
        before = 0 if self.cfg.method == "isolated" else ev.count_params(model)[1]  # isolated: a pool of its own
        self.t, self.clock = t, Clock(name, n_before=before)
        return self.clock

    def restore_partial(self, model):
        """A task interrupted mid-training: its grown experts, PGKE decision, timing, step and optimizer state."""
        (tensors, meta), self.partial = self.partial, None
        ev.load_cl_state(model, tensors, meta, "partial")
        self.clock.seconds, self.clock.n_before = meta["time"], meta["n_before"]
        return meta.get("pgke"), (meta["step"], tensors)

    def checkpointer(self, model, decision):
        """Mid-task save: task_t/partial.safetensors (experts, routers, optimizer) + partial.json (step, decision)."""
        clock, stem = self.clock, os.path.join(self.cfg.out, f"task_{self.t}", "partial")

        def save(step, opt_state):
            if self.rank:  # under torchrun only rank 0 writes
                return
            sd, meta = ev.cl_state(model)
            meta.update(step=step, pgke=decision, time=clock.seconds, n_before=clock.n_before)
            save_safetensors({**sd, **opt_state}, stem + ".safetensors")
            save_json(meta, stem + ".json")
        return save

    def finish_stage(self, t, model, locator, result, decision):
        """Stage t's metrics, its checkpoint, then the progress marker: a crash before it redoes the stage."""
        cfg, metrics, clock, located = self.cfg, self.metrics, self.clock, self.cfg.method in ev.LOCATED
        dm = getattr(model, "dmole", None)
        if decision is not None:  # PGKE's decision, D-MoLE's allocation, or the experts activate-freeze froze
            key = "dmole" if dm is not None else "activate_freeze" if cfg.method == "moe-adapters" else "pgke"
            metrics.setdefault(key, []).append(decision)
        ev.record(metrics, result, t)
        pools = model.expert_pools()
        expert_params = ev.count_params(model)[1]
        adapters = adapter_pools(model) if cfg.method == "moe-adapters" else []
        n_experts = sum(f.n_experts for f in adapters or pools) + (dm.n_experts() if dm is not None else 0)
        metrics["params"].append({"task": clock.name, "trainable": clock.trainable, "experts": n_experts,
                                  "added": expert_params - clock.n_before, "expert_params": expert_params})
        if dm is not None:  # D-MoLE: experts per decoder layer (its four projections), then per ViT layer
            metrics["budget_params"] = cmoe.dmole_budget_numel(model, cfg.dmole_budget, cfg.rank)
            metrics["experts_per_layer"].append(ev.dmole_experts_per_layer(model))
        else:  # (moe-adapters: its static pools, decoder then tower)
            metrics["experts_per_layer"].append([f.n_experts for f in adapters or pools])
        metrics["time"]["tasks"].append(clock.seconds)
        metrics["finished_tasks"] = len(self.names) if cfg.method == "joint" else t + 1
        scores = zip(self.names + metrics["unseen"]["tasks"], result["acc"] + result["unseen"])
        self.log(f"after task {t + 1} ({clock.name}): " + " ".join(f"{n}={ev.fmt(a)}" for n, a in scores)
                 + (f" | locator {ev.fmt(metrics['locator']['acc'])}%" if located else ""))
        tdir = os.path.join(cfg.out, f"task_{t}")
        if self.rank:
            return
        sd, meta = ev.cl_state(model, locator)
        save_safetensors(sd, os.path.join(tdir, "model.safetensors"))
        save_json({**meta, "task": clock.name, "index": t, "tasks": self.names, "method": cfg.method},
                  os.path.join(tdir, "meta.json"))
        save_json(metrics, self.state_path)
        for ext in (".safetensors", ".json"):
            if os.path.exists(os.path.join(tdir, "partial" + ext)):
                os.remove(os.path.join(tdir, "partial" + ext))

    def finish(self):
        """Totals and summary metrics into state.json and metrics.json, report.md and its figures (eval.write_report;
        `python eval.py RUN` regenerates them); the accuracy matrix into the log."""
        metrics, log, out = self.metrics, self.log, self.cfg.out
        metrics["time"]["total"] = metrics["time"].get("total", 0.0) + time.time() - self.t_start
        metrics.update(ev.continual_metrics(metrics["acc"], joint=metrics["method"] == "joint",
                                            isolated=metrics["method"] == "isolated"))
        if self.rank == 0:
            save_json(metrics, self.state_path)
            save_json(metrics, os.path.join(out, "metrics.json"))
            ev.write_report(out, metrics)
        cell = lambda a: f"{a:8.1f}" if a is not None else f"{'':>8}"  # noqa: E731
        two = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        log("accuracy matrix (row: after training task j; column: task i)")
        log("            " + " ".join(f"{n[:8]:>8}" for n in self.names))
        labels = ["base"] + (self.names if metrics["method"] != "joint" else ["joint"])
        for label, row in zip(labels, [metrics["zero_shot"]] + metrics["acc"]):
            log(f"{label[:10]:>10}  " + " ".join(map(cell, row)))
        if metrics.get("plasticity"):
            log(f"{'plasticity':>10}  " + " ".join(map(cell, metrics["plasticity"])))
        unseen = metrics["unseen"]
        for n, z, a, k in zip(unseen["tasks"], unseen["zero_shot"], unseen["acc"][-1], unseen.get("retention") or []):
            log(f"unseen task {n}: base zero-shot {ev.fmt(z)}, after the last task {ev.fmt(a)}, retention {two(k)}")
        log(f"Last {two(metrics['last'])} | Avg {two(metrics['avg'])} | BWT {two(metrics['bwt'])} | "
            f"FWT {two(metrics.get('fwt'))} | locator {two(metrics['locator'].get('acc'))} | "
            f"total {metrics['time']['total']:.0f}s")
        log(f"report: {os.path.join(out, 'report.md')}, figures in {os.path.join(out, 'figures')}")
        return metrics


# ----------------------------------------------------------------------------------------------------------
# memory plan of a real run, from configs alone (python train.py --plan)

PRESETS = {  # the published config.json fields that LlamaConfig.from_hf reads
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=False,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
}
PLAN_MARGIN = 0.10  # share of --gpu-mem the plan leaves free: CUDA context, allocator fragmentation, backward's buffers


def plan_configs(args):
    """(LlamaConfig, VisionConfig, what they came from): --preset, or only the config.json of --llm and --vision."""
    if args.preset:
        return (LlamaConfig.from_hf(PRESETS[args.preset], f"preset {args.preset}"),
                VisionConfig.clip_vit_large_patch14_336(), f"preset {args.preset} + CLIP ViT-L/14-336")
    if not (args.llm and args.vision):
        raise SystemExit("--plan needs --preset, or --llm and --vision (HF folders: only their config.json is read)")
    lpath, vpath = os.path.join(args.llm, "config.json"), os.path.join(args.vision, "config.json")
    d = read_hf_config(args.llm)
    arch = d.get("architectures") or ["LlamaForCausalLM"]
    if d.get("model_type") != "llama" or "LlamaForCausalLM" not in arch:
        raise CheckpointError(f"{lpath}: model_type {d.get('model_type')!r}, architectures {arch}: not a Llama "
                              f"(expected model_type 'llama', LlamaForCausalLM)")
    return LlamaConfig.from_hf(d, lpath), VisionConfig.from_hf(read_hf_config(args.vision), vpath), f"{lpath} + {vpath}"


def activation_bytes(lc: LlamaConfig, ecfg: ExpertConfig, E, S, B, dt, ckpt=False):
    """Bytes autograd keeps for backward in one training step of B samples of S spliced tokens (T = B*S), tensor by
    tensor as cmoe saves them (tests/test_plan.py measures it). dt: bytes per element of the model dtype; RMSNorm and
    the router compute in fp32 (4 B), indices are int64 (8 B). The vision tower and projector run once per dataset
    under no_grad (train.encode): nothing. A frozen Linear keeps only its weight. Per decoder layer:
      norms      2 x (T*D*4: the fp32 input + T*4: rsqrt)
      attention  4 x T*H*hd*dt (q; k, v repeated to H heads; output) + T*H*4 (logsumexp)
      router     T*D*4 (fp32 input) + T*(E*4 probs + K*12 top-k weights, indices + 8) + B*E*D*4 (each sample's router)
      ffn        3 x T*F*dt (gate, silu(gate), up)
      lora       the inputs the A's gradients need: dense T*F*dt (down's) + T*D*dt (gate's, up's; fp32: the router's);
                 sparse M*(D + F)*dt (the gathered rows: gate's and up's are one) + M*8 + T*K*16 (where rows go);
                 and per projection din -> dout (gate, up, down): n*(2R + 1)*dt (rank space before / after gating,
                 gates) + nw*R*(din + dout)*dt (the A, B the dispatch uses);
                 dense: n = T*E, nw = E; sparse (cmoe.sparse_wins): n = M = T*K + E*31 rounded up to 32-row blocks, nw = M/32;
                 --attn-experts: q, k, v, o too, and their inputs: dense T*D*dt (the FFN's input, no longer the
                 router's; o's is the attention output kept anyway), sparse M*(D + H*hd)*dt (q's, k's, v's rows; o's)
    The first layer's input needs no gradient: it keeps no norms, attention, router weights, nor gate's and up's A
    (--attn-experts: no first norm, router weights, nor q's, k's and v's A).
    Once: RoPE cos, sin 2*T*hd*dt; final norm T*(4D + 4); loss (T - B)*(4V + 8) (fp32 log-probs and targets).
    --grad-ckpt keeps each layer's input T*D*dt instead, and recomputes one layer at a time in backward (in fp32, that
    layer's first norm keeps the saved input itself). Returns (total bytes, the terms of one layer after the first)."""
    T, D, F, R, H, K, blk = B * S, lc.dim, lc.ffn_dim, ecfg.rank, lc.n_heads, min(ecfg.top_k, E), cmoe.BLOCK
    sparse = cmoe.sparse_wins(E, ecfg.top_k, True, ecfg.rank, D)  # Experts' "auto" dispatch in training
    M = -(-(T * K + E * (blk - 1)) // blk) * blk
    n, nw = (M, M // blk) if sparse else (T * E, E)
    proj = ((D, F), (D, F), (F, D))
    Q, KV = H * lc.head_dim, lc.n_kv_heads * lc.head_dim
    lora_in = M * (D + F) * dt if sparse else T * (F + D * (dt != 4)) * dt
    if ecfg.attn:  # q, k, v, o experts; routed at the layer's input, which is then the router's fp32 input
        proj += ((D, Q), (D, KV), (D, KV), (Q, D))  # (and the FFN's input is kept for gate's and up's A apart)
        lora_in += M * (D + Q) * dt if sparse else T * D * dt  # (dense: o's input is the kept attention output)
    t = {"norms": 2 * T * (4 * D + 4), "attention": T * (4 * H * lc.head_dim * dt + 4 * H),
         "router": T * D * 4 + T * (4 * E + 12 * K + 8) + B * E * D * 4,
         "ffn": 3 * T * F * dt,
         "lora": (M * 8 + T * K * 16 if sparse else 0) + lora_in
         + sum(n * (2 * R + 1) + nw * R * (i + o) for i, o in proj) * dt}
    layer = sum(t.values())
    if ecfg.attn:  # the first layer's attention now trains; its input (the embeddings) still needs no gradient
        first = layer - T * (4 * D + 4) - B * E * D * 4 - 3 * nw * D * R * dt
    else:
        first = layer - t["norms"] - t["attention"] - B * E * D * 4 - 2 * nw * D * R * dt
    once = 2 * T * lc.head_dim * dt + T * (4 * D + 4) + (T - B) * (4 * lc.vocab_size + 8)
    reused = T * D * 4 if dt == 4 else 0  # --grad-ckpt, fp32: the recomputed first norm's input is the saved one
    layers = lc.n_layers * T * D * dt + layer - reused if ckpt else first + (lc.n_layers - 1) * layer
    return layers + once, t


def tensor_bytes(model, trainable=False):
    """Bytes of a model's tensors as stored (parameters and buffers, each once: a tied head is the embedding);
    trainable: the parameters that train only (the bytes of their gradients)."""
    tensors = [p for p in model.parameters() if p.requires_grad or not trainable]
    tensors += [] if trainable else list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def plan(args):
    """--plan: parameters, memory and the largest micro-batch of the run the flags describe, at the worst case of
    --tasks (cmoe: every layer grows by --n-new experts every task). The model is built on the meta device: nothing is
    downloaded, allocated or read but config.json. Prints; returns the numbers (bytes, counts)."""
    lc, vc, what = plan_configs(args)
    n_tasks = int(args.tasks) if (args.tasks or "").isdigit() else len(data.task_list(args)[0])
    ecfg, dt = expert_config(args), torch.finfo(cmoe.PRECISIONS[args.precision]).bits // 8  # activations' bytes
    with torch.device("meta"):  # the model run() trains (prepare), without its weights
        model = prepare(LLaVA(CLIPVision(vc), Projector(vc.hidden_size, lc.dim), Llama(lc)), args)
        base = {k: sum(p.numel() for p in getattr(model, k).parameters()) for k in ("vision", "projector", "llm")}
    if args.method == "dmole":  # worst case: every task's budget on the modules with the largest LoRA
        names = sorted(cmoe.dmole_candidates(model), key=lambda n: -cmoe.lora_numel(model.get_submodule(n), args.rank))
        model.dmole.grow(model, names[: int(round(args.dmole_budget * len(names)))], 0)
    elif args.method == "moe-adapters":  # the static pools and the first task's routers (a frozen expert only lowers
        add_adapter_pools(model, args, n_tasks)  # later tasks' trainable count: task 1 is the largest)
        for pool in adapter_pools(model):
            pool.add_router()
    else:
        cmoe.init_experts(model, first_pool_size(args))  # (--experts-in: the decoder's pools, the tower's, or both)
    first, grads = ev.count_params(model)[0], tensor_bytes(model, trainable=True)
    for t in range(1, n_tasks) if args.method == "dmole" else ():
        model.dmole.freeze()
        model.dmole.grow(model, names[: int(round(args.dmole_budget * len(names)))], t)
    for _ in range(n_tasks - 1 if args.method == "cmoe" else 0):  # new tensors follow the weights onto meta
        for pool in model.expert_pools():
            pool.freeze()
            pool.add_experts(args.n_new)
            pool.add_router()
    for _ in range(n_tasks - 1 if args.method == "moe-adapters" else 0):  # every later task: its routers
        for pool in adapter_pools(model):
            for r in (*pool.routers, *pool.noise):
                r.requires_grad_(False)
            pool.add_router()
    (last, added), grads = ev.count_params(model), max(grads, tensor_bytes(model, trainable=True))
    E, S, frozen = model.llm.layers[0].experts.n_experts, args.max_len - 1 + vc.num_patches, sum(base.values())
    clip_layer = sum(p.numel() for n, p in model.vision.encoder.layers[0].named_parameters() if not ev.is_cl_key("." + n))
    # AdamW keeps m and v in the dtype of each parameter it updates (fp32: experts and routers are the master weights)
    mem = {"weights": tensor_bytes(model), "gradients": grads, "AdamW": 2 * grads}
    loss_peak = S * lc.vocab_size * (dt + 8)  # per sample: the logits train_stage holds, 2 fp32 grads of the log-probs
    budget = args.gpu_mem * 2**30 * (1 - PLAN_MARGIN) - sum(mem.values())
    act, fit, gib = {}, {}, lambda b: f"{b / 2**30:.2f} GiB"
    for ck in (False, True):
        a1, a65 = (activation_bytes(lc, ecfg, E, S, b, dt, ck)[0] + b * loss_peak for b in (1, 65))
        act[ck] = ((a65 - a1) / 64, a1 - (a65 - a1) / 64)  # (per sample, per step): sparse rows come in blocks
        b = max(0, int((budget - act[ck][1]) // act[ck][0]))
        while b and activation_bytes(lc, ecfg, E, S, b, dt, ck)[0] + b * loss_peak > budget:
            b -= 1
        fit[ck] = b
    if args.method == "dmole":
        kind = f"rank {ecfg.rank} LoRA experts on the attention projections of both towers"
    elif args.method == "moe-adapters":
        a0 = adapter_pools(model)[0].acfg
        kind = f"adapter experts (bottleneck {a0.dim}) beside the FFN, top-{a0.top_k} per sample"
    else:
        kind = f"rank {ecfg.rank}, top-k {ecfg.top_k}, experts on {'FFN + attention' if ecfg.attn else 'FFN'}"
    print(f"plan: {what} (config only; model built on the meta device)\n  {args.method}, {kind}, {n_tasks} task(s); "
          f"S = {args.max_len - 1} text + {vc.num_patches} image = {S} tokens")
    print(f"parameters\n  frozen base      vision {base['vision']:,} + projector {base['projector']:,} + LLM "
          f"{base['llm']:,} = {frozen:,}\n                   (vision: {vc.run_layers} of {vc.num_hidden_layers} CLIP "
          f"layers, no post_layernorm, as LLaVA reads layer {vc.select_layer}; CLIPVisionModel: "
          f"{base['vision'] + (vc.num_hidden_layers - vc.run_layers) * clip_layer + 2 * vc.hidden_size:,})")
    if args.method == "dmole":
        print(f"  dmole            each task at most {first:,} expert parameters (rank {args.rank} LoRA on "
              f"{int(round(args.dmole_budget * len(names)))} of {len(names)} attention projections, the largest); "
              f"activations below leave out the vision tower's backward (its experts train)")
    print(f"  trainable        task 1: {first:,}; task {n_tasks}: {last:,} (that task's experts and router)\n"
          f"  after task {n_tasks}     {frozen + added:,} ({added:,} in experts and routers"
          + (f", {E} experts per layer)" if E else ")"))  # (E = 0: dmole and moe-adapters route no LoRA pool)
    if model.tower_pools("vision"):
        vis = sum(p.numel() for pool in model.tower_pools("vision") for p in pool.parameters())
        print(f"  vision experts   {vis:,} of them in the {len(model.tower_pools('vision'))} CLIP layers' pools "
              f"(--experts-in {args.experts_in}: {model.tower_pools('vision')[0].n_experts} experts per layer; the tower "
              f"then trains under autograd, and its activations are not in the estimate below)")
    if args.method == "moe-adapters":
        ap = adapter_pools(model)
        print(f"  moe-adapters     {ap[0].n_experts} adapter experts (bottleneck {ap[0].acfg.dim}) in each of {len(ap)} "
              f"blocks (--adapters-in {args.adapters_in}), a router and a noise router per task and block; the "
              f"activations below leave out the adapters' bottleneck, top-k x T x {ap[0].acfg.dim} values a layer")
    print(f"memory (--precision {args.precision}: the frozen base in {args.precision}, experts and routers in fp32 with "
          f"fp32 gradients and AdamW m and v; activations in {args.precision})\n  "
          + ", ".join(f"{k} {gib(v)}" for k, v in mem.items()))
    terms = {k: v / 64 for k, v in activation_bytes(lc, ecfg, E, S, 64, dt)[1].items()}  # per sample, not per step
    dispatch = "sparse" if cmoe.sparse_wins(E, ecfg.top_k, True, ecfg.rank, lc.dim) else "dense"
    pool_kind = f"{dispatch} expert dispatch, E = {E}" if E else "no routed LoRA pool"
    print(f"  activations kept for backward, per sample and decoder layer ({pool_kind}):\n    "
          + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in terms.items()) + " MiB")
    for ck in (False, True):
        print(f"  {'with' if ck else 'without'} --grad-ckpt: {gib(act[ck][0])} per sample (incl. loss peak "
              f"{gib(loss_peak)}: logits + 2 fp32 log-prob gradients) + {act[ck][1] / 2**20:.1f} MiB per step")
    if fit[True] < 1:  # not even one sample with checkpointing: say so rather than print a micro-batch of 0
        print(f"does not fit {args.gpu_mem:g} GiB ({PLAN_MARGIN:.0%} left free): weights and optimizer state "
              f"{gib(sum(mem.values()))}, one sample with --grad-ckpt {gib(act[True][0] + act[True][1])} more")
    else:
        print(f"fits {args.gpu_mem:g} GiB, {PLAN_MARGIN:.0%} left free: micro-batch {fit[False]} without --grad-ckpt, "
              f"{fit[True]} with (the rows of one forward: --batch-size / --batch-shards)")
    return dict(base=base, first=first, last=last, added=added, experts=E, S=S, mem=mem, act=act, fit=fit)


def main(argv=None):
    cfg = parse_args(argv)
    if cfg.plan or cfg.preset:
        try:
            return plan(cfg)
        except (CheckpointError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
    try:
        return run(cfg)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        leave_distributed()


if __name__ == "__main__":
    main()
