"""What every objective shares: input checks, the reference-KL term, aggregation and the ratio metrics.

An objective is built once from the ``distill`` config (:func:`rlad_megatron.objectives.build_objective`)
and declares what the step must compute for it (``uses_teacher_logprobs``, ``uses_teacher_logits``,
``needs_reference``); the trainer, the train module, the memory planner and the benchmarks ask it
and never look at its name. Subclasses implement :meth:`Objective.token_loss` only.

Shape legend (one micro-batch):
    B  sequences
    S  positions per sequence (prompt and padding positions are masked out by ``mask``)
    V/TP  the local vocabulary shard of tensor-parallel logits
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch
import torch.distributed as dist

from rlad_megatron.losses.trrd import LOG_RATIO_BOUND, aggregate, k3, masked, token_mean

if TYPE_CHECKING:
    from rlad_megatron.config import DistillConfig


# Full teacher logits (distill.teacher_topk: 0) are for small vocabularies only.
FULL_LOGITS_MAX_VOCAB = 65536


@dataclass
class LossInputs:
    """One micro-batch's per-token tensors, all ``[B, S]`` unless noted.

    lp_s: student log-probs of the sampled tokens (with grad), e.g. from
        :func:`~rlad_megatron.losses.vocab_parallel.vocab_parallel_logprobs` on megatron's
        ``[B, S, V/TP]`` logits (transpose ``[S, B]`` tensors first).
    lp_old: log-probs of the policy that sampled (no grad).
    advantages: ``[B]`` per-sequence or ``[B, S]`` per-token advantages.
    mask: bool/0-1, True on response tokens that count (False on prompt and padding; log-probs
        there may be anything, including -inf or NaN).
    lp_t / lp_ref: teacher / reference log-probs (no grad), when the objective uses them.
    entropy: per-token entropy, logged only.
    student_logits / teacher_logits: ``[B, S, V/TP]`` shards, for objectives that match the
        teacher's distribution (``uses_teacher_logits``).
    teacher_topk_ids / teacher_topk_lp: ``[B, S, k]`` the teacher's top-k token ids (global) and
        log-probs per position, the compact form of its distribution (``distill.teacher_topk``).
    """

    lp_s: torch.Tensor
    lp_old: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    lp_t: Optional[torch.Tensor] = None
    lp_ref: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    student_logits: Optional[torch.Tensor] = None
    teacher_logits: Optional[torch.Tensor] = None
    teacher_topk_ids: Optional[torch.Tensor] = None
    teacher_topk_lp: Optional[torch.Tensor] = None


@dataclass
class Tokens:
    """The masked, detached views every objective's token loss starts from (``[B, S]``)."""

    valid: torch.Tensor  # bool
    adv: torch.Tensor  # advantages expanded to tokens, 0 where masked
    s: torch.Tensor  # lp_s, 0 where masked (keeps the gradient)
    t: Optional[torch.Tensor]  # lp_t, 0 where masked
    delta_old: torch.Tensor  # s - lp_old: the GRPO log-ratio


class Objective:
    """Loss (to minimise) and metrics of one micro-batch; see the module docstring."""

    name: ClassVar[str] = ""
    # The teacher's log-probs of the sampled tokens (lp_t).
    uses_teacher_logprobs: ClassVar[bool] = False
    # The teacher's distribution over the vocabulary (its logits shard per position).
    uses_teacher_logits: ClassVar[bool] = False

    def __init__(self, cfg: DistillConfig, *, tp_group: Optional[dist.ProcessGroup] = None,
                 vocab_size: Optional[int] = None):
        self.cfg, self.tp_group, self.vocab_size = cfg, tp_group, vocab_size
        if self.keeps_teacher_logits and vocab_size and vocab_size > FULL_LOGITS_MAX_VOCAB:
            raise ValueError(f"distill.teacher_topk: expected >= 1 for a vocabulary of {vocab_size} (> "
                             f"{FULL_LOGITS_MAX_VOCAB}: the rollout's full teacher logits would take N x S x V/TP "
                             f"floats), got 0")

    @property
    def needs_teacher(self) -> bool:
        return self.uses_teacher_logprobs or self.uses_teacher_logits

    @property
    def needs_reference(self) -> bool:
        return self.cfg.beta > 0

    @property
    def keeps_teacher_logits(self) -> bool:
        """The teacher's whole logits shards are kept (``distill.teacher_topk: 0``), not its top-k."""
        return self.uses_teacher_logits and self.cfg.teacher_topk == 0

    @property
    def teacher_topk(self) -> int:
        """k of the teacher's top-k distribution this objective needs (0: none), clipped to the vocabulary."""
        if not self.uses_teacher_logits or self.keeps_teacher_logits:
            return 0
        return min(self.cfg.teacher_topk, self.vocab_size) if self.vocab_size else self.cfg.teacher_topk

    # ------------------------------------------------------------------ the one hook

    def check_inputs(self, x: LossInputs) -> None:
        """Raise ValueError naming what this objective needs and ``x`` lacks."""

    def token_loss(self, tok: Tokens, x: LossInputs) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(per-token loss [B, S], log-ratio [B, S] for the ratio metrics, metrics)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared

    def loss(self, x: LossInputs, *, num_sequences: Optional[float] = None,
             num_tokens: Optional[float] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, metrics)`` of one micro-batch.

        ``loss`` is this micro-batch's share of the mini-batch objective (a sum over its tokens or
        sequences divided by ``num_tokens`` / ``num_sequences``, defaulting to this micro-batch's
        own counts), a scalar of ``lp_s``'s dtype; ``metrics`` are detached float32 scalars. With
        megatron's schedule, note that it divides a 2-tuple loss by the number of micro-batches.
        """
        cfg, lp_s = self.cfg, x.lp_s
        if lp_s.dim() != 2:
            raise ValueError(f"lp_s: expected shape [B, S], got {tuple(lp_s.shape)}")
        for name in ("lp_old", "lp_t", "lp_ref", "mask", "entropy"):
            value = getattr(x, name)
            if value is not None and tuple(value.shape) != tuple(lp_s.shape):
                raise ValueError(f"{name}: expected shape {tuple(lp_s.shape)} (lp_s's), got {tuple(value.shape)}")
        self.check_inputs(x)
        if cfg.beta > 0 and x.lp_ref is None:
            raise ValueError(f"lp_ref: required when distill.beta > 0 (got beta={cfg.beta})")

        valid = x.mask.to(torch.bool)
        advantages = x.advantages
        if advantages.dim() == 1:
            if advantages.shape[0] != lp_s.shape[0]:
                raise ValueError(f"advantages: expected [B={lp_s.shape[0]}] or [B, S], got {tuple(advantages.shape)}")
            advantages = advantages.unsqueeze(-1)
        adv = masked(advantages.to(lp_s.dtype).expand_as(lp_s), valid).detach()
        s = masked(lp_s, valid)
        # lp_old = -inf on a counted token would give alpha * inf = NaN at alpha = 0; the most negative finite
        # value gives the same bounded ratio (see LOG_RATIO_BOUND) without the NaN.
        old = masked(x.lp_old.to(lp_s.dtype), valid).detach().clamp(min=torch.finfo(lp_s.dtype).min)
        t = masked(x.lp_t.to(lp_s.dtype), valid).detach() if x.lp_t is not None else None
        tok = Tokens(valid=valid, adv=adv, s=s, t=t, delta_old=s - old)
        per_tok, log_r, metrics = self.token_loss(tok, x)

        if cfg.beta > 0:
            kl_ref = k3(masked(x.lp_ref.to(lp_s.dtype), valid).detach(), s)
            per_tok = per_tok + cfg.beta * kl_ref
            metrics["kl_ref"] = token_mean(kl_ref, valid)

        loss = aggregate(per_tok, valid, mode=cfg.loss_agg, num_sequences=num_sequences, num_tokens=num_tokens)

        with torch.no_grad():
            r = torch.exp(torch.clamp(log_r.detach(), -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
            metrics["ratio_mean"] = token_mean(r, valid)
            metrics["clip_frac_low"] = token_mean(((r < 1 - cfg.eps_low) & (adv < 0)).float(), valid)
            metrics["clip_frac_high"] = token_mean(((r > 1 + cfg.eps_high) & (adv > 0)).float(), valid)
            if cfg.dual_clip:
                # for A < 0, min(rA, clip(r)A) < c_dual * A exactly when r > c_dual
                metrics["dual_clip_frac"] = token_mean(((r > cfg.c_dual) & (adv < 0)).float(), valid)
            if t is not None:
                metrics["kl_teacher_k3"] = token_mean(k3(t, s.detach()), valid)
            if x.entropy is not None:
                metrics["entropy"] = token_mean(x.entropy, valid)
            metrics["num_tokens"] = valid.sum().to(torch.float32)
            metrics["loss"] = loss.detach().to(torch.float32)
        return loss, metrics
