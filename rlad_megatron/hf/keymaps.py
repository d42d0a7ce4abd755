"""Templated HF <-> megatron-core key maps for Llama-shaped decoders (Llama, Qwen2, Qwen3,
and the MoE families Qwen3-MoE and Mixtral).

Megatron names are the full (TP=1, PP=1) layout of ``GPTModel`` with megatron-core's local
layer spec; :mod:`rlad_megatron.models.weights` loads that layout into any TP/PP rank.

Two megatron tensors fuse several HF tensors:

    linear_qkv (weight [G*(H/G+2)*D, hidden], bias [G*(H/G+2)*D]): rows grouped per query group g,
        [q heads of group g (H/G*D rows) | k_g (D rows) | v_g (D rows)] for g = 0..G-1
        (megatron-core ``SelfAttention.get_query_key_value_tensors`` views the output as
        [.., G, (H/G + 2) * D] and splits each group into q, k, v).
    linear_fc1 (weight [2*F, hidden]): [gate_proj ; up_proj] (``MLP`` chunks it in two: act(first) * second).
        The same per expert of an MoE layer (F = the expert FFN size).

MoE layers (megatron-core ``MoELayer`` with ``SequentialMLP`` experts, the local spec's layout):
HF ``{block}.gate.weight`` [E, hidden] is ``mlp.router.weight``; HF expert ``e``'s gate/up/down
projections are ``mlp.experts.local_experts.{e}.linear_fc1`` ([gate; up]) and ``.linear_fc2``.
Names are the full layout (EP=1: local expert e is global expert e). HF names are the on-disk
checkpoint names (transformers >= 5 fuses the experts in memory, not on disk).

Legend: H query heads, G query groups (KV heads), D head dim, F ffn size, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class MoeNames:
    """Where an HF MoE block keeps its router and experts in the checkpoint."""

    block: str  # model.layers.{i}.<block>.gate / .experts.{e}
    gate: str  # expert projections: SiLU(gate) * up, then down
    up: str
    down: str


@dataclass(frozen=True)
class Architecture:
    """What a supported HF architecture adds to the plain Llama block."""

    model_type: str
    hf_class: str
    qkv_bias: bool
    qk_norm: bool
    moe: Optional[MoeNames] = None


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", "LlamaForCausalLM", qkv_bias=False, qk_norm=False),
    "qwen2": Architecture("qwen2", "Qwen2ForCausalLM", qkv_bias=True, qk_norm=False),
    "qwen3": Architecture("qwen3", "Qwen3ForCausalLM", qkv_bias=False, qk_norm=True),
    "qwen3_moe": Architecture("qwen3_moe", "Qwen3MoeForCausalLM", qkv_bias=False, qk_norm=True,
                              moe=MoeNames("mlp", gate="gate_proj", up="up_proj", down="down_proj")),
    "mixtral": Architecture("mixtral", "MixtralForCausalLM", qkv_bias=False, qk_norm=False,
                            moe=MoeNames("block_sparse_moe", gate="w1", up="w3", down="w2")),
}

# HF name template -> megatron name template for tensors that map one-to-one.
_GLOBAL_MAP = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}
_LAYER_MAP = {
    "model.layers.{i}.input_layernorm.weight": "decoder.layers.{i}.input_layernorm.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "decoder.layers.{i}.self_attention.linear_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "decoder.layers.{i}.pre_mlp_layernorm.weight",
}
_DENSE_FC2 = {"model.layers.{i}.mlp.down_proj.weight": "decoder.layers.{i}.mlp.linear_fc2.weight"}
_HF_ROUTER = "model.layers.{i}.{block}.gate.weight"
_MEG_ROUTER = "decoder.layers.{i}.mlp.router.weight"
_HF_EXPERT = "model.layers.{i}.{block}.experts.{e}.{p}.weight"
_MEG_EXPERT = "decoder.layers.{i}.mlp.experts.local_experts.{e}.linear_fc{n}.weight"
_QK_NORM_MAP = {
    "model.layers.{i}.self_attn.q_norm.weight": "decoder.layers.{i}.self_attention.q_layernorm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "decoder.layers.{i}.self_attention.k_layernorm.weight",
}
_HF_QKV = "model.layers.{i}.self_attn.{p}_proj.{kind}"
_HF_FC1 = "model.layers.{i}.mlp.{p}_proj.weight"
_MEG_QKV = "decoder.layers.{i}.self_attention.linear_qkv.{kind}"
_MEG_FC1 = "decoder.layers.{i}.mlp.linear_fc1.weight"

EMBED = "embedding.word_embeddings.weight"
OUTPUT = "output_layer.weight"
HF_EMBED = "model.embed_tokens.weight"
HF_LM_HEAD = "lm_head.weight"


def one_to_one_map(arch: Architecture, *, layer: int, experts: int = 0) -> dict[str, str]:
    """HF -> megatron names of one layer's tensors that are copied unchanged.

    ``experts``: the layer's number of routed experts (0: a dense MLP).
    """
    table = dict(_LAYER_MAP)
    if arch.qk_norm:
        table.update(_QK_NORM_MAP)
    if not experts:
        table.update(_DENSE_FC2)
    out = {hf.format(i=layer): meg.format(i=layer) for hf, meg in table.items()}
    if experts:
        moe = _moe(arch)
        out[_HF_ROUTER.format(i=layer, block=moe.block)] = _MEG_ROUTER.format(i=layer)
        for e in range(experts):
            out[_HF_EXPERT.format(i=layer, block=moe.block, e=e, p=moe.down)] = _MEG_EXPERT.format(i=layer, e=e, n=2)
    return out


def _moe(arch: Architecture) -> MoeNames:
    assert arch.moe is not None, f"{arch.model_type} has no MoE layers"
    return arch.moe


def global_map(*, tied: bool) -> dict[str, str]:
    table = dict(_GLOBAL_MAP)
    if tied:
        del table[HF_LM_HEAD]
    return table


def qkv_names(arch: Architecture, *, layer: int) -> list[tuple[str, list[str]]]:
    """[(megatron fused name, [hf q, k, v names])] for the weight and, with qkv bias, the bias."""
    kinds = ["weight", "bias"] if arch.qkv_bias else ["weight"]
    return [(_MEG_QKV.format(i=layer, kind=k), [_HF_QKV.format(i=layer, p=p, kind=k) for p in "qkv"])
            for k in kinds]


def fc1_names(arch: Architecture, *, layer: int, experts: int = 0) -> list[tuple[str, list[str]]]:
    """[(megatron linear_fc1 name, [hf gate, up names])]: one for a dense layer, one per expert."""
    if not experts:
        return [(_MEG_FC1.format(i=layer), [_HF_FC1.format(i=layer, p=p) for p in ("gate", "up")])]
    moe = _moe(arch)
    return [(_MEG_EXPERT.format(i=layer, e=e, n=1),
             [_HF_EXPERT.format(i=layer, block=moe.block, e=e, p=p) for p in (moe.gate, moe.up)])
            for e in range(experts)]


def expected_hf_names(arch: Architecture, *, num_layers: int, tied: bool,
                      layer_experts: Optional[list[int]] = None) -> list[str]:
    """Every tensor an HF checkpoint of this architecture must hold, in model order.

    ``layer_experts[i]``: layer i's number of routed experts (0: dense; None: all dense).
    """
    layer_experts = layer_experts or [0] * num_layers
    names = [HF_EMBED]
    for i in range(num_layers):
        names += list(one_to_one_map(arch, layer=i, experts=layer_experts[i]))
        for _, hf in qkv_names(arch, layer=i):
            names += hf
        for _, hf in fc1_names(arch, layer=i, experts=layer_experts[i]):
            names += hf
    names.append("model.norm.weight")
    if not tied:
        names.append(HF_LM_HEAD)
    return names


# ---------------------------------------------------------------- fusion


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, num_heads: int, num_groups: int,
             head_dim: int) -> torch.Tensor:
    """HF q [H*D, ...], k/v [G*D, ...] -> megatron linear_qkv [G*(H/G+2)*D, ...] (weight or bias)."""
    rest = q.shape[1:]
    per_group = num_heads // num_groups
    q_G = q.reshape(num_groups, per_group * head_dim, *rest)
    k_G = k.reshape(num_groups, head_dim, *rest)
    v_G = v.reshape(num_groups, head_dim, *rest)
    return torch.cat([q_G, k_G, v_G], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, *, num_heads: int, num_groups: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    rest = qkv.shape[1:]
    per_group = num_heads // num_groups
    grouped = qkv.reshape(num_groups, (per_group + 2) * head_dim, *rest)
    q, k, v = torch.split(grouped, [per_group * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *rest).contiguous(), k.reshape(-1, *rest).contiguous(),
            v.reshape(-1, *rest).contiguous())


def fuse_fc1(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_fc1(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


# ---------------------------------------------------------------- Transformer Engine names


_TE_NORMS = {".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
             ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight"}


def te_to_local_name(name: str) -> str:
    """TE-spec name -> megatron local-spec name (the full layout's names).

    TE fuses the pre-norms into the next linear; megatron's dist-checkpoint keys use the TE
    names for both specs.
    """
    for local, te in _TE_NORMS.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name
