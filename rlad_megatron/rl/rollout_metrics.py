"""Sampler vs trainer log-prob mismatch: how far the rollout's ``lp_old`` is from a training forward.

Legend: N rollout rows, S positions (any alignment, as long as the three tensors share it).

The PPO-style ratio ``exp(lp_s - lp_old)`` assumes the sampler and the training forward compute
the same log-probs for the same weights. They differ in practice (KV-cached decode vs one full
forward, bf16 rounding, fused kernels, graphs), and a large gap silently biases the ratio and its
clipping. NeMo-RL and verl log the same quantity; on CPU float32 it is ~0 (tests/distributed/
test_rollout_pool.py checks it at TP=2).

    lp_NS, _ = frozen_logprobs(model=student, exp=exp, ...)            # training forward, no update yet
    metrics |= logprob_mismatch(exp.lp_old_NS, lp_NS, exp.mask_NS)    # last pipeline stage
"""

from __future__ import annotations

import torch
import torch.distributed as dist

MEAN_KEY = "rollout/logprob_mismatch_mean"
MAX_KEY = "rollout/logprob_mismatch_max"


def logprob_mismatch(lp_old_NS: torch.Tensor, lp_NS: torch.Tensor, mask_NS: torch.Tensor, *,
                     dp_group: dist.ProcessGroup | None = None) -> dict[str, float]:
    """Mean and max of ``|lp_old - lp|`` over the tokens where ``mask_NS`` is True (float64 inside).

    With ``dp_group`` the mean is over every replica's tokens and the max over every replica (a
    collective: call it on every rank of the group). No masked token gives 0 for both.
    """
    if lp_old_NS.shape != lp_NS.shape or mask_NS.shape != lp_NS.shape:
        raise ValueError(f"lp_old_NS, lp_NS, mask_NS: expected one shape, got {tuple(lp_old_NS.shape)}, "
                         f"{tuple(lp_NS.shape)}, {tuple(mask_NS.shape)}")
    if mask_NS.dtype != torch.bool:
        raise ValueError(f"mask_NS: expected a bool tensor, got {mask_NS.dtype}")
    diff_T = (lp_old_NS.double() - lp_NS.to(lp_old_NS.device).double()).abs()[mask_NS.to(lp_old_NS.device)]
    # [sum, count] reduced with SUM, [max] with MAX; a count of 0 keeps the max at 0.
    total_2 = torch.stack([diff_T.sum(), torch.tensor(float(diff_T.numel()), dtype=torch.float64,
                                                      device=diff_T.device)])
    max_1 = diff_T.max().reshape(1) if diff_T.numel() else torch.zeros(1, dtype=torch.float64, device=diff_T.device)
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(total_2, op=dist.ReduceOp.SUM, group=dp_group)
        dist.all_reduce(max_1, op=dist.ReduceOp.MAX, group=dp_group)
    mean = float(total_2[0] / total_2[1]) if float(total_2[1]) > 0 else 0.0
    return {MEAN_KEY: mean, MAX_KEY: float(max_1[0])}
