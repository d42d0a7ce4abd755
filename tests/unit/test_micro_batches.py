"""Token-budget planning: every row exactly once, the budget kept except for single oversized rows,
trimming to the longest row, and the padding it saves on a long-tailed batch."""

from __future__ import annotations

import torch

from rlad_megatron.rl.micro_batches import (
    fixed_plan,
    plan_micro_batches,
    plan_stats,
    row_lengths,
    trimmed_micro_batches,
)


def test_row_lengths_last_counted_position_and_empty_rows():
    mask = torch.zeros((3, 6), dtype=torch.bool)
    mask[0, 2:4] = True
    mask[2, 5] = True
    assert row_lengths(mask).tolist() == [4, 1, 6]


def test_plan_covers_rows_once_within_budget():
    torch.manual_seed(0)
    lengths = (torch.distributions.LogNormal(3.0, 1.0).sample((200,)).clamp(1, 400)).long()
    budget = 256
    plan = plan_micro_batches(lengths, max_tokens=budget)
    rows = torch.cat(plan).sort().values
    assert rows.tolist() == list(range(200))
    for mb in plan:
        assert len(mb) * int(lengths[mb].max()) <= budget or len(mb) == 1
    stats = plan_stats(lengths, plan, max_tokens=budget)
    assert stats.oversized_rows == int((lengths > budget).sum())
    padded = plan_stats(lengths, fixed_plan(200, 8))
    assert stats.padding_fraction < 0.1 < padded.padding_fraction


def test_trimmed_micro_batches_cut_to_longest_row():
    batch = {"tokens_BS": torch.arange(40).view(4, 10), "adv_B": torch.arange(4.0)}
    lengths = torch.tensor([3, 9, 2, 5])
    # costs (rows x width + 4 per micro-batch): [9] [5] [3, 2] = 32 beats [9] [5, 3] [2] = 33
    plan = plan_micro_batches(lengths, max_tokens=10, overhead_tokens=4)
    micro = trimmed_micro_batches(batch, plan, lengths)
    assert [tuple(m["tokens_BS"].shape) for m in micro] == [(1, 9), (1, 5), (2, 3)]
    assert micro[2]["adv_B"].tolist() == [0.0, 2.0]
    assert micro[2]["tokens_BS"].tolist() == [[0, 1, 2], [20, 21, 22]]
