"""Tiny random HF models saved with save_pretrained, for conversion tests.

Families: llama, qwen2, qwen3 (dense), llama3 (Llama with Llama 3.2's RoPE scaling), qwen3_moe
(one dense layer via mlp_only_layers) and mixtral (4 experts, top-2).
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 250
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-6)


# Llama 3.2's rope_scaling as its config.json has it; rope_theta 500000 puts 3 of the 8 frequency
# pairs of a 16-wide head past the 8192-token wavelength (scaled by 1/factor) and 1 in between.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
FAMILIES = {
    "llama3": dict(rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0}),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                      mlp_only_layers=[1], norm_topk_prob=True),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
}


def tiny_hf_model(model_type: str, *, tied: bool = False, dtype: torch.dtype = torch.float32, **extra):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config, "llama3": transformers.LlamaConfig,
           "qwen3_moe": transformers.Qwen3MoeConfig, "mixtral": transformers.MixtralConfig}[model_type]
    # head_dim 16 = hidden / heads; Qwen3's default (128) would not be.
    config = cls(**{**SHAPE, "head_dim": 16, "tie_word_embeddings": tied, **FAMILIES.get(model_type, {}), **extra})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Every tensor random (norms around 1, biases non-zero) so a wrong mapping cannot hide.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.to(dtype)


def save_tiny_hf(directory: Path, model_type: str, *, tied: bool = False, dtype: torch.dtype = torch.float32,
                 config: dict | None = None, **save_kwargs) -> Path:
    """``config``: HF config fields overriding the family's (e.g. norm_topk_prob=False)."""
    model = tiny_hf_model(model_type, tied=tied, dtype=dtype, **(config or {}))
    model.save_pretrained(str(directory), **save_kwargs)
    return directory
