"""One optimizer step of the student on a mini-batch of experience, with the objective from config.

Loss normalisation: the schedule runs with ``calculate_per_token_loss``; each micro-batch returns
the *sum* of its per-sequence token means (``seq_mean_token_mean``) or of its token losses
(``token_mean``) together with its count of sequences or tokens, and megatron's
``finalize_model_grads`` divides the gradients by the count summed over micro-batches and DP
replicas. So the update equals the full-batch objective of DESIGN.md at any micro-batch size and
DP degree.
"""

from __future__ import annotations

import math

import torch
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from rlad_megatron.config import DistillConfig
from rlad_megatron.losses import rlad_loss, vocab_parallel_logprobs
from rlad_megatron.metrics import mean_of_dicts
from rlad_megatron.models.forward import run_schedule, split_micro_batches
from rlad_megatron.rl.experience import Experience

LOSS_METRICS = ["loss", "ratio_mean", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "gated_frac",
                "teacher_logratio_mean", "teacher_clamp_frac", "kl_teacher_k3", "kd_k2", "kl_forward",
                "kl_ref", "entropy"]


def make_loss_fn(*, cfg: DistillConfig, tp_group, vocab_size: int):
    """The megatron ``loss_func`` body: ``(logits [B, S, V/TP], micro-batch) -> (sum loss, count, metrics)``."""

    def loss_fn(logits_BSV: torch.Tensor, mb: dict):
        lp_s, entropy = vocab_parallel_logprobs(logits_BSV, mb["targets_BS"], tp_group=tp_group,
                                                vocab_size=vocab_size, with_entropy=True)
        mask = mb["mask_BS"]
        loss, metrics = rlad_loss(
            lp_s=lp_s, lp_old=mb["lp_old_BS"], lp_t=mb.get("lp_t_BS"), advantages=mb["adv_B"], mask=mask, cfg=cfg,
            lp_ref=mb.get("lp_ref_BS"), entropy=entropy, num_sequences=1.0, num_tokens=1.0,
            student_logits=logits_BSV if cfg.objective == "forward_kl" else None,
            teacher_logits=mb.get("teacher_logits_BSV"), tp_group=tp_group, vocab_size=vocab_size)
        count = mask.shape[0] if cfg.loss_agg == "seq_mean_token_mean" else int(mask.sum())
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["count"] = float(count)
        return loss, torch.tensor(count, dtype=torch.int), metrics

    return loss_fn


def guarded_optimizer_step(optimizer, *, clip_grad: float) -> tuple[bool, float]:
    """Step unless the gradient norm is non-finite; returns (stepped, grad_norm).

    megatron's FP32 optimizer would clip and step with NaN gradients; checking the norm first lets
    the trainer skip the step and count it instead.
    """
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(grad_norm):
        return False, grad_norm
    if clip_grad > 0:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            params = opt.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, clip_grad, grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def train_mini_batch(*, model, optimizer, scheduler, exp: Experience, index: torch.Tensor, micro_batch_size: int,
                     cfg: DistillConfig, clip_grad: float, tp_group, vocab_size: int,
                     device: torch.device) -> dict[str, float]:
    """Forward-backward over the rows ``index`` of ``exp`` and one guarded optimizer step."""
    model.zero_grad_buffer()
    optimizer.zero_grad()
    micro = split_micro_batches(exp.rows(index), micro_batch_size)
    if cfg.objective == "forward_kl" and exp.teacher_logits:
        # Teacher logits were kept per scoring micro-batch; rows of this mini-batch are re-sliced.
        full = torch.cat(exp.teacher_logits, dim=0)[index]
        for i, mb in enumerate(micro):
            mb["teacher_logits_BSV"] = full[i * micro_batch_size:(i + 1) * micro_batch_size]
    out = run_schedule(model=model, micro_batches=micro, loss_fn=make_loss_fn(cfg=cfg, tp_group=tp_group,
                                                                               vocab_size=vocab_size),
                       forward_only=False, device=device)
    stepped, grad_norm = guarded_optimizer_step(optimizer, clip_grad=clip_grad)
    if stepped and scheduler is not None:
        scheduler.step(increment=1)
    metrics = mean_of_dicts(out, LOSS_METRICS)
    if out:
        # The loss reported is the mini-batch objective: summed losses over the total count.
        metrics["loss"] = sum(d["loss"] for d in out) / max(sum(d["count"] for d in out), 1.0)
    metrics["grad_norm"] = grad_norm
    metrics["skipped_step"] = 0.0 if stepped else 1.0
    return metrics
