"""HF (Llama / Qwen2 / Qwen3) <-> megatron-core checkpoint conversion, shared by the trainer and the CLIs."""

from rlad_megatron.hf.checkpoint import (
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    format_summary,
    read_hf_checkpoint,
    read_megatron_checkpoint,
)
from rlad_megatron.hf.config_map import hf_config_from_model, model_config_from_hf
from rlad_megatron.hf.convert import hf_to_megatron_state, megatron_to_hf_state
from rlad_megatron.hf.load import checkpoint_kind, load_megatron_weights, read_checkpoint_config

__all__ = [
    "checkpoint_kind",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "format_summary",
    "hf_config_from_model",
    "hf_to_megatron_state",
    "load_megatron_weights",
    "megatron_to_hf_state",
    "model_config_from_hf",
    "read_checkpoint_config",
    "read_hf_checkpoint",
    "read_megatron_checkpoint",
]
