"""A few RLAD steps with an MoE teacher and a dense student (TP=2), and with an MoE student (router
aux loss on, TP=1) on CPU: finite losses, the student moves, and resuming replays the losses exactly.

Same run as tests/e2e/test_train_loop.py (its overrides and helpers), with MoE models swapped in.
EP > 1 in training waits for the trainer to build the expert grid (``expert_model_parallel_size``).
"""

from __future__ import annotations

import math

import pytest

from tests.e2e.test_train_loop import STEPS, _drop_checkpoints_after, _losses, _overrides, _train
from tests.harness import run_distributed

MOE = {
    # Qwen3-MoE-shaped teacher: layer 0 MoE, layer 1 dense (mlp_only_layers=[1]).
    "teacher": ["--teacher.model.num_experts=4", "--teacher.model.moe_ffn_hidden_size=64",
                "--teacher.model.moe_layer_pattern='10'"],
    "student": ["--student.model.num_experts=4", "--student.model.moe_ffn_hidden_size=32",
                "--student.model.moe_router_topk=2", "--student.model.moe_aux_loss_coeff=0.01"],
}
# An MoE student trains at TP=1 (config.py explains why); the frozen MoE teacher runs at TP=2.
TP = {"teacher": 2, "student": 1}


@pytest.mark.parametrize("which", sorted(MOE))
def test_moe_rlad_steps_resume_exactly(tmp_path, which):
    tp = TP[which]
    overrides = _overrides(tmp_path, tp, 1, "full", "rlad") + MOE[which]
    results = run_distributed(_train, tp, args=(overrides, False))
    assert all(r["moved"] for r in results), "the student's parameters did not change"
    full = _losses(tmp_path / "full")
    assert sorted(full) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in full.values()), full

    _drop_checkpoints_after(tmp_path / "ckpt", 2)
    resumed_overrides = _overrides(tmp_path, tp, 1, "resumed", "rlad") + MOE[which]
    results = run_distributed(_train, tp, args=(resumed_overrides, True))
    assert {r["start"] for r in results} == {2}
    resumed = _losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == full[step], (which, step, resumed[step], full[step])
