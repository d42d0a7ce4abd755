"""Config -> megatron-core ``TransformerConfig`` -> ``GPTModel`` (Llama/Qwen shapes, dense or MoE).

Transformer Engine layer specs when TE imports and the model runs on CUDA; megatron-core's
local (non-TE) spec otherwise, so the same builder serves CPU tests and GPU jobs. MoE models
(Qwen3-MoE, Mixtral) use megatron-core's decoder block spec, which picks a dense or an MoE layer
spec per layer from ``moe_layer_freq``; grouped GEMM only with TE.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import unwrap_model

from rlad_megatron.config import ModelSection
from rlad_megatron.distributed.compat import patch_moe_router_without_te
from rlad_megatron.distributed.groups import ParallelGroups

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def _use_te(device: torch.device) -> bool:
    return device.type == "cuda" and te_available()


def moe_config(section: ModelSection, *, device: torch.device) -> dict:
    """The TransformerConfig fields of an MoE model (empty for a dense one)."""
    m, p = section.model, section.parallel
    if not m.num_experts:
        return {}
    return dict(
        num_moe_experts=m.num_experts,
        moe_ffn_hidden_size=m.expert_ffn_hidden_size,
        moe_router_topk=m.moe_router_topk,
        moe_layer_freq=[int(x) for x in m.moe_layers],
        # HF: softmax over all experts, top-k, then (norm_topk_prob) renormalise; megatron's
        # default (softmax over the top-k logits) is the same renormalised distribution.
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not m.moe_norm_topk_prob,
        moe_router_load_balancing_type="aux_loss" if m.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=m.moe_aux_loss_coeff,
        # No capacity factor (megatron's default): every token reaches its top-k experts, as in HF.
        # All-to-all is megatron's dispatcher for EP on GPUs (not run here: no GPU in CI); the CPU
        # tests run the all-gather one, which gives the same routing.
        moe_token_dispatcher_type="alltoall" if device.type == "cuda" else "allgather",
        moe_grouped_gemm=_use_te(device),
        expert_model_parallel_size=p.expert_model_parallel_size,
    )


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
        **moe_config(section, device=device),
    )


def layer_spec(section: ModelSection, *, device: torch.device, config: TransformerConfig | None = None,
               pp_rank: int = 0):
    """One layer spec for a dense model; megatron's per-layer block spec (this stage's layers) for MoE."""
    if section.model.num_experts:
        assert config is not None, "an MoE layer spec needs the TransformerConfig"
        return get_gpt_decoder_block_spec(config, use_transformer_engine=_use_te(device), normalization="RMSNorm",
                                          pp_rank=pp_rank)
    if _use_te(device):
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
    if section.model.num_experts and not _use_te(device):
        patch_moe_router_without_te()
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(section, device=device, config=config, pp_rank=groups.pp_rank),
        vocab_size=section.padded_vocab_size,
        max_sequence_length=section.model.max_position_embeddings,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=not section.model.untie_embeddings_and_output_weights,
        position_embedding_type="rope",
        rotary_base=int(section.model.rotary_base),
        rope_scaling=section.model.rope_scaling,
        rope_scaling_factor=section.model.rope_scaling_factor,
        pg_collection=groups.collection,
    )
    # What GPTModel does not keep: the true vocabulary (checkpoints record it) and the fields
    # megatron folds into the rotary embedding or the layer specs (weights.check_model_matches).
    model.model_config = section.model
    return model.to(device)


def true_vocab_size(model: torch.nn.Module) -> int | None:
    """The tokenizer vocabulary a model built by :func:`build_gpt_model` was built for (None otherwise)."""
    cfg = getattr(unwrap_model(model), "model_config", None)
    return None if cfg is None else cfg.vocab_size


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Teacher/reference: eval mode, no gradients, so no optimizer state is ever built for it."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
