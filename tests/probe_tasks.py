"""Which MiniCoIN variants can the tiny base learn? train.py with one task or the stage-0b mix changed, nothing else
(the default BPE; a changed mix needs its own --base-dir, since the stage-0 cache key does not see it).

    python tests/probe_tasks.py --method lora --tasks sqa1 --locator oracle --unseen none --out out/probe-sqa1
    python tests/probe_tasks.py --instruct-mc --base-dir out/base-mc --method lora --tasks sqa1,sqa \
        --locator oracle --unseen none --out out/probe-mc

sqa1: sqa's options and suffix about the only object in the image (large, as in cls): the answer is the letter of a
colour or shape the base reads reliably, with no search among objects.
--instruct-mc: MiniCoIN-Instruct also asks "What color is the text?" with lettered options (3 draws in 29): the
base has then matched an answer it can read to its option letter, as LLaVA-665K's multiple-choice sets (A-OKVQA)
teach LLaVA before ScienceQA. Its suffix is not sqa's.
Every other flag is train.py's.
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import train  # noqa: E402

MC_SUFFIX = "Reply with the letter of the right option."


def lettered(rng, right, pool, question, suffix):
    """(prompt, letter): the right answer among 1-3 others from pool, in a random order, one option per line."""
    opts = [right] + list(rng.choice([p for p in pool if p != right], int(rng.integers(1, 4)), replace=False))
    opts = [opts[i] for i in rng.permutation(len(opts))]
    options = "\n".join(f"{'ABCD'[i]}. {p}" for i, p in enumerate(opts))
    return f"{question}\n{options}\n{suffix}", "ABCD"[opts.index(right)]


def sample(task, rng, task_sample=data._task_sample):
    if task != "sqa1":
        return task_sample(task, rng)
    scene = data._single_scene(rng)
    o = scene["objs"][0]
    q, right, pool = (("What color is the object?", o["color"], list(data.COLORS)) if rng.random() < 0.5 else
                      ("Which shape is the object?", o["shape"], list(data.SHAPES)))
    prompt, letter = lettered(rng, right, pool, q, data.SUFFIX_LETTER)
    return scene, "<image>\n" + prompt, letter


def make_instruct(rng, make=data._make_instruct):
    if rng.random() < 3 / 29:
        scene = data._text_scene(rng)
        return scene, [lettered(rng, scene["text"]["color"], list(data.COLORS), "What color is the text?", MC_SUFFIX)]
    return make(rng)


if __name__ == "__main__":
    argv = sys.argv[1:]
    mc = "--instruct-mc" in argv
    argv = [a for a in argv if a != "--instruct-mc"]
    if mc and "--base-dir" not in argv:
        sys.exit("--instruct-mc changes stage 0b: give it its own --base-dir")
    # the default BPE, trained (if missing) on the unchanged tasks' text, then kept whatever the tasks become
    tok_path = data.minicoin_tokenizer_path(train.parse_args(argv).base_dir)
    data.build_minicoin_tokenizer(tok_path)
    data.minicoin_tokenizer_path = lambda folder, vocab_size=data.MINICOIN_VOCAB: tok_path
    data._task_sample = sample
    data.TASK_METRIC["sqa1"] = "letter"
    data.MINICOIN_TASKS += ("sqa1",)
    if mc:
        data._make_instruct = make_instruct
    train.main(argv)
