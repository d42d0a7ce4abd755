"""Losses: vocab-parallel log-prob / entropy / forward-KL kernels and the TRRD objective (DESIGN.md 1-2)."""

from rlad_megatron.losses.trrd import rlad_loss
from rlad_megatron.losses.vocab_parallel import (
    check_vocab_layout,
    vocab_parallel_forward_kl,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_no_grad,
)

__all__ = ["check_vocab_layout", "rlad_loss", "vocab_parallel_forward_kl", "vocab_parallel_logprobs",
           "vocab_parallel_logprobs_no_grad"]
