"""Small helpers shared by test files (fixtures live in conftest.py; the gloo harness in harness.py)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def objective_loss(*, cfg, num_sequences=None, num_tokens=None, tp_group=None, vocab_size=None, **tensors):
    """``(loss, metrics)`` of the objective ``cfg`` names on one micro-batch's tensors, built the way the
    train module builds it (``build_objective`` once, then ``loss(LossInputs(...))``)."""
    from rlad_megatron.objectives import LossInputs, build_objective

    objective = build_objective(cfg, tp_group=tp_group, vocab_size=vocab_size)
    return objective.loss(LossInputs(**tensors), num_sequences=num_sequences, num_tokens=num_tokens)


def train_run(rank, world_size, overrides, resume):
    """A ``run_distributed`` worker: the tiny config with ``overrides``, trained to the end (resumed from
    the newest checkpoint when ``resume``); returns the start step and whether the student moved."""
    import torch

    from rlad_megatron.config import load_config, same_layout
    from rlad_megatron.distributed.init import init_distributed
    from rlad_megatron.models.weights import model_state_dict
    from rlad_megatron.trainer import Trainer

    cfg = load_config(ROOT / "launch" / "configs" / "tiny_cpu.yaml",
                      overrides + [f"--checkpoint.resume={'true' if resume else 'false'}"])
    trainer = Trainer(cfg, init_distributed("cpu"))
    if trainer.teacher is not None and same_layout(cfg.student, cfg.teacher):
        # One layout: the teacher shares the student's groups (the path before teacher.parallel existed).
        assert trainer.teacher.groups is trainer.groups
    before = model_state_dict(trainer.student.policy)
    start = trainer.step
    trainer.train()
    after = model_state_dict(trainer.student.policy)
    moved = any(not torch.equal(before[k], after[k]) for k in before)
    return {"start": start, "moved": moved}


def read_losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def drop_checkpoints_after(save_dir: Path, step: int) -> None:
    """Resume picks the newest complete step directory; remove those after ``step``."""
    import shutil

    from rlad_megatron.checkpointing.files import step_of

    for p in save_dir.iterdir():
        if (step_of(p) or 0) > step:
            shutil.rmtree(p)


def rollout_model_section(tp: int, pp: int, *, vocab_size: int, num_layers: int):
    """A tiny GPT section for the rollout tests at TP x PP."""
    from rlad_megatron.config import ModelConfig, ModelSection, ParallelConfig

    # A wide init spreads the logits so greedy argmax never sits on a float-rounding tie.
    return ModelSection(
        model=ModelConfig(num_layers=num_layers, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=128, vocab_size=vocab_size, make_vocab_size_divisible_by=8,
                          init_method_std=0.3),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))


def spreading_eos(batch) -> int:
    """The most frequent response token whose first occurrence differs between rows, so that as EOS it
    stops rows at different lengths (the random seed can make the most frequent one stop every row
    at the same step); the most frequent token if none does."""
    import torch

    responses = [list(r) for r in batch.responses()]
    counts = torch.bincount(torch.cat([torch.tensor(r) for r in responses]))
    for token in counts.argsort(descending=True).tolist():
        if counts[token] == 0:
            break
        if len({r.index(token) if token in r else len(r) for r in responses}) > 1:
            return token
    return int(counts.argmax())
