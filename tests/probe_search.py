"""Can a model learn to *search*: find an object by one property and answer with another? (a script, not a test)

    python tests/probe_search.py recall --tokens 1        # text only: each object is one token (colour+shape)
    python tests/probe_search.py recall --tokens 2        # text only: colour and shape are two neighbouring tokens
    python tests/probe_search.py recall --tokens 2 --text-steps 4000   # ... after induction pretraining
    python tests/probe_search.py recall --tokens 2 --layers 8          # ... a deeper decoder (--dim, --heads: wider)
    python tests/probe_search.py image out/base/minicoin-base-<key> --kind color_of_shape --steps 600
    python tests/probe_search.py tokens out/base/minicoin-base-<key>   # what one image token says of its object
    python tests/probe_search.py heads out/base/minicoin-instruct-<key> fresh   # does a base hold induction heads?
    python tests/probe_search.py skills out/base/minicoin-instruct-<key>   # what a base answers of stage 0b's kinds

recall: a fresh tiny Llama (the MiniCoIN decoder's size) learns associative recall: 2-4 objects (colour, shape) in
a row of filler tokens, then a query shape; the answer is that object's colour. --tokens 1 gives each object one
token, as a merged image token holds one scene cell; --tokens 2 puts the colour token before the shape token, so the
answer needs a circuit that matches the shape and copies the token before it (an induction head); --text-steps N
first trains the decoder N steps on data.induction_batch over 40 token ids (train.py --text-steps: over all of them).
image: a cached stage-0a base (LLM trained; tower and projector frozen: image features computed once) learns one question kind about
fresh MiniCoIN scenes (batch 32, one new scene per sample) and is scored on 200 test scenes.
tokens: a linear probe (softmax regression on standardised features, 3,000 train / 1,000 test scenes of 2-4 objects)
reads the colour, the shape and the scene cell of the object under each image token (the cell also with one hidden
layer), from the tower's patch tokens and from the projector's (what the LLM sees; one per scene cell with
--patch-merge 2): how much of an object, and of where it is, one token holds.
heads: the induction loss (data.induction_batch over the decoder's whole vocabulary) of each base's decoder, then
after 25-200 steps of training on it: a decoder that once formed induction heads (train.py --text-steps) and then
learned captions predicts caption tokens instead, but gets the copying back within ~100 steps; one that never
formed them ("fresh": an untrained decoder of the MiniCoIN size) stays near chance, ln(768) = 6.6, for 200 steps.
skills: greedy answers of a cached stage-0b base to its own question kinds on 150 test scenes each (exact match):
existence ("Is there a red circle?", a conjunction, yes half the time), position, text colour and first letter,
full descriptions, and tests/probe_tasks.py's search-style kinds (find an object by its shape or colour and name it;
what is at a position, "nothing" for 5-7 of the 9; count the objects of a colour). Search: can the base find an
object by what it is?
The others print accuracy, heads the loss."""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import cmoe  # noqa: E402
import data  # noqa: E402
import eval as ev  # noqa: E402
import train  # noqa: E402
import probe_tasks  # noqa: E402  (tests/, beside this script)
from vision import preprocess  # noqa: E402

T, Q = 30, 27  # recall: sequence length, query marker position (the query shape follows it; its logits answer)


def recall_batch(B, tokens, g, n=4):
    """Colours 0-4, shapes 5-9, filler 20-39, query marker 11, one-token objects 40 + 5 * colour + shape."""
    x = torch.randint(20, 40, (B, T), generator=g)
    c = torch.rand(B, 5, generator=g).argsort(1)[:, :n]
    s = torch.rand(B, 5, generator=g).argsort(1)[:, :n]
    slot = torch.rand(B, 9, generator=g).argsort(1)[:, :n] * 3  # objects at 0, 3, ..., 24: never next to each other
    if tokens == 1:
        x.scatter_(1, slot, 40 + 5 * c + s)
    else:
        x.scatter_(1, slot, c)
        x.scatter_(1, slot + 1, s + 5)
    q = torch.randint(n, (B, 1), generator=g)
    x[:, Q], x[:, Q + 1] = 11, s.gather(1, q)[:, 0] + 5
    return x, c.gather(1, q)[:, 0]


def induction_loss_of(llm, ids, labels):
    """Next-token loss on data.induction_batch's labelled repeat (train.pretrain_text's loss)."""
    return F.cross_entropy(llm(ids)[0][:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=cmoe.IGNORE_INDEX)


def recall(args):
    torch.manual_seed(0)
    model = cmoe.Llama(cmoe.LlamaConfig(vocab_size=72, n_layers=args.layers, dim=args.dim, n_heads=args.heads,
                                        n_kv_heads=args.heads // 2, ffn_dim=3 * args.dim))  # default: MiniCoIN's
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    test = recall_batch(512, args.tokens, torch.Generator().manual_seed(2))
    for step in range(args.text_steps):  # train.pretrain_text's data and schedule: induction heads first
        ids, labels = data.induction_batch(g, 32, 40)  # 40 of the 72 ids (the README's figures)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 20)
        loss = induction_loss_of(model, ids, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 500 == 0:
            print(f"text step {step + 1}: induction loss {loss.item():.3f}", flush=True)
    for step in range(args.steps + 1):
        if step % (args.steps // 6) == 0:
            with torch.no_grad():
                acc = (model(test[0])[0][:, Q + 1].argmax(-1) == test[1]).float().mean()
            print(f"recall, {args.tokens} token(s) per object, step {step}: accuracy {100 * acc:.1f} % "
                  f"(chance 25 %)", flush=True)
        if step < args.steps:
            x, y = recall_batch(32, args.tokens, g)
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, (step + 1) / 20)
            loss = F.cross_entropy(model(x)[0][:, Q + 1], y)
            opt.zero_grad()
            loss.backward()
            opt.step()


def image_question(kind, rng):
    scene = data._obj_scene(rng, int(rng.integers(2, 5)), unique=True)
    o = scene["objs"][rng.integers(len(scene["objs"]))]
    q, a = {"color_of_shape": (f"Which color does the {o['shape']} have?", o["color"]),
            "shape_of_color": (f"Which shape does the {o['color']} object have?", o["shape"]),
            "where_shape": (f"Where is the {o['shape']}?", data.POSITIONS[o["cell"]])}[kind]
    return data.Example(data.draw_scene(scene), [(f"<image>\n{q}", a)], kind)


def image(args):
    model = ev.load_base(args.base)
    cfg = train.TrainConfig(base_dir=os.path.dirname(os.path.abspath(args.base)))
    tok, template = data.tokenizer(cfg)
    train_set = [image_question(args.kind, np.random.default_rng([1, i])) for i in range(32 * args.steps)]
    test_set = [image_question(args.kind, np.random.default_rng([2, i])) for i in range(200)]
    model.requires_grad_(False).llm.requires_grad_(True)
    ds = train.encode(model, train_set, tok, template, cfg, 0)
    train.train_stage(model, ds, cfg, args.steps, cfg.base_lr, 0, args.kind, print, experts=False)
    model.eval()
    prompts = [data.encode_prompt(tok, ex, template) for ex in test_set]
    with torch.no_grad():
        out = model.generate(prompts, torch.stack([preprocess(ex.image, data.IMAGE_SIZE) for ex in test_set]),
                             max_new_tokens=8, stop_ids=data.stop_ids(tok, template), use_experts=False)
    acc = np.mean([tok.decode(o).strip() == ex.answer for o, ex in zip(out, test_set)])
    print(f"{args.base}: {args.kind} after {args.steps} steps: {100 * acc:.1f} % of 200 test scenes "
          f"(image tokens: {ds['images'].shape[1]})")


SKILLS = ("exists", "where", "text_color", "first_letter", "describe") + probe_tasks.SEARCH_KINDS


def skill_examples(kind, n=150):
    """n examples of one stage-0b kind on test scenes (split as data.minicoin_sample splits them)."""
    out, i = [], 0
    while len(out) < n:
        rng, i = np.random.default_rng([7, i]), i + 1
        scene = (data._text_scene(rng) if kind in ("text_color", "first_letter") else
                 probe_tasks.search_scene(kind, rng))
        if data.is_test_scene(data._scene_key(scene)):
            q, a = probe_tasks.search_turn(kind, rng, scene)
            out.append(data.Example(data.draw_scene(scene), [(f"<image>\n{q}", a)], kind))
    return out


def skills(args):
    model = ev.load_base(args.base).eval()
    cfg = train.TrainConfig(base_dir=os.path.dirname(os.path.abspath(args.base)))
    tok, template = data.tokenizer(cfg)
    for kind in SKILLS:
        exs = skill_examples(kind)
        with torch.no_grad():
            out = model.generate([data.encode_prompt(tok, ex, template) for ex in exs], ev.image_features(model, exs, cfg),
                                 max_new_tokens=data.MAX_LEN, stop_ids=data.stop_ids(tok, template), use_experts=False)
        acc = np.mean([tok.decode(o).strip() == ex.answer for o, ex in zip(out, exs)])
        print(f"{kind}: {100 * acc:.1f} % of {len(exs)} test scenes", flush=True)


def token_labels(scenes, side):
    """[N, side*side] colour, shape and scene cell (0-8) of the object under each token's square; no object: the
    class count (5, 5, 9)."""
    px = data.IMAGE_SIZE // side
    col = torch.full((len(scenes), side * side), len(data.COLORS))
    shp = torch.full((len(scenes), side * side), len(data.SHAPES))
    cell = torch.full((len(scenes), side * side), 9)
    for n, scene in enumerate(scenes):
        for o in scene["objs"]:
            for r in range(o["y"] // px, (o["y"] + o["s"] - 1) // px + 1):
                for c in range(o["x"] // px, (o["x"] + o["s"] - 1) // px + 1):
                    col[n, r * side + c] = list(data.COLORS).index(o["color"])
                    shp[n, r * side + c] = data.SHAPES.index(o["shape"])
                    cell[n, r * side + c] = o["cell"]
    return col, shp, cell


def linear_probe(x_tr, y_tr, x_te, y_te, none, steps=300, hidden=0):
    """Softmax regression on standardised token features (hidden > 0: one GELU layer of that width first); accuracy %
    on object tokens and on empty ones (class none)."""
    x_tr, x_te, y_tr, y_te = x_tr.flatten(0, 1), x_te.flatten(0, 1), y_tr.flatten(), y_te.flatten()
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    lin = (torch.nn.Sequential(torch.nn.Linear(x_tr.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, none + 1))
           if hidden else torch.nn.Linear(x_tr.shape[1], none + 1))
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2 if not hidden else 3e-3)
    for _ in range(steps):
        loss = F.cross_entropy(lin(x_tr), y_tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        hit = lin(x_te).argmax(-1) == y_te
    empty = y_te == none
    return 100 * hit[~empty].float().mean().item(), 100 * hit[empty].float().mean().item()


def tokens(args):
    model = ev.load_base(args.base).eval()
    sets = []
    for stream, n in ((1, 3000), (2, 1000)):
        scenes = [data._obj_scene(rng, int(rng.integers(2, 5)), unique=True)
                  for rng in (np.random.default_rng([3, stream, i]) for i in range(n))]
        px = torch.stack([preprocess(data.draw_scene(s), data.IMAGE_SIZE) for s in scenes])
        with torch.no_grad():
            patches = torch.cat([model.vision(px[i:i + 500]) for i in range(0, n, 500)])
            seen = torch.cat([model.projector(patches[i:i + 500]) for i in range(0, n, 500)])
        sets.append((scenes, patches, seen))
    (tr, p_tr, s_tr), (te, p_te, s_te) = sets
    for name, x_tr, x_te in (("tower", p_tr, p_te), ("projector", s_tr, s_te)):
        side = int(x_tr.shape[1] ** 0.5)
        (c_tr, h_tr, cell_tr), (c_te, h_te, cell_te) = token_labels(tr, side), token_labels(te, side)
        c_obj, c_empty = linear_probe(x_tr, c_tr, x_te, c_te, len(data.COLORS))
        h_obj, h_empty = linear_probe(x_tr, h_tr, x_te, h_te, len(data.SHAPES))
        # where the object is: not needed by captions (read cell by cell, RoPE orders them), needed by "where" and ground
        p_obj, _ = linear_probe(x_tr, cell_tr, x_te, cell_te, 9)
        p_mlp, _ = linear_probe(x_tr, cell_tr, x_te, cell_te, 9, steps=600, hidden=256)
        print(f"{args.base}: {name} tokens ({side}x{side}): the object's colour {c_obj:.1f} %, its shape {h_obj:.1f} % "
              f"of tokens on an object (chance 20 %); 'no object' {c_empty:.1f} / {h_empty:.1f} % of empty tokens; "
              f"its cell {p_obj:.1f} % (one hidden layer: {p_mlp:.1f} %; chance 11 %)", flush=True)


def induction_loss(llm, n=8):
    gen = torch.Generator().manual_seed(123)  # the same held-out batches for every base and every check
    total = 0.0
    with torch.no_grad():
        for _ in range(n):
            ids, labels = data.induction_batch(gen, 32, llm.cfg.vocab_size)
            total += induction_loss_of(llm, ids, labels).item()
    return total / n


def heads(args):
    for base in args.bases:
        torch.manual_seed(0)
        llm = cmoe.Llama(cmoe.LlamaConfig.tiny()) if base == "fresh" else ev.load_base(base).llm  # tiny: MiniCoIN's
        opt = torch.optim.AdamW(llm.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.0)  # train.py's base_lr
        g, seen = torch.Generator().manual_seed(5), []
        for step in range(max(args.checks) + 1):
            if step in args.checks:
                seen.append(f"step {step}: {induction_loss(llm.eval()):.2f}")
            if step == max(args.checks):
                break
            ids, labels = data.induction_batch(g, 32, llm.cfg.vocab_size)
            llm.train()
            loss = induction_loss_of(llm, ids, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"{base}: induction loss " + " | ".join(seen), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    r = sub.add_parser("recall")
    r.add_argument("--tokens", type=int, choices=(1, 2), default=1)
    r.add_argument("--steps", type=int, default=1200)
    r.add_argument("--lr", type=float, default=2e-3)
    r.add_argument("--text-steps", type=int, default=0, help="induction pretraining first (as --text-steps of train.py)")
    r.add_argument("--layers", type=int, default=4, help="decoder size (default: the MiniCoIN decoder's)")
    r.add_argument("--dim", type=int, default=128)
    r.add_argument("--heads", type=int, default=4)
    i = sub.add_parser("image")
    i.add_argument("base", help="a cached stage-0a folder: out/base/minicoin-base-<key>")
    i.add_argument("--kind", choices=("color_of_shape", "shape_of_color", "where_shape"), default="color_of_shape")
    i.add_argument("--steps", type=int, default=600)
    t = sub.add_parser("tokens")
    t.add_argument("base", help="a cached stage-0 folder: out/base/minicoin-base-<key> (or -instruct-)")
    h = sub.add_parser("heads")
    h.add_argument("bases", nargs="+", help="cached stage-0 folders; 'fresh': an untrained MiniCoIN-size decoder")
    h.add_argument("--checks", type=int, nargs="+", default=[0, 25, 50, 100, 200], help="steps to measure at")
    k = sub.add_parser("skills")
    k.add_argument("base", help="a cached stage-0b folder: out/base/minicoin-instruct-<key>")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    {"recall": recall, "image": image, "tokens": tokens, "heads": heads, "skills": skills}[a.mode](a)
