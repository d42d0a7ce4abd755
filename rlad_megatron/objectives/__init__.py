"""Objectives as components: built once from the ``distill`` config, asked what they need.

    objective = build_objective(cfg.distill, tp_group=groups.tp, vocab_size=V)
    if objective.needs_teacher: ...              # build and run the teacher scorer
    loss, metrics = objective.loss(LossInputs(lp_s=..., lp_old=..., advantages=..., mask=..., lp_t=...))

Adding an objective is one :class:`Objective` subclass decorated with :func:`register`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from rlad_megatron.objectives import builtin  # noqa: F401 - registers rlad, grpo, kdrl, forward_kl
from rlad_megatron.objectives.base import LossInputs, Objective, Tokens
from rlad_megatron.objectives.registry import OBJECTIVES, objective_names, register

if TYPE_CHECKING:
    import torch.distributed as dist

    from rlad_megatron.config import DistillConfig


def build_objective(cfg: DistillConfig, *, tp_group: Optional[dist.ProcessGroup] = None,
                    vocab_size: Optional[int] = None) -> Objective:
    """The objective ``cfg.objective`` names; ``tp_group``/``vocab_size`` describe the logits' layout."""
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"distill.objective: expected one of {objective_names()}, got {cfg.objective!r}")
    return OBJECTIVES[cfg.objective](cfg, tp_group=tp_group, vocab_size=vocab_size)


__all__ = ["OBJECTIVES", "LossInputs", "Objective", "Tokens", "build_objective", "objective_names", "register"]
