"""A few RLAD steps with an MoE teacher and a dense student (TP=2), and with an MoE student (router
aux loss on, TP=1) on CPU: finite losses, the student moves, and resuming replays the losses exactly.

Same run as tests/e2e/test_train_loop.py (the shared overrides and helpers), with MoE models swapped
in; the MoE student also at EP=2 (two ranks, DP=2: each holds half the experts).
"""

from __future__ import annotations

import math

import pytest

from tests.harness import run_distributed
from tests.helpers import drop_checkpoints_after, read_losses, train_run

STEPS = 4

MOE = {
    # Qwen3-MoE-shaped teacher: layer 0 MoE, layer 1 dense (mlp_only_layers=[1]).
    "teacher": ["--teacher.model.num_experts=4", "--teacher.model.moe_ffn_hidden_size=64",
                "--teacher.model.moe_layer_pattern='10'"],
    "student": ["--student.model.num_experts=4", "--student.model.moe_ffn_hidden_size=32",
                "--student.model.moe_router_topk=2", "--student.model.moe_aux_loss_coeff=0.01"],
}
MOE["student_ep2"] = MOE["student"] + ["--student.parallel.expert_model_parallel_size=2"]
# An MoE student trains at TP=1 (config/schema.py explains why); the frozen MoE teacher runs at TP=2.
TP = {"teacher": 2, "student": 1, "student_ep2": 1}
WORLD = {"teacher": 2, "student": 1, "student_ep2": 2}


@pytest.mark.parametrize("which", sorted(MOE))
def test_moe_rlad_steps_resume_exactly(tmp_path, which, rl_overrides):
    tp = TP[which]
    overrides = rl_overrides(tmp_path, tp, 1, "full", "rlad", steps=STEPS) + MOE[which]
    results = run_distributed(train_run, WORLD[which], args=(overrides, False))
    assert all(r["moved"] for r in results), "the student's parameters did not change"
    full = read_losses(tmp_path / "full")
    assert sorted(full) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in full.values()), full

    drop_checkpoints_after(tmp_path / "ckpt", 2)
    resumed_overrides = rl_overrides(tmp_path, tp, 1, "resumed", "rlad", steps=STEPS) + MOE[which]
    results = run_distributed(train_run, WORLD[which], args=(resumed_overrides, True))
    assert {r["start"] for r in results} == {2}
    resumed = read_losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == full[step], (which, step, resumed[step], full[step])
