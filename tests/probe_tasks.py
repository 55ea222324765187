"""Which MiniCoIN variants can the tiny base learn? train.py with one task changed, nothing else (the default BPE):

    python tests/probe_tasks.py --no-instruct-mc --no-attn-experts --method lora --tasks sqa1 --locator oracle \
        --unseen none --out out/probe-sqa1
    python tests/probe_tasks.py --no-attn-experts --method lora --tasks sqa1,sqa --locator oracle --unseen none \
        --out out/probe-mc

    python tests/probe_tasks.py --search-kinds --instruct-steps 1500 --instruct-n 24000 --base-dir out/base-search \
        --out out/probe-search

    python tests/probe_tasks.py --method joint --tasks sqa,gqa_shape --unseen none --out out/probe-joint-shape
    python tests/probe_tasks.py --no-image-experts --method joint --tasks sqa --unseen none --out out/probe-noimg
    python tests/probe_tasks.py --task-routers --method joint --locator oracle --unseen none --out out/probe-routers

sqa1: sqa's options and suffix about the only object in the image (large, as in cls), asking its colour or its shape:
MiniCoIN v4's sqa plus the shape half (v3's sqa asked about one of 2-4 objects; the README's sqa1 rows are v3's).
gqa_shape: gqa asking only the large object's shape (no colour question beside sqa's; README's joint rows).
--no-image-experts: every router's weights are zeroed on image-token positions, so the experts change only the text
tokens (which of a shared pool's rewrites happen where the image sits, before the question; README's joint rows).
--task-routers (with --method joint --locator oracle): joint's shared pool gets one router per task, trained on each
sample's own task and used with the true task at test time (do per-task routers alone avoid joint's interference?).
--search-kinds: stage 0b also holds four search-style kinds (SEARCH_KINDS, 12 of 38 draws): find an object by its
shape or colour and name it, name what is at a position, count the objects of a colour; none is a task's prompt (the
nearest pairing: count_color beside count, which counts every object; README). Every other flag is train.py's
(--no-instruct-mc: stage 0b without the lettered multiple choice of data.INSTRUCT_MC, as the README's first sqa1
row). A changed mix needs its own --base-dir: the cache key does not know about it.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402


def sample(task, rng, task_sample=data._task_sample):
    if task == "gqa_shape":
        scene = data._pair_scene(rng)
        o = max(scene["objs"], key=lambda o: o["s"])
        return scene, f"<image>\nWhat shape is the large object?\n{data.SUFFIX_SHORT}", o["shape"]
    if task != "sqa1":
        return task_sample(task, rng)
    scene = data._single_scene(rng)
    o = scene["objs"][0]
    q, right, pool = (("What color is the object?", o["color"], list(data.COLORS)) if rng.random() < 0.5 else
                      ("Which shape is the object?", o["shape"], list(data.SHAPES)))
    prompt, letter = data.lettered(rng, right, pool, q, data.SUFFIX_LETTER)
    return scene, "<image>\n" + prompt, letter


SEARCH_KINDS = ("about_shape", "about_color", "at", "count_color")


def search_turn(kind, rng, scene, instruct_turn=data._instruct_turn):
    """data._instruct_turn plus SEARCH_KINDS (scene: 2-4 distinct objects; count_color: 2-7, colours repeat)."""
    if kind not in SEARCH_KINDS:
        return instruct_turn(kind, rng, scene)
    objs = scene["objs"]
    if kind in ("about_shape", "about_color"):
        o = objs[rng.integers(len(objs))]
        q = f"Tell me about the {o['shape']}." if kind == "about_shape" else f"Tell me about the {o['color']} object."
        return q, f"{o['color']} {o['shape']}"
    if kind == "at":
        cell = int(rng.integers(9))
        hit = [o for o in objs if o["cell"] == cell]
        return f"What is at the {data.POSITIONS[cell]}?", f"{hit[0]['color']} {hit[0]['shape']}" if hit else "nothing"
    c = objs[rng.integers(len(objs))]["color"]  # count_color
    return f"How many {c} objects are there?", str(sum(o["color"] == c for o in objs))


def search_scene(kind, rng):
    return data._obj_scene(rng, int(rng.integers(2, 8)) if kind == "count_color" else int(rng.integers(2, 5)),
                           unique=kind != "count_color")


def search_instruct(rng, mc=False, make_instruct=data._make_instruct):
    if rng.random() < 12 / 38:
        kind = SEARCH_KINDS[rng.integers(len(SEARCH_KINDS))]
        scene = search_scene(kind, rng)
        return scene, [search_turn(kind, rng, scene)]
    return make_instruct(rng, mc)


def no_image_experts():
    """Patch cmoe so that no expert acts on an image token: LLaVA.splice notes where each row's image slots are, and
    route zeroes their weights (the prefill of generation included; a cached decode step has no image slot). The
    balance loss still sees the router's probabilities there, so its value changes; its weight is 0.01."""
    import cmoe
    splice, route, at = cmoe.LLaVA.splice, cmoe.route, {}

    def splice_noting(self, input_ids_BT, images, labels_BT=None):
        out = splice(self, input_ids_BT, images, labels_BT)
        P = out[0].shape[1] - input_ids_BT.shape[1] + 1  # S = T - 1 + P
        is_ph_BT = input_ids_BT == cmoe.IMAGE_TOKEN_ID
        first_B1 = is_ph_BT.int().argmax(1, keepdim=True)
        rel_BS = torch.arange(out[0].shape[1], device=input_ids_BT.device)[None] - first_B1
        at["img_BS"] = (rel_BS >= 0) & (rel_BS < P) & is_ph_BT.any(1, keepdim=True)
        return out

    def route_off_image(x_BTD, *args):
        w_BTE, probs_BTE = route(x_BTD, *args)
        img_BS = at.get("img_BS")
        if img_BS is not None and img_BS.shape == w_BTE.shape[:2]:
            w_BTE = w_BTE.masked_fill(img_BS[..., None].to(w_BTE.device), 0.0)
        return w_BTE, probs_BTE

    cmoe.LLaVA.splice, cmoe.route = splice_noting, route_off_image


def task_routers(n_tasks):
    """Patch train.py's joint so that its shared pool has one router per task: each sample trains its own task's
    router (the dataset's task ids), and each test sample uses its true task's router (the oracle)."""
    import eval as ev
    grow, train_stage, predict = train.grow, train.train_stage, ev.predict

    def grow_routers(model, ds, cfg, t, log):
        out = grow(model, ds, cfg, t, log)
        for f in model.llm.expert_ffns():
            while len(f.routers) < n_tasks:
                f.add_router()
        return out

    def train_per_sample(model, ds, cfg, steps, lr, t, tag, log, task_ids_fixed=None, **kw):
        return train_stage(model, ds, cfg, steps, lr, t, tag, log, task_ids_fixed=None, **kw)

    def predict_oracle(model, locator, exs, images, tok, template, cfg, true_task, seen, routed, feats=None):
        if true_task is not None:
            seen, routed = n_tasks, True
        return predict(model, locator, exs, images, tok, template, cfg, true_task, seen, routed, feats)

    train.grow, train.train_stage, ev.predict = grow_routers, train_per_sample, predict_oracle


if __name__ == "__main__":
    own = ("--search-kinds", "--no-image-experts", "--task-routers")
    search, no_image, routers = (flag in sys.argv[1:] for flag in own)
    argv = [a for a in sys.argv[1:] if a not in own]
    if no_image:
        no_image_experts()
    # the default BPE, trained (if missing) on the unchanged tasks' text, then kept whatever the tasks become
    cfg = train.parse_args(argv)
    tok_path = data.minicoin_tokenizer_path(cfg.base_dir)
    data.build_minicoin_tokenizer(tok_path)
    data.minicoin_tokenizer_path = lambda folder, vocab_size=data.MINICOIN_VOCAB: tok_path
    if not cfg.tasks:
        argv += ["--tasks", ",".join(data.MINICOIN_TASKS)]  # the default sequence: sqa1 only when asked for
    if routers:
        if cfg.method != "joint" or cfg.locator != "oracle":
            raise SystemExit("--task-routers patches joint's pool: use it with --method joint --locator oracle")
        task_routers(len(cfg.tasks.split(",")) if cfg.tasks else len(data.MINICOIN_TASKS))
    data._task_sample = sample
    if search:  # after the BPE: its corpus is drawn from the unchanged mix
        data._instruct_turn, data._make_instruct = search_turn, search_instruct
    data.TASK_METRIC["sqa1"], data.TASK_METRIC["gqa_shape"] = "letter", data.TASK_METRIC["gqa"]
    data.MINICOIN_TASKS += ("sqa1", "gqa_shape")
    train.main(argv)
