"""Continual training of LLaVA-CMoE (and its baselines) over a task sequence.

    python train.py                      # MiniCoIN, cmoe (PGKE + PTL), whatever device exists
    python train.py --quick              # the same pipeline on a small slice (about a minute on a CPU)
    python train.py --method lora        # baselines: lora | moelora | joint; ablations: --expand all, --locator oracle
    python train.py --benchmark coin --coin-root DIR --image-root DIR --llm L --vision V --projector P --tokenizer T

One run writes one folder (--out): per-task checkpoints (safetensors + JSON), metrics.json, log.txt, predictions/.
Shape legend: B batch, T tokens, P patches, D width, N examples.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time

import torch

import cmoe
import data
import eval as ev
from cmoe import LLaVA, Llama, LlamaConfig, ExpertConfig
from vision import (CheckpointError, CLIPVision, Projector, VisionConfig, load_clip, load_projector, preprocess,
                    read_hf_config, read_json)


# ----------------------------------------------------------------------------------------------------------
# arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--benchmark", default="minicoin", choices=["minicoin", "coin"])
    a("--method", default="cmoe", choices=["cmoe", "lora", "moelora", "joint"])
    a("--expand", default="probe", choices=["probe", "all"], help="PGKE: grow where probes say, or every layer")
    a("--locator", default="ptl", choices=["ptl", "oracle"], help="router choice at test time")
    a("--tasks", default=None, help="comma-separated task names (default: the benchmark's full sequence)")
    a("--out", default=None, help="run folder (default out/<benchmark>-<method>[-ablations])")
    a("--quick", action="store_true", help="small slice of everything: a pipeline check in about a minute")
    a("--resume", action="store_true", help="continue from the last finished task / last saved step")
    a("--seed", type=int, default=0)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile the training step (auto: on CUDA)")
    a("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    # model
    a("--llm", help="HF Llama-3.x folder (default: the tiny MiniCoIN base, pretrained on captions and cached)")
    a("--vision", help="HF CLIP folder (CLIPVisionModel or CLIPModel)")
    a("--projector", help="LLaVA mm_projector .safetensors (omit to train a fresh one on --align-json)")
    a("--tokenizer", help="Llama-3 tokenizer.model (tiktoken BPE file)")
    a("--align-json", help="LLaVA-format caption json for projector alignment (real models, no --projector)")
    a("--base-dir", default="out/base", help="cache of pretrained tiny base models")
    a("--base-steps", type=int, default=1000, help="tiny base, stage 0a: caption pretraining steps")
    a("--instruct-steps", type=int, default=500, help="tiny base, stage 0b: MiniCoIN-Instruct tuning steps")
    # experts / method
    a("--rank", type=int, default=8)
    a("--lora-alpha", type=float, default=16.0)
    a("--top-k", type=int, default=2)
    a("--n-init", type=int, default=2, help="experts per layer at task 1")
    a("--n-new", type=int, default=1, help="experts added to an expanded layer")
    a("--alpha", type=float, default=1.0, help="PGKE: expand iff freq > mean - alpha*std")
    a("--probe-frac", type=float, default=0.1, help="share of the task's data used to probe")
    a("--probe-steps", type=int, default=60)
    a("--lambda-aux", type=float, default=0.01, help="weight of the load-balance loss")
    a("--moelora-experts", type=int, default=4)
    # optimisation
    a("--steps", type=int, default=300, help="training steps per task")
    a("--batch-size", type=int, default=32)
    a("--grad-accum", type=int, default=1)
    a("--lr", type=float, default=5e-3)
    a("--base-lr", type=float, default=2e-3)
    a("--warmup", type=int, default=20)
    a("--weight-decay", type=float, default=0.0)
    a("--grad-ckpt", action="store_true", help="gradient checkpointing of decoder layers")
    a("--save-every", type=int, default=100, help="mid-task checkpoint interval (steps)")
    # data
    a("--train-n", type=int, default=None, help="training examples per task (default: 1000 on MiniCoIN, all on CoIN)")
    a("--test-n", type=int, default=None, help="test examples per task (default: 100 on MiniCoIN, all on CoIN)")
    a("--caption-n", type=int, default=data.BASE_SETS["caption"], help="stage 0a examples (tiny base)")
    a("--instruct-n", type=int, default=data.BASE_SETS["instruct"], help="stage 0b examples (tiny base)")
    a("--max-len", type=int, default=48, help="text tokens per sample (the image placeholder counts as one)")
    a("--max-new-tokens", type=int, default=24, help="a MiniCoIN box answer is 21 tokens with its end")
    a("--eval-batch", type=int, default=128)
    a("--locator-n", type=int, default=400, help="training features per task for its VAE")
    a("--coin-root", help="CoIN's Instructions_Original/ (or Instruction_Type2/): <Task>/train.json and test.json "
      "(val.json for TextVQA, VizWiz, VQAv2; OCR-VQA's folder is OCRVQA)")
    a("--image-root", help="root the CoIN image paths are relative to (CoIN's cl_dataset/)")
    a("--coin-annotations", help="folder laid out as CoIN's cl_dataset/ holding the scoring files CoIN's test records "
      "lack: TextVQA/TextVQA_0.5.1_val.json (the 10 human answers); without it TextVQA's score falls back (logged)")
    a("--predict-only", action="store_true", help="CoIN: test records may lack answers; write the answer files, "
      "report no accuracy")
    a("--bad-images", default="fail", choices=["fail", "skip"])
    plan_flags(a)
    args = p.parse_args(argv)
    if args.quick:
        for k, v in dict(base_steps=150, instruct_steps=100, steps=40, probe_steps=15, train_n=96, test_n=24,
                         caption_n=512, instruct_n=512,
                         batch_size=16, locator_n=96, save_every=20, warmup=5).items():
            if p.get_default(k) == getattr(args, k):
                setattr(args, k, v)
        if args.tasks is None:
            args.tasks = "sqa,cls,count"
    if args.out is None:
        tag = args.method + ("-expandall" if args.expand == "all" else "") + ("-oracle" if args.locator == "oracle" else "")
        args.out = os.path.join("out", f"{args.benchmark}{'-quick' if args.quick else ''}-{tag}")
    return args


class Log:
    def __init__(self, path):
        self.path = path

    def __call__(self, msg):
        print(msg, flush=True)
        with open(self.path, "a") as f:
            f.write(msg + "\n")


# ----------------------------------------------------------------------------------------------------------
# data: tasks, tokenizer, pre-encoded datasets

def task_list(args):
    if args.benchmark == "minicoin":
        names = args.tasks.split(",") if args.tasks else list(data.MINICOIN_TASKS)
        for n in names:
            if n not in data.MINICOIN_TASKS:
                raise SystemExit(f"unknown MiniCoIN task '{n}'; known: {', '.join(data.MINICOIN_TASKS)}")
        return names, {n: data.TASK_METRIC[n] for n in names}
    known = dict(data.COIN_TASKS)
    alias = {data.coin_folder(n): n for n in known}  # CoIN's folder names work too (OCRVQA)
    names = [alias.get(n, n) for n in args.tasks.split(",")] if args.tasks else [n for n, _ in data.COIN_TASKS]
    for n in names:
        if n not in known:
            raise SystemExit(f"unknown CoIN task '{n}'; known: {', '.join(known)}")
    return names, {n: known[n] for n in names}


def load_examples(args, task, split):
    if args.benchmark == "minicoin":
        n = args.train_n if split == "train" else args.test_n
        return data.minicoin(task, split, n, seed=args.seed)
    if not args.coin_root:
        raise SystemExit("--benchmark coin needs --coin-root (and --image-root)")
    train_path, test_path = data.coin_files(args.coin_root, task)
    root = args.image_root or args.coin_root
    if split == "train":
        return data.load_coin_train(train_path, root, bad_images=args.bad_images, task=task, n=args.train_n)
    ann = data.COIN_ANNOTATIONS.get(task)
    ann = os.path.join(args.coin_annotations, ann) if ann and args.coin_annotations else None
    if ann and not os.path.isfile(ann):
        raise FileNotFoundError(f"--coin-annotations {args.coin_annotations}: {data.COIN_ANNOTATIONS[task]} not found "
                                f"(CoIN scores {task} against it; leave the flag out to use the logged fallback)")
    return data.load_coin_test(test_path, root, bad_images=args.bad_images, task=task, n=args.test_n,
                               require_answer=not args.predict_only, annotations=ann)


def get_tokenizer(args):
    if args.tokenizer:
        return data.load_tokenizer(args.tokenizer), data.LLAMA3
    return data.build_minicoin_tokenizer(data.minicoin_tokenizer_path(args.base_dir)), data.COMPACT


@torch.no_grad()
def encode(model: LLaVA, examples, tok, template, args, task_id, feats=True):
    """Pre-encode a dataset once: ids/labels padded to max_len, and (frozen tower) projected image features."""
    ds = data.encode_dataset(examples, tok, template, args.max_len, model.vision.cfg.image_size, task_id)
    if feats:
        model.eval()
        px = ds.pop("pixel_values")
        ds["images"] = torch.cat([model.image_features(px[i:i + 256].to(args.device)).cpu() for i in range(0, len(px), 256)])
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


# ----------------------------------------------------------------------------------------------------------
# the base model (stage 0)

def tiny_base(vocab_size, pad_id):
    vcfg = VisionConfig.tiny(image_size=data.IMAGE_SIZE)
    lcfg = LlamaConfig.tiny(vocab_size=vocab_size)
    return LLaVA(CLIPVision(vcfg), Projector(vcfg.hidden_size, lcfg.dim), Llama(lcfg), pad_id=pad_id)


def save_base(model: LLaVA, folder, extra=None):
    meta = {"vision": vars(model.vision.cfg), "llm": vars(model.llm.cfg), "pad_id": model.pad_id,
            "projector": [model.projector[0].in_features, model.projector[0].out_features], **(extra or {})}
    cmoe.save_safetensors(cmoe.base_state(model), os.path.join(folder, "model.safetensors"))
    cmoe.save_json(meta, os.path.join(folder, "meta.json"))  # written last: its presence marks a complete base


def load_base(folder) -> LLaVA:
    meta = read_json(os.path.join(folder, "meta.json"))
    vcfg, lcfg = VisionConfig(**meta["vision"]), LlamaConfig(**meta["llm"])
    model = LLaVA(CLIPVision(vcfg), Projector(*meta["projector"]), Llama(lcfg), pad_id=meta["pad_id"])
    sd = cmoe.load_safetensors(os.path.join(folder, "model.safetensors"))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not cmoe._is_cl_key(k) and not (lcfg.tie_embeddings and k == "llm.lm_head.weight")]
    if missing or unexpected:
        raise KeyError(f"{folder}/model.safetensors: missing {missing}, unexpected {unexpected}")
    return model


def build_base(args, tok, template, log) -> LLaVA:
    pad = data.pad_id(tok)
    if args.llm:  # real checkpoints
        llm = cmoe.load_llama(args.llm)
        if not args.vision:
            raise SystemExit("--llm needs --vision (a CLIP folder)")
        vision = load_clip(args.vision)
        proj = load_projector(args.projector) if args.projector else Projector(vision.cfg.hidden_size, llm.cfg.dim)
        model = LLaVA(vision, proj, llm, pad_id=pad).to(args.device)
        if not args.projector and args.align_json:
            exs = data.load_coin_train(args.align_json, args.image_root, bad_images=args.bad_images)
            ds = encode(model, exs, tok, template, args, 0, feats=False)
            for p in model.parameters():
                p.requires_grad_(False)
            model.projector.requires_grad_(True)
            train_stage(model, ds, args, args.base_steps, args.base_lr, 0, "align", log, experts=False)
        return model
    # tiny MiniCoIN base, made the way LLaVA is (captions, then general instructions); each stage's result is
    # cached under a key of everything that shaped it, so changing stage 0b reuses stage 0a
    stages = [("base", "caption", args.caption_n, args.base_steps), ("instruct", "instruct", args.instruct_n,
                                                                     args.instruct_steps)]
    shaped_by = [args.seed, args.max_len, args.base_lr, args.batch_size, tok.name, data.MINICOIN_VERSION, data.IMAGE_SIZE,
                 "stage 0b: tower frozen"]
    model = None
    for k, (tag, task, n, steps) in enumerate(stages):
        key = hashlib.sha1(json.dumps(shaped_by + stages[: k + 1]).encode()).hexdigest()[:10]
        folder = os.path.join(args.base_dir, f"minicoin-{tag}-{key}")
        if os.path.isfile(os.path.join(folder, "meta.json")):
            log(f"base: stage 0 '{tag}' reused from {folder}")
            model = load_base(folder).to(args.device)
            continue
        if model is None:
            torch.manual_seed(args.seed)
            model = tiny_base(tok.n_vocab, pad).to(args.device)
        log(f"base: stage 0 '{tag}' on {n} MiniCoIN {task} examples for {steps} steps")
        ds = encode(model, data.minicoin(task, "train", n, seed=args.seed), tok, template, args, 0, feats=False)
        model.vision.requires_grad_(tag == "base")  # as LLaVA: the tower learns to see in 0a, is frozen in 0b
        train_stage(model, ds, args, steps, args.base_lr, 0, tag, log, experts=False)
        save_base(model, folder)
    return model


# ----------------------------------------------------------------------------------------------------------
# one training stage: AdamW, warm-up + cosine, grad accumulation, NaN guard, mid-stage checkpoints

def lr_at(step, total, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def compiled_step(model, args):
    use = args.compile == "on" or (args.compile == "auto" and args.device.startswith("cuda"))
    return torch.compile(model) if use else model


def train_stage(model: LLaVA, ds, args, steps, lr, task_id, tag, log, experts=True, task_ids_fixed=None,
                ckpt=None, start=None):
    """Train the parameters that have requires_grad on `ds`. `ckpt(step, opt)` saves a resumable state;
    `start` = (step, optimizer state) to continue from."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=args.weight_decay, betas=(0.9, 0.95))
    step0 = 0
    if start is not None:
        step0 = start[0]
        load_optimizer(opt, named, start[1])
    fwd = compiled_step(model, args)
    model.train()
    t_last, tok_count = time.time(), 0
    interval = max(1, steps // 10)
    amp = amp_ctx(args)
    for step in range(step0, steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, args.warmup)
        loss_sum = aux_sum = 0.0
        for micro in range(args.grad_accum):
            b = batch_at(ds, step * args.grad_accum + micro, args.batch_size, args.seed + 7919 * task_id)
            b = {k: v.to(args.device) for k, v in b.items()}
            tids = b["task_ids"] if task_ids_fixed is None else torch.full_like(b["task_ids"], task_ids_fixed)
            with amp:
                _, loss, aux = fwd(b["input_ids"], b["images"], b["labels"], tids if experts else None, use_experts=experts)
            total = loss + args.lambda_aux * aux
            if not torch.isfinite(total):
                raise FloatingPointError(f"non-finite loss ({float(total.detach())}) in stage '{tag}' at step {step + 1}: "
                                         f"stopping; checkpoints already on disk are untouched")
            (total / args.grad_accum).backward()
            loss_sum += float(loss.detach()) / args.grad_accum
            aux_sum += float(aux.detach()) / args.grad_accum
            tok_count += int((b["input_ids"] != model.pad_id).sum())
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % interval == 0 or step + 1 == steps:
            dt = time.time() - t_last
            eta = dt / interval * (steps - step - 1)
            log(f"{tag} step {step + 1:5d}/{steps} | loss {loss_sum:.4f} | aux {aux_sum:.3f} | "
                f"{tok_count / max(dt, 1e-9):,.0f} tok/s | eta {eta:4.0f}s")
            t_last, tok_count = time.time(), 0
        if ckpt is not None and (step + 1) % args.save_every == 0 and step + 1 < steps:
            ckpt(step + 1, optimizer_state(opt, named))
    model.eval()


def amp_ctx(args):
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if args.device.startswith("cuda") else contextlib.nullcontext()


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
# evaluation with the locator choosing the router per sample

@torch.no_grad()
def predict(model: LLaVA, locator, examples, images, tok, template, args, true_task, seen, use_locator, fixed_task=None):
    """Greedy answers for `examples` (`images`: their projected image features, from eval_images); returns rows for
    predictions/<task>.jsonl and the chosen task ids."""
    model.eval()
    rows, chosen = [], []
    stops = data.stop_ids(tok, template)
    for i in range(0, len(examples), args.eval_batch):
        exs = examples[i:i + args.eval_batch]
        prompts = [data.encode_prompt(tok, ex, template, args.max_len) for ex in exs]
        img = images[i:i + args.eval_batch].to(args.device)
        if fixed_task is not None:
            tids = torch.full((len(exs),), fixed_task, dtype=torch.long)
        elif use_locator and seen > 1:
            tids = locator.locate(model.features(prompts, img))
        else:  # oracle: the true task, or the latest router for a task not trained yet
            tids = torch.full((len(exs),), min(true_task, seen - 1), dtype=torch.long)
        with amp_ctx(args):
            outs = model.generate(prompts, img, tids.to(args.device), args.max_new_tokens, stops)
        for j, (ex, o) in enumerate(zip(exs, outs)):
            rows.append({"index": i + j, "prediction": tok.decode(o).strip(), "answer": ex.answer,
                         "answers": ex.answers, "true_task": true_task,
                         "located": int(tids[j]) if fixed_task is None else None})
            if "question_id" in ex.meta:  # CoIN test record: keep its id for the CoIN-format answer file
                rows[-1].update(question_id=ex.meta["question_id"], prompt=ex.turns[-1][0])
            if "size" in ex.meta:  # CoIN Grounding: boxes are scaled by the image size before the IoU
                rows[-1]["size"] = ex.meta["size"]
        chosen += tids.tolist()
    return rows, chosen


def save_predictions(out, task, stage, rows, trained=None):
    """predictions/<task>.jsonl holds every stage's rows (field "stage"); rows of this stage or later
    (left by an interrupted run) are replaced. CoIN test rows also go to answer files CoIN's eval scripts read as they
    are (one line per test question, in test order, question_id as the record has it): predictions/<task>.coin.jsonl
    (the latest stage) and, when `trained` names the task just trained, predictions/CoIN/<folder>/<STAGE>/merge.jsonl,
    CoIN's results/CoIN/LLaVA/<folder>/<STAGE>/merge.jsonl layout (STAGE: Finetune for the task itself, else the
    trained task's folder name, as scripts/LLaVA/Eval/Eval_all.sh names them)."""
    path = os.path.join(out, "predictions", f"{task}.jsonl")
    old = [r for r in ev.read_predictions(path) if r["stage"] < stage] if os.path.exists(path) else []
    ev.write_predictions(path, old + [{**r, "stage": stage} for r in rows])
    if rows and "question_id" in rows[0]:  # the answer-file layout CoIN's / LLaVA's eval scripts read
        lines = [{"question_id": r["question_id"], "prompt": r["prompt"], "text": r["prediction"],
                  "answer_id": f"stage{stage}-{r['index']}", "model_id": "cmoe", "metadata": {}} for r in rows]
        ev.write_predictions(os.path.join(out, "predictions", f"{task}.coin.jsonl"), lines)
        if trained is not None:
            tag = "Finetune" if trained == task else data.coin_folder(trained)
            ev.write_predictions(os.path.join(out, "predictions", "CoIN", data.coin_folder(task), tag, "merge.jsonl"),
                                 lines)


@torch.no_grad()
def image_features(model, exs, args):
    px = torch.stack([ex_pixels(ex, model) for ex in exs]).to(args.device)
    with amp_ctx(args):
        return model.image_features(px)


def eval_images(model, tests, args):
    """Projected image features of every test set, computed once per run: tower and projector are frozen."""
    return {n: torch.cat([image_features(model, exs[i:i + args.eval_batch], args).cpu()
                          for i in range(0, len(exs), args.eval_batch)]) for n, exs in tests.items()}


def ex_pixels(ex, model):
    S = model.vision.cfg.image_size
    return torch.zeros(3, S, S) if ex.image is None else preprocess(ex.image, S)  # text-only: masked out in splice


def _pct(a):
    return "n/a" if a is None else f"{a:.1f}"


def accuracy(rows, metric, predict_only=False):
    """Percent for one task: CoIN metrics aggregate as CoIN's scripts do (data.coin_accuracy); MiniCoIN's lenient
    ones are a mean of per-row scores. None in prediction-only mode (no answers to score against)."""
    if predict_only:
        return None
    return ev.task_accuracy(rows, metric)


# ----------------------------------------------------------------------------------------------------------
# the continual loop

def set_experts(llm: Llama, ecfg: ExpertConfig):
    """Expert settings of a fresh (expert-free) model: empty banks are re-made at the new rank."""
    llm.ecfg = ecfg
    for f in llm.expert_ffns():
        if f.n_experts:
            raise ValueError("set_experts is for a model without experts (the banks would lose their experts)")
        f.ecfg = ecfg
        for bank in ("frozen", "train"):
            for name, shape in f._bank_shapes(0).items():
                f._set(f"{bank}_{name}", torch.zeros(shape, device=f.gate_proj.weight.device), bank == "train")


def freeze_base(model):
    for p in model.parameters():
        p.requires_grad_(False)


def trainable_cl(model):
    """Only continual-learning parameters that the current stage owns stay trainable."""
    for n, p in model.named_parameters():
        if not cmoe._is_cl_key(n):
            p.requires_grad_(False)


def run(args):
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    log = Log(os.path.join(args.out, "log.txt"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    names, metric = task_list(args)
    tok, template = get_tokenizer(args)
    state_path = os.path.join(args.out, "state.json")
    if not args.resume:
        for f in ("state.json", "metrics.json"):  # a fresh run must not inherit an old run's progress
            if os.path.exists(os.path.join(args.out, f)):
                os.remove(os.path.join(args.out, f))
    cmoe.save_json({k: v for k, v in vars(args).items()}, os.path.join(args.out, "config.json"))
    log(f"run {args.out}: {args.method} on {args.benchmark} tasks {names} device {args.device}")

    t0 = time.time()
    model = build_base(args, tok, template, log)
    freeze_base(model)
    t_base = time.time() - t0

    set_experts(model.llm, expert_config(args))
    model.llm.grad_ckpt = args.grad_ckpt

    tests = {n: load_examples(args, n, "test") for n in names}
    images = eval_images(model, tests, args)
    scoring = scoring_rules(args, names, metric, tests, log)
    M = {"benchmark": args.benchmark, "method": args.method, "expand": args.expand, "locator": args.locator,
         "tasks": names, "metric": metric, "acc": [], "params": [], "experts_per_layer": [], "pgke": [],
         "locator_acc": [], "time": {"base": t_base, "tasks": []}, "finished_tasks": 0}
    locator = cmoe.Locator()
    first = 0
    partial = None
    if args.resume and os.path.exists(state_path):
        M = read_json(state_path)
        M["time"]["base"] += t_base
        first = M["finished_tasks"]
        if first:
            tdir = os.path.join(args.out, f"task_{first - 1}")
            locator = cmoe.load_cl_state(model, cmoe.load_safetensors(os.path.join(tdir, "model.safetensors")),
                                         read_json(os.path.join(tdir, "meta.json")), tdir)
        ppath = os.path.join(args.out, f"task_{first}", "partial.safetensors")
        if os.path.exists(ppath):
            partial = (cmoe.load_safetensors(ppath), read_json(ppath[:-len(".safetensors")] + ".json"))
        log(f"resume: {first} finished task(s){', and a partial task ' + str(first) if partial else ''}")

    if "zero_shot" not in M:  # row 0 of the accuracy matrix: the frozen base, before any expert exists
        M["zero_shot"], _ = evaluate_stage(model, None, args, names, metric, tests, images, -1, tok, template)
        log("base zero-shot: " + " ".join(f"{n}={_pct(a)}" for n, a in zip(names, M["zero_shot"])))
    M["scoring"] = scoring
    if args.method == "joint":
        return run_joint(args, model, tok, template, names, metric, tests, images, M, log, t_start)

    for t in range(first, len(names)):
        name = names[t]
        tt = {"task": name, "probe": 0.0, "train": 0.0, "locator": 0.0, "eval": 0.0}
        log(f"=== task {t + 1}/{len(names)}: {name} ===")
        train_exs = load_examples(args, name, "train")
        train_ds = encode(model, train_exs, tok, template, args, t)
        n_before = cmoe.count_params(model)[1]
        start, decision = None, None
        if partial is not None:  # rebuild the task's grown structure, optimizer and step from the mid-task save
            tensors, pmeta = partial
            cmoe.load_cl_state(model, tensors, pmeta, "partial")
            start, decision, tt = (pmeta["step"], tensors), pmeta.get("pgke"), pmeta["time"]
            n_before = pmeta["n_before"]
            partial = None
        elif args.method == "cmoe" and t == 0:
            cmoe.init_experts(model.llm, args.n_init, generator=stage_rng(args, t, "init"))
        elif args.method == "cmoe":
            t1 = time.time()
            decision = pgke(model, train_ds, args, t, log)
            tt["probe"] = time.time() - t1
        elif t == 0:  # lora / moelora: one shared pool and router, trained on every task in turn
            cmoe.init_experts(model.llm, 1 if args.method == "lora" else args.moelora_experts,
                              generator=stage_rng(args, t, "init"))
        if decision is not None:
            M["pgke"].append(decision)
        trainable_cl(model)
        trainable, _ = cmoe.count_params(model)

        def ckpt(step, opt_state, t=t, tt=tt, decision=decision, n_before=n_before):
            sd, meta = cmoe.cl_state(model)
            meta.update(step=step, pgke=decision, time=tt, n_before=n_before)
            p = os.path.join(args.out, f"task_{t}", "partial")
            cmoe.save_safetensors({**sd, **opt_state}, p + ".safetensors")
            cmoe.save_json(meta, p + ".json")

        t1 = time.time()
        shared = None if args.method == "cmoe" else 0
        train_stage(model, train_ds, args, args.steps, args.lr, t, f"task{t}:{name}", log,
                    task_ids_fixed=shared, ckpt=ckpt, start=start)
        tt["train"] += time.time() - t1
        if args.method == "cmoe":
            for f in model.llm.expert_ffns():
                f.freeze()

        t1 = time.time()
        if args.method == "cmoe":  # PTL: fit this task's VAE on frozen-base features of its training data
            feats = task_features(model, train_exs[: args.locator_n], tok, template, args)
            locator.add_task(feats, seed=stage_seed(args, t, "vae"))
        tt["locator"] = time.time() - t1

        t1 = time.time()
        row, conf = evaluate_stage(model, locator, args, names, metric, tests, images, t, tok, template)
        tt["eval"] = time.time() - t1
        M["acc"].append(row)
        if args.method == "cmoe":
            M["locator_acc"].append(ev.locator_accuracy(conf))
            M["locator"] = {"confusion": conf, "acc": M["locator_acc"][-1]}
        else:  # one shared router: there is nothing to locate
            M["locator"] = {"confusion": None, "acc": None}
        _, added_total = cmoe.count_params(model)
        M["params"].append({"task": name, "trainable": trainable, "added": added_total - n_before, "experts": sum(
            f.n_experts for f in model.llm.expert_ffns())})
        M["experts_per_layer"].append([f.n_experts for f in model.llm.expert_ffns()])
        M["time"]["tasks"].append(tt)
        M["finished_tasks"] = t + 1
        log(f"after task {t + 1} ({name}): " + " ".join(f"{n}={_pct(a)}" for n, a in zip(names, row))
            + (f" | locator {M['locator_acc'][-1]:.1f}%" if args.method == "cmoe" else ""))

        tdir = os.path.join(args.out, f"task_{t}")
        sd, meta = cmoe.cl_state(model, locator)
        meta.update(task=name, index=t, tasks=names, method=args.method)
        cmoe.save_safetensors(sd, os.path.join(tdir, "model.safetensors"))
        cmoe.save_json(meta, os.path.join(tdir, "meta.json"))
        cmoe.save_json(M, state_path)  # progress marker last: a crash before it redoes this task
        for ext in (".safetensors", ".json"):
            p = os.path.join(tdir, "partial" + ext)
            if os.path.exists(p):
                os.remove(p)
    return finish(args, M, log, t_start)


def scoring_rules(args, names, metric, tests, log=print):
    """{task: the rule its accuracy is computed with} (kept in metrics.json); CoIN's are logged, fallbacks included."""
    if args.benchmark != "coin":
        return {n: f"lenient normalised '{metric[n]}' (data.score_lenient, MiniCoIN)" for n in names}
    if args.predict_only:
        rules = {n: "prediction-only: answer files written, no accuracy" for n in names}
    else:
        rules = {n: data.coin_rule(metric[n], all(ex.answers for ex in tests[n])) for n in names}
        for n in names:
            if n in data.COIN_ANNOTATIONS and not rules[n].startswith("FALLBACK"):
                rules[n] += (f" (answers from {os.path.join(args.coin_annotations, data.COIN_ANNOTATIONS[n])})"
                             if args.coin_annotations else " (answers from the test records' own 'answers')")
    for n in names:
        log(f"scoring {n}: {rules[n]}")
    return rules


def evaluate_stage(model, locator, args, names, metric, tests, images, t, tok, template):
    """After training task t (t = -1: the frozen base before any expert exists, row 0): score every task
    (seen and not yet seen) with the routers chosen per sample; writes predictions/<task>.jsonl; returns the
    accuracy row and the locator confusion (seen tasks)."""
    row, conf = [], [[0] * (t + 1) for _ in names]
    cmoe_routed = args.method == "cmoe" and t >= 0
    for i, n in enumerate(names):
        rows, chosen = predict(model, locator, tests[n], images[n], tok, template, args, i, t + 1,
                               use_locator=cmoe_routed and args.locator == "ptl", fixed_task=None if cmoe_routed else 0)
        for c in chosen if t >= 0 else ():
            conf[i][c] += 1
        row.append(accuracy(rows, metric[n], args.predict_only))
        trained = "Zero_shot" if t < 0 else "Joint" if args.method == "joint" else names[t]  # CoIN's answer-file STAGE
        save_predictions(args.out, n, t, rows, trained if args.benchmark == "coin" else None)
    return row, conf[: t + 1]


def reevaluate(run_dir, device=None):
    """Rebuild a finished (or partly finished) run from its checkpoints and regenerate every stage's
    predictions and accuracy rows. Returns the refreshed metrics dict (also written to metrics.json)."""
    cfg = read_json(os.path.join(run_dir, "config.json"))
    args = parse_args([])
    for k, v in cfg.items():
        setattr(args, k, v)
    args.out, args.resume = run_dir, True
    args.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    log = Log(os.path.join(run_dir, "log.txt"))
    M = read_json(os.path.join(run_dir, "metrics.json" if os.path.exists(os.path.join(run_dir, "metrics.json")) else "state.json"))
    if not M.get("finished_tasks"):
        raise ValueError(f"no finished task in {run_dir}")
    names, metric = task_list(args)
    tok, template = get_tokenizer(args)
    model = build_base(args, tok, template, log)
    freeze_base(model)
    set_experts(model.llm, expert_config(args))
    tests = {n: load_examples(args, n, "test") for n in names}
    images = eval_images(model, tests, args)
    stages = [0] if args.method == "joint" else range(M["finished_tasks"])  # joint: one checkpoint, one row
    M["zero_shot"], _ = evaluate_stage(model, None, args, names, metric, tests, images, -1, tok, template)  # before experts
    acc = []
    for t in stages:
        tdir = os.path.join(run_dir, f"task_{t}")
        meta = read_json(os.path.join(tdir, "meta.json"))
        for field, want in (("method", args.method), ("tasks", names)):
            if meta.get(field) != want:
                raise ValueError(f"{tdir}/meta.json: field '{field}' is {meta.get(field)!r} but the run config says {want!r}")
        locator = cmoe.load_cl_state(model, cmoe.load_safetensors(os.path.join(tdir, "model.safetensors")), meta, tdir)
        row, conf = evaluate_stage(model, locator, args, names, metric, tests, images, t, tok, template)
        acc.append(row)
        if args.method == "cmoe":
            M["locator"] = {"confusion": conf, "acc": ev.locator_accuracy(conf)}
        log(f"re-evaluated task_{t}: " + " ".join(f"{n}={_pct(a)}" for n, a in zip(names, row)))
    M["acc"] = acc
    M.update(ev.continual_metrics(acc, joint=args.method == "joint"))
    cmoe.save_json(M, os.path.join(run_dir, "metrics.json"))
    return M


def expert_config(args):
    ecfg = ExpertConfig(rank=args.rank, alpha=args.lora_alpha, top_k=args.top_k)
    if args.method == "lora":
        ecfg.top_k = 1
    if args.method in ("moelora", "joint"):
        ecfg.top_k = args.moelora_experts  # CoIN's MoELoRA: a dense softmax over all experts
    return ecfg


def finish(args, M, log, t_start):
    M["time"]["total"] = M["time"].get("total", 0.0) + time.time() - t_start
    M.update(ev.continual_metrics(M["acc"], joint=M["method"] == "joint"))
    cmoe.save_json(M, os.path.join(args.out, "state.json"))
    cmoe.save_json(M, os.path.join(args.out, "metrics.json"))
    names = M["tasks"]
    log("accuracy matrix (row: after training task j; column: task i)")
    log("            " + " ".join(f"{n[:8]:>8}" for n in names))
    labels = ["base"] + (names if M["method"] != "joint" else ["joint"])
    for label, row in zip(labels, [M["zero_shot"]] + M["acc"]):
        log(f"{label[:10]:>10}  " + " ".join(f"{a:8.1f}" if a is not None else f"{'':>8}" for a in row))
    if M.get("plasticity"):
        log(f"{'plasticity':>10}  " + " ".join(f"{a:8.1f}" if a is not None else f"{'':>8}" for a in M["plasticity"]))
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    log(f"Last {fmt(M['last'])} | Avg {fmt(M['avg'])} | BWT {fmt(M['bwt'])} | FWT {fmt(M.get('fwt'))} | "
        f"locator {fmt(M['locator'].get('acc') if M.get('locator') else None)} | total {M['time']['total']:.0f}s")
    return M


def task_features(model, exs, tok, template, args):
    feats = []
    for i in range(0, len(exs), args.eval_batch):
        chunk = exs[i:i + args.eval_batch]
        prompts = [data.encode_prompt(tok, ex, template, args.max_len) for ex in chunk]
        feats.append(model.features(prompts, image_features(model, chunk, args)).cpu())
    return torch.cat(feats)


def pgke(model: LLaVA, ds, args, t, log):
    """Stage A of task t: probe experts + probe routers on a small subset, measure, decide; then stage B: expand."""
    N = ds["input_ids"].shape[0]
    perm = torch.randperm(N, generator=stage_rng(args, t, "split"))
    n_probe = max(8, int(args.probe_frac * N))
    n_hold = max(4, n_probe // 5)
    probe_train, probe_hold = subset(ds, perm[:n_probe - n_hold]), subset(ds, perm[n_probe - n_hold:n_probe])
    cmoe.probe_start(model.llm, generator=stage_rng(args, t, "probe"))
    trainable_cl(model)
    train_stage(model, probe_train, args, args.probe_steps, args.lr, t, f"probe{t}", log)
    cmoe.set_counting(model.llm, True)
    with torch.no_grad():
        for i in range(0, n_hold, args.eval_batch):
            b = {k: v[i:i + args.eval_batch].to(args.device) for k, v in probe_hold.items() if isinstance(v, torch.Tensor)}
            model(b["input_ids"], b["images"], None, b["task_ids"])
    freq = cmoe.probe_frequencies(model.llm)
    expand, thr = cmoe.pgke_decide(freq, args.alpha)
    if args.expand == "all":
        expand = [True] * len(expand)
    sources, probe_routers = cmoe.probe_end(model.llm)  # reads the usage counts, then stops counting
    cmoe.expand(model.llm, expand, sources, probe_routers, args.n_new, generator=stage_rng(args, t, "expand"))
    copied = [src if grow else None for grow, src in zip(expand, sources)]
    log(f"PGKE task {t}: probe freq " + " ".join(f"{f:.2f}" for f in freq) + f" | threshold {thr:.3f} | expand "
        + "".join("1" if e else "0" for e in expand) + " | copied from " + " ".join("-" if c is None else str(c) for c in copied))
    return {"task": t, "freq": freq, "threshold": thr, "expand": expand, "copied_from": copied}


STAGES = ("init", "split", "probe", "expand", "vae")


def stage_seed(args, t, stage):
    """The seed of one random stage of task t, a function of (seed, task, stage) alone: a task's result then
    depends only on the checkpointed state, never on what ran before it in the process."""
    return (args.seed * 1_000_003 + t) * len(STAGES) + STAGES.index(stage)


def stage_rng(args, t, stage):
    return torch.Generator().manual_seed(stage_seed(args, t, stage))


def run_joint(args, model, tok, template, names, metric, tests, images, M, log, t_start):
    """Multitask upper bound: one MoELoRA pool trained on all tasks at once, evaluated once."""
    t1 = time.time()
    ds = concat([encode(model, load_examples(args, n, "train"), tok, template, args, i) for i, n in enumerate(names)])
    cmoe.init_experts(model.llm, args.moelora_experts, generator=stage_rng(args, 0, "init"))
    trainable_cl(model)
    trainable, added = cmoe.count_params(model)
    train_stage(model, ds, args, args.steps * len(names), args.lr, 0, "joint", log, task_ids_fixed=0)
    t_train = time.time() - t1
    t1 = time.time()
    row, _ = evaluate_stage(model, None, args, names, metric, tests, images, 0, tok, template)
    M["acc"] = [row]
    M["params"] = [{"task": "joint", "trainable": trainable, "added": added, "experts": sum(
        f.n_experts for f in model.llm.expert_ffns())}]
    M["experts_per_layer"] = [[f.n_experts for f in model.llm.expert_ffns()]]
    M["time"]["tasks"] = [{"task": "joint", "probe": 0.0, "train": t_train, "locator": 0.0, "eval": time.time() - t1}]
    M["finished_tasks"] = len(names)
    M["locator"] = {"confusion": None, "acc": None}
    sd, meta = cmoe.cl_state(model)
    cmoe.save_safetensors(sd, os.path.join(args.out, "task_0", "model.safetensors"))
    cmoe.save_json({**meta, "task": "joint", "index": 0, "tasks": names, "method": "joint"},
                   os.path.join(args.out, "task_0", "meta.json"))
    return finish(args, M, log, t_start)


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


def plan_flags(a):
    a("--plan", action="store_true", help="print parameter counts, memory and the largest micro-batch that fits --gpu-mem "
      "for the run these flags describe (model built on the meta device from --preset or the config.json of --llm and "
      "--vision; nothing downloaded, allocated or trained), then exit; --tasks may be a number")
    a("--preset", choices=sorted(PRESETS), help="implies --plan: a published Llama config (no folders), CLIP ViT-L/14-336")
    a("--gpu-mem", type=float, default=80.0, help="--plan: GiB of GPU memory")
    a("--plan-dtype", default="bf16", choices=["bf16", "fp32"], help="--plan: dtype of weights, gradients, activations")


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
                 sparse M*din*dt per projection (its gathered rows) + M*8 + T*K*16 (where rows go);
                 and per projection din -> dout (gate, up, down): n*(2R + 1)*dt (rank space before / after gating,
                 gates) + nw*R*(din + dout)*dt (the A, B the dispatch uses);
                 dense: n = T*E, nw = E; sparse (E > 2K): n = M = T*K + E*31 rounded up to 32-row blocks, nw = M/32
    The first layer's input needs no gradient: it keeps no norms, attention, router weights, nor gate's and up's A.
    Once: RoPE cos, sin 2*T*hd*dt; final norm T*(4D + 4); loss (T - B)*(4V + 8) (fp32 log-probs and targets).
    --grad-ckpt keeps each layer's input T*D*dt instead, and recomputes one layer at a time in backward (in fp32, that
    layer's first norm keeps the saved input itself). Returns (total bytes, the terms of one layer after the first)."""
    T, D, F, R, H, K, blk = B * S, lc.dim, lc.ffn_dim, ecfg.rank, lc.n_heads, min(ecfg.top_k, E), cmoe.BLOCK
    sparse = E > 2 * ecfg.top_k  # ExpertFFN's "auto" dispatch
    M = -(-(T * K + E * (blk - 1)) // blk) * blk
    n, nw = (M, M // blk) if sparse else (T * E, E)
    proj = ((D, F), (D, F), (F, D))
    t = {"norms": 2 * T * (4 * D + 4), "attention": T * (4 * H * lc.head_dim * dt + 4 * H),
         "router": T * D * 4 + T * (4 * E + 12 * K + 8) + B * E * D * 4,
         "ffn": 3 * T * F * dt,
         "lora": (M * 8 + T * K * 16 if sparse else T * (F + D * (dt != 4)) * dt)
         + sum(n * (2 * R + 1) + nw * R * (i + o) + (M * i if sparse else 0) for i, o in proj) * dt}
    layer = sum(t.values())
    first = layer - t["norms"] - t["attention"] - B * E * D * 4 - 2 * nw * D * R * dt
    once = 2 * T * lc.head_dim * dt + T * (4 * D + 4) + (T - B) * (4 * lc.vocab_size + 8)
    reused = T * D * 4 if dt == 4 else 0  # --grad-ckpt, fp32: the recomputed first norm's input is the saved one
    layers = lc.n_layers * T * D * dt + layer - reused if ckpt else first + (lc.n_layers - 1) * layer
    return layers + once, t


def plan(args):
    """--plan: parameters, memory and the largest micro-batch of the run the flags describe, at the worst case of
    --tasks (cmoe: every layer grows by --n-new experts every task). The model is built on the meta device: nothing is
    downloaded, allocated or read but config.json. Prints; returns the numbers (bytes, counts)."""
    lc, vc, what = plan_configs(args)
    n_tasks = int(args.tasks) if (args.tasks or "").isdigit() else len(task_list(args)[0])
    ecfg, dt = expert_config(args), {"bf16": 2, "fp32": 4}[args.plan_dtype]
    with torch.device("meta"):
        model = LLaVA(CLIPVision(vc), Projector(vc.hidden_size, lc.dim), Llama(lc))
        freeze_base(model)
        set_experts(model.llm, ecfg)
        base = {k: sum(p.numel() for p in getattr(model, k).parameters()) for k in ("vision", "projector", "llm")}
    cmoe.init_experts(model.llm, {"cmoe": args.n_init, "lora": 1}.get(args.method, args.moelora_experts))
    first = cmoe.count_params(model)[0]
    for _ in range(n_tasks - 1 if args.method == "cmoe" else 0):  # new tensors follow the weights onto meta
        for f in model.llm.expert_ffns():
            f.freeze()
            f.add_experts(args.n_new)
            f.add_router()
    last, added = cmoe.count_params(model)
    E, S, frozen = model.llm.layers[0].ffn.n_experts, args.max_len - 1 + vc.num_patches, sum(base.values())
    clip_layer = sum(p.numel() for p in model.vision.encoder.layers[0].parameters())
    mem = {"weights": (frozen + added) * dt, "gradients": max(first, last) * dt, "AdamW": max(first, last) * 8}
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
    print(f"plan: {what} (config only; model built on the meta device)\n  {args.method}, rank {ecfg.rank}, top-k "
          f"{ecfg.top_k}, {n_tasks} task(s); S = {args.max_len - 1} text + {vc.num_patches} image = {S} tokens")
    print(f"parameters\n  frozen base      vision {base['vision']:,} + projector {base['projector']:,} + LLM "
          f"{base['llm']:,} = {frozen:,}\n                   (vision: {vc.run_layers} of {vc.num_hidden_layers} CLIP "
          f"layers, no post_layernorm, as LLaVA reads layer {vc.select_layer}; CLIPVisionModel: "
          f"{base['vision'] + (vc.num_hidden_layers - vc.run_layers) * clip_layer + 2 * vc.hidden_size:,})")
    print(f"  trainable        task 1: {first:,}; task {n_tasks}: {last:,} (that task's experts and router)\n"
          f"  after task {n_tasks}     {frozen + added:,} ({added:,} in experts and routers, {E} experts per layer)")
    print(f"memory ({args.plan_dtype} weights, gradients, activations; AdamW: fp32 m and v = 8 B per trainable "
          f"parameter, no fp32 master copy)\n  " + ", ".join(f"{k} {gib(v)}" for k, v in mem.items()))
    terms = {k: v / 64 for k, v in activation_bytes(lc, ecfg, E, S, 64, dt)[1].items()}  # per sample, not per step
    print(f"  activations kept for backward, per sample and decoder layer ({'sparse' if E > 2 * ecfg.top_k else 'dense'}"
          f" expert dispatch, E = {E}):\n    " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in terms.items()) + " MiB")
    for ck in (False, True):
        print(f"  {'with' if ck else 'without'} --grad-ckpt: {gib(act[ck][0])} per sample (incl. loss peak "
              f"{gib(loss_peak)}: logits + 2 fp32 log-prob gradients) + {act[ck][1] / 2**20:.1f} MiB per step")
    print(f"fits {args.gpu_mem:g} GiB, {PLAN_MARGIN:.0%} left free: micro-batch {fit[False]} without --grad-ckpt, "
          f"{fit[True]} with")
    if dt == 2:
        print(f"note: train.py keeps fp32 weights under CUDA bf16 autocast: +{gib(2 * (frozen + added))} of weights, "
              f"and autocast's bf16 copies of the frozen LLM weights (~{gib(2 * base['llm'])}) are kept for backward")
    return dict(base=base, first=first, last=last, added=added, experts=E, S=S, mem=mem, act=act, fit=fit)


def main(argv=None):
    args = parse_args(argv)
    if args.plan or args.preset:
        try:
            return plan(args)
        except (CheckpointError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
    try:
        return run(args)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
