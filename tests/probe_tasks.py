"""Which MiniCoIN variants can the tiny base learn? train.py with one task changed, nothing else (the default BPE):

    python tests/probe_tasks.py --no-instruct-mc --no-attn-experts --method lora --tasks sqa1 --locator oracle \
        --unseen none --out out/probe-sqa1
    python tests/probe_tasks.py --no-attn-experts --method lora --tasks sqa1,sqa --locator oracle --unseen none \
        --out out/probe-mc

sqa1: sqa's options and suffix about the only object in the image (large, as in cls): the answer is the letter of a
colour or shape the base reads reliably, with no search among objects. Every flag is train.py's (--no-instruct-mc:
stage 0b without the lettered multiple choice of data.INSTRUCT_MC, as the README's first sqa1 row).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import train  # noqa: E402


def sample(task, rng, task_sample=data._task_sample):
    if task != "sqa1":
        return task_sample(task, rng)
    scene = data._single_scene(rng)
    o = scene["objs"][0]
    q, right, pool = (("What color is the object?", o["color"], list(data.COLORS)) if rng.random() < 0.5 else
                      ("Which shape is the object?", o["shape"], list(data.SHAPES)))
    prompt, letter = data.lettered(rng, right, pool, q, data.SUFFIX_LETTER)
    return scene, "<image>\n" + prompt, letter


if __name__ == "__main__":
    argv = sys.argv[1:]
    # the default BPE, trained (if missing) on the unchanged tasks' text, then kept whatever the tasks become
    tok_path = data.minicoin_tokenizer_path(train.parse_args(argv).base_dir)
    data.build_minicoin_tokenizer(tok_path)
    data.minicoin_tokenizer_path = lambda folder, vocab_size=data.MINICOIN_VOCAB: tok_path
    data._task_sample = sample
    data.TASK_METRIC["sqa1"] = "letter"
    data.MINICOIN_TASKS += ("sqa1",)
    train.main(argv)
