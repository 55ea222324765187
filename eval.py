"""Evaluation for cmoe runs (CoIN protocol): continual metrics, predictions I/O, report and method comparison.

    python eval.py out/minicoin-cmoe                      # re-evaluate (or rescore saved predictions), write report
    python eval.py --compare out/minicoin-* [--out DIR]   # one table + bar chart over several runs

acc[j][i] (percent) = score on task i after training task j; None where not evaluated. Figures use Pillow only.
"""
import argparse
import glob
import json
import math
import os
import sys
from collections import defaultdict

from PIL import Image, ImageDraw, ImageFont

from vision import atomic_path, read_json

# -----------------------------------------------------------------------------
# metrics

def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None

def continual_metrics(acc, joint=None):
    """acc[j][i] -> dict(last, avg, bwt, fwt) over the rows trained so far (all-None trailing rows = not trained yet).
    joint (default: a single row) = multitask upper bound: Last = Avg = mean of the row, BWT = FWT = None."""
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

def locator_accuracy(confusion):
    """confusion[true][chosen] counts -> percent of samples routed to their own task (None when empty)."""
    if not confusion:
        return None
    n = len(confusion)
    for t, row in enumerate(confusion):
        if len(row) != n:
            raise ValueError(f"locator confusion row {t} has {len(row)} entries, expected {n} (square matrix)")
    total = sum(sum(r) for r in confusion)
    return 100.0 * sum(confusion[t][t] for t in range(n)) / total if total else None

# -----------------------------------------------------------------------------
# files

def _atomic_write(path, text):
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)

def _save_png(img, path):
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")

def write_predictions(path, rows):
    _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

def read_predictions(path):
    rows = read_json(path)
    for n, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: row {n}: expected a JSON object, got {type(r).__name__}")
    return rows

def rescore(rows, metric, score=None):
    """Per-row scores in [0,1] with data.score (the VQA answer list when present, else the single answer)."""
    if score is None:
        try:
            from data import score  # lazy: data.py is only needed when there is something to rescore
        except ImportError as e:
            raise ImportError(f"rescoring predictions needs data.score from data.py ({e})") from None
    out = []
    for k, r in enumerate(rows):
        if "prediction" not in r or ("answer" not in r and not r.get("answers")):
            raise ValueError(f"prediction record {k} (index {r.get('index')}) needs 'prediction' and 'answer'/'answers'")
        out.append(float(score(metric, r["prediction"], r.get("answers") or r["answer"])))
    return out

def task_accuracy(rows, metric, score=None):
    """Percent for one task's prediction rows: a CoIN metric aggregates as CoIN's script does (data.coin_accuracy,
    e.g. ScienceQA divides by every question); otherwise the mean of the per-row scores."""
    if score is None:
        import data  # lazy, as in rescore
        if metric in data.COIN_METRICS:
            return data.coin_accuracy(metric, rows)
    return 100.0 * _mean(rescore(rows, metric, score))

def load_run(run_dir):
    """metrics.json of a run folder with at least one finished task; clear errors otherwise."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise ValueError(f"no finished task in {run_dir} (no metrics.json)")
    m = read_json(path)
    if not m.get("finished_tasks"):
        raise ValueError(f"no finished task in {run_dir}")
    for key in ("tasks", "acc"):
        if key not in m:
            raise ValueError(f"{path}: missing field '{key}'")
    return m

def recompute(run_dir, score=None):
    """metrics.json with acc cells and the locator confusion rebuilt from predictions/<task>.jsonl where present."""
    m = load_run(run_dir)
    tasks, T = m["tasks"], len(m["tasks"])
    acc = [list(r) for r in m["acc"]]
    final = m["finished_tasks"] - 1 if m.get("method") != "joint" else 0
    conf, located_any = [[0] * T for _ in range(T)], False
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
                if not (0 <= t < T and 0 <= c < T):
                    raise ValueError(f"{path}: record {k} has true_task {t} / located {c} outside 0..{T - 1}")
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
    if located_any and m.get("method", "cmoe") == "cmoe":  # baselines share one router: nothing to locate
        m["locator"] = dict(m.get("locator") or {}, confusion=conf)
    return m

def reevaluate(run_dir, **kw):
    """Regenerate predictions/*.jsonl from the saved task checkpoints (then recompute() + write_report())."""
    import train  # lazy: the model stack is only needed to regenerate, not to score or draw
    return train.reevaluate(run_dir, **kw)

# -----------------------------------------------------------------------------
# figures (Pillow only)

_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
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
    _save_png(img, path)
    return img

def _nice_step(span, n=5):
    raw = span / n
    p = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    return next(k * p for k in (1, 2, 5, 10) if k * p >= raw)

def draw_bars(path, groups, series, vals, title, xlabel, ylabel, ymax=None, annotate=False, integer=False,
              stacked=False):
    """Bar chart: vals[g][s] for group g on x, one colour per series (legend on top); grouped or stacked."""
    f_lab, f_title, f_small = _font(14), _font(19), _font(12)
    tops = [sum(v or 0 for v in r) for r in vals] if stacked else [v for r in vals for v in r if v is not None]
    top = max(tops + [0])
    ymax = ymax or (top * 1.15 if top > 0 else 1)
    step = max(1, round(_nice_step(ymax))) if integer else _nice_step(ymax)
    ymax = math.ceil(ymax / step - 1e-9) * step
    S, G, nb = len(series), len(groups), 1 if stacked else len(series)  # nb = bars side by side per group
    bw = max(3, min(40 if stacked else 28, int((1400 / G - 12) / nb)))  # bars shrink with many groups
    gw = nb * bw + max(12, bw // 2)
    lw = max(_tw(f_lab, g) for g in groups) + 16
    gw = max(gw, lw) if lw * G <= 1400 else gw  # widen groups so their labels fit horizontally
    rot = lw > gw
    x0, ph = 70, 320
    pw = max(gw * G, 360, _tw(f_title, title) - 40)  # the title must fit too
    lab_h = lw if rot else 24
    items, lines, cur, w = [(s, _PALETTE[k % len(_PALETTE)]) for k, s in enumerate(series)], [], [], 0
    for s, c in items:  # legend entries wrapped to the plot width
        iw = 18 + _tw(f_lab, s) + 18
        if cur and w + iw > pw:
            lines.append(cur); cur, w = [], 0
        cur.append((s, c, iw)); w += iw
    lines.append(cur)
    y0 = 44 + 22 * len(lines) + 14
    img = Image.new("RGB", (x0 + pw + 20, y0 + ph + lab_h + 34), "white")
    d = ImageDraw.Draw(img)
    d.text((img.width // 2, 20), title, font=f_title, fill=_INK, anchor="mm")
    for n, line in enumerate(lines):
        x = x0 + (pw - sum(iw for _, _, iw in line)) // 2
        y = 42 + 22 * n
        for s, c, iw in line:
            d.rectangle((x, y + 2, x + 12, y + 14), fill=c)
            d.text((x + 17, y + 8), s, font=f_lab, fill=_INK, anchor="lm")
            x += iw
    Y = lambda v: y0 + ph - v / ymax * ph
    t = 0
    while t <= ymax + 1e-9:  # grid + y ticks
        d.line((x0, Y(t), x0 + pw, Y(t)), fill=_GRID)
        d.text((x0 - 6, Y(t)), f"{t:g}", font=f_small, fill=_INK, anchor="rm")
        t += step
    num = lambda v: f"{v:.0f}" if integer else f"{v:.1f}"
    off = (pw - gw * G) // 2
    for g, row in enumerate(vals):
        gx, base = x0 + off + g * gw + (gw - nb * bw) // 2, 0
        for s, v in enumerate(row):
            if not v and (stacked or v is None):
                continue
            bx = gx if stacked else gx + s * bw
            d.rectangle((bx, Y(base + v), bx + bw - 2, Y(base)), fill=_PALETTE[s % len(_PALETTE)])
            if annotate and not stacked and bw >= 22:
                d.text((bx + (bw - 2) / 2, Y(v) - 3), num(v), font=f_small, fill=_INK, anchor="mb")
            base += v if stacked else 0
        if annotate and stacked and bw >= 14:
            d.text((gx + (bw - 2) / 2, Y(base) - 3), num(base), font=f_small, fill=_INK, anchor="mb")
        cx = x0 + off + g * gw + gw // 2
        if rot:
            vt = _vtext(groups[g], f_lab)
            img.paste(vt, (cx - vt.width // 2, y0 + ph + 6), vt)
        else:
            d.text((cx, y0 + ph + 6), groups[g], font=f_lab, fill=_INK, anchor="mt")
    d.line((x0, y0, x0, y0 + ph), fill=_INK)
    d.line((x0, y0 + ph, x0 + pw, y0 + ph), fill=_INK)
    d.text((x0 + pw // 2, y0 + ph + lab_h + 16), xlabel, font=f_lab, fill=_INK, anchor="mm")
    vt = _vtext(ylabel, f_lab)
    img.paste(vt, (8, y0 + ph // 2 - vt.height // 2), vt)
    _save_png(img, path)
    return img

# -----------------------------------------------------------------------------
# report

def _f(x, nd=1):
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
    s = continual_metrics(acc, joint=joint)
    s["locator_acc"] = locator_accuracy((m.get("locator") or {}).get("confusion"))
    return s

def write_report(run_dir, metrics):
    """report.md + figures/*.png for one run; metrics.json is refreshed with the recomputed summary."""
    m = dict(metrics)
    s = summarize(m)
    m.update(last=s["last"], avg=s["avg"], bwt=s["bwt"], fwt=s["fwt"], plasticity=s["plasticity"])
    if m.get("locator") is not None:
        m["locator"] = dict(m["locator"], acc=s["locator_acc"])
    _atomic_write(os.path.join(run_dir, "metrics.json"), json.dumps(m, indent=1) + "\n")
    tasks, joint = m["tasks"], m.get("method") == "joint"
    acc = m["acc"] if joint else m["acc"][: m["finished_tasks"]]
    rows = ["joint"] if joint else [f"after {tasks[j]}" for j in range(len(acc))]
    if m.get("zero_shot"):  # row 0: the frozen base before any task
        acc, rows = [m["zero_shot"], *acc], ["base (zero-shot)", *rows]
    figs = os.path.join(run_dir, "figures")
    name = os.path.basename(os.path.normpath(run_dir))
    draw_heatmap(os.path.join(figs, "acc_matrix.png"), acc, rows, tasks, f"{name}: accuracy (%)",
                 "evaluated task i", "after training task j")
    md = [f"# {name}\n",
          f"benchmark `{m.get('benchmark')}`, method `{m.get('method')}`, "
          f"finished tasks {m['finished_tasks']}/{len(tasks)}\n",
          "## Summary\n", _table(["Last", "Avg", "BWT", "FWT", "Locator acc"],
                                 [[_f(s["last"]), _f(s["avg"]), _f(s["bwt"]), _f(s["fwt"]), _f(s["locator_acc"])]]),
          "`Last = mean_i a[T][i]`, `Avg = mean_j mean_{i<=j} a[j][i]`, `BWT = mean_{i<T}(a[T][i] - a[i][i])`, "
          "`FWT = mean_i a[i-1][i]` (zero-shot on the next task, before training it).\n",
          "## Accuracy matrix (%)\n", "Row j: after training task j; column i: evaluated task i.\n",
          _table(["", *tasks], [[r, *[_f(v) for v in row]] for r, row in zip(rows, acc)]
                 + ([["plasticity a_ii", *[_f(v) for v in s["plasticity"]]]] if s["plasticity"] else [])),
          "Plasticity: the accuracy on a task right after training it.\n" if s["plasticity"] else "",
          "![accuracy matrix](figures/acc_matrix.png)\n"]
    conf = (m.get("locator") or {}).get("confusion")
    if conf:
        tot = [max(sum(r), 1) for r in conf]
        draw_heatmap(os.path.join(figs, "locator_confusion.png"), conf, tasks[: len(conf)], tasks[: len(conf)],
                     f"Task locator: {_f(s['locator_acc'])}% correct", "chosen task", "true task", fmt="{:d}",
                     shade=[[c / tot[t] for c in r] for t, r in enumerate(conf)])
        md += ["## Task locator\n", f"Accuracy {_f(s['locator_acc'])}% (true task row, chosen task column).\n",
               _table(["true \\ chosen", *tasks[: len(conf)]], [[t, *r] for t, r in zip(tasks, conf)]),
               "![locator confusion](figures/locator_confusion.png)\n"]
    if m.get("params"):
        md += ["## Parameters per task\n",
               _table(["task", "trainable", "added", "experts"],
                      [[p.get("task"), _human(p.get("trainable")), _human(p.get("added")), p.get("experts", "—")]
                       for p in m["params"]]),
               f"Total added: {_human(sum(p.get('added') or 0 for p in m['params']))}\n"]
    epl = m.get("experts_per_layer")
    if epl:
        L = len(epl[0])
        added = [[epl[j][l] - (epl[j - 1][l] if j else 0) for j in range(len(epl))] for l in range(L)]
        draw_bars(os.path.join(figs, "experts_per_layer.png"), [str(l) for l in range(L)],
                  [f"{'initial' if j == 0 else 'added'}: {t}" for j, t in enumerate(tasks[: len(epl)])], added,
                  "Experts per layer (stacked by the task that added them)", "decoder layer", "experts",
                  integer=True, annotate=True, stacked=True)
        md += ["## Experts per layer\n",
               _table(["after task", *[str(l) for l in range(L)]], [[t, *r] for t, r in zip(tasks, epl)]),
               "![experts per layer](figures/experts_per_layer.png)\n"]
    if m.get("pgke"):
        md += ["## PGKE decisions\n", "freq = share of top-k slots the probe expert won; * = layer expanded.\n",
               _table(["task", "threshold", "expanded layers", "freq per layer"],
                      [[p.get("task"), _f(p.get("threshold"), 3),
                        ", ".join(str(l) for l, e in enumerate(p.get("expand", [])) if e) or "none",
                        " ".join(f"{f:.2f}{'*' if e else ''}" for f, e in zip(p.get("freq", []), p.get("expand", [])))]
                       for p in m["pgke"]])]
    tm = m.get("time") or {}
    if tm:
        stages = ("probe", "train", "locator", "eval")
        trs = [["base", *["—"] * 4, _f(tm.get("base"))]] if tm.get("base") is not None else []
        trs += [[t.get("task"), *[_f(t.get(k)) for k in stages], _f(sum(t.get(k) or 0 for k in stages))]
                for t in tm.get("tasks", [])]
        md += ["## Time per stage (s)\n", _table(["stage", *stages, "total"], trs), f"Total wall time: {_f(tm.get('total'))} s\n"]
    _atomic_write(os.path.join(run_dir, "report.md"), "\n".join(md))
    return m

def compare(run_dirs, out_dir):
    """One row per run (label = run folder name); writes out_dir/compare.md and compare.png, returns the rows."""
    rows = []
    for rd in run_dirs:
        m = load_run(rd)
        s = summarize(m)
        rows.append(dict(run=os.path.basename(os.path.normpath(rd)), method=m.get("method"), last=s["last"],
                         avg=s["avg"], bwt=s["bwt"], locator=s["locator_acc"],
                         added=sum(p.get("added") or 0 for p in m["params"]) if m.get("params") else None,
                         time=(m.get("time") or {}).get("total")))
    md = _table(["run", "method", "Last", "Avg", "BWT", "locator acc", "added params", "time (s)"],
                [[r["run"], r["method"], _f(r["last"]), _f(r["avg"]), _f(r["bwt"]), _f(r["locator"]),
                  _human(r["added"]), _f(r["time"])] for r in rows])
    print(md, end="")
    _atomic_write(os.path.join(out_dir, "compare.md"), md)
    draw_bars(os.path.join(out_dir, "compare.png"), [r["run"] for r in rows], ["Last", "Avg"],
              [[r["last"], r["avg"]] for r in rows], "Method comparison", "run", "accuracy (%)", ymax=100, annotate=True)
    return rows

# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="Re-evaluate / report a cmoe run, or compare several runs.")
    p.add_argument("runs", nargs="+", help="run folder(s), e.g. out/minicoin-cmoe")
    p.add_argument("--compare", action="store_true", help="compare several runs in one table + bar chart")
    p.add_argument("--out", default=None, help="output folder for --compare (default: <runs parent>/compare)")
    p.add_argument("--from-predictions", action="store_true", help="skip the model; rescore saved predictions")
    args = p.parse_args(argv)
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
                reevaluate(rd)
            except NotImplementedError as e:
                print(f"note: {e}; rescoring the saved predictions instead", file=sys.stderr)
        m = write_report(rd, recompute(rd))
        s = summarize(m)
        print(f"{rd}: Last {_f(s['last'])}  Avg {_f(s['avg'])}  BWT {_f(s['bwt'])}  FWT {_f(s['fwt'])}  "
              f"locator {_f(s['locator_acc'])} -> {os.path.join(rd, 'report.md')}")
        return 0
    except (OSError, ValueError, ImportError) as e:
        p.error(str(e))  # argparse-style one-line message, exit status 2

if __name__ == "__main__":
    sys.exit(main())
