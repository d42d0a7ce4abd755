"""The objectives of the paper's ablation (DESIGN.md section 1): rlad, grpo, kdrl, forward_kl.

For each response token (log-probs of the sampled token only)::

    d_t   = clamp(lp_s - lp_t, -c, +c)                                  # paper Eq. 5 + Appendix B
    log_r = alpha * (lp_s - lp_old) + (1 - alpha) * d_t    where m_t = 1 (gates open)
          = lp_s - lp_old                                   where m_t = 0 (GRPO fallback)
    s_t   = min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A),  r = exp(log_r)
    s_t   = max(s_t, c_dual * A)   if dual_clip and A < 0

``rlad`` minimises ``-agg(s_t)``; ``grpo`` is alpha = 1; ``kdrl`` is GRPO plus
``beta_kd * agg(0.5 * (lp_s - lp_t)^2)``; ``forward_kl`` is ``agg(KL(pi_t || pi_s))`` (pure on-policy
distillation, no advantage term) over the teacher's top-k tokens plus one tail bucket
(``distill.teacher_topk``; with k = vocabulary it is the full-vocabulary KL), or over the full
sharded vocabulary when the teacher's logits are kept (``teacher_topk: 0``). ``beta > 0`` adds the
reference k3 term to all of them (see :class:`~rlad_megatron.objectives.base.Objective`).
"""

from __future__ import annotations

import torch

from rlad_megatron.losses.topk import vocab_parallel_topk_forward_kl
from rlad_megatron.losses.trrd import ppo_surrogate, selective_gate, teacher_log_ratio, token_mean
from rlad_megatron.losses.vocab_parallel import vocab_parallel_forward_kl
from rlad_megatron.objectives.base import LossInputs, Objective, Tokens
from rlad_megatron.objectives.registry import register


def _clipped_surrogate_loss(objective: Objective, log_r: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    cfg = objective.cfg
    return -ppo_surrogate(log_r, adv, eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip,
                          c_dual=cfg.c_dual)


@register
class RLAD(Objective):
    """TRRD: the teacher's clamped log-ratio inside the clipped ratio, with the selective gates."""

    name = "rlad"
    uses_teacher_logprobs = True

    def check_inputs(self, x: LossInputs) -> None:
        if x.lp_t is None and self.cfg.alpha != 1.0:
            raise ValueError(f"lp_t: required for distill.objective={self.name!r} with alpha={self.cfg.alpha}")

    def token_loss(self, tok: Tokens, x: LossInputs):
        cfg, s, t = self.cfg, tok.s, tok.t
        if t is None:  # alpha = 1 without a teacher: exactly GRPO
            return _clipped_surrogate_loss(self, tok.delta_old, tok.adv), tok.delta_old, {}
        d = teacher_log_ratio(s, t, clamp=cfg.teacher_clamp, grad_mode=cfg.teacher_clamp_grad)
        gate = selective_gate(s, t, tok.adv, tok.valid, tau_align=cfg.tau_align, tau_adv=cfg.tau_adv,
                              level=cfg.gate_level)
        mixed = cfg.alpha * tok.delta_old + (1.0 - cfg.alpha) * d
        log_r = torch.where(gate, mixed, tok.delta_old)
        metrics = {"gated_frac": token_mean((~gate).to(torch.float32), tok.valid),
                   "teacher_logratio_mean": token_mean(d, tok.valid),
                   "teacher_clamp_frac": token_mean(((s - t).abs() > cfg.teacher_clamp).float(), tok.valid)}
        return _clipped_surrogate_loss(self, log_r, tok.adv), log_r, metrics


@register
class GRPO(Objective):
    """The PPO-clipped GRPO surrogate; the teacher plays no part."""

    name = "grpo"

    def token_loss(self, tok: Tokens, x: LossInputs):
        return _clipped_surrogate_loss(self, tok.delta_old, tok.adv), tok.delta_old, {}


@register
class KDRL(Objective):
    """GRPO plus a k2 distillation term to the teacher on the sampled tokens."""

    name = "kdrl"
    uses_teacher_logprobs = True

    def check_inputs(self, x: LossInputs) -> None:
        if x.lp_t is None:
            raise ValueError(f"lp_t: required for distill.objective={self.name!r} with alpha={self.cfg.alpha}")

    def token_loss(self, tok: Tokens, x: LossInputs):
        k2_BS = 0.5 * (tok.s - tok.t) ** 2
        per_tok = _clipped_surrogate_loss(self, tok.delta_old, tok.adv) + self.cfg.beta_kd * k2_BS
        return per_tok, tok.delta_old, {"kd_k2": token_mean(k2_BS, tok.valid)}


@register
class ForwardKL(Objective):
    """On-policy distillation: KL(pi_t || pi_s), vocab-parallel, no advantage term."""

    name = "forward_kl"
    uses_teacher_logits = True

    def check_inputs(self, x: LossInputs) -> None:
        teacher = x.teacher_logits if self.keeps_teacher_logits else x.teacher_topk_ids
        if x.student_logits is None or teacher is None or self.vocab_size is None:
            what = "teacher_logits" if self.keeps_teacher_logits else "teacher_topk_ids, teacher_topk_lp"
            raise ValueError(f"student_logits, {what}, vocab_size: required for distill.objective={self.name!r}")

    def token_loss(self, tok: Tokens, x: LossInputs):
        if self.keeps_teacher_logits:
            kl_BS = vocab_parallel_forward_kl(x.student_logits, x.teacher_logits, tp_group=self.tp_group,
                                              vocab_size=self.vocab_size)
        else:
            kl_BS = vocab_parallel_topk_forward_kl(x.student_logits, x.teacher_topk_ids, x.teacher_topk_lp,
                                                   tp_group=self.tp_group, vocab_size=self.vocab_size)
        kl_BS = kl_BS.to(x.lp_s.dtype)
        return kl_BS, tok.delta_old, {"kl_forward": token_mean(kl_BS, tok.valid)}
