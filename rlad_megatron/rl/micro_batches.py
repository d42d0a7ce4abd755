"""Micro-batches formed by a token budget, each trimmed to its own longest row (DESIGN.md section 4).

    plan = plan_micro_batches(lengths_N, max_tokens=4096)   # list of row-index tensors
    micro = trimmed_micro_batches(batch, plan, lengths_N)  # dicts of [B_i, S_i] tensors

Legend: N rows, S row width (the rollout's padded width), B_i rows and S_i width of micro-batch i.

A row's *length* is the number of leading positions the loss reads: up to its last counted target
(``mask``) plus one; a row without counted targets (an empty response) keeps one position so it
still counts as a sequence. Positions past a row's length only ever predict padding, and the model
is causal, so cutting them changes no counted log-prob: regrouping and trimming rows leaves the
mini-batch's summed loss, its count and its gradients unchanged (the losses return sums with their
counts, ``calculate_per_token_loss``).

Packing: rows sorted by length, longest first, are cut into consecutive runs whose padded cost
``rows x longest row`` stays within the budget, choosing the cuts that minimise the tokens processed
plus a fixed overhead per micro-batch (:func:`plan_micro_batches`). Neighbours in that order have
similar lengths, so padding is small and micro-batches carry similar token counts. A row longer
than the budget gets a micro-batch of its own (counted in ``PlanStats.oversized_rows``).

Packed sequences (THD, megatron's ``PackedSeqParams``) would remove the remaining padding, but need
Transformer Engine's attention; :func:`layout_line` is the log line saying which layout a run uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PlanStats:
    """What a plan processes: real and padded token positions, micro-batches, rows over the budget."""

    real_tokens: int
    padded_tokens: int
    micro_batches: int
    oversized_rows: int

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0

    def as_metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}padding_frac": self.padding_fraction, f"{prefix}micro_batches": float(self.micro_batches),
                f"{prefix}oversized_rows": float(self.oversized_rows)}


def row_lengths(mask_NS: torch.Tensor) -> torch.Tensor:
    """``[N]`` int64: last counted position + 1, at least 1 (see the module docstring)."""
    if mask_NS.dim() != 2:
        raise ValueError(f"mask: expected shape [N, S], got {tuple(mask_NS.shape)}")
    n, s = mask_NS.shape
    pos = torch.arange(1, s + 1, dtype=torch.int64).expand(n, s)
    last = torch.where(mask_NS.to(torch.bool).cpu(), pos, torch.zeros_like(pos)).amax(dim=1) if s else \
        torch.zeros(n, dtype=torch.int64)
    return last.clamp(min=1)


def plan_micro_batches(lengths_N: torch.Tensor, *, max_tokens: int, overhead_tokens: int | None = None
                       ) -> list[torch.Tensor]:
    """Row indices of each micro-batch, ``rows x longest row <= max_tokens`` except single oversized rows.

    Rows sorted by length (longest first) are cut into consecutive runs minimising the tokens
    processed (``rows x longest row`` summed) plus ``overhead_tokens`` per micro-batch (default
    ``max_tokens / 16``: what one more micro-batch is worth in padding), by dynamic programming over
    the sorted order; without the overhead term every row would get its own micro-batch.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens_per_micro_batch: expected >= 1, got {max_tokens}")
    overhead = max_tokens // 16 if overhead_tokens is None else overhead_tokens
    lengths = [int(x) for x in lengths_N.tolist()]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    sorted_len = [lengths[i] for i in order]
    n = len(order)
    # best[j]: least cost of cutting the first j sorted rows; cut[j]: where its last run starts.
    best, cut = [0] + [float("inf")] * n, [0] * (n + 1)
    for i in range(n):  # a run starting at sorted row i has width sorted_len[i]
        width = sorted_len[i]
        j = i + 1
        while j <= n and ((j - i) * width <= max_tokens or j == i + 1):
            cost = best[i] + (j - i) * width + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
            j += 1
    plan: list[list[int]] = []
    j = n
    while j > 0:
        plan.append(order[cut[j]:j])
        j = cut[j]
    plan.reverse()
    # Each micro-batch in ascending row order: deterministic, and the original order where possible.
    return [torch.tensor(sorted(rows), dtype=torch.int64) for rows in plan]


def plan_stats(lengths_N: torch.Tensor, plan: list[torch.Tensor], *, max_tokens: int | None = None) -> PlanStats:
    widths = [int(lengths_N[rows].max()) for rows in plan]
    padded = sum(w * len(rows) for w, rows in zip(widths, plan))
    oversized = sum(1 for w in widths if max_tokens is not None and w > max_tokens)
    return PlanStats(real_tokens=int(lengths_N.sum()), padded_tokens=padded, micro_batches=len(plan),
                     oversized_rows=oversized)


def fixed_plan(n: int, micro_batch_size: int) -> list[torch.Tensor]:
    """Today's plan: consecutive rows, ``micro_batch_size`` per micro-batch (untrimmed)."""
    if n % micro_batch_size:
        raise ValueError(f"batch of {n} sequences is not divisible by micro_batch_size={micro_batch_size}")
    return [torch.arange(i, i + micro_batch_size) for i in range(0, n, micro_batch_size)]


def trimmed_micro_batches(batch: dict, plan: list[torch.Tensor], lengths_N: torch.Tensor) -> list[dict]:
    """The rows of each planned micro-batch, every ``[N, S, ...]`` tensor cut to the micro-batch's longest
    row (``[N]`` tensors are only indexed)."""
    out = []
    for rows in plan:
        width = int(lengths_N[rows].max())
        mb = {}
        for key, value in batch.items():
            if not torch.is_tensor(value):
                mb[key] = value
                continue
            value = value[rows]
            mb[key] = value[:, :width] if value.dim() >= 2 else value
        out.append(mb)
    return out


def layout_line(*, max_tokens: int, transformer_engine: bool) -> str:
    """The one log line saying which sequence layout the run uses.

    Packed sequences (THD, ``PackedSeqParams``) need Transformer Engine's attention and are not
    built yet (docs/long_sequences.md); every run uses trimmed micro-batches.
    """
    why = ("THD packing is not implemented yet" if transformer_engine
           else "THD packing needs Transformer Engine, not available here")
    return f"micro-batches: token budget {max_tokens}, trimmed to each micro-batch's longest row ({why})"
