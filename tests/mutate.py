"""Mutation pass over the method code: apply one plausible one-line bug at a time to a copy of the tree, run the
tests that should notice it, and report which bugs the suite kills.

    python tests/mutate.py                 # every mutation, on the committed code (git HEAD) + untracked tests/
    python tests/mutate.py --list          # the mutations and their test selections, nothing run
    python tests/mutate.py --only 5 17     # a few of them (by number)
    python tests/mutate.py --worktree      # mutate the working tree (uncommitted edits included) instead of HEAD
    python tests/mutate.py --full          # every mutant against the whole suite (slow; default: a selection)
    python tests/mutate.py --exclude tests/test_method.py   # what the suite kills without one test file

Each mutation is (file, original text, replacement, description, tests). The original text must occur exactly
once in its file (checked for every mutation before anything runs: a stale entry is an error, so the list cannot
rot silently); it may span two lines to be unique, but a mutation changes one line. A mutant is killed when its
tests fail (or error, or time out: reported as such). Plain Python + pytest, one torch thread per run.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

# test selections (pytest node ids / files); the compiled-dispatch test is deselected everywhere (30 s, and the
# eager tests next to it compare the same code against the loop)
METHOD = ["tests/test_method.py"]
EXPERTS = ["tests/test_experts.py"]
TRAIN_FAST = ["tests/test_train.py::test_pgke_rule_on_hand_made_frequencies",
              "tests/test_train.py::test_ptl_locates_separated_tasks_per_sample",
              "tests/test_train.py::test_reject_gate_distance_is_the_shrunk_mahalanobis_by_hand",
              "tests/test_train.py::test_reject_gate_bound_is_the_held_out_quantile",
              "tests/test_train.py::test_reject_goes_to_the_best_accepting_task_and_the_base_where_no_gate_accepts"]
LLAMA = ["tests/test_llama.py"]
EVAL = ["tests/test_eval.py"]
DESELECT = ["tests/test_experts.py::test_compiled_fused_matches_loop_without_recompiles"]

ROUTE = METHOD + EXPERTS
PGKE = METHOD + EXPERTS + TRAIN_FAST
PTL = METHOD + TRAIN_FAST + LLAMA

MUTATIONS = [
    # --- routing
    ("cmoe.py", "top_BTK = top_BTK / top_BTK.sum(-1, keepdim=True)", "top_BTK = top_BTK",
     "route: top-k weights not renormalised", ROUTE),
    ("cmoe.py", 'logits_BTE.masked_fill(~valid_BE[:, None, :], float("-inf"))',
     "logits_BTE.masked_fill(~valid_BE[:, None, :], 0.0)",
     "route: experts added after a router get logit 0, not -inf", ROUTE),
    ("cmoe.py", "probs_BTE = logits_BTE.softmax(-1)", "probs_BTE = logits_BTE.softmax(1)",
     "route: softmax over tokens instead of experts", ROUTE),
    ("cmoe.py", "task_ids_B = torch.full((B,), len(self.routers) - 1,", "task_ids_B = torch.full((B,), 0,",
     "route: no task ids -> the first router instead of the latest", ROUTE),
    # --- dispatch
    ("cmoe.py", "rank_N = (onehot_NE.cumsum(0) * onehot_NE).sum(1) - 1",
     "rank_N = (onehot_NE.cumsum(0) * onehot_NE).sum(1)",
     "sparse plan: ranks from 1 (a full block spills into the next group)", ROUTE),
    ("cmoe.py", "padded_E = (onehot_NE.sum(0) + block - 1) // block * block",
     "padded_E = onehot_NE.sum(0) // block * block", "sparse plan: group sizes rounded down", ROUTE),
    ("cmoe.py", "start_E = padded_E.cumsum(0) - padded_E", "start_E = padded_E.cumsum(0)",
     "sparse plan: inclusive instead of exclusive prefix sum", ROUTE),
    ("cmoe.py", "e_b = zeros.scatter(0, pos_N, ids_N).view(nb, block).amax(1)",
     "e_b = zeros.scatter(0, pos_N, ids_N).view(nb, block)[:, -1]",
     "sparse plan: a block's expert read from its last (maybe padding) row", ROUTE),
    ("cmoe.py", "h_bLR = h_bLR * (w_M.to(h_bLR.dtype) * scale).view(nb, -1, 1)",
     "h_bLR = h_bLR * w_M.to(h_bLR.dtype).view(nb, -1, 1)", "sparse: LoRA scale alpha/r forgotten", ROUTE),
    ("cmoe.py", "return g_MD.index_select(0, pos_N).view(ctx.T, -1, g_MD.shape[-1]).sum(1), None, None",
     "return g_MD.index_select(0, pos_N).view(ctx.T, -1, g_MD.shape[-1]).mean(1), None, None",
     "sparse backward: a token's top-k row gradients averaged, not summed", ROUTE),
    ("cmoe.py", "h_TER = h_TER * w_TE.to(h_TER.dtype)[:, :, None]",
     "h_TER = h_TER * (w_TE > 0).to(h_TER.dtype)[:, :, None]", "dense: gated by the top-k mask, not the weights",
     ROUTE),
    # --- expert pools, counts, balance loss
    ("cmoe.py", "a_EDR, b_ERO = (W[copy_from].detach()", "a_EDR, b_ERO = (W[-1].detach()",
     "add_experts: copies the last expert, not copy_from", PGKE),
    ("cmoe.py", "b_ERO = torch.zeros(n, self.rank, self.dout, device=dev)",
     "b_ERO = torch.randn(n, self.rank, self.dout, generator=generator).to(dev) / math.sqrt(self.rank)",
     "add_experts: fresh experts start with B != 0", PGKE),
    ("cmoe.py", "        for r in self.routers:\n            r.requires_grad_(False)",
     "        for r in self.routers:\n            r.requires_grad_(True)", "freeze: routers stay trainable", PGKE),
    ("cmoe.py", "self.count(w_BTE, valid_BT)", "self.count(w_BTE, None)",
     "PGKE counts: padding tokens counted (mask not passed)", PGKE),
    ("cmoe.py", "hits_E = (w_BTE > 0).float()", "hits_E = (w_BTE >= 0).float()",
     "PGKE counts: every expert counted, not only the top-k", PGKE),
    ("cmoe.py", "/ (n * self.ecfg.top_k)", "/ n", "balance loss: assignment fractions not divided by k", ROUTE),
    ("cmoe.py", "psum_E = ((w_BTE > 0).float() * m[..., None]).sum((0, 1)), (probs_BTE * m[..., None]).sum((0, 1))",
     "psum_E = ((w_BTE > 0).float() * m[..., None]).sum((0, 1)), probs_BTE.sum((0, 1))",
     "balance loss: padding tokens in the mean router probability", ROUTE),
    # --- PGKE
    ("cmoe.py", "pool.add_router(latest)", "pool.add_router(None)",
     "probe router starts uniform, not from the latest router", PGKE),
    ("cmoe.py", "float(u[-1] / u.sum().clamp(min=1))", "float(u[-1] / u[:-1].sum().clamp(min=1))",
     "probe frequency relative to the old experts' assignments only", PGKE),
    ("cmoe.py", "[bool(x > threshold + PGKE_TOL) for x in f]", "[bool(x >= threshold - PGKE_TOL) for x in f]",
     "PGKE rule: a layer at the threshold grows", PGKE),
    ("cmoe.py", "alpha * f.std(unbiased=False)", "alpha * f.std()", "PGKE rule: sample std instead of population",
     PGKE),
    ("cmoe.py", "float(f.mean() - alpha", "float(f.mean() + alpha", "PGKE rule: mean + alpha*std", PGKE),
    ("cmoe.py", "old = u[:-1].tolist()", "old = u.tolist()",
     "copy source chosen among old experts and the probe", PGKE),
    ("cmoe.py", "out.append(old.index(max(old)) if old else None)",
     "out.append(len(old) - 1 - old[::-1].index(max(old)) if old else None)",
     "copy source: a tie goes to the highest index", PGKE),
    ("cmoe.py", "pool.routers = nn.ParameterList(list(pool.routers)[:-1])",
     "pool.routers = nn.ParameterList(list(pool.routers))", "probe_end keeps the probe router", PGKE),
    ("cmoe.py", "init = torch.cat([pr[:n_old], pr[n_old:n_old + 1].expand(pool.n_experts - n_old, -1)], 0)",
     "init = pr[:n_old]", "new task's router: grown rows start at zero, not at the probe's row", PGKE),
    ("cmoe.py", "pool.add_experts(n_new, copy_from=src, generator=generator)",
     "pool.add_experts(n_new, copy_from=None, generator=generator)", "expand: fresh experts, not copies", PGKE),
    ("cmoe.py", "        if on:\n", "        if not on:\n", "set_counting: resets when switched off, not on", PGKE),
    ("train.py", "return subset(ds, perm[:n_probe - n_hold]), subset(",
     "return subset(ds, perm[:n_probe]), subset(", "probe split: held-out examples also trained on",
     PGKE),
    ("train.py", "cmoe.set_counting(model, True)", "cmoe.set_counting(model, False)",
     "probe: held-out pass not counted", PGKE),
    ("train.py", 'model(b["input_ids"], b["images"], None, b["task_ids"])',
     'model(b["input_ids"], b["images"], None, torch.zeros_like(b["task_ids"]))',
     "probe: held-out pass routed by task 0's router, not the probe router", PGKE),
    # --- PTL
    ("cmoe.py", "(v.recon_error(f) - v.err_mean) / v.err_std", "(v.recon_error(f) - v.err_mean)",
     "locator: z-score not divided by the error std", PTL),
    ("cmoe.py", "            return z_BN.argmin(-1)", "            return z_BN.argmax(-1)",
     "locator: argmax instead of argmin", PTL),
    ("cmoe.py", "float(torch.quantile(self.distance(held_out_ND), quantile))",
     "float(torch.quantile(self.distance(held_out_ND), 1 - quantile))", "reject bound at the complementary quantile", PTL),
    ("cmoe.py", '(masks[1:] if kind == "text" else masks)', "masks",
     "reject gates' feature: the image half kept beside the instruction's", PTL),
    ("cmoe.py", "z_BN = z_BN.masked_fill(~ok_BN, float(\"inf\"))", "z_BN = z_BN.masked_fill(ok_BN, float(\"inf\"))",
     "reject: refuses what a task accepts", PTL),
    ("cmoe.py", "gate.var.copy_((1 - shrink) * lam + floor)", "gate.var.copy_(lam + floor)",
     "gate: eigenvalues not shrunk", PTL),
    ("cmoe.py", "+ rest_B / self.floor.double()", "", "gate: directions outside the kept basis ignored", PTL),
    ("cmoe.py", "mu, _ = self.enc(x).chunk(2, -1)", "_, mu = self.enc(x).chunk(2, -1)",
     "VAE recon error decodes the log-variance half", PTL),
    ("cmoe.py", "vae.err_std.copy_(err.std().clamp(min=1e-6))", "vae.err_std.copy_(err.var().clamp(min=1e-6))",
     "VAE: error variance stored as the std", PTL),
    ("cmoe.py", "vae.feat_std.copy_(f.std(0).clamp(min=1e-4))", "vae.feat_std.copy_(f.var(0).clamp(min=1e-4))",
     "VAE: features scaled by their variance", PTL),
    ("cmoe.py", "mask_BTT=mask, use_experts=False, return_hidden=True)",
     "mask_BTT=mask, use_experts=True, return_hidden=True)", "locator feature computed with experts on", PTL),
    # --- metrics
    ("eval.py", "a[R - 1][i] - a[i][i] for i in range(R - 1)", "a[R - 1][i] - a[i][i] for i in range(R)",
     "BWT includes the last task", EVAL),
    ("eval.py", "avg = _mean([_mean(a[j][: j + 1]) for j in range(R)])",
     "avg = _mean([_mean(a[j][: j]) for j in range(R)])", "Avg drops the just-trained task", EVAL),
    ("eval.py", "last = _mean(a[R - 1][:R])", "last = _mean(a[R - 1])", "Last includes untrained tasks", EVAL),
    ("eval.py", "sum(confusion[t][t] for t in range(n))", "sum(confusion[t][0] for t in range(n))",
     "locator accuracy counts choices of task 0", EVAL),
    # --- splice
    ("cmoe.py", "torch.where(j_1S < p_B1, j_1S, j_1S - P + 1)", "torch.where(j_1S < p_B1, j_1S, j_1S - P)",
     "splice: text after the image shifted by one", LLAMA),
    ("cmoe.py", "lab_BS = labels_BT.gather(1, src_BS).masked_fill(is_img_BS, IGNORE_INDEX)",
     "lab_BS = labels_BT.gather(1, src_BS)", "splice: image slots keep labels", LLAMA),
    ("cmoe.py", "is_img_BS = (rel_BS >= 0) & (rel_BS < P)", "is_img_BS = (rel_BS >= 0) & (rel_BS <= P)",
     "splice: one image slot too many", LLAMA),
    ("cmoe.py", "return E > 6 * top_k", "return E > 2 * top_k",
     "auto dispatch: the block plan forward-only from E > 2 * top-k (no forward-only crossover)", EXPERTS),
    ("cmoe.py", "return E > 2 * top_k and E * rank * dim > top_k * 16 * 512", "return E > 2 * top_k",
     "auto dispatch in training: the block plan from E > 2 * top-k at every layer size", EXPERTS),
    ("cmoe.py", "routing = experts.route(h, task_ids, valid) if on", "routing = experts.route(x, task_ids, valid) if on",
     "attention experts: the layer routes its un-normalised input", EXPERTS),
    ("cmoe.py", 'return self.proj("o", y.transpose(1, 2).reshape(B, T, -1), delta)',
     'return self.proj("o", y.transpose(1, 2).reshape(B, T, -1), None)', "attention experts: none on o_proj", EXPERTS),
    ("cmoe.py", "rows if x_in is x_BTD else None)", 'rows if x_in is x_BTD or name == "o" else None)',
     "attention experts, sparse dispatch: o_proj's experts read q's input rows", EXPERTS),
    ("vision.py", ".transpose(2, 3).reshape(B, P // (m * m), m * m * C)", ".reshape(B, P // (m * m), m * m * C)",
     "patch merge: a token takes m consecutive patches of m rows instead of an m x m block",
     ["tests/test_vision.py::test_projector_patch_merge_puts_each_block_of_patches_in_one_token"]),
    ("cmoe.py", "P = x.shape[1] - ids.shape[1] + 1", "P = self.vision.cfg.num_patches",
     "the mean PTL feature counts one image slot per patch, also after a patch merge",
     ["tests/test_train.py::test_patch_merge_and_text_steps_base_is_cached_reloaded_and_refused_where_it_cannot_apply"]),
    ("data.py", "labels[i, rep + 1:rep + span] = ids[i, start + 1:start + span]",
     "labels[i, rep:rep + span] = ids[i, start:start + span]",
     "induction pretraining labels the repeat's first token, which nothing predicts",
     ["tests/test_data.py::test_induction_batch_labels_exactly_a_repeated_span"]),
    ("train.py", "and saved[name] != value:", "and False:",
     "--resume accepts changed settings (two runs mixed in one folder)",
     ["tests/test_train.py::test_resume_with_changed_settings_is_refused_before_anything_is_written"]),
    ("train.py", "L = min(T, longest + 1)", "L = min(T, longest)",
     "trim_padding keeps no padding column (a text-only row's image slots overwrite its last token)",
     ["tests/test_method.py::test_trim_padding_keeps_loss_balance_and_gradients_of_the_full_width_batch"]),
    ("train.py", "yield shard, world * int((shard[\"labels\"] != cmoe.IGNORE_INDEX).sum()) / n_all",
     "yield shard, world / n",
     "batch shards: each shard's loss weighted equally, not by its labelled tokens (not the batch's token mean)",
     ["tests/test_train.py::test_batch_shards_cover_the_batch_once_and_weigh_their_losses_into_its_token_mean"]),
    ("train.py", "        torch._dynamo.reset()  # and past", "        pass  # and past",
     "compiled training: no dynamo reset per stage (grown pools' recompiles pile up past the limit: eager, silently)",
     ["tests/test_train.py::test_compiled_stages_with_grown_pools_never_hit_the_recompile_limit"]),
    # --- checkpoints
    ("data.py", 'tmp = f"{path}.tmp{os.getpid()}"', "tmp = path",
     "the atomic writer writes in place (no temp file + rename): checkpoints, JSON, predictions", METHOD),
    ("data.py", "            os.remove(tmp)", "            pass",
     "the atomic writer leaves its temp file behind after a failure", METHOD),
    # --- bounded growth and the isolated bound
    ("cmoe.py", "merged = W_ED[j] if u_j > u_i else W_ED[i]", "merged = W_ED[j] if u_j < u_i else W_ED[i]",
     "merge: a router keeps the row of the expert its task used less", ["tests/test_budget.py"]),
    ("train.py", "key=lambda l: score[l])", "key=lambda l: -score[l])",
     "budget skip rule: drops the growth the decision valued most", ["tests/test_budget.py"]),
    ("vision.py", 'self.fc2(a_BTF) + delta("fc2", a_BTF)', 'self.fc2(a_BTF) + delta("fc2", h_BTF)',
     "vision experts: fc2's delta from the MLP's pre-activation", ["tests/test_vision_experts.py"]),
    ("cmoe.py", 'return self.tower_pools("llm") + self.tower_pools("vision")', 'return self.tower_pools("llm")',
     "vision experts: the tower's pools neither grown nor frozen", ["tests/test_vision_experts.py"]),
    ("train.py", "        for pool in model.expert_pools():\n            pool.reset(model.llm.ecfg)",
     "        for pool in model.expert_pools():\n            pool.drop_trainable()",
     "isolated: a task keeps the previous tasks' experts", ["tests/test_train.py::test_isolated_trains_each_task_alone_from_the_base"]),
    ("cmoe.py", "requires_grad=flag) for t, flag", "requires_grad=True) for t, flag",
     "Experts.load: every router trainable", METHOD),
    ("eval.py", 'return ".experts." in k', 'return ".experts.lora." in k',
     "checkpoint: routers not part of the continual state", METHOD),
    # --- the siblings (MoE-Adapters4CL, D-MoLE) and compare
    ("cmoe.py", "max(math.floor(vision_floor * B), int(round(B * share)))", "int(round(B * share))",
     "D-MoLE allocator: no vision floor", ["tests/test_dmole.py::test_allocator_gives_vision_its_floor"]),
    ("cmoe.py", "min(hi, max(lo, d[side] / mean))", "min(hi, max(lo, mean / d[side]))",
     "D-MoLE curriculum: the easier modality takes the larger steps",
     ["tests/test_dmole.py::test_curriculum_scales_by_mean_module_gradient"]),
    ("cmoe.py", "masked = err_BN.masked_fill(~(err_BN < tau_N[None])", "masked = err_BN.masked_fill(~(err_BN > tau_N[None])",
     "D-MoLE router: accepts the tasks over their threshold",
     ["tests/test_dmole.py::test_route_by_errors_takes_the_best_task_under_its_threshold"]),
    ("cmoe.py", "(best_B > tau), DDAS.REJECTED, i_B - 1)", "(best_B < tau), DDAS.REJECTED, i_B - 1)",
     "DDAS: the base answers what a task's autoencoder accepts",
     ["tests/test_moe_adapters.py::test_ddas_rule_on_made_up_errors"]),
    ("cmoe.py", "top = sorted(range(self.n_experts), key=lambda e: (-float(chosen_E[e]), e))",
     "top = sorted(range(self.n_experts), key=lambda e: (float(chosen_E[e]), e))",
     "activate-freeze: freezes the least chosen experts",
     ["tests/test_moe_adapters.py::test_activate_freeze_freezes_the_two_most_chosen_and_keeps_them_bit_identical"]),
    ("eval.py", "method=method_label(rd, m)", "method=m.get(\"method\")",
     "compare: cmoe with experts in the tower pooled with cmoe", ["tests/test_eval.py::test_compare"]),
]


def run(cmd, cwd, timeout=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def build_source(dest, worktree):
    """The tree to mutate: git HEAD plus the untracked files under tests/ (new tests not committed yet), or the
    working tree (tracked + untracked, git-ignored files excluded)."""
    os.makedirs(dest)
    if worktree:
        files = run(["git", "ls-files", "-co", "--exclude-standard"], REPO).stdout.split("\n")
    else:
        arc = os.path.join(dest, "..", "head.tar")
        with open(arc, "wb") as f:
            subprocess.run(["git", "-C", REPO, "archive", "HEAD"], stdout=f, check=True)
        with tarfile.open(arc) as t:
            t.extractall(dest, filter="data")
        files = run(["git", "ls-files", "-o", "--exclude-standard", "tests"], REPO).stdout.split("\n")
    for rel in filter(None, files):
        src = os.path.join(REPO, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def check_list(src):
    """Every original text occurs exactly once, and every replacement differs from it."""
    errors = []
    for i, (path, old, new, desc, _) in enumerate(MUTATIONS, 1):
        text = open(os.path.join(src, path)).read()
        n = text.count(old)
        if n != 1 or old == new:
            errors.append(f"mutation {i} ({desc}): original text found {n} times in {path}: {old!r}")
        elif old.count("\n") - new.count("\n") or sum(a != b for a, b in zip(old.split("\n"), new.split("\n"))) != 1:
            errors.append(f"mutation {i} ({desc}): changes more than one line")
    return errors


def pytest_cmd(tests, full, exclude=()):
    sel = ["tests"] if full else [t for t in dict.fromkeys(tests) if t.split("::")[0] not in exclude]
    if not sel:
        return None
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *sel,
            *[f"--deselect={d}" for d in (DESELECT if not full else [])], *[f"--ignore={e}" for e in exclude]]


def first_failure(out):
    m = re.search(r"^(FAILED|ERROR) (\S+)", out, re.M)
    return m.group(2) if m else ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", type=int, nargs="*", help="mutation numbers to run (1-based)")
    p.add_argument("--list", action="store_true", help="print the mutations and exit")
    p.add_argument("--worktree", action="store_true", help="mutate the working tree instead of git HEAD")
    p.add_argument("--full", action="store_true", help="run the whole suite per mutant")
    p.add_argument("--exclude", nargs="*", default=[], help="leave these test files out of every selection")
    p.add_argument("--timeout", type=float, default=300, help="seconds per mutant (a timeout counts as killed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary trees")
    args = p.parse_args(argv)
    if args.list:
        for i, (path, old, new, desc, tests) in enumerate(MUTATIONS, 1):
            print(f"{i:3d} {path:9s} {desc}\n      - {old.strip()!s}\n      + {new.strip()!s}\n      tests: {' '.join(tests)}")
        return 0
    tmp = tempfile.mkdtemp(prefix="mutate-")
    try:
        src = os.path.join(tmp, "src")
        build_source(src, args.worktree)
        errors = check_list(src)
        if errors:
            print("stale mutation list:\n  " + "\n  ".join(errors), file=sys.stderr)
            return 2
        chosen = args.only or range(1, len(MUTATIONS) + 1)
        union = sorted({t for i in chosen for t in MUTATIONS[i - 1][4]})
        t0 = time.time()
        cmd = pytest_cmd(union, args.full, args.exclude)
        base = run(cmd, src) if cmd else subprocess.CompletedProcess([], 0, "", "")
        print(f"baseline (unmutated tree, the union of the selections): "
              f"{'pass' if base.returncode == 0 else 'FAIL'} in {time.time() - t0:.0f}s", flush=True)
        if base.returncode != 0:
            print(base.stdout[-3000:] + base.stderr[-2000:], file=sys.stderr)
            return 2
        rows = []
        for i in chosen:
            path, old, new, desc, tests = MUTATIONS[i - 1]
            tree = os.path.join(tmp, f"m{i}")
            shutil.copytree(src, tree)
            f = os.path.join(tree, path)
            text = open(f).read()
            line = text[: text.index(old)].count("\n") + 1 + next(
                (k for k, (a, b) in enumerate(zip(old.split("\n"), new.split("\n"))) if a != b), 0)
            open(f, "w").write(text.replace(old, new))
            t1 = time.time()
            try:
                cmd = pytest_cmd(tests, args.full, args.exclude)
                r = run(cmd, tree, timeout=args.timeout) if cmd else None
                rc = r.returncode if r is not None else 5
                # rc 5: no test selected (everything excluded): nothing can notice the mutant
                # rc 4: pytest usage error, a fault of this script, not a kill
                status = ("survived" if rc in (0, 5) else "killed" if rc == 1 else "ERROR (usage)" if rc == 4
                          else f"killed (rc {rc})")
                by = first_failure(r.stdout) if r is not None and rc not in (0, 5) else ""
            except subprocess.TimeoutExpired:
                status, by = "killed (timeout)", ""
            dt = time.time() - t1
            rows.append((i, f"{path}:{line}", desc, status, by, dt))
            print(f"{i:3d} {path + ':' + str(line):13s} {status:17s} {dt:5.1f}s  {desc}" + (f"  [{by}]" if by else ""),
                  flush=True)
            if not args.keep:
                shutil.rmtree(tree, ignore_errors=True)
        killed = sum(r[3].startswith("killed") for r in rows)
        print(f"\nmutation score: {killed}/{len(rows)} killed = {100 * killed / len(rows):.0f}% "
              f"({time.time() - t0:.0f}s, {'HEAD' if not args.worktree else 'working tree'})")
        survivors = [r for r in rows if r[3] == "survived"]
        for r in survivors:
            print(f"  survived: {r[0]} {r[1]} {r[2]}")
        for r in rows:
            if "timeout" in r[3] or r[3].startswith("ERROR"):
                print(f"  {r[3]}: {r[0]} {r[1]} {r[2]}")
        return 1 if any(r[3].startswith("ERROR") for r in rows) else 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
