"""A run's ``metrics.jsonl`` as one PNG of its main curves.

    python tools/plot_metrics.py runs/tiny/rlad/metrics.jsonl --out runs/tiny/rlad/metrics.png

Panels: sampled reward on the step's (fresh) prompts, held-out greedy accuracy (with the teacher's
as a dashed ceiling), KL to the teacher, the PPO clip fractions, the policy's entropy, and where each step's time goes.
A panel whose metrics the run did not log says so instead of failing. Needs matplotlib
(``pip install -e ".[plot]"``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# (panel title, y label, [(metric key, legend label)])
PANELS = [
    ("reward on the step's prompts", "mean reward", [("reward_mean", "reward_mean")]),
    ("held-out greedy accuracy", "accuracy", [("eval/student_accuracy", "student")]),
    ("KL to the teacher (k3, sampled tokens)", "nats / token", [("kl_teacher_k3", "kl_teacher_k3")]),
    ("clip fractions", "fraction of tokens",
     [("clip_frac_low", "clip_frac_low"), ("clip_frac_high", "clip_frac_high")]),
    ("policy entropy (sampled tokens)", "nats / token", [("entropy", "entropy")]),
]
ROLLING = 10
TIME_KEYS = [("time/rollout_s", "rollout"), ("time/teacher_s", "teacher"), ("time/train_s", "train")]


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl; a missing file or a bad line is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: metrics file not found (expected <run_dir>/metrics.jsonl)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: expected a JSON object per line, got {line[:60]!r} ({e.msg})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f"{path}:{n}: expected an object with a 'step' field, got {line[:60]!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no metrics rows")
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that carry a finite ``key``."""
    pts = [(r["step"], float(r[key])) for r in rows if key in r and math.isfinite(float(r[key]))]
    return [s for s, _ in pts], [v for _, v in pts]


def plot_run(rows: list[dict], out: str | Path, *, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(13, 7))
    axes = list(grid.flat)
    for ax, (name, ylabel, keys) in zip(axes, PANELS):
        drawn = False
        for key, label in keys:
            steps, vals = series(rows, key)
            if not steps:
                continue
            drawn = True
            if len(steps) < 30:
                ax.plot(steps, vals, marker="o", ms=3, label=label)
                continue
            # Per-step values are noisy (a few hundred 0/1 rewards): draw them faint under a rolling mean.
            line, = ax.plot(steps, vals, alpha=0.3, lw=0.8)
            k = ROLLING
            ax.plot(steps[k - 1:], [sum(vals[i - k + 1:i + 1]) / k for i in range(k - 1, len(vals))],
                    c=line.get_color(), label=f"{label} ({k}-step mean)")
        if name.startswith("held-out"):
            _, teacher = series(rows, "eval/teacher_accuracy")
            if teacher:
                ax.axhline(teacher[0], ls="--", c="gray", label="teacher (step 0)")
        _finish(ax, name, ylabel, drawn)
    ax = axes[len(PANELS)]
    bottom = None
    drawn = False
    for key, label in TIME_KEYS:
        steps, vals = series(rows, key)
        if steps:
            ax.bar(steps, vals, width=1.0, bottom=bottom, label=label)
            bottom = vals if bottom is None else [b + v for b, v in zip(bottom, vals)]
            drawn = True
    _finish(ax, "time per step", "seconds", drawn)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _finish(ax, name: str, ylabel: str, drawn: bool) -> None:
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    if drawn:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    else:
        ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", help="a run's metrics.jsonl (or its run directory)")
    p.add_argument("--out", default=None, help="PNG path (default: metrics.png beside the metrics file)")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    path = Path(args.metrics)
    if path.is_dir():
        path = path / "metrics.jsonl"
    try:
        rows = read_metrics(path)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = plot_run(rows, args.out or path.with_name("metrics.png"), title=args.title or str(path.parent))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
