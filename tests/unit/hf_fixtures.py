"""Tiny random HF models (Llama / Qwen2 / Qwen3) saved with save_pretrained, for conversion tests."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 250
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128, rms_norm_eps=1e-6)


def tiny_hf_model(model_type: str, *, tied: bool = False, dtype: torch.dtype = torch.float32, **extra):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "qwen3": transformers.Qwen3Config}[model_type]
    # head_dim 16 = hidden / heads; Qwen3's default (128) would not be.
    config = cls(**SHAPE, head_dim=16, tie_word_embeddings=tied, **extra)
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
                 **save_kwargs) -> Path:
    model = tiny_hf_model(model_type, tied=tied, dtype=dtype)
    model.save_pretrained(str(directory), **save_kwargs)
    return directory
