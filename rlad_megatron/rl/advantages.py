"""GRPO group-normalised advantages (DESIGN.md section 1).

    A_i = (r_i - mean(r)) / (std(r) + eps)     within each group of G samples of one prompt

Shape legend: N = num_prompts * G rewards ordered group by group (prompt 0's G samples first),
P = num_prompts, G = group size.

Which std: the Bessel-corrected sample std (``unbiased=True``, divide by G - 1), as DeepSeekMath's
GRPO is implemented in TRL (``rewards.view(-1, G).std(dim=1)``) and verl (``torch.std``); DESIGN.md
writes ``std(r)`` without saying. ``unbiased=False`` (divide by G) is available. For binary rewards
the two differ by the factor sqrt(G / (G - 1)) only.

A group whose rewards are all equal (all right or all wrong, or G = 1) carries no learning
signal: its advantages are exactly 0 (not 0/eps noise) and it is counted, since the fraction of
such groups is the first thing to watch when RL stalls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupAdvantages:
    advantages_N: torch.Tensor  # [N], float32 unless another dtype was asked for
    num_zero_variance_groups: int
    num_groups: int

    @property
    def zero_variance_fraction(self) -> float:
        return self.num_zero_variance_groups / self.num_groups


def grpo_advantages(*, rewards_N: torch.Tensor | Sequence[float], group_size: int, eps: float = 1e-6,
                    unbiased: bool = True, dtype: torch.dtype = torch.float32) -> GroupAdvantages:
    """Group-normalised advantages for ``rewards_N`` ordered group by group (see module docstring).

    Computed in float64 on CPU (rewards are a few hundred scalars) and returned as ``dtype``.
    """
    r_N = torch.as_tensor(rewards_N, dtype=torch.float64).detach().cpu()
    if r_N.dim() != 1:
        raise ValueError(f"rewards_N: expected a 1-D tensor [num_prompts * group_size], got shape {tuple(r_N.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size: expected >= 1, got {group_size}")
    if r_N.numel() == 0 or r_N.numel() % group_size:
        raise ValueError(f"rewards_N: expected a positive multiple of group_size={group_size} elements, "
                         f"got {r_N.numel()}")
    if not torch.isfinite(r_N).all():
        raise ValueError(f"rewards_N: expected finite rewards, got {r_N[~torch.isfinite(r_N)][:4].tolist()}")
    r_PG = r_N.view(-1, group_size)
    mean_P1 = r_PG.mean(dim=1, keepdim=True)
    zero_var_P = (r_PG.max(dim=1).values == r_PG.min(dim=1).values)
    if group_size > 1:
        std_P1 = r_PG.std(dim=1, unbiased=unbiased, keepdim=True)
    else:
        std_P1 = torch.zeros_like(mean_P1)
    adv_PG = (r_PG - mean_P1) / (std_P1 + eps)
    adv_PG = torch.where(zero_var_P[:, None], torch.zeros_like(adv_PG), adv_PG)
    return GroupAdvantages(advantages_N=adv_PG.reshape(-1).to(dtype),
                           num_zero_variance_groups=int(zero_var_P.sum()), num_groups=r_PG.shape[0])
