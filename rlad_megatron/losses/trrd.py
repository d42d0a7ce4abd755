"""Numeric helpers of the TRRD objective and its baselines on per-token scalars (DESIGN.md section 1).

The objectives themselves (which helpers combine into which loss) live in
:mod:`rlad_megatron.objectives`. For each response token::

    d_t   = clamp(lp_s - lp_t, -c, +c)                      teacher_log_ratio (paper Eq. 5 + Appendix B)
    m_t   = |lp_s - lp_t| <= tau_align and A >= tau_adv     selective_gate
    s_t   = min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A),  r = exp(log_r)    ppo_surrogate
    k3    = exp(lp_ref - lp_s) - (lp_ref - lp_s) - 1        k3

Micro-batching: ``aggregate`` is a *sum* over this micro-batch divided by a caller-given normaliser,
so that summing the losses of the micro-batches of a mini-batch gives the full mini-batch loss:
    seq_mean_token_mean: sum_i (sum_t l_it m_it / max(1, sum_t m_it)) / num_sequences
    token_mean:          sum_it l_it m_it / num_tokens
``num_sequences`` / ``num_tokens`` default to this micro-batch's count (B / valid tokens).

Shape legend:
    B  sequences in the micro-batch
    S  positions per sequence (prompt and padding positions are masked out by ``mask``)
"""

from __future__ import annotations

from typing import Optional

import torch

# |log r| bound before exp() in the PPO surrogate: e^20 ~ 5e8 is far outside any clip range.
LOG_RATIO_BOUND = 20.0

# ----------------------------------------------------------------------------- numeric helpers


def masked(x_BS: torch.Tensor, valid_BS: torch.Tensor) -> torch.Tensor:
    """x where valid, else 0: masked tokens may hold -inf / NaN log-probs and must not reach exp()."""
    return torch.where(valid_BS, x_BS, torch.zeros((), dtype=x_BS.dtype, device=x_BS.device))


def teacher_log_ratio(lp_s_BS: torch.Tensor, lp_t_BS: torch.Tensor, *, clamp: float, grad_mode: str) -> torch.Tensor:
    """``d_t = clamp(lp_s - lp_t, -clamp, clamp)`` (DESIGN.md section 1).

    ``grad_mode='clamp'``: zero gradient outside [-c, c]; ``'straight_through'``: the value is
    clamped, the gradient w.r.t. lp_s is 1 everywhere. Finite for lp_t = -inf.
    """
    raw = lp_s_BS.detach() - lp_t_BS
    if grad_mode == "clamp":
        return torch.clamp(lp_s_BS - lp_t_BS, -clamp, clamp)
    if grad_mode == "straight_through":
        # lp_s - lp_s.detach() is exactly 0 with gradient 1; never inf - inf even when lp_t = -inf.
        return (lp_s_BS - lp_s_BS.detach()) + torch.clamp(raw, -clamp, clamp)
    raise ValueError(f"distill.teacher_clamp_grad: expected one of ['clamp', 'straight_through'], got {grad_mode!r}")


def k3(lp_other_BS: torch.Tensor, lp_s_BS: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(pi_s || pi_other) on sampled tokens: exp(x) - x - 1, x = lp_other - lp_s."""
    x = lp_other_BS - lp_s_BS
    return torch.exp(x) - x - 1


def selective_gate(lp_s_BS: torch.Tensor, lp_t_BS: torch.Tensor, adv_BS: torch.Tensor, valid_BS: torch.Tensor, *,
                   tau_align: float, tau_adv: float, level: str) -> torch.Tensor:
    """Bool gate m_t [B, S]: True where the teacher term enters the ratio (DESIGN.md "Selective imitation")."""
    gap = (lp_s_BS.detach() - lp_t_BS).abs()
    if level == "token":
        aligned = gap <= tau_align
    elif level == "sequence":
        gap = torch.where(valid_BS, gap, torch.zeros_like(gap))
        seq_gap_B = gap.sum(-1) / valid_BS.sum(-1).clamp(min=1)
        aligned = (seq_gap_B <= tau_align).unsqueeze(-1).expand_as(gap)
    else:
        raise ValueError(f"distill.gate_level: expected one of ['token', 'sequence'], got {level!r}")
    # inf <= +inf holds, so the default tau_align = +inf keeps tokens with lp_t = -inf open.
    return aligned & (adv_BS >= tau_adv)


def ppo_surrogate(log_r_BS: torch.Tensor, adv_BS: torch.Tensor, *, eps_low: float, eps_high: float,
                  dual_clip: bool, c_dual: float) -> torch.Tensor:
    """Per-token asymmetric-clip PPO surrogate s_t (to maximise), optional dual clip for A < 0."""
    # exp overflows to inf for log_r > ~88 (float32), and inf * A(=0) is NaN; far outside the clip range
    # the surrogate is flat (or, unclipped, meaningless), so bound log_r first (verl uses the same bound).
    r = torch.exp(torch.clamp(log_r_BS, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    s = torch.minimum(r * adv_BS, torch.clamp(r, 1 - eps_low, 1 + eps_high) * adv_BS)
    if dual_clip:
        s = torch.where(adv_BS < 0, torch.maximum(s, c_dual * adv_BS), s)
    return s


def aggregate(loss_BS: torch.Tensor, valid_BS: torch.Tensor, *, mode: str, num_sequences: Optional[float],
              num_tokens: Optional[float]) -> torch.Tensor:
    """Sum of per-token losses over this micro-batch, normalised for ``mode`` (see module docstring)."""
    loss_BS = masked(loss_BS, valid_BS)
    if mode == "seq_mean_token_mean":
        per_seq_B = loss_BS.sum(-1) / valid_BS.sum(-1).clamp(min=1).to(loss_BS.dtype)
        denom = float(loss_BS.shape[0]) if num_sequences is None else float(num_sequences)
        return per_seq_B.sum() / denom
    if mode == "token_mean":
        if num_tokens is None:
            return loss_BS.sum() / valid_BS.sum().clamp(min=1).to(loss_BS.dtype)
        return loss_BS.sum() / float(num_tokens)
    raise ValueError(f"distill.loss_agg: expected one of ['seq_mean_token_mean', 'token_mean'], got {mode!r}")


def token_mean(x_BS: torch.Tensor, valid_BS: torch.Tensor) -> torch.Tensor:
    x = masked(x_BS.detach().to(torch.float32), valid_BS)
    return x.sum() / valid_BS.sum().clamp(min=1)
