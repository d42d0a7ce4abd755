"""The one list of objective names: ``distill.objective`` -> the class that owns its loss."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rlad_megatron.objectives.base import Objective

OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make ``cls`` selectable as ``distill.objective: <cls.name>``."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__}.name: expected a non-empty objective name")
    if cls.name in OBJECTIVES and OBJECTIVES[cls.name] is not cls:
        raise ValueError(f"distill.objective: {cls.name!r} is already registered by "
                         f"{OBJECTIVES[cls.name].__qualname__}")
    OBJECTIVES[cls.name] = cls
    return cls


def objective_names() -> list[str]:
    return list(OBJECTIVES)
