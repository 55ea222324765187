"""eval.py: continual metrics against hand arithmetic, predictions I/O, report/figures, compare, CLI errors."""
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import eval as ev  # noqa: E402

REPO = os.path.join(os.path.dirname(__file__), "..")

# 3 tasks; row j = after training task j, column i = evaluated task i (upper triangle = zero-shot)
ACC = [[80.0, 10.0, 20.0],
       [60.0, 90.0, 30.0],
       [50.0, 70.0, 100.0]]


def test_continual_metrics_by_hand():
    m = ev.continual_metrics(ACC)
    # Last: final row, all tasks
    assert m["last"] == pytest.approx((50 + 70 + 100) / 3)
    # Avg: row means over the lower triangle, then mean over rows
    assert m["avg"] == pytest.approx((80 / 1 + (60 + 90) / 2 + (50 + 70 + 100) / 3) / 3)
    # BWT: final minus just-trained, tasks 0 and 1: (50-80) and (70-90)
    assert m["bwt"] == pytest.approx(((50 - 80) + (70 - 90)) / 2)
    # FWT: zero-shot on the next task before training it: a[0][1] and a[1][2]
    assert m["fwt"] == pytest.approx((10 + 30) / 2)
    # plasticity: accuracy on each task right after training it, a[i][i]
    assert m["plasticity"] == [80, 90, 100]


def test_joint_single_row():
    m = ev.continual_metrics([[40.0, 60.0, 80.0]])
    assert m["last"] == pytest.approx((40 + 60 + 80) / 3)
    assert m["avg"] == m["last"]
    assert m["bwt"] is None and m["fwt"] is None and m["plasticity"] is None


def test_isolated_is_each_task_by_its_own_model():
    m = ev.continual_metrics(ACC, isolated=True)  # row j: task j's model alone; only the diagonal is its own task
    assert m["last"] == m["avg"] == pytest.approx((80 + 90 + 100) / 3)
    assert m["plasticity"] == [80, 90, 100] and m["bwt"] is None and m["fwt"] is None
    assert ev.continual_metrics([[70.0, 5.0, 1.0]], isolated=True)["last"] == 70.0  # one task trained so far


def test_none_cells_and_partial_run():
    # no zero-shot evaluation and a[1][0] missing; last row all None = task 2 not trained yet
    acc = [[80.0, None, None],
           [None, 90.0, None],
           [None, None, None]]
    m = ev.continual_metrics(acc)
    assert m["last"] == pytest.approx(90.0)                 # only a[1][1] available in the final trained row
    assert m["avg"] == pytest.approx((80 + 90) / 2)         # row 0: 80; row 1: mean(90)
    assert m["bwt"] is None                                 # a[1][0] missing, no pair to subtract
    assert m["fwt"] is None                                 # no zero-shot cells
    # a partial continual run of one task is not a joint run when told so
    one = ev.continual_metrics([[70.0, 5.0, 1.0]], joint=False)
    assert one["last"] == pytest.approx(70.0) and one["bwt"] is None and one["fwt"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="row 1"):
        ev.continual_metrics([[1.0, 2.0], [3.0]])


def test_locator_accuracy():
    conf = [[8, 2], [1, 9]]
    assert ev.locator_accuracy(conf) == pytest.approx(100 * (8 + 9) / (8 + 2 + 1 + 9))
    assert ev.locator_accuracy([]) is None
    assert ev.locator_accuracy([[0, 0], [0, 0]]) is None


def test_predictions_roundtrip_and_bad_line(tmp_path):
    p = str(tmp_path / "p.jsonl")
    rows = [{"index": 0, "prediction": "A", "answer": "A", "stage": 0}, {"index": 1, "prediction": "é", "answer": "b"}]
    ev.write_predictions(p, rows)
    assert ev.read_predictions(p) == rows
    with open(p, "a") as f:
        f.write('{"index": 2, "prediction": \n')  # line 3 is truncated
    with pytest.raises(ValueError, match=r"p\.jsonl: malformed JSON at line 3 column"):
        ev.read_predictions(p)
    exact = lambda metric, pred, ans: float(pred.lower() in [a.lower() for a in (ans if isinstance(ans, list) else [ans])])
    assert ev.rescore([{"prediction": "Cat", "answer": "cat"}, {"prediction": "x", "answers": ["y", "x"]},
                       {"prediction": "n", "answer": "m"}], "exact", score=exact) == [1.0, 1.0, 0.0]


def make_run(root, name, acc, method="cmoe", finished=None):
    tasks = ["sqa", "ocr", "cls"][: len(acc[0])]
    rd = os.path.join(root, name)
    os.makedirs(rd)
    m = dict(benchmark="minicoin", method=method, tasks=tasks, metric={t: "exact" for t in tasks}, acc=acc,
             last=0.0, avg=0.0, bwt=0.0, fwt=None, finished_tasks=finished or len(acc),
             locator=dict(confusion=[[18, 2, 0], [1, 15, 4], [0, 0, 20]], acc=None),
             params=[dict(task=t, trainable=1000 * (k + 1), added=500 * (k + 1), experts=2 + k) for k, t in enumerate(tasks)],
             experts_per_layer=[[2, 2, 2, 2], [2, 3, 2, 3], [3, 3, 2, 4]],
             pgke=[dict(task="ocr", freq=[0.1, 0.4, 0.05, 0.3], threshold=0.12, expand=[False, True, False, True]),
                   dict(task="cls", freq=[0.3, 0.1, 0.02, 0.2], threshold=0.08, expand=[True, True, False, True])],
             time=dict(base=12.0, tasks=[dict(task=t, probe=1.0, train=5.0, locator=0.5, eval=2.0) for t in tasks],
                       total=40.0 if method == "cmoe" else 25.0))
    with open(os.path.join(rd, "metrics.json"), "w") as f:
        json.dump(m, f)
    return rd, m


def test_write_report(tmp_path):
    rd, m = make_run(str(tmp_path), "minicoin-cmoe", ACC)
    elsewhere = tmp_path / "elsewhere"  # eval.py RUN --out DIR: the report and its figures go to DIR
    ev.write_report(rd, m, str(elsewhere))
    assert (elsewhere / "report.md").is_file() and (elsewhere / "figures" / "acc_matrix.png").is_file()
    assert not os.path.exists(os.path.join(rd, "report.md"))
    ev.write_report(rd, m)
    report = open(os.path.join(rd, "report.md")).read()
    assert "Accuracy matrix" in report and "PGKE" in report and "Total added" in report
    for fig in ("acc_matrix", "locator_confusion", "experts_per_layer"):
        with Image.open(os.path.join(rd, "figures", f"{fig}.png")) as im:
            im.load()
            assert im.width >= 200 and im.height >= 150
    with open(os.path.join(rd, "metrics.json")) as f:
        new = json.load(f)
    assert new["last"] == pytest.approx((50 + 70 + 100) / 3)    # the stale 0.0 was refreshed
    assert new["locator"]["acc"] == pytest.approx(100 * (18 + 15 + 20) / 60)
    # heatmap colours read back from the PNG: higher accuracy must be drawn darker (and so differently)
    cells = heatmap_cells(os.path.join(rd, "figures", "acc_matrix.png"), 3, 3)
    hi, lo = cells[2][2], cells[0][1]  # 100.0 and 10.0
    assert hi != lo and sum(hi) < sum(lo)
    assert sum(cells[1][1]) < sum(cells[1][0])  # 90.0 darker than 60.0


def heatmap_cells(path, nrows, ncols):
    """Colour near each cell's top-left corner (away from its number); the grid is found in the image itself as
    the first pixel row holding ncols runs of >= 40 equal non-white pixels (equal square cells, 2 px white gaps)."""
    im = Image.open(path).convert("RGB")
    px, (W, H) = im.load(), im.size
    for y in range(H):
        runs, x = [], 0
        while x < W:
            x1 = x
            while x1 < W and px[x1, y] == px[x, y]:
                x1 += 1
            if px[x, y] != (255, 255, 255) and x1 - x >= 40:
                runs.append(x)
            x = x1
        if len(runs) == ncols:
            break
    pitch = runs[1] - runs[0]
    return [[px[runs[i] + 3, y + 3 + j * pitch] for i in range(ncols)] for j in range(nrows)]


def test_recompute_from_predictions(tmp_path):
    rd, m = make_run(str(tmp_path), "run", [[0.0, None, None], [None, None, None], [None, None, None]], finished=1)
    preds = [dict(index=k, prediction=p, answer="a", stage=0, located=loc, true_task=0)
             for k, (p, loc) in enumerate([("a", 0), ("a", 0), ("b", 1), ("a", 0)])]
    ev.write_predictions(os.path.join(rd, "predictions", "sqa.jsonl"), preds)
    out = ev.recompute(rd, score=lambda metric, pred, ans: float(pred == ans))
    assert out["acc"][0][0] == pytest.approx(100 * 3 / 4)
    assert out["locator"]["confusion"][0] == [3, 1, 0]


def test_compare(tmp_path, capsys):
    a, _ = make_run(str(tmp_path), "minicoin-cmoe", ACC)
    b, _ = make_run(str(tmp_path), "minicoin-lora", [[80.0, 5.0, 5.0], [20.0, 90.0, 5.0], [10.0, 15.0, 95.0]], "lora")
    out = str(tmp_path / "cmp")
    rows = ev.compare([a, b], out)
    table = open(os.path.join(out, "compare.md")).read()
    assert table == capsys.readouterr().out
    last_a, last_b = (50 + 70 + 100) / 3, (10 + 15 + 95) / 3
    for name, last in (("minicoin-cmoe", last_a), ("minicoin-lora", last_b)):
        line = next(l for l in table.splitlines() if l.startswith(f"| {name} |"))
        assert f"| {last:.1f} |" in line
    assert [r["added"] for r in rows] == [500 + 1000 + 1500] * 2
    with Image.open(os.path.join(out, "compare.png")) as im:
        assert im.width >= 200
    assert "mean ± sd" not in table  # one run per method: nothing to spread
    # seeds: two more cmoe runs -> a mean ± sd row over the three (sample sd), the lora run alone
    c, _ = make_run(str(tmp_path), "minicoin-cmoe-seed1", [[80.0, 0, 0], [60.0, 90.0, 0], [40.0, 70.0, 100.0]])
    d, _ = make_run(str(tmp_path), "minicoin-cmoe-seed2", [[80.0, 0, 0], [60.0, 90.0, 0], [60.0, 70.0, 100.0]])
    ev.compare([a, b, c, d], out)
    lasts = [last_a, (40 + 70 + 100) / 3, (60 + 70 + 100) / 3]
    mean = sum(lasts) / 3
    sd = (sum((x - mean) ** 2 for x in lasts) / 2) ** 0.5
    lines = [l for l in open(os.path.join(out, "compare.md")).read().splitlines() if "mean ± sd" in l]
    assert lines == [f"| mean ± sd of 3 | cmoe | {mean:.1f} ± {sd:.1f} | " + lines[0].split(" | ", 3)[3]]
    # a run with experts in the tower too is its own method: the two cmoe runs of each kind get their own rows
    for rd in (c, d):
        with open(os.path.join(rd, "config.json"), "w") as f:
            json.dump({"experts_in": "both", "seed": 1}, f)
    ev.compare([a, b, c, d], out)
    lines = [l for l in open(os.path.join(out, "compare.md")).read().splitlines() if "mean ± sd" in l]
    assert [l.split(" | ")[1] for l in lines] == ["cmoe --experts-in both"]


def test_cli_errors(tmp_path, capsys):
    r = subprocess.run([sys.executable, os.path.join(REPO, "eval.py"), str(tmp_path / "nope")], capture_output=True,
                       text=True)  # the real command line once: a one-line error, no traceback
    assert r.returncode == 2 and "run folder not found" in r.stderr and "Traceback" not in r.stderr

    def fails(*argv):  # the rest in this process: main() turns every error into argparse's exit 2 and one line
        with pytest.raises(SystemExit) as e:
            ev.main([*argv])
        assert e.value.code == 2
        return capsys.readouterr().err
    os.makedirs(tmp_path / "empty")
    assert "no finished task in" in fails(str(tmp_path / "empty"))
    rd, _ = make_run(str(tmp_path), "bad", ACC)
    os.makedirs(os.path.join(rd, "predictions"))
    with open(os.path.join(rd, "predictions", "ocr.jsonl"), "w") as f:
        f.write('{"index": 0, "prediction": "a", "answer": "a", "stage": 0}\n{oops\n')
    assert "ocr.jsonl: malformed JSON at line 2" in fails(rd)
    for flags, says in ((["--reject-quantile", "1.5"], "must be in [0, 1]"),
                        (["--from-predictions", "--reject"], "leave out --from-predictions")):
        assert says in fails(rd, *flags), flags


def test_an_unfinished_run_is_read_from_its_progress_marker(tmp_path):
    rd, _ = make_run(str(tmp_path), "killed", ACC)
    os.replace(os.path.join(rd, "metrics.json"), os.path.join(rd, "state.json"))  # as a run killed mid-task leaves it
    assert ev.load_run(rd)["acc"] == ACC


def test_cli_report_and_compare(tmp_path, capsys):
    a, _ = make_run(str(tmp_path), "minicoin-cmoe", ACC)
    b, _ = make_run(str(tmp_path), "minicoin-lora", [[80.0, 5.0, 5.0], [20.0, 90.0, 5.0], [10.0, 15.0, 95.0]], "lora")
    assert ev.main([a]) == 0
    assert os.path.isfile(os.path.join(a, "report.md")) and os.path.isfile(os.path.join(a, "figures", "acc_matrix.png"))
    out = str(tmp_path / "cmp")
    capsys.readouterr()
    assert ev.main(["--compare", a, b, "--out", out]) == 0
    table = capsys.readouterr().out
    assert "| minicoin-cmoe |" in table and "| minicoin-lora |" in table
    assert os.path.isfile(os.path.join(out, "compare.png"))
