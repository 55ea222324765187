"""Does the frozen stage-0 tower already separate a task's answers? Probes on what the decoder receives.

    python bench/tower_probe.py RUN_OR_BASE [--task pattern] [--train-n 1000] [--test-n 400] [--hidden 256]

RUN_OR_BASE is a run folder (its metrics.json names the cached base) or a cached base folder (out/base/minicoin-*).
For each input a classifier (full-batch AdamW, standardized inputs, weight decay; linear, and with one hidden ReLU
layer of --hidden units) is fitted on the task's training images and scored on its test images, the answer its class:
- `pixels`: the preprocessed image itself (what a probe gets without any tower),
- `tower, every patch`: the projected patch features the decoder reads ([P, D] flattened; the frozen tower),
- `tower, mean of patches`: their mean (what survives pooling).
Where the frozen tower's features separate the classes, the decoder's experts can learn the task from them, and
experts in the tower can speed learning up rather than make it possible."""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import eval as ev  # noqa: E402
from data import read_json  # noqa: E402


def probe(x_train_ND, y_train_N, x_test_ND, y_test_N, n_classes, hidden=0, steps=500, lr=1e-2, wd=1e-2):
    """Test accuracy (%) of a classifier fitted on standardized x_train (statistics of the training set): linear, or
    with one ReLU layer of `hidden` units."""
    mu, sd = x_train_ND.mean(0), x_train_ND.std(0).clamp_min(1e-6)
    x_train_ND, x_test_ND = (x_train_ND - mu) / sd, (x_test_ND - mu) / sd
    D = x_train_ND.shape[1]
    w = (torch.nn.Sequential(torch.nn.Linear(D, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_classes)) if hidden
         else torch.nn.Linear(D, n_classes))
    opt = torch.optim.AdamW(w.parameters(), lr=lr, weight_decay=wd)
    for _ in range(steps):
        loss = F.cross_entropy(w(x_train_ND), y_train_N)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return 100.0 * float((w(x_test_ND).argmax(-1) == y_test_N).float().mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--task", default="pattern")
    p.add_argument("--train-n", type=int, default=1000)
    p.add_argument("--test-n", type=int, default=400)
    p.add_argument("--seed", type=int, default=0, help="the data draws' seed (the run's own, for a run folder)")
    p.add_argument("--hidden", type=int, default=256, help="the second probe's ReLU layer")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    folder, seed = a.folder, a.seed
    if not os.path.isfile(os.path.join(folder, "meta.json")):  # a run folder: its base and its seed
        metrics = read_json(os.path.join(folder, "metrics.json"))
        folder, seed = metrics["base"]["tiny"], read_json(os.path.join(a.folder, "config.json"))["seed"]
    model = ev.load_base(folder).eval().requires_grad_(False)
    train, test = data.minicoin(a.task, "train", a.train_n, seed), data.minicoin(a.task, "test", a.test_n, seed)
    classes = sorted({ex.turns[0][1] for ex in train})
    y = {s: torch.tensor([classes.index(ex.turns[0][1]) for ex in exs]) for s, exs in (("train", train), ("test", test))}
    inputs = {}
    with torch.no_grad():
        for s, exs in (("train", train), ("test", test)):
            px = ev.pixels(model, exs)
            f = torch.cat([model.image_features(px[i:i + 256], use_experts=False) for i in range(0, len(px), 256)])
            inputs.setdefault("pixels", {})[s] = px.flatten(1)
            inputs.setdefault("tower, every patch", {})[s] = f.flatten(1)
            inputs.setdefault("tower, mean of patches", {})[s] = f.mean(1)
    counts = {c: int((y["train"] == k).sum()) for k, c in enumerate(classes)}
    top = max(int((y["test"] == k).sum()) for k in range(len(classes)))
    print(f"{a.task}: {len(classes)} classes (train counts {counts}); base {folder}; train {a.train_n}, test "
          f"{a.test_n}; the test set's largest class {100.0 * top / len(test):.1f} %")
    print(f"  {'input':24s} {'dims':>6s}  test accuracy: linear / one hidden layer of {a.hidden}")
    for name, xs in inputs.items():
        accs = []
        for hidden in (0, a.hidden):
            torch.manual_seed(0)
            accs.append(probe(xs["train"], y["train"], xs["test"], y["test"], len(classes), hidden))
        print(f"  {name:24s} {xs['train'].shape[1]:6d}  {accs[0]:5.1f} / {accs[1]:5.1f} %")


if __name__ == "__main__":
    main()
