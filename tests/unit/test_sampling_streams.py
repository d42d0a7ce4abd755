"""Per-row random streams (rl/sampling.py ``sample_tokens_seeded``), row seeds and the log-prob mismatch metric.

The distribution checks compare empirical frequencies with the exact softmax at a tolerance
derived from the binomial standard deviation of the sample count (6 sigma), not fixed numbers.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlad_megatron.rl.rollout import repeat_prompts, rollout_row_seeds
from rlad_megatron.rl.rollout_metrics import MAX_KEY, MEAN_KEY, logprob_mismatch
from rlad_megatron.rl.sampling import row_uniforms, sample_tokens_seeded, top_p_filter

VOCAB, PADDED = 40, 48


def _seeds(n: int) -> torch.Tensor:
    return torch.randint(0, 2**63 - 1, (n,), dtype=torch.int64)


def _logits(rows: int) -> torch.Tensor:
    logits = torch.randn(rows, PADDED) * 2
    logits[:, VOCAB:] = logits.max() + 10  # padded ids must never be drawn
    return logits


def _draw(logits, seeds, positions, temperature=0.8, top_p=1.0):
    return sample_tokens_seeded(logits, vocab_size=VOCAB, temperature=temperature, top_p=top_p, seeds_B=seeds,
                                positions_B=positions)


def test_a_rows_draw_depends_only_on_its_logits_seed_and_position():
    logits, seeds, positions = _logits(32), _seeds(32), torch.randint(0, 1000, (32,))
    full = _draw(logits, seeds, positions, top_p=0.9)
    assert torch.equal(full, _draw(logits, seeds, positions, top_p=0.9))
    # Any subset in any order (another batch, another admission order) draws the same tokens.
    order = torch.randperm(32)[:11]
    assert torch.equal(_draw(logits[order], seeds[order], positions[order], top_p=0.9), full[order])
    # Another position or seed is another draw: the streams are not constant.
    moved = _draw(logits, seeds, positions + 1, top_p=0.9)
    assert not torch.equal(moved, full)
    assert (full < VOCAB).all() and (moved < VOCAB).all()


def test_greedy_ignores_the_seeds_and_is_the_exact_argmax():
    logits = _logits(16)
    tokens = _draw(logits, _seeds(16), torch.zeros(16, dtype=torch.long), temperature=0.0)
    assert torch.equal(tokens, logits[:, :VOCAB].argmax(-1))


@pytest.mark.parametrize("top_p", [1.0, 0.7])
def test_draws_follow_the_tempered_nucleus_distribution(top_p):
    # One logits row, many independent streams (seeds x positions): frequencies vs the exact probs.
    n, temperature = 20_000, 0.7
    row_V = _logits(1)
    probs_Vt = torch.softmax(row_V[0, :VOCAB].double() / temperature, -1)
    if top_p < 1.0:
        probs_Vt = top_p_filter(probs_Vt[None], top_p)[0]
        probs_Vt = probs_Vt / probs_Vt.sum()
    tokens = _draw(row_V.expand(n, -1), _seeds(n), torch.randint(0, 4096, (n,)), temperature=temperature,
                   top_p=top_p)
    freq_Vt = torch.bincount(tokens, minlength=VOCAB).double() / n
    sigma_Vt = (probs_Vt * (1 - probs_Vt) / n).sqrt()
    assert (freq_Vt[probs_Vt == 0] == 0).all(), "a token outside the nucleus was drawn"
    assert ((freq_Vt - probs_Vt).abs() <= 6 * sigma_Vt + 1.0 / n).all(), (freq_Vt, probs_Vt)


def test_uniforms_are_uniform_and_neighbours_uncorrelated():
    n = 4096
    u = row_uniforms(_seeds(n), torch.arange(n), 2)
    assert ((u > 0) & (u < 1)).all()
    # Kolmogorov-Smirnov at alpha ~ 1e-4 (critical value 2.0 / sqrt(n)).
    ks = (u[:, 0].sort().values - (torch.arange(n, dtype=torch.float64) + 0.5) / n).abs().max()
    assert ks < 2.0 / math.sqrt(n)
    # Neighbouring columns, neighbouring positions of one seed: correlations within 5 / sqrt(n) of 0.
    same_seed = row_uniforms(torch.full((n,), 7, dtype=torch.int64), torch.arange(n), 1)[:, 0]
    for a, b in ((u[:, 0], u[:, 1]), (same_seed[:-1], same_seed[1:])):
        assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 5 / math.sqrt(n)


def test_row_seeds_are_per_prompt_and_sample_and_follow_repeat_prompts():
    seeds = rollout_row_seeds(seed=3, step=5, prompt_indices=[10, 11, 12], group_size=4)
    assert seeds == rollout_row_seeds(seed=3, step=5, prompt_indices=[10, 11, 12], group_size=4)
    assert len(set(seeds)) == 12 and len(seeds) == len(repeat_prompts([[1]] * 3, group_size=4))
    assert all(0 <= s < 2**63 for s in seeds)
    # A prompt's seeds do not depend on its neighbours (DP shard, batch) ...
    assert rollout_row_seeds(seed=3, step=5, prompt_indices=[12], group_size=4) == seeds[8:]
    # ... and change with the step and the run seed.
    for other in (dict(seed=4, step=5), dict(seed=3, step=6)):
        assert set(rollout_row_seeds(prompt_indices=[10, 11, 12], group_size=4, **other)).isdisjoint(seeds)
    with pytest.raises(ValueError, match="prompt_indices"):
        rollout_row_seeds(seed=0, step=0, prompt_indices=[-1], group_size=1)


def test_logprob_mismatch_against_a_loop_reference():
    lp_old, lp = torch.randn(5, 9), torch.randn(5, 9)
    mask = torch.rand(5, 9) > 0.4
    diffs = [abs(float(lp_old[i, t]) - float(lp[i, t])) for i in range(5) for t in range(9) if mask[i, t]]
    out = logprob_mismatch(lp_old, lp, mask)
    assert out[MEAN_KEY] == pytest.approx(sum(diffs) / len(diffs), rel=1e-6)
    assert out[MAX_KEY] == pytest.approx(max(diffs), rel=1e-6)
    assert logprob_mismatch(lp_old, lp, torch.zeros_like(mask)) == {MEAN_KEY: 0.0, MAX_KEY: 0.0}
    with pytest.raises(ValueError, match="mask_NS"):
        logprob_mismatch(lp_old, lp, mask.float())
    with pytest.raises(ValueError, match="one shape"):
        logprob_mismatch(lp_old, lp[:, :3], mask)


def test_rl_config_rollout_fields():
    from rlad_megatron.config import ConfigError, load_config

    cfg = load_config(None, ["--rl.max_rollout_rows=8", "--rl.cuda_graphs=true"])
    assert cfg.rl.max_rollout_rows == 8 and cfg.rl.cuda_graphs is True
    assert load_config(None, []).rl.max_rollout_rows == 0  # default: every row at once
    with pytest.raises(ConfigError, match=r"rl\.max_rollout_rows: expected >= 0"):
        load_config(None, ["--rl.max_rollout_rows=-1"])
