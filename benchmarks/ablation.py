"""The objectives side by side on the tiny default: held-out accuracy against RL step, several seeds.

    python benchmarks/ablation.py --out-dir runs/ablation                  # 5 objectives x 3 seeds, ~20 min on 2 cores
    python benchmarks/ablation.py --variants grpo,rlad --seeds 1,2 --steps 40      # a quicker look

Every run is ``bash launch/tiny.sh`` with the variant's overrides, a seed (``train.seed``: which
fresh problems each step draws and the rollouts' sampling) and its own run directory, so all runs
share the SFT checkpoints that tiny.sh trains once and caches (``SFT_DIR``, default
``runs/tiny/sft_carry``). The student's greedy held-out accuracy is read from each run's
``metrics.jsonl`` (every ``--eval-interval`` steps). Runs one at a time (2 gloo ranks each).

Writes to ``--out-dir``: ``runs/<variant>_s<seed>/`` (the runs), ``results.json`` (every curve),
``table.md`` (final held-out accuracy mean +- std over seeds, area under the accuracy curve as the
mean accuracy over the evaluated steps, wall time per run) and ``heldout_accuracy.png`` (mean
+- std per variant; needs matplotlib, ``pip install -e ".[plot]"``; skipped with a note without it).
An existing finished run is reused, so an interrupted ablation continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> overrides of the tiny default (paper defaults unless named).
VARIANTS: dict[str, list[str]] = {
    "grpo": ["--distill.objective=grpo"],
    "kdrl": ["--distill.objective=kdrl"],
    "forward_kl": ["--distill.objective=forward_kl"],
    "rlad": ["--distill.objective=rlad"],
    # Selective imitation: the teacher term only on responses at least as good as their group's
    # mean and on tokens within 2 nats of the teacher (DESIGN.md, "Selective imitation").
    "rlad_gated": ["--distill.objective=rlad", "--distill.tau_adv=0.0", "--distill.tau_align=2.0"],
}


def curve(metrics_path: Path) -> tuple[list[int], list[float], float | None]:
    """(eval steps, held-out accuracies, teacher accuracy at step 0) of one run."""
    steps, accs, teacher = [], [], None
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "eval/student_accuracy" in row:
            steps.append(row["step"])
            accs.append(row["eval/student_accuracy"])
        if teacher is None and "eval/teacher_accuracy" in row:
            teacher = row["eval/teacher_accuracy"]
    return steps, accs, teacher


def area(steps: list[int], accs: list[float]) -> float:
    """Trapezoid area under accuracy(step) divided by the steps covered: the mean accuracy of the run."""
    if len(steps) < 2:
        return accs[0] if accs else math.nan
    total = sum((s1 - s0) * (a0 + a1) / 2 for s0, s1, a0, a1 in zip(steps, steps[1:], accs, accs[1:]))
    return total / (steps[-1] - steps[0])


def run_one(*, variant: str, seed: int, run_dir: Path, steps: int, eval_interval: int, extra: list[str],
            env: dict[str, str]) -> dict:
    done = run_dir / "ablation_run.json"
    if done.is_file():
        return json.loads(done.read_text())
    cmd = ["bash", str(ROOT / "launch" / "tiny.sh"), *VARIANTS[variant], f"--train.seed={seed}",
           f"--train.steps={steps}", f"--train.eval_interval={eval_interval}", f"--logging.run_dir={run_dir}",
           "--checkpoint.save_interval=0", "--logging.progress_bar=false", *extra]
    if (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()  # an interrupted run starts over; metrics.jsonl appends
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir / "stdout.log", "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} seed {seed}: {' '.join(cmd)} exited {proc.returncode}; see {run_dir}/stdout.log")
    eval_steps, accs, teacher = curve(run_dir / "metrics.jsonl")
    rewards = [json.loads(line).get("reward_mean") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {"variant": variant, "seed": seed, "wall_s": wall, "eval_steps": eval_steps, "accuracy": accs,
              "teacher_accuracy": teacher, "reward": [r for r in rewards if r is not None]}
    done.write_text(json.dumps(result) + "\n")
    return result


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in results):
        rs = [r for r in results if r["variant"] == variant]
        finals = [r["accuracy"][-1] for r in rs]
        gains = [r["accuracy"][-1] - r["accuracy"][0] for r in rs]
        aucs = [area(r["eval_steps"], r["accuracy"]) for r in rs]
        rows.append({"variant": variant, "seeds": len(rs), "start": statistics.mean(r["accuracy"][0] for r in rs),
                     "final_mean": statistics.mean(finals), "final_std": _std(finals),
                     "gain_mean": statistics.mean(gains), "gain_std": _std(gains),
                     "auc_mean": statistics.mean(aucs), "auc_std": _std(aucs),
                     "wall_s": statistics.mean(r["wall_s"] for r in rs), "finals": finals})
    return rows


def _std(xs: list[float]) -> float:
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def table_markdown(rows: list[dict], *, steps: int) -> str:
    lines = [f"| objective | seeds | held-out acc, step 0 | final (step {steps}) mean +- std | gain mean +- std "
             "| area under curve | wall time / run | finals per seed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['start']:.3f} "
                     f"| {r['final_mean']:.3f} +- {r['final_std']:.3f} "
                     f"| {r['gain_mean']:+.3f} +- {r['gain_std']:.3f} | {r['auc_mean']:.3f} +- {r['auc_std']:.3f} "
                     f"| {r['wall_s']:.0f} s | {', '.join(f'{f:.3f}' for f in r['finals'])} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        print('matplotlib not installed (pip install -e ".[plot]"): no plot', file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    teacher = next((r["teacher_accuracy"] for r in results if r["teacher_accuracy"] is not None), None)
    for variant in dict.fromkeys(r["variant"] for r in results):
        rs = [r for r in results if r["variant"] == variant]
        steps = rs[0]["eval_steps"]
        per_step = [[r["accuracy"][i] for r in rs] for i in range(len(steps))]
        mean = [statistics.mean(v) for v in per_step]
        std = [_std(v) for v in per_step]
        ax.plot(steps, mean, marker="o", ms=3, label=f"{variant} (n={len(rs)})")
        ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.15)
    ax.set_xlabel("RL step")
    ax.set_ylabel("student held-out greedy accuracy")
    # The teacher's accuracy as a number, not a line: near 1 it would squash the students' curves.
    ax.set_title("tiny default: mean +- std over seeds" + (f" (teacher: {teacher:.3f})" if teacher is not None else ""),
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="runs/ablation")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated train.seed values")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the tiny default's)")
    p.add_argument("--eval-interval", type=int, default=10, help="held-out evaluation every N steps")
    p.add_argument("--sft-dir", default=None, help="cached SFT checkpoints (default: tiny.sh's runs/tiny/sft_carry)")
    args, extra = p.parse_known_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}, expected from {list(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    steps = args.steps or _default_steps()
    out = Path(args.out_dir).resolve()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "TORCHELASTIC_"))}
    env.setdefault("PYTHON", sys.executable)
    if args.sft_dir:
        env["SFT_DIR"] = str(Path(args.sft_dir).resolve())
    results = []
    for variant in variants:
        for seed in seeds:
            r = run_one(variant=variant, seed=seed, run_dir=out / "runs" / f"{variant}_s{seed}", steps=steps,
                        eval_interval=args.eval_interval, extra=extra, env=env)
            print(f"{variant} seed {seed}: held-out {r['accuracy'][0]:.3f} -> {r['accuracy'][-1]:.3f} "
                  f"({r['wall_s']:.0f} s)", flush=True)
            results.append(r)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = table_markdown(summarize(results), steps=steps)
    (out / "table.md").write_text(table)
    print(table)
    png = plot(results, out / "heldout_accuracy.png")
    if png:
        print(f"wrote {png}")
    return 0


def _default_steps() -> int:
    sys.path.insert(0, str(ROOT))
    from rlad_megatron.config import load_config

    return load_config(ROOT / "launch" / "configs" / "tiny_cpu.yaml").train.steps


if __name__ == "__main__":
    raise SystemExit(main())
