"""Small helpers shared by test files (fixtures live in conftest.py; the gloo harness in harness.py)."""

from __future__ import annotations


def objective_loss(*, cfg, num_sequences=None, num_tokens=None, tp_group=None, vocab_size=None, **tensors):
    """``(loss, metrics)`` of the objective ``cfg`` names on one micro-batch's tensors, built the way the
    train module builds it (``build_objective`` once, then ``loss(LossInputs(...))``)."""
    from rlad_megatron.objectives import LossInputs, build_objective

    objective = build_objective(cfg, tp_group=tp_group, vocab_size=vocab_size)
    return objective.loss(LossInputs(**tensors), num_sequences=num_sequences, num_tokens=num_tokens)
