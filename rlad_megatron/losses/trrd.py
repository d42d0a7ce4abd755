"""The TRRD objective and its baselines on per-token scalars (DESIGN.md section 1).

For each response token (log-probs of the sampled token only)::

    d_t   = clamp(lp_s - lp_t, -c, +c)                                  # paper Eq. 5 + Appendix B
    log_r = alpha * (lp_s - lp_old) + (1 - alpha) * d_t    where m_t = 1 (gates open)
          = lp_s - lp_old                                   where m_t = 0 (GRPO fallback)
    r     = exp(log_r)
    s_t   = min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)
    s_t   = max(s_t, c_dual * A)   if dual_clip and A < 0
    J     = agg(s_t) - beta * agg(k3(lp_ref, lp_s)),   k3 = exp(lp_ref - lp_s) - (lp_ref - lp_s) - 1

The loss returned is ``-J`` (minimised). Baselines (``DistillConfig.objective``):
``grpo`` alpha = 1; ``kdrl`` GRPO + ``beta_kd * agg(0.5 * (lp_s - lp_t)^2)``; ``forward_kl``
``agg(KL(pi_t || pi_s))`` over the full sharded vocabulary (pure on-policy distillation, no
advantage term); ``rlad`` the TRRD objective above. ``beta > 0`` adds the reference k3 term to all.

Micro-batching: ``agg`` is a *sum* over this micro-batch divided by a caller-given normaliser, so
that summing the losses of the micro-batches of a mini-batch gives the full mini-batch loss:
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
import torch.distributed as dist

from rlad_megatron.config import DistillConfig
from rlad_megatron.losses.vocab_parallel import vocab_parallel_forward_kl

_OBJECTIVES = ("rlad", "grpo", "kdrl", "forward_kl")
# |log r| bound before exp() in the PPO surrogate: e^20 ~ 5e8 is far outside any clip range.
LOG_RATIO_BOUND = 20.0

# ----------------------------------------------------------------------------- numeric helpers


def _masked(x_BS: torch.Tensor, valid_BS: torch.Tensor) -> torch.Tensor:
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
    loss_BS = _masked(loss_BS, valid_BS)
    if mode == "seq_mean_token_mean":
        per_seq_B = loss_BS.sum(-1) / valid_BS.sum(-1).clamp(min=1).to(loss_BS.dtype)
        denom = float(loss_BS.shape[0]) if num_sequences is None else float(num_sequences)
        return per_seq_B.sum() / denom
    if mode == "token_mean":
        if num_tokens is None:
            return loss_BS.sum() / valid_BS.sum().clamp(min=1).to(loss_BS.dtype)
        return loss_BS.sum() / float(num_tokens)
    raise ValueError(f"distill.loss_agg: expected one of ['seq_mean_token_mean', 'token_mean'], got {mode!r}")


def _token_mean(x_BS: torch.Tensor, valid_BS: torch.Tensor) -> torch.Tensor:
    x = _masked(x_BS.detach().to(torch.float32), valid_BS)
    return x.sum() / valid_BS.sum().clamp(min=1)


# ----------------------------------------------------------------------------- public function


def rlad_loss(*, lp_s: torch.Tensor, lp_old: torch.Tensor, lp_t: Optional[torch.Tensor], advantages: torch.Tensor,
              mask: torch.Tensor, cfg: DistillConfig, lp_ref: Optional[torch.Tensor] = None,
              entropy: Optional[torch.Tensor] = None, num_sequences: Optional[float] = None,
              num_tokens: Optional[float] = None, student_logits: Optional[torch.Tensor] = None,
              teacher_logits: Optional[torch.Tensor] = None, tp_group: Optional[dist.ProcessGroup] = None,
              vocab_size: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (to minimise) and metrics for one micro-batch, objective chosen by ``cfg.objective``.

    Args:
        lp_s: ``[B, S]`` student log-probs of the sampled tokens (with grad), e.g. from
            :func:`~rlad_megatron.losses.vocab_parallel.vocab_parallel_logprobs` on megatron's
            ``[B, S, V/TP]`` logits. Transpose ``[S, B]`` tensors first.
        lp_old: ``[B, S]`` log-probs of the policy that sampled (no grad).
        lp_t: ``[B, S]`` teacher log-probs (no grad); may be None for ``grpo``.
        advantages: ``[B]`` per-sequence or ``[B, S]`` per-token advantages.
        mask: ``[B, S]`` bool/0-1, True on response tokens that count (False on prompt and padding;
            log-probs there may be anything, including -inf or NaN).
        cfg: the ``distill`` sub-config.
        lp_ref: ``[B, S]`` reference log-probs, required when ``cfg.beta > 0``.
        entropy: ``[B, S]`` optional per-token entropy, logged only.
        num_sequences: total sequences of the mini-batch (``seq_mean_token_mean``); default B.
        num_tokens: total valid tokens of the mini-batch (``token_mean``); default this mask's sum.
        student_logits, teacher_logits, tp_group, vocab_size: ``[B, S, V/TP]`` shards and their
            layout, required for ``forward_kl`` only.

    Returns:
        ``(loss, metrics)``: a scalar loss of ``lp_s``'s dtype and a dict of detached float32 scalars.
        With megatron's schedule, note that it divides a 2-tuple loss by the number of micro-batches.
    """
    if cfg.objective not in _OBJECTIVES:
        raise ValueError(f"distill.objective: expected one of {list(_OBJECTIVES)}, got {cfg.objective!r}")
    if lp_s.dim() != 2:
        raise ValueError(f"lp_s: expected shape [B, S], got {tuple(lp_s.shape)}")
    for name, x in (("lp_old", lp_old), ("lp_t", lp_t), ("lp_ref", lp_ref), ("mask", mask), ("entropy", entropy)):
        if x is not None and tuple(x.shape) != tuple(lp_s.shape):
            raise ValueError(f"{name}: expected shape {tuple(lp_s.shape)} (lp_s's), got {tuple(x.shape)}")
    if lp_t is None and (cfg.objective == "kdrl" or (cfg.objective == "rlad" and cfg.alpha != 1.0)):
        raise ValueError(f"lp_t: required for distill.objective={cfg.objective!r} with alpha={cfg.alpha}")
    if cfg.beta > 0 and lp_ref is None:
        raise ValueError(f"lp_ref: required when distill.beta > 0 (got beta={cfg.beta})")

    valid = mask.to(torch.bool)
    if advantages.dim() == 1:
        if advantages.shape[0] != lp_s.shape[0]:
            raise ValueError(f"advantages: expected [B={lp_s.shape[0]}] or [B, S], got {tuple(advantages.shape)}")
        advantages = advantages.unsqueeze(-1)
    adv = _masked(advantages.to(lp_s.dtype).expand_as(lp_s), valid).detach()
    s = _masked(lp_s, valid)
    # lp_old = -inf on a counted token would give alpha * inf = NaN at alpha = 0; the most negative finite
    # value gives the same bounded ratio (see LOG_RATIO_BOUND) without the NaN.
    old = _masked(lp_old.to(lp_s.dtype), valid).detach().clamp(min=torch.finfo(lp_s.dtype).min)
    t = _masked(lp_t.to(lp_s.dtype), valid).detach() if lp_t is not None else None
    delta_old = s - old
    metrics: dict[str, torch.Tensor] = {}

    if cfg.objective == "forward_kl":
        if student_logits is None or teacher_logits is None or vocab_size is None:
            raise ValueError("student_logits, teacher_logits, vocab_size: required for distill.objective='forward_kl'")
        kl_BS = vocab_parallel_forward_kl(student_logits, teacher_logits, tp_group=tp_group, vocab_size=vocab_size)
        kl_BS = kl_BS.to(lp_s.dtype)
        per_tok = kl_BS
        metrics["kl_forward"] = _token_mean(kl_BS, valid)
        log_r = delta_old
    else:
        if cfg.objective == "rlad" and t is not None:
            d = teacher_log_ratio(s, t, clamp=cfg.teacher_clamp, grad_mode=cfg.teacher_clamp_grad)
            gate = selective_gate(s, t, adv, valid, tau_align=cfg.tau_align, tau_adv=cfg.tau_adv,
                                  level=cfg.gate_level)
            mixed = cfg.alpha * delta_old + (1.0 - cfg.alpha) * d
            log_r = torch.where(gate, mixed, delta_old)
            metrics["gated_frac"] = _token_mean((~gate).to(torch.float32), valid)
            metrics["teacher_logratio_mean"] = _token_mean(d, valid)
            metrics["teacher_clamp_frac"] = _token_mean(((s - t).abs() > cfg.teacher_clamp).float(), valid)
        else:  # grpo, kdrl (alpha = 1: the teacher is not in the ratio)
            log_r = delta_old
        per_tok = -ppo_surrogate(log_r, adv, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                                 dual_clip=cfg.dual_clip, c_dual=cfg.c_dual)
        if cfg.objective == "kdrl":
            k2_BS = 0.5 * (s - t) ** 2
            per_tok = per_tok + cfg.beta_kd * k2_BS
            metrics["kd_k2"] = _token_mean(k2_BS, valid)

    if cfg.beta > 0:
        kl_ref = k3(_masked(lp_ref.to(lp_s.dtype), valid).detach(), s)
        per_tok = per_tok + cfg.beta * kl_ref
        metrics["kl_ref"] = _token_mean(kl_ref, valid)

    loss = aggregate(per_tok, valid, mode=cfg.loss_agg, num_sequences=num_sequences, num_tokens=num_tokens)

    with torch.no_grad():
        r = torch.exp(torch.clamp(log_r.detach(), -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
        metrics["ratio_mean"] = _token_mean(r, valid)
        metrics["clip_frac_low"] = _token_mean(((r < 1 - cfg.eps_low) & (adv < 0)).float(), valid)
        metrics["clip_frac_high"] = _token_mean(((r > 1 + cfg.eps_high) & (adv > 0)).float(), valid)
        if cfg.dual_clip:
            # for A < 0, min(rA, clip(r)A) < c_dual * A exactly when r > c_dual
            metrics["dual_clip_frac"] = _token_mean(((r > cfg.c_dual) & (adv < 0)).float(), valid)
        if t is not None:
            metrics["kl_teacher_k3"] = _token_mean(k3(t, s.detach()), valid)
        if entropy is not None:
            metrics["entropy"] = _token_mean(entropy, valid)
        metrics["num_tokens"] = valid.sum().to(torch.float32)
        metrics["loss"] = loss.detach().to(torch.float32)
    return loss, metrics
