"""Single-process checks of the sampling kernel used by rollouts (rlad_megatron/rl/sampling.py)."""

from __future__ import annotations

import pytest
import torch

from rlad_megatron.rl.sampling import sample_tokens_seeded, token_logprobs, top_p_filter, validate_sampling_args


def _logits(rows: int, vocab: int, padded: int) -> torch.Tensor:
    logits = torch.randn(rows, padded) * 3
    # Padded ids get the largest logits: any leak into sampling or the normaliser shows up.
    logits[:, vocab:] = logits.max() + 10
    return logits


def test_greedy_is_argmax_over_true_vocab():
    logits = _logits(6, 50, 64)
    tokens = sample_tokens_seeded(logits, vocab_size=50, temperature=0.0, top_p=1.0,
                                  seeds_B=torch.arange(6), positions_B=torch.zeros(6, dtype=torch.long))
    assert torch.equal(tokens, logits[:, :50].argmax(-1))


def test_logprobs_are_temperature_one_log_softmax_over_true_vocab():
    logits = _logits(6, 50, 64)
    tokens = torch.randint(0, 50, (6,))
    expected = torch.log_softmax(logits[:, :50].double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, tokens, vocab_size=50), expected.float())


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.softmax(torch.randn(4, 30), -1)
    top_p = float(torch.rand(()) * 0.8 + 0.1)
    kept = top_p_filter(probs, top_p) > 0
    for row, keep in zip(probs, kept):
        order = row.argsort(descending=True)
        mass = row[order].cumsum(0)
        size = int((mass < top_p).sum()) + 1  # the token crossing top_p is kept
        assert set(order[:size].tolist()) == set(keep.nonzero().squeeze(-1).tolist())


def test_sampling_is_reproducible_and_stays_in_nucleus_and_true_vocab():
    logits = _logits(64, 50, 64)
    seeds_B = torch.randint(0, 2**62, (64,), generator=torch.Generator().manual_seed(11))
    draws = [sample_tokens_seeded(logits, vocab_size=50, temperature=0.7, top_p=0.5, seeds_B=seeds_B,
                                  positions_B=torch.full((64,), 3)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    nucleus = top_p_filter(torch.softmax(logits[:, :50] / 0.7, -1), 0.5) > 0
    assert nucleus.gather(-1, draws[0][:, None]).all()
    assert (draws[0] < 50).all()


def test_invalid_arguments_name_the_field():
    with pytest.raises(ValueError, match="temperature"):
        validate_sampling_args(temperature=-1.0, top_p=1.0)
    with pytest.raises(ValueError, match="top_p"):
        validate_sampling_args(temperature=1.0, top_p=0.0)


def test_repeat_prompts_groups_samples_of_a_prompt_together():
    from rlad_megatron.rl.rollout import repeat_prompts

    prompts = [[1, 2], [3], [4, 5, 6]]
    rows = repeat_prompts(prompts, group_size=3)
    assert [rows[i] for i in range(0, 9, 3)] == prompts
    assert all(rows[i] == prompts[i // 3] for i in range(9))
    with pytest.raises(ValueError, match="group_size"):
        repeat_prompts(prompts, group_size=0)


@pytest.mark.parametrize("change,field", [
    (dict(prompts=[[1], []]), r"prompts\[1\]"),
    (dict(prompts=[[1, 99]]), r"prompts\[0\]"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(eos_id=50), "eos_id"),
    (dict(pad_id=-1), "pad_id"),
    (dict(top_p=1.5), "top_p"),
    (dict(model=None), "sequence_parallel"),
    (dict(max_rows=-1), "max_rows"),
    (dict(row_seeds=[1, 2]), "row_seeds"),
])
def test_generate_rejects_bad_arguments(change, field):
    from types import SimpleNamespace

    from rlad_megatron.rl.rollout import _validate

    args = dict(model=SimpleNamespace(config=SimpleNamespace(sequence_parallel=False)), prompts=[[1, 2]],
                max_new_tokens=4, temperature=1.0, top_p=1.0, vocab_size=50, pad_id=0, eos_id=2)
    if "model" in change:
        change = dict(model=SimpleNamespace(config=SimpleNamespace(sequence_parallel=True)))
    with pytest.raises(ValueError, match=field):
        _validate(**(args | change))
