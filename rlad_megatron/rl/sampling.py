"""Next-token sampling and sampled-token log-probs from full-vocabulary last-position logits.

Shape legend: B = sequences in the batch, V = logits width (megatron's padded vocabulary),
Vt = the true (tokenizer) vocabulary size, Vt <= V.

The rollout gathers the last-position logits across TP once per step (``[B, V]`` is small next
to the KV cache), so everything here is plain single-device code: every TP rank runs it on the
same gathered logits with the same row seeds.

Per-row random streams (``sample_tokens_seeded``): the uniform for row ``i`` at position ``t`` is
a counter-based hash of (row seed, t), not a draw from a shared generator. A row's token therefore
depends only on its own logits, seed and position: not on which other rows share the batch, their
order, or when the row was admitted (the row pool relies on this). The hash is integer arithmetic
on int64 tensors, so CPU and CUDA produce the same uniforms and a CUDA graph can capture it. The
token is the inverse CDF of softmax(logits / T), renormalised on the top-p nucleus, at that uniform.

Padded vocabulary ids (``Vt <= id < V``) are never sampled and are left out of the
log-softmax normaliser: the policy is the distribution over the true vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable

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


def sample_tokens_seeded(logits_BV: torch.Tensor, *, vocab_size: int, temperature: float, top_p: float,
                         seeds_B: torch.Tensor, positions_B: torch.Tensor) -> torch.Tensor:
    """Next token per row, int64 ``[B]``, drawn from row ``i``'s own stream at ``positions_B[i]``.

    ``seeds_B`` are int64 in ``[0, 2**63)`` (see ``rollout.rollout_row_seeds``); greedy
    (``temperature == 0``) ignores them and is the exact argmax.
    """
    logits_BVt = true_vocab_logits(logits_BV, vocab_size)
    if temperature == 0.0:
        return logits_BVt.argmax(dim=-1)
    probs_BVt = torch.softmax(logits_BVt / temperature, dim=-1)
    if top_p < 1.0:
        probs_BVt = top_p_filter(probs_BVt, top_p)
    # Inverse CDF with one hashed uniform per row and step (Gumbel-max would hash one per vocab
    # entry, ~40 integer ops on every [B, V] element). float64 so the CDF of a 100k-entry
    # vocabulary keeps its resolution. A zero-probability token has cdf[i] == cdf[i - 1] and can
    # never be the first entry above u.
    cdf_BVt = probs_BVt.double().cumsum(dim=-1)
    u_B1 = row_uniforms(seeds_B, positions_B, 1) * cdf_BVt[:, -1:]
    tokens_B = torch.searchsorted(cdf_BVt, u_B1, right=True).squeeze(-1)
    return tokens_B.clamp(max=logits_BVt.shape[-1] - 1)


# (logits [B, V], row seeds [B], positions [B]) -> (tokens [B], their log-probs [B]).
Sampler = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def make_sampler(*, vocab_size: int, temperature: float, top_p: float) -> Sampler:
    """One rollout's sampler, ``sample(logits_BV, seeds_B, positions_B) -> (tokens_B, lp_B)``: the
    tokens of :func:`sample_tokens_seeded` and their :func:`token_logprobs`. Fixed shapes and no host
    synchronisation, so the graphed decode step captures it; the row pool's eager steps call it too.
    The settings are checked by the caller (``rollout.generate``: ``validate_sampling_args``)."""

    def sample(logits_BV: torch.Tensor, seeds_B: torch.Tensor,
               positions_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens_B = sample_tokens_seeded(logits_BV, vocab_size=vocab_size, temperature=temperature, top_p=top_p,
                                        seeds_B=seeds_B, positions_B=positions_B)
        return tokens_B, token_logprobs(logits_BV, tokens_B, vocab_size=vocab_size)

    return sample


_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32), split in 16-bit halves so no product overflows int64."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with full avalanche (Wellons' "lowbias32") on int64 tensors in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_uniforms(seeds_B: torch.Tensor, positions_B: torch.Tensor, width: int) -> torch.Tensor:
    """float64 ``[B, width]`` uniforms in (0, 1): a hash of (seed, position, column), one stream per row."""
    if seeds_B.dtype != torch.int64 or positions_B.dtype != torch.int64:
        raise ValueError(f"seeds_B, positions_B: expected int64, got {seeds_B.dtype}, {positions_B.dtype}")
    key_B = _mix32((seeds_B & _MASK32) ^ 0x9E3779B9)
    key_B = _mix32(key_B ^ ((seeds_B >> 32) & _MASK32))
    key_B = _mix32(key_B ^ (positions_B & _MASK32))
    column_V = torch.arange(width, dtype=torch.int64, device=seeds_B.device)
    # Two rounds over (key, column): one round of xor-then-hash leaves neighbouring columns correlated.
    bits_BV = _mix32(_mix32(key_B[:, None] ^ column_V) ^ _mix32(key_B ^ 0x85EBCA6B)[:, None])
    return (bits_BV.double() + 0.5) / 2.0**32


def top_p_filter(probs_BVt: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability mass reaches ``top_p``.

    The token that crosses ``top_p`` is kept, so the most likely token always survives.
    ``torch.multinomial`` renormalises, so the result is left unnormalised.
    """
    sorted_BVt, order_BVt = probs_BVt.sort(dim=-1, descending=True)
    mass_before_BVt = sorted_BVt.cumsum(dim=-1) - sorted_BVt
    sorted_BVt = sorted_BVt.masked_fill(mass_before_BVt >= top_p, 0.0)
    return torch.zeros_like(probs_BVt).scatter_(-1, order_BVt, sorted_BVt)
