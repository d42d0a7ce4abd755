"""HF (Llama / Qwen2 / Qwen3) <-> megatron-core: config and key maps, and checkpoint files on disk.

Loading into a live model is :mod:`rlad_megatron.models.weights`; directory conversion is
:mod:`rlad_megatron.conversion`.
"""

from rlad_megatron.hf.checkpoint import checkpoint_kind, read_checkpoint_config, read_hf_checkpoint
from rlad_megatron.hf.config_map import hf_config_from_model, model_config_from_hf
from rlad_megatron.hf.convert import hf_to_megatron_state, megatron_to_hf_state

__all__ = [
    "checkpoint_kind",
    "hf_config_from_model",
    "hf_to_megatron_state",
    "megatron_to_hf_state",
    "model_config_from_hf",
    "read_checkpoint_config",
    "read_hf_checkpoint",
]
