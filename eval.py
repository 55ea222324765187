"""Evaluation for cmoe runs (CoIN protocol): continual metrics, run folders (checkpoints, predictions), predictions
with the locator choosing each sample's routers, scoring, re-evaluation of a run, report and method comparison.

    python eval.py out/minicoin-cmoe                      # re-evaluate (or rescore saved predictions), write report
    python eval.py --compare out/minicoin-* [--out DIR]   # one table + figure over several runs

acc[j][i] (percent) = score on task i after training task j; None where not evaluated. Figures use Pillow only.
"""
import argparse
import contextlib
import dataclasses
import glob
import json
import math
import os
import statistics
import sys
import types
from collections import defaultdict

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont

import cmoe
import data
from cmoe import ExpertConfig, LLaVA, Llama, LlamaConfig
from data import atomic_path, preprocess, read_json, read_safetensors, save_json, save_safetensors, write_text
from vision import CLIPVision, Projector, VisionConfig, load_clip, load_projector

# -----------------------------------------------------------------------------
# metrics

def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None

def continual_metrics(acc, joint=None, isolated=False):
    """acc[j][i] -> dict(last, avg, bwt, fwt) over the rows trained so far (all-None trailing rows = not trained yet).
    joint (default: a single row) = multitask upper bound: Last = Avg = mean of the row, BWT = FWT = None.
    isolated: row j is task j's own model (trained alone from the base): Last = Avg = the mean of the diagonal, each
    task by its own model, BWT = FWT = None (no sequence)."""
    if not isinstance(acc, (list, tuple)) or not acc:
        raise ValueError(f"accuracy matrix must be a non-empty list of rows, got {acc!r}")
    T = len(acc[0])
    for j, row in enumerate(acc):
        if not isinstance(row, (list, tuple)) or len(row) != T:
            raise ValueError(f"accuracy matrix row {j} is {row!r}, expected a list of {T} entries")
    a = [list(r) for r in acc]
    while len(a) > 1 and all(x is None for x in a[-1]):
        a.pop()  # rows of tasks not trained yet (a crashed or partial run)
    if len(a) > T:
        raise ValueError(f"accuracy matrix has {len(a)} rows but only {T} tasks")
    if isolated:
        diagonal = [a[i][i] for i in range(len(a))]
        m = _mean(diagonal)
        return dict(last=m, avg=m, bwt=None, fwt=None, plasticity=diagonal)
    if joint is None:
        joint = len(a) == 1
    if joint:
        m = _mean(a[-1])
        return dict(last=m, avg=m, bwt=None, fwt=None, plasticity=None)
    R = len(a)  # tasks trained so far (== T for a finished run)
    plasticity = [a[i][i] for i in range(R)]  # accuracy on a task right after training it
    last = _mean(a[R - 1][:R])
    avg = _mean([_mean(a[j][: j + 1]) for j in range(R)])
    bwt = _mean([a[R - 1][i] - a[i][i] for i in range(R - 1) if a[R - 1][i] is not None and a[i][i] is not None])
    fwt = _mean([a[i - 1][i] for i in range(1, min(R + 1, T))])  # a[R-1][R] is a valid zero-shot too
    return dict(last=last, avg=avg, bwt=bwt if R > 1 else None, fwt=fwt, plasticity=plasticity)

def locator_accuracy(confusion, rejected=None):
    """confusion[true][chosen] counts (+ rejected[true]: samples no task accepted, --reject) -> percent of samples
    routed to their own task (None when empty)."""
    if not confusion:
        return None
    n = len(confusion)
    for t, row in enumerate(confusion):
        if len(row) != n:
            raise ValueError(f"locator confusion row {t} has {len(row)} entries, expected {n} (square matrix)")
    total = sum(sum(r) for r in confusion) + sum(rejected or [])
    return 100.0 * sum(confusion[t][t] for t in range(n)) / total if total else None

LOCATED = ("cmoe", "dmole", "moe-adapters")  # methods whose test samples (dmole: batches) are routed by a task
# selector (PTL, D-MoLE's autoencoders, DDAS); the others share one pool


def pixels_needed(cfg):
    """Whether a run's vision tower carries experts (--experts-in vision|both, dmole's tower experts, moe-adapters'
    tower pools): it trains and evaluates on pixels, since its image features depend on each sample's experts and
    cannot be computed once per dataset. (Run folders from before the fields: the decoder alone.)"""
    method = getattr(cfg, "method", None)
    return (getattr(cfg, "experts_in", "llm") != "llm" or method == "dmole"
            or (method == "moe-adapters" and getattr(cfg, "adapters_in", "both") in ("vision", "both")))

def record(metrics, result, t):
    """Stage t's Benchmark.evaluate result into metrics (t = -1: row 0, the bare base): the accuracy row, the unseen
    tasks' row and their retention (accuracy now / the base's zero-shot accuracy), the locator's confusion."""
    unseen = metrics["unseen"]
    if t < 0:
        metrics["zero_shot"], unseen["zero_shot"] = result["acc"], result["unseen"]
        return
    metrics["acc"].append(result["acc"])
    unseen["acc"].append(result["unseen"])
    unseen["retention"] = [None if a is None or not z else a / z for a, z in zip(result["unseen"], unseen["zero_shot"])]
    if metrics["method"] not in LOCATED:  # the baselines share one router: nothing to locate
        metrics["locator"] = {"confusion": None, "rejected": None, "acc": None}
        return
    acc = locator_accuracy(result["confusion"], result["rejected"])
    metrics["locator_acc"].append(acc)
    metrics["locator"] = {"confusion": result["confusion"], "rejected": result["rejected"], "acc": acc}

# -----------------------------------------------------------------------------
# run folders: the cached base, task checkpoints (safetensors + JSON sidecar, written atomically), predictions

def rank_world():
    """(this process's rank, number of processes): (0, 1) unless torchrun started several."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)

class Log:
    """print, and append to the run's log.txt (rank 0 only)."""

    def __init__(self, path):
        self.path = path

    def __call__(self, msg):
        if rank_world()[0]:
            return
        print(msg, flush=True)
        with open(self.path, "a") as f:
            f.write(msg + "\n")

def is_cl_key(k):
    """A state_dict key that continual learning adds to the base: experts and routers."""
    return ".experts." in k

def save_base(model: LLaVA, folder):
    """The frozen base (vision, projector, LLM without experts; a tied head stored once) + meta.json, written last:
    its presence marks a complete base."""
    sd = {k: v for k, v in model.state_dict().items() if not is_cl_key(k)}
    if model.llm.cfg.tie_embeddings:
        sd.pop("llm.lm_head.weight", None)
    meta = {"vision": vars(model.vision.cfg), "llm": vars(model.llm.cfg), "pad_id": model.pad_id,
            "projector": [model.projector[0].in_features // model.projector.merge ** 2, model.projector[0].out_features,
                          model.projector.merge]}
    save_safetensors(sd, os.path.join(folder, "model.safetensors"))
    save_json(meta, os.path.join(folder, "meta.json"))

def load_base(folder) -> LLaVA:
    meta = read_json(os.path.join(folder, "meta.json"))
    vcfg, lcfg = VisionConfig(**meta["vision"]), LlamaConfig(**meta["llm"])
    model = LLaVA(CLIPVision(vcfg), Projector(*meta["projector"]), Llama(lcfg), pad_id=meta["pad_id"])
    missing, unexpected = model.load_state_dict(read_safetensors(os.path.join(folder, "model.safetensors")), strict=False)
    missing = [k for k in missing if not is_cl_key(k) and not (lcfg.tie_embeddings and k == "llm.lm_head.weight")]
    if missing or unexpected:
        raise KeyError(f"{folder}/model.safetensors: missing {missing}, unexpected {unexpected}")
    return model

def load_model(base: dict, pad_id: int) -> LLaVA:
    """A run's frozen base as its metrics record it: {"tiny": cached folder} or {"llm", "vision", "projector"}
    (HF folders and a LLaVA mm_projector file; no projector: a fresh one)."""
    if "tiny" in base:
        return load_base(base["tiny"])
    llm, vision = cmoe.load_llama(base["llm"]), load_clip(base["vision"])
    proj = load_projector(base["projector"]) if base.get("projector") else Projector(vision.cfg.hidden_size, llm.cfg.dim)
    return LLaVA(vision, proj, llm, pad_id=pad_id)

def vision_pools(model: LLaVA):
    """The vision tower's per-block pools (none for a stand-in tower without blocks)."""
    return model.vision.expert_pools() if hasattr(model.vision, "expert_pools") else []

def cl_state(model: LLaVA, locator: cmoe.Locator | None = None) -> tuple[dict, dict]:
    """Everything continual learning adds (experts, routers, VAEs) and what rebuilding them needs. The vision tower's
    pools (vision.encoder.layers.i.experts.*) are kept when the run puts experts there (model.experts_in, or
    moe-adapters' adapters)."""
    vision = bool(model.tower_pools("vision"))
    towers = {"llm": model.llm.expert_pools(), "vision": vision_pools(model)}
    adapters = [p.adapters for ps in towers.values() for p in ps if p.adapters is not None]
    tower_keys = vision or any(p.adapters is not None for p in towers["vision"])  # moe-adapters' tower pools
    sd = {k: v for k, v in model.state_dict().items() if is_cl_key(k) and (tower_keys or not k.startswith("vision."))}
    meta = {"experts": dataclasses.asdict(model.llm.ecfg),
            "router_trainable": [[bool(r.requires_grad) for r in f.routers] for f in model.llm.expert_pools()]}
    if vision:
        meta["experts_in"] = model.experts_in
        meta["vision_router_trainable"] = [[bool(r.requires_grad) for r in f.routers]
                                           for f in model.vision.expert_pools()]
    if any(f.task_use for f in model.llm.expert_pools()):  # bounded growth's usage records (--max-expert-params)
        meta["task_use"] = [[u.tolist() for u in f.task_use] for f in model.llm.expert_pools()]
    if vision and any(f.task_use for f in model.vision.expert_pools()):
        meta["vision_task_use"] = [[u.tolist() for u in f.task_use] for f in model.vision.expert_pools()]
    dm = getattr(model, "dmole", None)
    if dm is not None:  # D-MoLE: which module holds which task's expert
        meta["dmole"] = {"rank": dm.rank, "alpha": dm.alpha, "tasks": dm.tasks}
    if adapters:  # moe-adapters: the pools' settings, which towers hold them, how many routers
        meta["adapters"] = {"config": dataclasses.asdict(adapters[0].acfg), "n_routers": len(adapters[0].routers),
                            "router_trainable": bool(adapters[0].routers[-1].requires_grad) if adapters[0].routers
                            else False, **{t: ps[0].adapters is not None for t, ps in towers.items()}}
    if isinstance(locator, cmoe.AERouter):  # D-MoLE's task autoencoders
        sd.update({f"locator.{k}": v for k, v in locator.state_dict().items()})
        meta["n_ae"] = len(locator)
        if len(locator):
            meta["ae"] = {"dim": locator.aes[0].net[0].in_features, "hidden": locator.aes[0].net[0].out_features}
    elif isinstance(locator, cmoe.DDAS):
        sd.update({f"locator.{k}": v for k, v in locator.state_dict().items()})
        meta["locator_feature"] = locator.feature
        meta["ddas"] = {"n_ae": len(locator.aes), "hidden": locator.hidden, "dim": int(locator.feat_mean.shape[0])}
    elif locator is not None:
        sd.update({f"locator.{k}": v for k, v in locator.state_dict().items()})
        meta["n_vae"], meta["locator_feature"] = len(locator.vaes), locator.feature
        meta["n_gate"], meta["gate_feature"] = len(locator.gates), cmoe.REJECT_FEATURE
        if len(locator.vaes):
            v = locator.vaes[0]
            meta["vae"] = {"hidden": v.enc[0].out_features, "latent": v.dec[0].in_features}
    return sd, meta

OLD_KEYS = ((".ffn.experts.", ".experts.lora."), (".ffn.routers.", ".experts.routers."))  # run folders from before
# the expert pool was its own module (cmoe.Experts) kept experts and routers inside the FFN


def load_cl_state(model: LLaVA, tensors: dict, meta: dict, source="") -> cmoe.Locator:
    """Rebuild the expert pools and routers with their stored sizes, then the locator; returns the locator."""
    for old, new in OLD_KEYS:
        tensors = {k.replace(old, new): v for k, v in tensors.items()}
    model.llm.ecfg = ExpertConfig(**meta["experts"])
    for i, pool in enumerate(model.llm.expert_pools()):
        pool.reset(model.llm.ecfg)
        pool.load(tensors, f"llm.layers.{i}.experts.", meta["router_trainable"][i], source)
        pool.task_use = [torch.tensor(u) for u in meta["task_use"][i]] if "task_use" in meta else []
    model.experts_in = meta.get("experts_in", "llm")  # (checkpoints without the field: the decoder's pools only)
    for i, pool in enumerate(model.tower_pools("vision")):
        pool.reset(model.llm.ecfg)
        pool.load(tensors, f"vision.encoder.layers.{i}.experts.", meta["vision_router_trainable"][i], source)
        pool.task_use = [torch.tensor(u) for u in meta["vision_task_use"][i]] if "vision_task_use" in meta else []
    if "dmole" in meta:
        d = meta["dmole"]
        dm = getattr(model, "dmole", None) or cmoe.attach_dmole(model, d["rank"], d["alpha"])
        dm.rank, dm.alpha = d["rank"], d["alpha"]
        dm.load(model, tensors, d["tasks"], source)
    ad = meta.get("adapters")
    for tower, pools, pre in (("llm", model.llm.expert_pools(), "llm.layers.{}.experts.adapters."),
                              ("vision", vision_pools(model), "vision.encoder.layers.{}.experts.adapters.")):
        for i, pool in enumerate(pools):
            pool.adapters = None
            if ad and ad[tower]:
                pool.add_adapters(cmoe.AdapterConfig(**ad["config"]))
                pool.adapters.load(tensors, pre.format(i), ad["n_routers"], ad["router_trainable"], source)
    if "ddas" in meta:
        d = meta["ddas"]
        ddas = cmoe.DDAS(meta["locator_feature"], d["dim"], d["hidden"])
        ddas.aes.extend(cmoe.DDASAE(d["dim"], d["hidden"]) for _ in range(d["n_ae"]))
        ddas.bounds = torch.zeros(d["n_ae"])
        pre = "locator."
        ddas.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
        return ddas.eval()
    if "n_ae" in meta:
        router = cmoe.AERouter()
        for t in range(meta["n_ae"]):
            pre = f"locator.aes.{t}."
            ae = cmoe.TaskAE(meta["ae"]["dim"], meta["ae"]["hidden"])
            ae.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
            router.aes.append(ae.eval())
        return router
    loc = cmoe.Locator(meta.get("locator_feature", "last"))
    for t in range(meta.get("n_vae", 0)):
        pre = f"locator.vaes.{t}."
        vae = cmoe.TaskVAE(tensors[pre + "feat_mean"].shape[0], **meta["vae"])
        missing, unexpected = vae.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)},
                                                  strict=False)
        unexpected = [k for k in unexpected if k != "accept_z"]  # the VAE bound of older checkpoints: the gates replace it
        if missing or unexpected:
            raise KeyError(f"{source}: locator VAE {t}: missing {missing}, unexpected {unexpected}")
        loc.vaes.append(vae.eval())
    # none in older checkpoints, and none kept where they model another feature (before "gate_feature": the
    # instruction+image "mean"): reevaluate fits them for --reject
    for t in range(meta.get("n_gate", 0) if meta.get("gate_feature", "mean") == cmoe.REJECT_FEATURE else 0):
        pre = f"locator.gates.{t}."
        gate = cmoe.TaskGate(*tensors[pre + "basis"].shape)
        gate.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
        loc.gates.append(gate.eval())
    return loc

def load_task(model: LLaVA, tdir) -> cmoe.Locator:
    """task_t/: its experts and routers into `model`; returns its locator."""
    return load_cl_state(model, read_safetensors(os.path.join(tdir, "model.safetensors")),
                         read_json(os.path.join(tdir, "meta.json")), tdir)

def count_params(model: LLaVA):
    """(trainable, expert parameters in the pool incl. routers) — for the per-task parameter report (parameters only:
    moe-adapters' bookkeeping buffers, the frozen mask and the choice counts, are not parameters)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    added = sum(p.numel() for k, p in model.named_parameters() if is_cl_key(k))
    return trainable, added

def write_predictions(path, rows):
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

def read_predictions(path):
    rows = read_json(path)
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: row {n}: expected a JSON object, got {type(r).__name__}")
    return rows

def save_predictions(out, task, stage, rows, trained=None):
    """predictions/<task>.jsonl holds every stage's rows (field "stage"); rows of this stage or later
    (left by an interrupted run) are replaced. CoIN test rows also go to answer files CoIN's eval scripts read as they
    are (one line per test question, in test order, question_id as the record has it): predictions/<task>.coin.jsonl
    (the latest stage) and, when `trained` names the task just trained, predictions/CoIN/<folder>/<STAGE>/merge.jsonl,
    CoIN's results/CoIN/LLaVA/<folder>/<STAGE>/merge.jsonl layout (STAGE: Finetune for the task itself, else the
    trained task's folder name, as scripts/LLaVA/Eval/Eval_all.sh names them)."""
    path = os.path.join(out, "predictions", f"{task}.jsonl")
    old = [r for r in read_predictions(path) if r["stage"] < stage] if os.path.exists(path) else []
    write_predictions(path, old + [{**r, "stage": stage} for r in rows])
    if rows and "question_id" in rows[0]:  # the answer-file layout CoIN's / LLaVA's eval scripts read
        lines = [{"question_id": r["question_id"], "prompt": r["prompt"], "text": r["prediction"],
                  "answer_id": f"stage{stage}-{r['index']}", "model_id": "cmoe", "metadata": {}} for r in rows]
        write_predictions(os.path.join(out, "predictions", f"{task}.coin.jsonl"), lines)
        if trained is not None:
            tag = "Finetune" if trained == task else data.coin_folder(trained)
            write_predictions(os.path.join(out, "predictions", "CoIN", data.coin_folder(task), tag, "merge.jsonl"), lines)

def load_run(run_dir):
    """metrics.json of a run folder (state.json of an unfinished one) with at least one finished task; clear errors
    otherwise."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        path = os.path.join(run_dir, "state.json")  # an unfinished run's progress marker
    if not os.path.isfile(path):
        raise ValueError(f"no finished task in {run_dir} (neither metrics.json nor state.json)")
    m = read_json(path)
    if not m.get("finished_tasks"):
        raise ValueError(f"no finished task in {run_dir}")
    for key in ("tasks", "acc"):
        if key not in m:
            raise ValueError(f"{path}: missing field '{key}'")
    return m

# -----------------------------------------------------------------------------
# evaluation: greedy answers with the locator choosing each sample's router, scored per task

def pixels(model: LLaVA, examples):
    """pixel_values [N,3,S,S] of examples (zeros for a text-only one: splice masks its slots out), for a tower whose
    experts route them or the features computed from them."""
    S = model.vision.cfg.image_size
    return torch.stack([torch.zeros(3, S, S) if ex.image is None else preprocess(ex.image, S) for ex in examples])

@torch.no_grad()
def image_features(model: LLaVA, examples, cfg):
    """Projected image features [N,P,D] of examples through the frozen tower (its experts off; zeros for a text-only
    one: splice masks its slots out)."""
    out = []
    for i in range(0, len(examples), cfg.eval_batch):
        px = pixels(model, examples[i:i + cfg.eval_batch]).to(cfg.device)
        out.append(model.image_features(px, use_experts=False).cpu())  # in the model's precision (cmoe.set_precision)
    return torch.cat(out)


@torch.no_grad()
def dmole_reps(model: LLaVA, examples, tok, template, cfg, px_N3SS=None):
    """cmoe.dmole_rep of examples (their prompts: no answers; `px_N3SS`: their pixels, if known), in eval batches."""
    out = []
    for i in range(0, len(examples), cfg.eval_batch):
        exs = examples[i:i + cfg.eval_batch]
        px = px_N3SS[i:i + cfg.eval_batch] if px_N3SS is not None else pixels(model, exs)
        prompts = [data.encode_prompt(tok, ex, template, cfg.max_len) for ex in exs]
        out.append(cmoe.dmole_rep(model, prompts, px.to(cfg.device)).cpu())
    return torch.cat(out)

def dmole_experts_per_layer(model: LLaVA):
    """D-MoLE's experts per decoder layer (over its four projections), then per ViT layer."""
    count = {}
    for n, ts in model.dmole.tasks.items():
        side, layer = ("V" if cmoe.is_vision_module(n) else "L"), int(n.split("layers.")[1].split(".")[0])
        count[(side, layer)] = count.get((side, layer), 0) + len(ts)
    return ([count.get(("L", i), 0) for i in range(len(model.llm.layers))]
            + [count.get(("V", i), 0) for i in range(len(model.vision.encoder.layers))])

def task_features(model: LLaVA, examples, tok, template, cfg, images=None, kind=None):
    """PTL features (`kind`, default cfg.locator_feature, of the frozen base) of examples (`images`: their image
    features, if known), in eval batches."""
    images = image_features(model, examples, cfg) if images is None else images
    return torch.cat([model.features([data.encode_prompt(tok, ex, template, cfg.max_len) for ex in
                                      examples[i:i + cfg.eval_batch]], images[i:i + cfg.eval_batch].to(cfg.device),
                                     kind or cfg.locator_feature).cpu() for i in range(0, len(examples), cfg.eval_batch)])

def reject_features(model: LLaVA, examples, tok, template, cfg, kind=None):
    """The features that calibrate a task's reject bound: its training examples after the locator_n its VAE was
    fitted on (the next calib_n: data the VAE never saw); without any, the fitted ones."""
    held_out = examples[cfg.locator_n: cfg.locator_n + cfg.calib_n] or examples[: cfg.locator_n]
    return task_features(model, held_out, tok, template, cfg, kind=kind)

def gate_features(model: LLaVA, examples, tok, template, cfg, images=None):
    """What a task's reject gate is fitted and calibrated on (Locator.add_gate, cmoe.fit_gate): REJECT_FEATURE of the
    locator_n training examples its VAE is fitted on (`images`: their image features, if known), and of the held-out
    ones (reject_features)."""
    kind = cmoe.REJECT_FEATURE
    return (task_features(model, examples[: cfg.locator_n], tok, template, cfg, images, kind=kind),
            reject_features(model, examples, tok, template, cfg, kind=kind))

BASE_ONLY = -1  # a routing choice: no task's routers; the frozen base answers alone, without experts


def choose_routers(locator, cfg, feats_BD, n, true_task, seen, routed, gate_BD=None):
    """Whose routers answer each of n samples: a task index, or BASE_ONLY.
      none    routed=False (the baselines' one shared pool; row 0's bare base): task 0's, the only ones
      PTL     --locator ptl, once 2 tasks are seen (or with --reject): the locator's choice per sample, BASE_ONLY
              where no task's gate accepts it (--reject; gate_BD: the samples' REJECT_FEATURE)
      oracle  otherwise: the true task's (the latest for a task not trained yet), BASE_ONLY for an unseen task
              (true_task None), which no router was trained for"""
    if not routed:
        return torch.zeros(n, dtype=torch.long)
    if cfg.locator == "ptl" and (seen > 1 or cfg.reject or isinstance(locator, cmoe.DDAS)):  # (DDAS may reject)
        t_B = locator.locate(feats_BD, reject=cfg.reject, g_BD=gate_BD)
        return torch.where(t_B == locator.REJECTED, BASE_ONLY, t_B)
    return torch.full((n,), BASE_ONLY if true_task is None else min(true_task, seen - 1), dtype=torch.long)


def dmole_active(router, cfg, reps_BD, true_task, seen):
    """The tasks whose D-MoLE experts answer one evaluation batch: under --locator ptl the autoencoders' vote
    (cmoe.vote_eval; [] = the base model); oracle: the true task's (the latest for a task not trained yet), none for an
    unseen task. Evaluation batches hold one task's test samples (Benchmark.evaluate predicts task by task), as the
    release's evaluation does (one dataset per batch): a vote over a mixed batch would penalise D-MoLE."""
    if cfg.locator == "ptl":
        return cmoe.vote_eval(router.route(reps_BD))
    return [] if true_task is None else [min(true_task, seen - 1)]


@torch.no_grad()
def predict(model: LLaVA, locator, examples, images, tok, template, cfg, true_task, seen, routed, feats=None,
            gate_feats=None):
    """Greedy answers for `examples` (`images`: their projected features; `feats`: their PTL features, needed when the
    locator chooses; `gate_feats`: their REJECT_FEATURE, with --reject); returns rows for predictions/<task>.jsonl and the routers chosen per sample (choose_routers)."""
    model.eval()
    rows, chosen = [], []
    stops = data.stop_ids(tok, template)
    for i in range(0, len(examples), cfg.eval_batch):
        exs = examples[i:i + cfg.eval_batch]
        prompts = [data.encode_prompt(tok, ex, template, cfg.max_len) for ex in exs]
        img = images[i:i + cfg.eval_batch].to(cfg.device)
        part = [None if f is None else f[i:i + cfg.eval_batch] for f in (feats, gate_feats)]
        if getattr(cfg, "method", None) == "dmole" and routed:  # one expert set for the whole batch (D-MoLE routes per batch)
            active = dmole_active(locator, cfg, part[0], true_task, seen)
            with model.dmole.using(active):
                outs = model.generate(prompts, img, None, cfg.max_new_tokens, stops, use_experts=False)
            tids = torch.full((len(exs),), active[0] if active else BASE_ONLY, dtype=torch.long)
        else:
            tids = choose_routers(locator, cfg, part[0], len(exs), true_task, seen, routed, part[1])
            outs = [None] * len(exs)
            for experts in (True, False):  # samples with routers, then those the base answers alone
                idx = [j for j in range(len(exs)) if bool(tids[j] != BASE_ONLY) == experts]
                if idx:
                    gen = model.generate([prompts[j] for j in idx], img[idx], tids[idx].clamp(min=0).to(cfg.device),
                                         cfg.max_new_tokens, stops, use_experts=experts)
                    for j, o in zip(idx, gen):
                        outs[j] = o
        for j, (ex, o) in enumerate(zip(exs, outs)):
            rows.append({"index": i + j, "prediction": tok.decode(o).strip(), "answer": ex.answer,
                         "answers": ex.answers, "true_task": true_task, "located": int(tids[j]) if routed else None})
            if "question_id" in ex.meta:  # CoIN test record: keep its id for the CoIN-format answer file
                rows[-1].update(question_id=ex.meta["question_id"], prompt=ex.turns[-1][0])
            if "size" in ex.meta:  # CoIN Grounding: boxes are scaled by the image size before the IoU
                rows[-1]["size"] = ex.meta["size"]
        chosen += tids.tolist()
    return rows, chosen

def scoring_rules(cfg, names, metric, tests, log=print):
    """{task: the rule its accuracy is computed with} (kept in metrics.json); CoIN's are logged, fallbacks included."""
    if cfg.benchmark != "coin":
        return {n: f"lenient normalised '{metric[n]}' (data.score_lenient, MiniCoIN)" for n in names}
    if cfg.predict_only:
        rules = {n: "prediction-only: answer files written, no accuracy" for n in names}
    else:
        rules = {n: data.coin_rule(metric[n], all(ex.answers for ex in tests[n])) for n in names}
        for n in names:
            if n in data.COIN_ANNOTATIONS and not rules[n].startswith("FALLBACK"):
                rules[n] += (f" (answers from {os.path.join(cfg.coin_annotations, data.COIN_ANNOTATIONS[n])})"
                             if cfg.coin_annotations else " (answers from the test records' own 'answers')")
    for n in names:
        log(f"scoring {n}: {rules[n]}")
    return rules

class Benchmark:
    """The test side of a run: every task's test set (the trained sequence, then the unseen tasks), its image features
    (computed once per run: tower and projector are frozen; with experts in the tower, --experts-in vision|both, its
    pixels: the chosen routers route them at every evaluation), its scoring rule; evaluate() scores them after a
    stage."""

    def __init__(self, cfg, model: LLaVA, tok, template, log=print):
        self.cfg, self.tok, self.template = cfg, tok, template
        self.names, self.metric = data.task_list(cfg)
        unseen = data.unseen_list(cfg, self.names)
        self.unseen, self.metric = list(unseen), {**self.metric, **unseen}
        self.tests = {n: data.load_examples(cfg, n, "test") for n in self.names + self.unseen}
        # a tower whose experts route the test images needs their pixels; a frozen tower, its features, once
        self.dmole = getattr(cfg, "method", None) == "dmole"  # its task features: cmoe.dmole_rep
        self.images = {n: pixels(model, exs) if pixels_needed(cfg) else image_features(model, exs, cfg)
                       for n, exs in self.tests.items()}
        self.scoring = scoring_rules(cfg, self.names + self.unseen, self.metric, self.tests, log)
        self.feats = {}  # PTL features of each test set: the base is frozen, so computed once, at their first use
        self.gate_feats = {}  # their REJECT_FEATURE (--reject), likewise

    def evaluate(self, model: LLaVA, locator, t):
        """After training task t (t = -1: the frozen base before any expert exists, row 0): score every task (seen, not
        yet seen, unseen) with the routers chosen per sample; writes predictions/<task>.jsonl. Returns {"acc": the
        accuracy row, "unseen": the unseen tasks' accuracies, "confusion": [true][chosen] over the seen tasks,
        "rejected": per seen task, the samples no task accepted (--reject)}."""
        cfg, routed, T = self.cfg, self.cfg.method in LOCATED and t >= 0, len(self.names)
        out = {"acc": [], "unseen": [], "confusion": [[0] * (t + 1) for _ in range(t + 1)], "rejected": [0] * (t + 1)}
        rank, world = rank_world()
        for i, n in enumerate(self.names + self.unseen):
            mine = list(range(rank, len(self.tests[n]), world))  # under torchrun each rank predicts every world-th
            exs = [self.tests[n][k] for k in mine]
            if routed and cfg.locator == "ptl" and n not in self.feats:  # (dmole: its autoencoders' input)
                self.feats[n] = (dmole_reps if self.dmole else task_features)(model, exs, self.tok, self.template, cfg,
                                                                              self.images[n][mine])
            if routed and cfg.locator == "ptl" and cfg.reject and n not in self.gate_feats:
                self.gate_feats[n] = (self.feats[n] if cfg.locator_feature == cmoe.REJECT_FEATURE else task_features(
                    model, exs, self.tok, self.template, cfg, self.images[n][mine], kind=cmoe.REJECT_FEATURE))
            rows, chosen = predict(model, locator, exs, self.images[n][mine], self.tok, self.template, cfg,
                                   i if i < T else None, t + 1, routed, self.feats.get(n), self.gate_feats.get(n))
            rows, chosen = gather_in_order(mine, rows, chosen)
            out["acc" if i < T else "unseen"].append(None if cfg.predict_only else task_accuracy(rows, self.metric[n]))
            for c in chosen if routed and i <= t else ():
                if c == BASE_ONLY:  # a seen task's sample: every gate rejected it
                    out["rejected"][i] += 1
                else:
                    out["confusion"][i][c] += 1
            trained = "Zero_shot" if t < 0 else "Joint" if cfg.method == "joint" else self.names[t]  # CoIN's STAGE
            if rank == 0:
                save_predictions(cfg.out, n, t, rows, trained if cfg.benchmark == "coin" else None)
        return out

def gather_in_order(mine, rows, chosen):
    """Every rank's predictions for its samples (`mine`: their indices) -> all rows and choices in test order."""
    for r, k in zip(rows, mine):
        r["index"] = k
    if rank_world()[1] == 1:
        return rows, chosen
    parts = [None] * rank_world()[1]
    dist.all_gather_object(parts, (rows, chosen))
    merged = sorted(((r["index"], r, c) for rs, cs in parts for r, c in zip(rs, cs)), key=lambda x: x[0])
    return [r for _, r, _ in merged], [c for _, _, c in merged]

def reevaluate(run_dir, device=None, reject=None, quantile=None):
    """Rebuild a finished (or partly finished) run from its base and task checkpoints and regenerate every stage's
    predictions and accuracy rows. reject: override the run's reject option; quantile: recalibrate every task's
    reject gate at this quantile, from the same held-out training examples training used (a run folder from before
    the gates gets them fitted from its training data the same way). Returns the refreshed
    metrics dict (also written to metrics.json). Works from any directory: the run's relative paths (cached base,
    --base-dir, data, checkpoints) are taken from the folder training ran in (metrics.json 'cwd')."""
    run_dir = os.path.abspath(run_dir)
    metrics = load_run(run_dir)
    home = metrics.get("cwd")
    with contextlib.chdir(home) if home and os.path.isdir(home) else contextlib.nullcontext():
        return reevaluate_in_place(run_dir, metrics, device, reject, quantile)


def reevaluate_in_place(run_dir, metrics, device, reject, quantile):
    cfg = types.SimpleNamespace(**read_json(os.path.join(run_dir, "config.json")))
    cfg.out, cfg.device = run_dir, device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg.reject = cfg.reject if reject is None else reject
    cfg.reject_quantile = cfg.reject_quantile if quantile is None else quantile
    log = Log(os.path.join(run_dir, "log.txt"))
    if "base" not in metrics:
        raise ValueError(f"{run_dir}: metrics name no base model (a run folder from before the 'base' field: rerun it)")
    tok, template = data.tokenizer(cfg)
    model = load_model(metrics["base"], data.pad_id(tok)).requires_grad_(False)
    cmoe.set_precision(model, getattr(cfg, "precision", None) or "fp32")  # as training held it (config.json; fp32
    model = model.to(cfg.device)  # where it names no precision)
    bench = Benchmark(cfg, model, tok, template, log)
    metrics.update(acc=[], locator_acc=[], unseen={"tasks": bench.unseen, "acc": []}, reject=cfg.reject,
                   reject_quantile=cfg.reject_quantile)
    record(metrics, bench.evaluate(model, None, -1), -1)  # before any expert
    gates = {}
    for t in [0] if cfg.method == "joint" else range(metrics["finished_tasks"]):  # joint: one checkpoint, one row
        tdir = os.path.join(run_dir, f"task_{t}")
        meta = read_json(os.path.join(tdir, "meta.json"))
        checks = (("method", cfg.method), ("tasks", bench.names)) + (
            () if cfg.method == "dmole" else (("locator_feature", cfg.locator_feature),))  # (dmole: its own feature)
        for field, want in checks:
            if meta.get(field) != want:
                raise ValueError(f"{tdir}/meta.json: field '{field}' is {meta.get(field)!r} "
                                 f"but the run config says {want!r}")
        locator = load_task(model, tdir)
        refit = cfg.reject and cfg.locator == "ptl" and (quantile is not None or len(locator.gates) < len(locator.vaes))
        for k in range(len(locator.vaes)) if refit else ():
            if k not in gates:  # the base is frozen: a task's gate is the same at every stage
                exs = data.load_examples(cfg, bench.names[k], "train")
                gates[k] = cmoe.fit_gate(*gate_features(model, exs, tok, template, cfg), cfg.reject_quantile)
            if k < len(locator.gates):
                locator.gates[k] = gates[k]
            else:
                locator.gates.append(gates[k])
        record(metrics, bench.evaluate(model, locator, t), t)
        log(f"re-evaluated task_{t}: " + " ".join(f"{n}={fmt(a)}" for n, a in zip(bench.names, metrics["acc"][-1])))
    metrics.update(continual_metrics(metrics["acc"], joint=cfg.method == "joint", isolated=cfg.method == "isolated"))
    save_json(metrics, os.path.join(run_dir, "metrics.json"))
    return metrics

# -----------------------------------------------------------------------------
# scoring saved predictions

def rescore(rows, metric, score=None):
    """Per-row scores in [0,1] with data.score (the VQA answer list when present, else the single answer)."""
    out, score = [], score or data.score
    for k, r in enumerate(rows):
        if "prediction" not in r or ("answer" not in r and not r.get("answers")):
            raise ValueError(f"prediction record {k} (index {r.get('index')}) needs 'prediction' and 'answer'/'answers'")
        out.append(float(score(metric, r["prediction"], r.get("answers") or r["answer"])))
    return out

def task_accuracy(rows, metric, score=None):
    """Percent for one task's prediction rows: a CoIN metric aggregates as CoIN's script does (data.coin_accuracy,
    e.g. ScienceQA divides by every question); otherwise the mean of the per-row scores."""
    if score is None and metric in data.COIN_METRICS:
        return data.coin_accuracy(metric, rows)
    return 100.0 * _mean(rescore(rows, metric, score))

def recompute(run_dir, score=None):
    """metrics.json with acc cells and the locator confusion rebuilt from predictions/<task>.jsonl where present."""
    m = load_run(run_dir)
    tasks, T = m["tasks"], len(m["tasks"])
    acc = [list(r) for r in m["acc"]]
    final = m["finished_tasks"] - 1 if m.get("method") != "joint" else 0
    conf, rejected, located_any = [[0] * T for _ in range(T)], [0] * T, False
    for i, task in enumerate(tasks):
        path = os.path.join(run_dir, "predictions", f"{task}.jsonl")
        if not os.path.isfile(path):
            continue
        metric = m.get("metric", {}).get(task)
        if metric is None:
            raise ValueError(f"{os.path.join(run_dir, 'metrics.json')}: no metric for task '{task}'")
        stages = defaultdict(list)
        for k, r in enumerate(read_predictions(path)):
            if "stage" not in r:
                raise ValueError(f"{path}: record {k} has no 'stage'")
            stages[int(r["stage"])].append(r)
            if r.get("located") is not None and int(r["stage"]) == final:
                t, c = int(r.get("true_task", i)), int(r["located"])
                if not (0 <= t < T and (0 <= c < T or c == BASE_ONLY)):
                    raise ValueError(f"{path}: record {k} has true_task {t} / located {c} outside 0..{T - 1} "
                                     f"({BASE_ONLY}: rejected)")
                if c == BASE_ONLY:
                    rejected[t] += 1
                else:
                    conf[t][c] += 1
                located_any = True
        for j, rs in stages.items():
            if j < 0:  # stage -1: the frozen base before task 1 (row 0, zero-shot)
                m.setdefault("zero_shot", [None] * T)[i] = task_accuracy(rs, metric, score)
                continue
            while len(acc) <= j:
                acc.append([None] * T)  # predictions written before metrics.json caught up
            acc[j][i] = task_accuracy(rs, metric, score)
    m["acc"] = acc
    if located_any and m.get("method", "cmoe") in LOCATED:  # baselines share one router: nothing to locate
        m["locator"] = dict(m.get("locator") or {}, confusion=conf, rejected=rejected)
    return m

# -----------------------------------------------------------------------------
# figures (Pillow only)

_RAMP = [(247, 251, 255), (198, 219, 239), (107, 174, 214), (33, 113, 181), (8, 48, 107)]  # light -> dark blue
_GRID, _INK, _EMPTY = (225, 225, 225), (30, 30, 30), (245, 245, 245)

def _font(size):
    return ImageFont.load_default(size=size)

def _colour(t):
    t = min(max(t, 0.0), 1.0) * (len(_RAMP) - 1)
    k = min(int(t), len(_RAMP) - 2)
    return tuple(round(a + (b - a) * (t - k)) for a, b in zip(_RAMP[k], _RAMP[k + 1]))

def _tw(font, s):
    return math.ceil(font.getlength(s))

def _vtext(s, font, fill=_INK):
    """Text rotated 90° (reads bottom to top) as an RGBA image to paste."""
    l, t, r, b = font.getbbox(s)
    img = Image.new("RGBA", (r - l + 2, b - t + 2), (255, 255, 255, 0))
    ImageDraw.Draw(img).text((1 - l, 1 - t), s, font=font, fill=fill)
    return img.rotate(90, expand=True)

def draw_heatmap(path, vals, rows, cols, title, xlabel, ylabel, fmt="{:.1f}", shade=None, vmax=100.0):
    """Cells coloured by shade[j][i] in [0,1] (default vals/vmax) with the value written in; None cells left empty."""
    f_cell, f_lab, f_title = _font(15), _font(15), _font(19)
    texts = [[None if v is None else fmt.format(v) for v in r] for r in vals]
    cell = max([64] + [_tw(f_cell, s) + 14 for r in texts for s in r if s])
    rot = max(_tw(f_lab, c) for c in cols) > cell - 8  # long task names go vertical
    col_h = max(_tw(f_lab, c) for c in cols) + 8 if rot else 24
    x0 = 40 + max(_tw(f_lab, r) for r in rows) + 10  # 40 px for the vertical axis title
    y0, W, H = 46, cell * len(cols), cell * len(rows)
    img = Image.new("RGB", (x0 + W + 90, y0 + H + col_h + 36), "white")
    d = ImageDraw.Draw(img)
    d.text((img.width // 2, 22), title, font=f_title, fill=_INK, anchor="mm")
    for j, row in enumerate(vals):
        for i, v in enumerate(row):
            box = (x0 + i * cell, y0 + j * cell, x0 + (i + 1) * cell, y0 + (j + 1) * cell)
            if v is None:
                d.rectangle(box, fill=_EMPTY, outline="white", width=2)
                continue
            c = _colour((v / vmax) if shade is None else shade[j][i])
            d.rectangle(box, fill=c, outline="white", width=2)
            ink = "white" if 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2] < 150 else _INK  # contrast with the cell
            d.text(((box[0] + box[2]) // 2, (box[1] + box[3]) // 2), texts[j][i], font=f_cell, fill=ink, anchor="mm")
    for j, r in enumerate(rows):
        d.text((x0 - 8, y0 + j * cell + cell // 2), r, font=f_lab, fill=_INK, anchor="rm")
    for i, c in enumerate(cols):
        cx = x0 + i * cell + cell // 2
        if rot:
            v = _vtext(c, f_lab)
            img.paste(v, (cx - v.width // 2, y0 + H + 6), v)
        else:
            d.text((cx, y0 + H + 6), c, font=f_lab, fill=_INK, anchor="mt")
    d.text((x0 + W // 2, y0 + H + col_h + 18), xlabel, font=f_lab, fill=_INK, anchor="mm")
    v = _vtext(ylabel, f_lab)
    if ylabel and v.height <= H + col_h:  # a one-row matrix has no room for a vertical title
        img.paste(v, (10, max(y0, y0 + H // 2 - v.height // 2)), v)
    bx, bh = x0 + W + 20, min(H, 200)  # colour bar
    for y in range(bh):
        d.line((bx, y0 + y, bx + 14, y0 + y), fill=_colour(1 - y / max(bh - 1, 1)))
    d.rectangle((bx, y0, bx + 14, y0 + bh), outline=_GRID)
    f_tick = _font(12)
    for t in (0.0, 0.5, 1.0):
        lab = f"{t * vmax:g}" if shade is None else f"{t:.0%}"  # shade = share of the row
        d.text((bx + 20, y0 + round((1 - t) * (bh - 1))), lab, font=f_tick, fill=_INK, anchor="lm")
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return img

def draw_curve(path, xs, ys, labels, title, xlabel, ylabel, vline=None):
    """Points (xs[k], ys[k]) joined in order, each labelled; a dashed vertical line at vline (e.g. a budget)."""
    f, f_title, W, H, m = _font(13), _font(17), 520, 340, 60
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs_all = list(xs) + ([vline] if vline is not None else [])
    x_lo, x_hi = 0.0, max(xs_all) * 1.08 or 1.0
    y_lo, y_hi = min(0.0, min(ys)), max(100.0, max(ys))
    px = lambda x: m + (x - x_lo) / (x_hi - x_lo) * (W - 1.5 * m)  # noqa: E731
    py = lambda y: H - m - (y - y_lo) / (y_hi - y_lo) * (H - 1.8 * m)  # noqa: E731
    d.text((W // 2, 18), title, font=f_title, fill=_INK, anchor="mm")
    d.line((px(x_lo), py(y_lo), px(x_hi), py(y_lo)), fill=_INK)
    d.line((px(x_lo), py(y_lo), px(x_lo), py(y_hi)), fill=_INK)
    for k in range(5):  # ticks: 4 equal steps on each axis
        x, y = x_lo + k * (x_hi - x_lo) / 4, y_lo + k * (y_hi - y_lo) / 4
        d.text((px(x), py(y_lo) + 6), _human(x), font=f, fill=_INK, anchor="mt")
        d.text((px(x_lo) - 6, py(y)), f"{y:g}", font=f, fill=_INK, anchor="rm")
        d.line((px(x_lo), py(y), px(x_hi), py(y)), fill=_GRID)
    if vline is not None:
        for y in range(int(py(y_hi)), int(py(y_lo)), 8):
            d.line((px(vline), y, px(vline), y + 4), fill=_RAMP[3])
    pts = [(px(x), py(y)) for x, y in zip(xs, ys)]
    if len(pts) > 1:
        d.line(pts, fill=_RAMP[2], width=2)
    for (x, y), lab in zip(pts, labels):
        d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=_RAMP[4])
        d.text((x + 6, y - 6), lab, font=f, fill=_INK, anchor="ls")
    d.text((W // 2, H - 14), xlabel, font=f, fill=_INK, anchor="mm")
    v = _vtext(ylabel, f)
    img.paste(v, (4, H // 2 - v.height // 2), v)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return img

# -----------------------------------------------------------------------------
# report

def fmt(x, nd=1):
    """A number for a log line or a report cell: nd decimals, "—" for None (not evaluated, not applicable)."""
    return "—" if x is None else f"{x:.{nd}f}"

def _human(n):
    if n is None:
        return "—"
    for unit, k in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.2f}{unit}"
    return str(int(n))

def _table(head, rows):
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] +
                     ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]) + "\n"

def summarize(m):
    """Summary numbers of a metrics dict: last/avg/bwt/fwt over the finished tasks + locator accuracy."""
    joint = m.get("method") == "joint"
    acc = m["acc"] if joint else m["acc"][: m.get("finished_tasks") or len(m["acc"])]
    s = continual_metrics(acc, joint=joint, isolated=m.get("method") == "isolated")
    loc = m.get("locator") or {}
    s["locator_acc"] = locator_accuracy(loc.get("confusion"), loc.get("rejected"))
    return s

def write_report(run_dir, metrics, out_dir=None):
    """report.md + figures/*.png for one run, in out_dir (default: the run folder); the run's metrics.json is
    refreshed with the recomputed summary."""
    m = dict(metrics)
    s = summarize(m)
    m.update(last=s["last"], avg=s["avg"], bwt=s["bwt"], fwt=s["fwt"], plasticity=s["plasticity"])
    if m.get("locator") is not None:
        m["locator"] = dict(m["locator"], acc=s["locator_acc"])
    save_json(m, os.path.join(run_dir, "metrics.json"))
    tasks, joint = m["tasks"], m.get("method") == "joint"
    acc = m["acc"] if joint else m["acc"][: m["finished_tasks"]]
    rows = ["joint"] if joint else [f"after {tasks[j]}" for j in range(len(acc))]
    if m.get("zero_shot"):  # row 0: the frozen base before any task
        acc, rows = [m["zero_shot"], *acc], ["base (zero-shot)", *rows]
    out_dir = out_dir or run_dir
    figs, name = os.path.join(out_dir, "figures"), os.path.basename(os.path.normpath(run_dir))
    draw_heatmap(os.path.join(figs, "acc_matrix.png"), acc, rows, tasks, f"{name}: accuracy (%)",
                 "evaluated task i", "after training task j")
    md = [f"# {name}\n",
          f"benchmark `{m.get('benchmark')}`, method `{m.get('method')}`, "
          f"finished tasks {m['finished_tasks']}/{len(tasks)}\n",
          "## Summary\n", _table(["Last", "Avg", "BWT", "FWT", "Locator acc"],
                                 [[fmt(s["last"]), fmt(s["avg"]), fmt(s["bwt"]), fmt(s["fwt"]), fmt(s["locator_acc"])]]),
          "`Last = mean_i a[T][i]`, `Avg = mean_j mean_{i<=j} a[j][i]`, `BWT = mean_{i<T}(a[T][i] - a[i][i])`, "
          "`FWT = mean_i a[i-1][i]` (zero-shot on the next task, before training it).\n",
          "## Accuracy matrix (%)\n", "Row j: after training task j; column i: evaluated task i.\n",
          _table(["", *tasks], [[r, *[fmt(v) for v in row]] for r, row in zip(rows, acc)]
                 + ([["plasticity a_ii", *[fmt(v) for v in s["plasticity"]]]] if s["plasticity"] else [])),
          "Plasticity: the accuracy on a task right after training it.\n" if s["plasticity"] else "",
          "![accuracy matrix](figures/acc_matrix.png)\n"]
    md += _report_locator(m, s, figs) + _report_growth(m, figs) + _report_time(m.get("time") or {})
    write_text(os.path.join(out_dir, "report.md"), "\n".join(md))
    return m

def _report_locator(m, s, figs):
    """The locator's confusion (+ a "rejected" column with --reject) and the unseen tasks' retention."""
    loc, tasks, md = m.get("locator") or {}, m["tasks"], []
    conf, rej, unseen = loc.get("confusion"), loc.get("rejected"), m.get("unseen") or {}
    if conf:
        full = [r + ([rej[t]] if rej and any(rej) else []) for t, r in enumerate(conf)]
        tot = [max(sum(r), 1) for r in full]
        cols = tasks[: len(conf)] + (["rejected"] if rej and any(rej) else [])
        draw_heatmap(os.path.join(figs, "locator_confusion.png"), full, tasks[: len(conf)], cols,
                     f"Task locator: {fmt(s['locator_acc'])}% correct", "chosen task", "true task", fmt="{:d}",
                     shade=[[c / tot[t] for c in r] for t, r in enumerate(full)])
        md += ["## Task locator\n", f"Accuracy {fmt(s['locator_acc'])}% (true task row, chosen task column).\n",
               _table(["true \\ chosen", *cols], [[t, *r] for t, r in zip(tasks, full)]),
               "![locator confusion](figures/locator_confusion.png)\n"]
    if unseen.get("tasks") and unseen.get("acc"):
        md += ["## Unseen tasks (scored every stage, never trained)\n",
               _table(["task", "base zero-shot", "after the last task", "retention"],
                      [[n, fmt(z), fmt(a), fmt(k, 2)] for n, z, a, k in zip(unseen["tasks"], unseen["zero_shot"],
                                                                         unseen["acc"][-1], unseen["retention"])])]
    return md

def _report_growth(m, figs):
    """Parameters per task, experts per layer (table + figure), PGKE decisions."""
    md, tasks, epl = [], m["tasks"], m.get("experts_per_layer")
    if m.get("params"):
        budget = m.get("max_expert_params")
        md += ["## Parameters per task\n",
               _table(["task", "trainable", "added", "experts", "expert params"],
                      [[p.get("task"), _human(p.get("trainable")), _human(p.get("added")), p.get("experts", "—"),
                        _human(p.get("expert_params"))] for p in m["params"]]),
               f"Total added: {_human(sum(p.get('added') or 0 for p in m['params']))}"
               + (f"; budget (--max-expert-params): {_human(budget)}" if budget else "") + "\n"]
        acc = m.get("acc") or []
        pts = [(p["expert_params"], _mean(acc[t][: t + 1]), p.get("task")) for t, p in enumerate(m["params"])
               if p.get("expert_params") is not None and t < len(acc) and _mean(acc[t][: t + 1]) is not None]
        if pts and m.get("method") not in ("joint", "isolated"):  # (isolated: a row is not the run so far)
            draw_curve(os.path.join(figs, "params_vs_acc.png"), *zip(*pts), "Parameters and accuracy after each task",
                       "expert + router parameters", "mean accuracy on tasks so far (%)", vline=budget)
            md += ["Mean accuracy over the tasks trained so far against the expert and router parameters, after "
                   "each task (the last point's accuracy is Last" + ("; dashed: the budget" if budget else "")
                   + ").\n", "![parameters and accuracy](figures/params_vs_acc.png)\n"]
    names = m.get("expert_layers")  # --experts-in vision|both: tower.layer; else the decoder's layer indices
    if epl:
        layers, after = names or [str(l) for l in range(len(epl[0]))], tasks[: len(epl)] if len(epl) > 1 else ["joint"]
        where = "layer (tower.layer)" if names else "decoder layer"
        if m.get("dmole"):  # decoder layers, then ViT layers (dmole_experts_per_layer)
            n_llm = sum(not n.startswith("vision.") for n in m["dmole"][0]["scores"])
            layers = [f"L{l}" for l in range(n_llm // 4)] + [f"V{l}" for l in range(len(epl[0]) - n_llm // 4)]
            where = "decoder (L) and vision (V) layer: its attention projections' experts"
        draw_heatmap(os.path.join(figs, "experts_per_layer.png"), epl, after, layers, "Experts per layer",
                     where, "after task", fmt="{:d}", vmax=max(1, max(map(max, epl))))
        md += ["## Experts per layer\n", _table(["after task", *layers], [[t, *r] for t, r in zip(after, epl)]),
               "![experts per layer](figures/experts_per_layer.png)\n"]
    if m.get("dmole"):
        md += ["## D-MoLE allocation\n", "Per task: the modules that got its expert (budget "
               f"{_human(m.get('budget_params'))} expert parameters per task), the vision share of the frozen base's "
               "gradient norms, and the curriculum's learning-rate factors.\n",
               _table(["task", "language modules", "vision modules", "vision share", "lr x (language, vision)"],
                      [[d["task"], sum(not n.startswith("vision.") for n in d["chosen"]),
                        sum(n.startswith("vision.") for n in d["chosen"]), fmt(d["vision_share"], 3),
                        f"{d['lr_scale']['llm']:.2f}, {d['lr_scale']['vision']:.2f}"] for d in m["dmole"]])]
    if m.get("pgke"):
        md += ["## PGKE decisions\n", "freq = share of top-k slots the probe expert won; * = layer expanded.\n",
               _table(["task", "threshold", "expanded layers", "freq per layer"],
                      [[p.get("task"), fmt(p.get("threshold"), 3),
                        ", ".join(names[l] if names else str(l) for l, e in enumerate(p.get("expand", [])) if e)
                        or "none",
                        " ".join(f"{f:.2f}{'*' if e else ''}" for f, e in zip(p.get("freq", []), p.get("expand", [])))]
                       for p in m["pgke"]])]
    return md

def _report_time(tm):
    if not tm:
        return []
    stages = ("probe", "train", "locator", "eval")
    trs = [["base", *["—"] * 4, fmt(tm.get("base"))]] if tm.get("base") is not None else []
    trs += [[t.get("task"), *[fmt(t.get(k)) for k in stages], fmt(sum(t.get(k) or 0 for k in stages))]
            for t in tm.get("tasks", [])]
    return ["## Time per stage (s)\n", _table(["stage", *stages, "total"], trs),
            f"Total wall time: {fmt(tm.get('total'))} s\n"]

def method_label(run_dir, m):
    """The method as compare groups runs: --method, and --experts-in where cmoe's experts sit in the tower too."""
    path = os.path.join(run_dir, "config.json")
    where = read_json(path).get("experts_in", "llm") if os.path.isfile(path) else "llm"
    return m.get("method") + ("" if where == "llm" else f" --experts-in {where}")


def compare(run_dirs, out_dir):
    """One row per run (label = run folder name), and per method run more than once (seeds: `--seed S --out DIR`)
    a row of mean ± sd (sample sd) over its runs; writes out_dir/compare.md and compare.png, returns the rows."""
    rows = []
    for rd in run_dirs:
        m = load_run(rd)
        s = summarize(m)
        rows.append(dict(run=os.path.basename(os.path.normpath(rd)), method=method_label(rd, m), last=s["last"],
                         avg=s["avg"], bwt=s["bwt"], locator=s["locator_acc"],
                         added=sum(p.get("added") or 0 for p in m["params"]) if m.get("params") else None,
                         time=(m.get("time") or {}).get("total")))
    keys = ("last", "avg", "bwt", "locator")
    spread = []
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method]
        if len(runs) > 1:
            stats = {k: [r[k] for r in runs if r[k] is not None] for k in keys}
            spread.append([f"mean ± sd of {len(runs)}", method, *[
                "—" if len(v) < 2 else f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}" for v in stats.values()],
                "", ""])
    md = _table(["run", "method", "Last", "Avg", "BWT", "locator acc", "added params", "time (s)"],
                [[r["run"], r["method"], fmt(r["last"]), fmt(r["avg"]), fmt(r["bwt"]), fmt(r["locator"]),
                  _human(r["added"]), fmt(r["time"])] for r in rows] + spread)
    print(md, end="")
    write_text(os.path.join(out_dir, "compare.md"), md)
    draw_heatmap(os.path.join(out_dir, "compare.png"), [[r["last"], r["avg"], r["locator"]] for r in rows],
                 [r["run"] for r in rows], ["Last", "Avg", "locator"], "Method comparison (%)", "", "run")
    return rows

# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Re-evaluate / report a cmoe run, or compare several runs.")
    p.add_argument("runs", nargs="+", help="run folder(s), e.g. out/minicoin-cmoe")
    p.add_argument("--compare", action="store_true", help="compare several runs in one table + figure")
    p.add_argument("--out", default=None, help="output folder: of report.md and its figures (default: the run folder); "
                   "with --compare, of compare.md and compare.png (default: <runs parent>/compare)")
    p.add_argument("--from-predictions", action="store_true", help="skip the model; rescore saved predictions")
    p.add_argument("--reject", action="store_true", help="re-evaluate with the locator's reject option (the gates "
                   "are fitted during training whether or not the run used it; older run folders get them fitted "
                   "from the run's training data)")
    p.add_argument("--reject-quantile", type=float, help="implies --reject: recalibrate every task's gate at this "
                   "quantile of its held-out training distances (recomputed from the run's training data)")
    args = p.parse_args(argv)
    if args.reject_quantile is not None and not 0.0 <= args.reject_quantile <= 1.0:
        p.error(f"--reject-quantile must be in [0, 1], not {args.reject_quantile}")
    if args.from_predictions and (args.reject or args.reject_quantile is not None):
        p.error("--reject and --reject-quantile re-run the model: leave out --from-predictions")
    try:
        if args.compare:
            out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.runs[0])), "compare")
            compare(args.runs, out)
            print(f"wrote {os.path.join(out, 'compare.md')} and compare.png")
            return 0
        if len(args.runs) != 1:
            p.error("give exactly one run folder (or --compare RUN...)")
        rd = args.runs[0]
        load_run(rd)  # fail early with a clear message
        if not args.from_predictions and glob.glob(os.path.join(rd, "task_*", "model.safetensors")):
            try:
                reevaluate(rd, reject=args.reject or args.reject_quantile is not None or None,
                           quantile=args.reject_quantile)
            except NotImplementedError as e:
                print(f"note: {e}; rescoring the saved predictions instead", file=sys.stderr)
        m = write_report(rd, recompute(rd), args.out)
        s = summarize(m)
        print(f"{rd}: Last {fmt(s['last'])}  Avg {fmt(s['avg'])}  BWT {fmt(s['bwt'])}  FWT {fmt(s['fwt'])}  "
              f"locator {fmt(s['locator_acc'])} -> {os.path.join(args.out or rd, 'report.md')}")
        return 0
    except (OSError, ValueError, ImportError) as e:
        p.error(str(e))  # argparse-style one-line message, exit status 2

if __name__ == "__main__":
    sys.exit(main())

