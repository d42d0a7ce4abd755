"""tools/plot_metrics.py and benchmarks/ablation.py's summary: PNGs from metrics, areas, tables."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from benchmarks.ablation import area, summarize, table_markdown
from tools.plot_metrics import main as plot_main
from tools.plot_metrics import read_metrics, series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(path, steps: int, *, with_teacher: bool) -> list[dict]:
    rows = [{"step": 0, "eval/student_accuracy": random.random()}]
    if with_teacher:
        rows[0]["eval/teacher_accuracy"] = random.random()
    for s in range(1, steps + 1):
        row = {"step": s, "reward_mean": random.random(), "clip_frac_low": random.random() / 10,
               "time/rollout_s": random.random(), "time/train_s": random.random()}
        if with_teacher:
            row["kl_teacher_k3"] = random.random()
        if s % 5 == 0:
            row["eval/student_accuracy"] = random.random()
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


@pytest.mark.parametrize("with_teacher", [True, False])
def test_plot_writes_a_png_with_or_without_teacher_metrics(tmp_path, with_teacher):
    pytest.importorskip("matplotlib")
    rows = _write_run(tmp_path / "metrics.jsonl", random.randint(6, 30), with_teacher=with_teacher)
    assert plot_main([str(tmp_path)]) == 0
    png = tmp_path / "metrics.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    steps, vals = series(read_metrics(tmp_path / "metrics.jsonl"), "eval/student_accuracy")
    assert vals == [r["eval/student_accuracy"] for r in rows if "eval/student_accuracy" in r]
    assert steps[0] == 0


def test_bad_metrics_files_name_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    assert plot_main([str(bad), "--out", str(tmp_path / "x.png")]) == 2
    assert f"{bad}:2: expected a JSON object per line" in capsys.readouterr().err
    assert plot_main([str(tmp_path / "missing.jsonl")]) == 2
    assert "metrics file not found" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_area_is_the_mean_accuracy_of_the_curve():
    c, n = random.random(), random.randint(2, 10)
    steps = sorted(random.sample(range(1, 200), n))
    assert area(steps, [c] * n) == pytest.approx(c)
    lo, hi = random.random(), random.random()
    # A straight line from lo to hi averages to the midpoint, wherever the evaluations fall.
    line = [lo + (hi - lo) * (s - steps[0]) / (steps[-1] - steps[0]) for s in steps]
    assert area(steps, line) == pytest.approx((lo + hi) / 2)


def test_summary_and_table_over_seeds():
    results = []
    for variant in ("a", "b"):
        for seed in range(3):
            acc = [random.random() for _ in range(4)]
            results.append({"variant": variant, "seed": seed, "wall_s": random.uniform(10, 90),
                            "eval_steps": [0, 10, 20, 30], "accuracy": acc, "teacher_accuracy": None})
    rows = summarize(results)
    assert [r["variant"] for r in rows] == ["a", "b"]
    for r in rows:
        finals = [x["accuracy"][-1] for x in results if x["variant"] == r["variant"]]
        assert r["final_mean"] == pytest.approx(statistics.mean(finals))
        assert r["final_std"] == pytest.approx(statistics.stdev(finals))
    table = table_markdown(rows, steps=30).splitlines()
    assert len(table) == 2 + len(rows) and all(line.startswith("| ") for line in table)
    assert f"{rows[1]['final_mean']:.3f} +- {rows[1]['final_std']:.3f}" in table[3]
