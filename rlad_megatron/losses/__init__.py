"""Losses: vocab-parallel log-prob / entropy / forward-KL kernels and the TRRD numeric helpers (DESIGN.md 1-2).

The objectives built from them (rlad, grpo, kdrl, forward_kl) are in :mod:`rlad_megatron.objectives`.
"""

from rlad_megatron.losses.chunked import chunked_linear_logprobs
from rlad_megatron.losses.topk import vocab_parallel_topk_forward_kl, vocab_parallel_topk_logprobs
from rlad_megatron.losses.vocab_parallel import (
    check_vocab_layout,
    vocab_parallel_forward_kl,
    vocab_parallel_logprobs,
    vocab_parallel_logprobs_no_grad,
)

__all__ = ["check_vocab_layout", "chunked_linear_logprobs", "vocab_parallel_forward_kl", "vocab_parallel_logprobs",
           "vocab_parallel_logprobs_no_grad", "vocab_parallel_topk_forward_kl", "vocab_parallel_topk_logprobs"]
