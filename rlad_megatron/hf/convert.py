"""HF state dict <-> full (TP=1, PP=1) megatron-core state dict, validated tensor by tensor.

Pure functions on in-memory dicts; directory handling lives in :mod:`rlad_megatron.hf.checkpoint`.
Tensors are copied, never cast, so HF -> megatron -> HF is bitwise.

Legend: V vocab, Vp padded vocab, h hidden, H heads, G query groups, D head dim, F ffn size,
E experts, Fe expert ffn size.
"""

from __future__ import annotations

import re
import warnings

import torch

from rlad_megatron.config import ModelConfig
from rlad_megatron.hf import keymaps as km
from rlad_megatron.hf.config_map import head_dim


def _ignored_hf_name(name: str) -> bool:
    # Old Llama checkpoints persist the RoPE frequency buffer; megatron recomputes it.
    return name.endswith(".rotary_emb.inv_freq")


def layer_experts(cfg: ModelConfig) -> list[int]:
    """Per layer: its number of routed experts (0: a dense MLP)."""
    return [cfg.num_experts if moe else 0 for moe in cfg.moe_layers]


_EXPERT = re.compile(r"\.experts\.\d+\.")


def expected_hf_shapes(arch: km.Architecture, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, H, G, D, F, V = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, head_dim(cfg),
                        cfg.ffn_hidden_size, cfg.vocab_size)
    E, Fe = cfg.num_experts, cfg.expert_ffn_hidden_size
    moe = arch.moe
    expert_shapes = {} if moe is None else {
        f"{moe.block}.gate.weight": (E, h), f"{moe.block}.experts.e.{moe.gate}.weight": (Fe, h),
        f"{moe.block}.experts.e.{moe.up}.weight": (Fe, h), f"{moe.block}.experts.e.{moe.down}.weight": (h, Fe)}
    tied = not cfg.untie_embeddings_and_output_weights
    shapes: dict[str, tuple[int, ...]] = {}
    for name in km.expected_hf_names(arch, num_layers=cfg.num_layers, tied=tied, layer_experts=layer_experts(cfg)):
        leaf = name.split(".", 3)[-1] if name.startswith("model.layers.") else name
        leaf = _EXPERT.sub(".experts.e.", leaf)
        shapes[name] = expert_shapes.get(leaf) or {
            km.HF_EMBED: (V, h), km.HF_LM_HEAD: (V, h), "model.norm.weight": (h,),
            "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (H * D, h), "self_attn.k_proj.weight": (G * D, h),
            "self_attn.v_proj.weight": (G * D, h), "self_attn.q_proj.bias": (H * D,),
            "self_attn.k_proj.bias": (G * D,), "self_attn.v_proj.bias": (G * D,),
            "self_attn.o_proj.weight": (h, H * D), "self_attn.q_norm.weight": (D,),
            "self_attn.k_norm.weight": (D,), "mlp.gate_proj.weight": (F, h), "mlp.up_proj.weight": (F, h),
            "mlp.down_proj.weight": (h, F),
        }[leaf]
    return shapes


def expected_megatron_shapes(cfg: ModelConfig, *, padded_vocab: int) -> dict[str, tuple[int, ...]]:
    h, H, G, D, F = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups, head_dim(cfg),
                     cfg.ffn_hidden_size)
    E, Fe = cfg.num_experts, cfg.expert_ffn_hidden_size
    qkv_rows = (H + 2 * G) * D
    shapes: dict[str, tuple[int, ...]] = {km.EMBED: (padded_vocab, h)}
    for i, experts in enumerate(layer_experts(cfg)):
        p = f"decoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attention.linear_qkv.weight"] = (qkv_rows, h)
        if cfg.add_qkv_bias:
            shapes[p + "self_attention.linear_qkv.bias"] = (qkv_rows,)
        if cfg.qk_layernorm:
            shapes[p + "self_attention.q_layernorm.weight"] = (D,)
            shapes[p + "self_attention.k_layernorm.weight"] = (D,)
        shapes[p + "self_attention.linear_proj.weight"] = (h, H * D)
        shapes[p + "pre_mlp_layernorm.weight"] = (h,)
        if not experts:
            shapes[p + "mlp.linear_fc1.weight"] = (2 * F, h)
            shapes[p + "mlp.linear_fc2.weight"] = (h, F)
            continue
        shapes[p + "mlp.router.weight"] = (E, h)
        for e in range(experts):
            shapes[p + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = (2 * Fe, h)
            shapes[p + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = (h, Fe)
    shapes["decoder.final_layernorm.weight"] = (h,)
    if cfg.untie_embeddings_and_output_weights:
        shapes[km.OUTPUT] = (padded_vocab, h)
    return shapes


def check_names_and_shapes(actual: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], *,
                           where: dict[str, str] | str) -> None:
    """Missing, unexpected and mis-shaped tensors, each error naming the tensor and its file."""
    def file_of(name: str) -> str:
        return where if isinstance(where, str) else where.get(name, "?")

    missing = [n for n in expected if n not in actual]
    if missing:
        files = where if isinstance(where, str) else sorted(set(where.values()))
        raise ValueError(f"missing tensor {missing[0]!r} in {files}"
                         + (f" (and {len(missing) - 1} more: {missing[1:4]})" if len(missing) > 1 else ""))
    unexpected = [n for n in actual if n not in expected]
    if unexpected:
        raise ValueError(f"{file_of(unexpected[0])}: unexpected tensor {unexpected[0]!r}"
                         + (f" (and {len(unexpected) - 1} more: {unexpected[1:4]})" if len(unexpected) > 1 else "")
                         + " for this architecture/config")
    for name, shape in expected.items():
        if tuple(actual[name]) != tuple(shape):
            raise ValueError(f"{file_of(name)}: tensor {name!r}: expected shape {tuple(shape)}, "
                             f"got {tuple(actual[name])}")


def select_hf_names(names: list[str], *, tied: bool) -> list[str]:
    """Drop names the conversion ignores: RoPE buffers, and lm_head when tied to the embedding."""
    keep = [n for n in names if not _ignored_hf_name(n)]
    if tied and km.HF_LM_HEAD in keep:
        keep.remove(km.HF_LM_HEAD)
    return keep


def hf_to_megatron_state(hf: dict[str, torch.Tensor], cfg: ModelConfig, arch: km.Architecture, *,
                         padded_vocab: int) -> dict[str, torch.Tensor]:
    """HF tensors (already validated) -> full megatron layout; embedding rows padded with zeros to Vp."""
    tied = not cfg.untie_embeddings_and_output_weights
    H, G, D = cfg.num_attention_heads, cfg.num_query_groups, head_dim(cfg)
    if tied and km.HF_LM_HEAD in hf and not torch.equal(hf[km.HF_LM_HEAD], hf[km.HF_EMBED]):
        warnings.warn("tie_word_embeddings is true but lm_head.weight differs from embed_tokens; "
                      "lm_head.weight is ignored, as transformers does", stacklevel=2)
    out: dict[str, torch.Tensor] = {}
    out[km.EMBED] = pad_vocab(hf[km.HF_EMBED], padded_vocab)
    for i, experts in enumerate(layer_experts(cfg)):
        for src, dst in km.one_to_one_map(arch, layer=i, experts=experts).items():
            out[dst] = hf[src]
        for dst, (q, k, v) in km.qkv_names(arch, layer=i):
            out[dst] = km.fuse_qkv(hf[q], hf[k], hf[v], num_heads=H, num_groups=G, head_dim=D)
        for dst, (gate, up) in km.fc1_names(arch, layer=i, experts=experts):
            out[dst] = km.fuse_fc1(hf[gate], hf[up])
    out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
    if not tied:
        out[km.OUTPUT] = pad_vocab(hf[km.HF_LM_HEAD], padded_vocab)
    return _order_like(out, expected_megatron_shapes(cfg, padded_vocab=padded_vocab))


def megatron_to_hf_state(meg: dict[str, torch.Tensor], cfg: ModelConfig,
                         arch: km.Architecture) -> dict[str, torch.Tensor]:
    """Full megatron layout (any Vp >= V) -> HF tensors; padded vocab rows are dropped."""
    tied = not cfg.untie_embeddings_and_output_weights
    H, G, D, V = cfg.num_attention_heads, cfg.num_query_groups, head_dim(cfg), cfg.vocab_size
    out: dict[str, torch.Tensor] = {km.HF_EMBED: meg[km.EMBED][:V].contiguous()}
    for i, experts in enumerate(layer_experts(cfg)):
        for dst, src in km.one_to_one_map(arch, layer=i, experts=experts).items():
            out[dst] = meg[src]
        for src, names in km.qkv_names(arch, layer=i):
            for name, t in zip(names, km.split_qkv(meg[src], num_heads=H, num_groups=G, head_dim=D)):
                out[name] = t
        for src, names in km.fc1_names(arch, layer=i, experts=experts):
            for name, t in zip(names, km.split_fc1(meg[src])):
                out[name] = t
    out["model.norm.weight"] = meg["decoder.final_layernorm.weight"]
    if not tied:
        out[km.HF_LM_HEAD] = meg[km.OUTPUT][:V].contiguous()
    return _order_like(out, expected_hf_shapes(arch, cfg))


def pad_vocab(weight_VH: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    """Zero rows up to ``padded_vocab`` (or strip them: rows past the true vocab carry nothing)."""
    rows = weight_VH.shape[0]
    if rows >= padded_vocab:
        return weight_VH[:padded_vocab].contiguous()
    pad = weight_VH.new_zeros((padded_vocab - rows, *weight_VH.shape[1:]))
    return torch.cat([weight_VH, pad], dim=0)


def _order_like(tensors: dict[str, torch.Tensor], order: dict) -> dict[str, torch.Tensor]:
    assert set(tensors) == set(order), sorted(set(tensors) ^ set(order))
    return {n: tensors[n] for n in order}
