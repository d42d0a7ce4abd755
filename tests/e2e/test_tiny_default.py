"""The embedded default end to end: `launch/tiny.sh` (SFT of teacher and student, then RLAD at TP=2
under torchrun + gloo) and the claim the README makes for it: the teacher is measurably better than
the student, and the student's reward rises.

Everything is the default except that RL stops after 40 of its 80 steps (about five minutes on
2 cores; SFT of the teacher is most of it).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 40
WINDOW = 10
# Rewards are 0/1 over 256 samples per step: a 10-step mean has a standard error near 0.01.
MIN_RISE = 0.05


@pytest.mark.slow
def test_tiny_default_teacher_beats_student_and_the_reward_rises(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "TORCHELASTIC_"))}
    env.update(PYTHON=sys.executable, SFT_DIR=str(tmp_path / "sft"), OMP_NUM_THREADS="1")
    run_dir = tmp_path / "rlad"
    cmd = ["bash", str(ROOT / "launch" / "tiny.sh"), f"--train.steps={STEPS}", f"--logging.run_dir={run_dir}",
           f"--checkpoint.save_dir={run_dir / 'checkpoints'}", "--logging.progress_bar=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    assert first["eval/teacher_accuracy"] > first["eval/student_accuracy"] + 0.05, first
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
    assert len(rewards) == STEPS
    early, late = statistics.mean(rewards[:WINDOW]), statistics.mean(rewards[-WINDOW:])
    assert late > early + MIN_RISE, f"reward over the first {WINDOW} steps {early:.3f}, last {WINDOW} {late:.3f}"
    assert (run_dir / "checkpoints" / "latest").is_file()
