"""Atomic, resumable megatron-core dist checkpoints (see docs/checkpointing.md)."""

from rlad_megatron.checkpointing.checkpointer import load_checkpoint, save_checkpoint
from rlad_megatron.checkpointing.files import complete_checkpoints, latest_checkpoint

__all__ = ["complete_checkpoints", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]
