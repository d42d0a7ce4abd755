"""Next-token sampling and sampled-token log-probs from full-vocabulary last-position logits.

Shape legend: B = sequences in the batch, V = logits width (megatron's padded vocabulary),
Vt = the true (tokenizer) vocabulary size, Vt <= V.

The rollout gathers the last-position logits across TP once per step (``[B, V]`` is small next
to the KV cache), so everything here is plain single-device code: every TP rank runs it on the
same gathered logits with an identically seeded generator.

Padded vocabulary ids (``Vt <= id < V``) are never sampled and are left out of the
log-softmax normaliser: the policy is the distribution over the true vocabulary.
"""

from __future__ import annotations

import torch


def validate_sampling_args(*, temperature: float, top_p: float) -> None:
    if not temperature >= 0.0:
        raise ValueError(f"temperature: expected >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")


def true_vocab_logits(logits_BV: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 logits restricted to the true vocabulary, ``[B, Vt]``."""
    if logits_BV.shape[-1] < vocab_size:
        raise ValueError(f"vocab_size: expected <= the logits width {logits_BV.shape[-1]}, got {vocab_size}")
    return logits_BV[..., :vocab_size].float()


def token_logprobs(logits_BV: torch.Tensor, tokens_B: torch.Tensor, *, vocab_size: int) -> torch.Tensor:
    """log pi(token) under the raw (temperature 1, no top-p) policy, float32 ``[B]``.

    These are the ``lp_old`` of the RL objective: the trainer recomputes the same quantity at
    temperature 1 for ``lp_s``, so the ratio is 1 when the weights have not moved.
    """
    logits_BVt = true_vocab_logits(logits_BV, vocab_size)
    lse_B = torch.logsumexp(logits_BVt, dim=-1)
    return logits_BVt.gather(-1, tokens_B.unsqueeze(-1)).squeeze(-1) - lse_B


def sample_tokens(logits_BV: torch.Tensor, *, vocab_size: int, temperature: float, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row, int64 ``[B]``: argmax when ``temperature == 0``, else nucleus sampling."""
    logits_BVt = true_vocab_logits(logits_BV, vocab_size)
    if temperature == 0.0:
        return logits_BVt.argmax(dim=-1)
    probs_BVt = torch.softmax(logits_BVt / temperature, dim=-1)
    if top_p < 1.0:
        probs_BVt = top_p_filter(probs_BVt, top_p)
    return torch.multinomial(probs_BVt, num_samples=1, generator=generator).squeeze(-1)


def top_p_filter(probs_BVt: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability mass reaches ``top_p``.

    The token that crosses ``top_p`` is kept, so the most likely token always survives.
    ``torch.multinomial`` renormalises, so the result is left unnormalised.
    """
    sorted_BVt, order_BVt = probs_BVt.sort(dim=-1, descending=True)
    mass_before_BVt = sorted_BVt.cumsum(dim=-1) - sorted_BVt
    sorted_BVt = sorted_BVt.masked_fill(mass_before_BVt >= top_p, 0.0)
    return torch.zeros_like(probs_BVt).scatter_(-1, order_BVt, sorted_BVt)
