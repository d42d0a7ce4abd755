"""Fixtures shared by several test files (each file keeps the helpers only it uses)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


def write_easy_task(directory: Path) -> Path:
    """Single-digit sums: a random tiny model gets some right, so GRPO groups carry signal."""
    from rlad_megatron.data import write_jsonl

    rows = [{"question": f"{a}+{b}=", "answer": f"#### {a + b}"} for a in range(5) for b in range(5)]
    return write_jsonl(directory / "easy.jsonl", rows)


@pytest.fixture
def easy_task() -> Callable[[Path], Path]:
    """``write(directory)``: the easy task's JSONL in ``directory``; returns its path."""
    return write_easy_task


@pytest.fixture
def rl_overrides() -> Callable[..., list[str]]:
    """``make(tmp, tp, pp, run, objective, steps=4)``: overrides of the tiny config for a few random-init RL
    steps on the easy task at TP x PP (teacher on the same layout), checkpointing every 2 steps."""

    def make(tmp: Path, tp: int, pp: int, run: str, objective: str, *, steps: int = 4) -> list[str]:
        return [
            f"--student.parallel.tensor_model_parallel_size={tp}",
            f"--student.parallel.pipeline_model_parallel_size={pp}",
            f"--teacher.parallel.tensor_model_parallel_size={tp}",
            f"--teacher.parallel.pipeline_model_parallel_size={pp}",
            "--student.load=null", "--teacher.load=null", "--teacher.model.num_layers=2",
            f"--data.train_path={write_easy_task(tmp)}", "--data.eval_path=null", "--train.eval_interval=0",
            # 64 rows a step: a random model answers ~4% of them, so (nearly) every step has GRPO signal.
            "--rl.prompts_per_step=8", "--rl.group_size=8", "--rl.mini_batch_size=32", "--rl.micro_batch_size=8",
            "--rl.max_new_tokens=3", "--optimizer.lr=1e-2", "--optimizer.warmup_steps=0",
            f"--distill.objective={objective}", f"--train.steps={steps}", "--logging.progress_bar=false",
            f"--logging.run_dir={tmp / run}", f"--checkpoint.save_dir={tmp / 'ckpt'}", "--checkpoint.save_interval=2",
        ]

    return make
