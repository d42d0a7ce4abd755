"""HF ``config.json`` (Llama / Qwen2 / Qwen3) <-> :class:`rlad_megatron.config.ModelConfig`.

Only plain RoPE, SiLU-gated MLPs, RMSNorm and full attention are representable by the builder;
anything else is rejected with the config field that makes it unsupported.
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


def architecture(hf_config: dict, *, source: str = "config.json") -> Architecture:
    model_type = hf_config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{source}: model_type: expected one of {sorted(ARCHITECTURES)}, got {model_type!r}")
    return ARCHITECTURES[model_type]


def _rope_theta(hf_config: dict, source: str) -> float:
    # transformers >= 5 nests RoPE settings in rope_parameters; 4.x has rope_theta + rope_scaling.
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling") or {}
    for where, block in (("rope_parameters", params), ("rope_scaling", scaling)):
        rope_type = block.get("rope_type", block.get("type", "default"))
        if rope_type not in ("default", None):
            raise ValueError(f"{source}: {where}.rope_type: only plain RoPE ('default') is supported, "
                             f"got {rope_type!r}")
    theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        raise ValueError(f"{source}: rope_theta: the model builder takes an integer RoPE base, got {theta}")
    return float(theta)


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
            rotary_base=_rope_theta(hf_config, source),
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
    if cfg.qk_layernorm:
        return "qwen3"
    return "qwen2" if cfg.add_qkv_bias else "llama"


def hf_config_from_model(cfg: ModelConfig, *, model_type: Optional[str] = None,
                         base: Optional[dict] = None) -> dict[str, Any]:
    """config.json for ``cfg``; ``base`` (the source HF config) keeps fields megatron does not model."""
    model_type = model_type or (base or {}).get("model_type") or infer_model_type(cfg)
    arch = architecture({"model_type": model_type}, source="model_type")
    if (arch.qkv_bias, arch.qk_norm) != (cfg.add_qkv_bias, cfg.qk_layernorm):
        raise ValueError(f"model_type: {model_type} needs add_qkv_bias={arch.qkv_bias}, "
                         f"qk_layernorm={arch.qk_norm}; the checkpoint has {cfg.add_qkv_bias}, {cfg.qk_layernorm}")
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
        out.update(rope_theta=cfg.rotary_base,
                   rope_parameters={"rope_type": "default", "rope_theta": cfg.rotary_base},
                   dtype=cfg.params_dtype)
        if model_type == "qwen2":
            out["use_sliding_window"] = False
        else:
            out["attention_bias"] = False
    return out


def model_config_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)
