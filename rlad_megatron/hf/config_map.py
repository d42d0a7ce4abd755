"""HF ``config.json`` (Llama / Qwen2 / Qwen3 / Qwen3-MoE / Mixtral) <-> :class:`rlad_megatron.config.ModelConfig`.

Representable by the builder: plain RoPE or Llama 3.x RoPE scaling with megatron-core's constants,
SiLU-gated MLPs, RMSNorm, full attention, and routed experts behind a softmax top-k router.
Anything else is rejected with the config field that makes it unsupported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from rlad_megatron.config import ModelConfig
from rlad_megatron.hf.keymaps import ARCHITECTURES, Architecture

_NUMERIC_FIELDS = ("hidden_size", "num_attention_heads", "num_hidden_layers", "num_key_value_heads",
                   "intermediate_size", "vocab_size", "max_position_embeddings", "rms_norm_eps", "head_dim",
                   "rope_theta")
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
# megatron-core 0.16 ``RotaryEmbedding._apply_scaling`` takes only the factor from GPTModel and
# keeps these Llama 3.1 constants (tests/unit/test_hf_families.py checks them against its signature).
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# HF MoE fields a routed-experts-only, softmax top-k model must have at these values.
_MOE_UNSUPPORTED = {
    "shared_expert_intermediate_size": 0, "n_shared_experts": 0, "moe_shared_expert_intermediate_size": 0,
    "n_group": 1, "topk_group": 1, "router_jitter_noise": 0.0,
}


def architecture(hf_config: dict, *, source: str = "config.json") -> Architecture:
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{source}: model_type: expected one of {sorted(ARCHITECTURES)}, got {model_type!r}")
    return ARCHITECTURES[model_type]


def _rope(hf_config: dict, source: str) -> dict:
    """ModelConfig's RoPE fields: rotary_base, rope_scaling, rope_scaling_factor."""
    # transformers >= 5 nests RoPE settings in rope_parameters; 4.x (and every Llama 3.x
    # checkpoint on the Hub) has rope_theta + a rope_scaling dict.
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    out = {"rope_scaling": False, "rope_scaling_factor": 8.0}
    for where, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        rope_type = block.get("rope_type", block.get("type", "default"))
        if rope_type in ("default", None):
            continue
        if rope_type != "llama3":
            raise ValueError(f"{source}: {where}.rope_type: expected 'default' or 'llama3' (what megatron-core's "
                             f"RotaryEmbedding computes), got {rope_type!r}")
        for key, megatron in MEGATRON_LLAMA3_ROPE.items():
            # transformers falls back to max_position_embeddings for a missing original length.
            got = block.get(key, hf_config.get("max_position_embeddings") if key.startswith("original") else None)
            if got is None or float(got) != megatron:
                raise ValueError(f"{source}: {where}.{key}: megatron-core's llama3 RoPE scaling fixes it at "
                                 f"{megatron:g}, got {got}")
        if not isinstance(block.get("factor"), (int, float)) or block["factor"] < 1:
            raise ValueError(f"{source}: {where}.factor: expected a number >= 1, got {block.get('factor')!r}")
        out.update(rope_scaling=True, rope_scaling_factor=float(block["factor"]))
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise ValueError(f"{source}: rope_theta: the model builder takes an integer RoPE base, got {theta}")
    return {"rotary_base": float(theta), **out}


def _moe(hf_config: dict, arch: Architecture, source: str) -> dict:
    """ModelConfig's MoE fields (empty for a dense architecture)."""
    if arch.moe is None:
        return {}
    for key, supported in _MOE_UNSUPPORTED.items():
        if hf_config.get(key) not in (None, supported):
            raise ValueError(f"{source}: {key}: expected {supported!r} or absent (routed experts behind a plain "
                             f"softmax top-k router only), got {hf_config[key]!r}")
    scoring = hf_config.get("scoring_func", "softmax")
    if scoring != "softmax":
        raise ValueError(f"{source}: scoring_func: expected 'softmax' (sigmoid routers are not supported), "
                         f"got {scoring!r}")
    experts_key = "num_experts" if "num_experts" in hf_config else "num_local_experts"
    experts = int(hf_config.get(experts_key) or 0)
    layers = int(hf_config["num_hidden_layers"])
    if arch.model_type == "mixtral":
        # Every Mixtral layer is MoE, its experts of intermediate_size, top-k always renormalised.
        return dict(num_experts=experts, moe_router_topk=int(hf_config.get("num_experts_per_tok", 2)),
                    moe_ffn_hidden_size=int(hf_config["intermediate_size"]), moe_norm_topk_prob=True)
    # Qwen3-MoE: layer i is MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0.
    step = int(hf_config.get("decoder_sparse_step", 1))
    dense = set(hf_config.get("mlp_only_layers") or [])
    pattern = "".join("1" if experts > 0 and i not in dense and (i + 1) % step == 0 else "0" for i in range(layers))
    if "1" not in pattern:
        raise ValueError(f"{source}: {experts_key}/mlp_only_layers/decoder_sparse_step: expected at least one "
                         f"MoE layer, got {experts} experts and pattern {pattern!r}")
    return dict(num_experts=experts, moe_router_topk=int(hf_config.get("num_experts_per_tok", 2)),
                moe_ffn_hidden_size=int(hf_config["moe_intermediate_size"]),
                moe_layer_pattern=None if "0" not in pattern else pattern,
                moe_norm_topk_prob=bool(hf_config.get("norm_topk_prob", False)))


def _reject(hf_config: dict, arch: Architecture, source: str) -> None:
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act: expected 'silu', got {hf_config['hidden_act']!r}")
    if hf_config.get("mlp_bias"):
        raise ValueError(f"{source}: mlp_bias: expected false (no MLP biases in the megatron layout), got true")
    # Llama/Qwen3 attention_bias adds an o_proj bias too, which the megatron layout does not hold;
    # Qwen2 always has q/k/v biases and never an o_proj bias.
    if arch.model_type != "qwen2" and hf_config.get("attention_bias"):
        raise ValueError(f"{source}: attention_bias: expected false for {arch.model_type} (o_proj bias is "
                         "not supported), got true")
    if hf_config.get("use_sliding_window"):
        raise ValueError(f"{source}: use_sliding_window: expected false (full attention only), got true")
    # Mixtral (like Mistral) applies sliding_window whenever it is set; Qwen's only with use_sliding_window.
    if arch.model_type == "mixtral" and hf_config.get("sliding_window") is not None:
        raise ValueError(f"{source}: sliding_window: expected null (full attention only), "
                         f"got {hf_config['sliding_window']!r}")
    layer_types = hf_config.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"{source}: layer_types: expected only 'full_attention', got {sorted(set(layer_types))}")


def model_config_from_hf(hf_config: dict, *, make_vocab_size_divisible_by: int = 128,
                         source: str = "config.json") -> ModelConfig:
    """The :class:`ModelConfig` that builds a megatron model equal to the HF one."""
    arch = architecture(hf_config, source=source)
    _reject(hf_config, arch, source)
    try:
        hidden = int(hf_config["hidden_size"])
        heads = int(hf_config["num_attention_heads"])
        cfg = ModelConfig(
            num_layers=int(hf_config["num_hidden_layers"]),
            hidden_size=hidden,
            num_attention_heads=heads,
            num_query_groups=int(hf_config.get("num_key_value_heads") or heads),
            ffn_hidden_size=int(hf_config["intermediate_size"]),
            vocab_size=int(hf_config["vocab_size"]),
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            max_position_embeddings=int(hf_config.get("max_position_embeddings", 2048)),
            **_rope(hf_config, source),
            **_moe(hf_config, arch, source),
            norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)),
            untie_embeddings_and_output_weights=not bool(hf_config.get("tie_word_embeddings", False)),
            add_qkv_bias=arch.qkv_bias,
            qk_layernorm=arch.qk_norm,
            kv_channels=int(hf_config.get("head_dim") or hidden // heads),
            params_dtype=_DTYPES.get(str(hf_config.get("dtype") or hf_config.get("torch_dtype")), "float32"),
        )
    except KeyError as e:
        raise ValueError(f"{source}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:  # e.g. "hidden_size": "sixty-four"
        if str(e).startswith(f"{source}:"):
            raise
        bad = [k for k, v in hf_config.items() if isinstance(v, (str, list, dict)) and k in _NUMERIC_FIELDS]
        raise ValueError(f"{source}: {bad[0] if bad else 'model dimensions'}: expected a number, got "
                         f"{hf_config.get(bad[0]) if bad else e!r}") from None
    cfg.validate(source)
    return cfg


def head_dim(cfg: ModelConfig) -> int:
    return cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads


def infer_model_type(cfg: ModelConfig) -> str:
    """The HF architecture a ModelConfig came from when no HF config was kept alongside it."""
    if cfg.num_experts:
        return "qwen3_moe" if cfg.qk_layernorm else "mixtral"
    if cfg.qk_layernorm:
        return "qwen3"
    return "qwen2" if cfg.add_qkv_bias else "llama"


def _rope_hf(cfg: ModelConfig) -> dict:
    """rope_theta + rope_parameters (transformers >= 5 reads either, 4.x reads rope_theta/rope_scaling)."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    out: dict[str, Any] = {"rope_theta": cfg.rotary_base, "rope_parameters": params}
    if cfg.rope_scaling:
        params.update(rope_type="llama3", factor=cfg.rope_scaling_factor, **MEGATRON_LLAMA3_ROPE)
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out


def _moe_hf(cfg: ModelConfig, model_type: str) -> dict:
    if model_type == "mixtral":
        if cfg.expert_ffn_hidden_size != cfg.ffn_hidden_size or not all(cfg.moe_layers) or not cfg.moe_norm_topk_prob:
            raise ValueError("model_type: mixtral needs every layer MoE, moe_ffn_hidden_size == ffn_hidden_size and "
                             f"moe_norm_topk_prob; the checkpoint has pattern {cfg.moe_layer_pattern!r}, "
                             f"{cfg.expert_ffn_hidden_size} vs {cfg.ffn_hidden_size}, {cfg.moe_norm_topk_prob}")
        return dict(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.moe_router_topk,
                    router_aux_loss_coef=cfg.moe_aux_loss_coeff)
    return dict(num_experts=cfg.num_experts, num_experts_per_tok=cfg.moe_router_topk,
                moe_intermediate_size=cfg.expert_ffn_hidden_size, norm_topk_prob=cfg.moe_norm_topk_prob,
                decoder_sparse_step=1, mlp_only_layers=[i for i, moe in enumerate(cfg.moe_layers) if not moe],
                router_aux_loss_coef=cfg.moe_aux_loss_coeff)


def hf_config_from_model(cfg: ModelConfig, *, model_type: Optional[str] = None,
                         base: Optional[dict] = None) -> dict[str, Any]:
    """config.json for ``cfg``; ``base`` (the source HF config) keeps fields megatron does not model."""
    model_type = model_type or (base or {}).get("model_type") or infer_model_type(cfg)
    arch = architecture({"model_type": model_type}, source="model_type")
    if (arch.qkv_bias, arch.qk_norm) != (cfg.add_qkv_bias, cfg.qk_layernorm):
        raise ValueError(f"model_type: {model_type} needs add_qkv_bias={arch.qkv_bias}, "
                         f"qk_layernorm={arch.qk_norm}; the checkpoint has {cfg.add_qkv_bias}, {cfg.qk_layernorm}")
    if (arch.moe is not None) != bool(cfg.num_experts):
        raise ValueError(f"model_type: {model_type} is {'an MoE' if arch.moe else 'a dense'} architecture; the "
                         f"checkpoint has num_experts={cfg.num_experts}")
    out = dict(base or {})
    out.update(
        architectures=[arch.hf_class],
        model_type=model_type,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        intermediate_size=cfg.ffn_hidden_size,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=not cfg.untie_embeddings_and_output_weights,
        head_dim=head_dim(cfg),
        hidden_act="silu",
    )
    if base is None:
        out.update(**_rope_hf(cfg), dtype=cfg.params_dtype)
        if arch.moe is not None:
            out.update(_moe_hf(cfg, model_type))
        if model_type == "qwen2":
            out["use_sliding_window"] = False
        elif model_type == "mixtral":
            out["sliding_window"] = None
        else:
            out["attention_bias"] = False
    return out


def model_config_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)
