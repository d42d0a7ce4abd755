"""GRPO group-normalised advantages against a float64 numpy reference."""

import random

import numpy as np
import pytest
import torch

from rlad_megatron.rl.advantages import grpo_advantages


def _reference(r: np.ndarray, g: int, ddof: int, eps: float = 1e-6) -> tuple[np.ndarray, int]:
    out = np.zeros_like(r, dtype=np.float64)
    zero = 0
    for p in range(len(r) // g):
        grp = r[p * g:(p + 1) * g].astype(np.float64)
        if grp.max() == grp.min():
            zero += 1
            continue
        out[p * g:(p + 1) * g] = (grp - grp.mean()) / (grp.std(ddof=ddof) + eps)
    return out, zero


@pytest.mark.parametrize("kind", ["binary", "continuous"])
@pytest.mark.parametrize("unbiased", [True, False])
def test_matches_reference(kind, unbiased):
    g, p = random.randint(2, 8), random.randint(1, 12)
    rng = np.random.default_rng()
    r = rng.integers(0, 2, size=p * g).astype(np.float64) if kind == "binary" else rng.normal(size=p * g)
    if kind == "continuous":
        r[:g] = r[0]  # force one constant group
    res = grpo_advantages(rewards_N=torch.from_numpy(r), group_size=g, unbiased=unbiased, dtype=torch.float64)
    ref, zero = _reference(r, g, ddof=1 if unbiased else 0)
    np.testing.assert_allclose(res.advantages_N.numpy(), ref, rtol=1e-12, atol=1e-12)
    assert res.num_zero_variance_groups == zero and res.num_groups == p
    assert res.zero_variance_fraction == zero / p
    assert res.advantages_N.shape == (p * g,)


def test_zero_variance_groups_are_exactly_zero_and_counted():
    g = 4
    rewards = [1, 1, 1, 1] + [0, 1, 0, 0] + [0, 0, 0, 0]
    res = grpo_advantages(rewards_N=rewards, group_size=g)
    a = res.advantages_N
    assert a.dtype == torch.float32
    assert torch.equal(a[:4], torch.zeros(4)) and torch.equal(a[8:], torch.zeros(4))
    assert res.num_zero_variance_groups == 2
    # One right answer out of 4: positive for it, equal negatives for the others, mean zero.
    assert a[5] > 0 and torch.allclose(a[[4, 6, 7]], a[4].expand(3)) and abs(float(a[4:8].sum())) < 1e-5


def test_groups_are_independent_and_ordered_group_by_group():
    g, p = 5, 6
    r = torch.rand(p * g)
    full = grpo_advantages(rewards_N=r, group_size=g).advantages_N
    for i in range(p):
        alone = grpo_advantages(rewards_N=r[i * g:(i + 1) * g], group_size=g).advantages_N
        assert torch.equal(full[i * g:(i + 1) * g], alone)
    perm = torch.randperm(g)
    a0 = grpo_advantages(rewards_N=r[:g][perm], group_size=g).advantages_N
    assert torch.allclose(a0, full[:g][perm])


def test_group_size_one_gives_zero_advantage():
    res = grpo_advantages(rewards_N=[0.0, 1.0, 0.5], group_size=1)
    assert torch.equal(res.advantages_N, torch.zeros(3)) and res.num_zero_variance_groups == 3


@pytest.mark.parametrize("rewards, g, match", [
    ([1.0, 0.0, 1.0], 2, "multiple of group_size=2"),
    ([], 2, "multiple of group_size=2"),
    ([[1.0, 0.0]], 2, "1-D"),
    ([1.0, float("nan")], 2, "finite"),
    ([1.0, 0.0], 0, "group_size: expected >= 1"),
])
def test_errors(rewards, g, match):
    with pytest.raises(ValueError, match=match):
        grpo_advantages(rewards_N=rewards, group_size=g)
