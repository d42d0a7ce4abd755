"""Config -> megatron-core ``TransformerConfig`` -> ``GPTModel`` (Llama/Qwen shapes).

Transformer Engine layer specs when TE imports and the model runs on CUDA; megatron-core's
local (non-TE) spec otherwise, so the same builder serves CPU tests and GPU jobs.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import unwrap_model

from rlad_megatron.config import ModelSection
from rlad_megatron.distributed.groups import ParallelGroups

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def transformer_config(section: ModelSection, *, device: torch.device) -> TransformerConfig:
    m, p = section.model, section.parallel
    dtype = _DTYPES[m.params_dtype]
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        ffn_hidden_size=m.ffn_hidden_size,
        kv_channels=m.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel and p.tensor_model_parallel_size > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        use_cpu_initialization=device.type == "cpu",
        # Sampling runs the model one token at a time; no activation recompute, no fusions
        # that need CUDA kernels on the CPU path.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )


def layer_spec(section: ModelSection, *, device: torch.device):
    if device.type == "cuda" and te_available():
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=section.model.qk_layernorm)
    return get_gpt_layer_local_spec(qk_layernorm=section.model.qk_layernorm, normalization="RMSNorm")


def kernels_line(device: torch.device) -> str:
    """One line saying which layers and optimizer kernels a run on ``device`` uses (printed once per run;
    megatron-core's own per-rank copies of this are silenced in ``rlad_megatron/__init__.py``)."""
    te, apex = te_available(), importlib.util.find_spec("apex") is not None
    spec = "Transformer Engine layer spec" if device.type == "cuda" and te else "megatron-core local layer spec"
    adam = "fused Adam (TE/apex)" if te or apex else "torch Adam"
    missing = [name for name, ok in (("transformer_engine", te), ("apex", apex)) if not ok]
    note = f" ({' and '.join(missing)} not installed)" if missing else ""
    return f"kernels: {spec}, {adam}{note}"


def build_gpt_model(section: ModelSection, groups: ParallelGroups, *, device: torch.device) -> GPTModel:
    """One pipeline stage of the model described by ``section`` for this rank."""
    config = transformer_config(section, device=device)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(section, device=device),
        vocab_size=section.padded_vocab_size,
        max_sequence_length=section.model.max_position_embeddings,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=not section.model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=int(section.model.rotary_base),
        pg_collection=groups.collection,
    )
    # GPTModel knows only the padded vocabulary; checkpoints record the true one (see true_vocab_size).
    model.true_vocab_size = section.model.vocab_size
    return model.to(device)


def true_vocab_size(model: torch.nn.Module) -> int | None:
    """The tokenizer vocabulary a model built by :func:`build_gpt_model` was built for (None otherwise)."""
    return getattr(unwrap_model(model), "true_vocab_size", None)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Teacher/reference: eval mode, no gradients, so no optimizer state is ever built for it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
