"""From a rollout to training tensors, and frozen-model log-probs over them.

Legend: N rollout rows (prompts x G), S row width, B micro-batch rows, V/TP local vocab shard.

Targets are the tokens shifted left: position ``t`` holds the logits that predict token ``t+1``,
so every per-token tensor here is aligned with the *logits* (``lp_BS[:, t] = log p(tok[t+1])``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlad_megatron.losses import vocab_parallel_logprobs_no_grad
from rlad_megatron.models.forward import run_schedule, split_micro_batches
from rlad_megatron.rl.rollout import RolloutBatch


@dataclass
class Experience:
    tokens_NS: torch.Tensor  # int64, prompt | response | pad
    targets_NS: torch.Tensor  # int64, tokens shifted left (pad at the end)
    mask_NS: torch.Tensor  # bool, True where the target is a response token
    lp_old_NS: torch.Tensor  # float32, sampling-policy log-probs of the targets
    advantages_N: torch.Tensor  # float32, one GRPO advantage per row
    lp_t_NS: torch.Tensor | None = None  # teacher log-probs (last pipeline stage only)
    lp_ref_NS: torch.Tensor | None = None  # reference log-probs (beta > 0, last stage only)
    # forward_kl: the teacher's logits shard of each micro-batch (last stage only).
    teacher_logits: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return self.tokens_NS.shape[0]

    def rows(self, index: torch.Tensor) -> dict:
        """The tensors of rows ``index`` as one batch dict (teacher logits are handled by the caller)."""
        out = {"tokens_BS": self.tokens_NS[index], "targets_BS": self.targets_NS[index],
               "mask_BS": self.mask_NS[index], "lp_old_BS": self.lp_old_NS[index],
               "adv_B": self.advantages_N[index]}
        if self.lp_t_NS is not None:
            out["lp_t_BS"] = self.lp_t_NS[index]
        if self.lp_ref_NS is not None:
            out["lp_ref_BS"] = self.lp_ref_NS[index]
        return out


def build_experience(rollout: RolloutBatch, advantages_N: torch.Tensor, *, pad_id: int) -> Experience:
    tokens = rollout.tokens_BL
    targets = torch.full_like(tokens, pad_id)
    targets[:, :-1] = tokens[:, 1:]
    mask = torch.zeros_like(rollout.response_mask_BL)
    mask[:, :-1] = rollout.response_mask_BL[:, 1:]
    lp_old = torch.zeros_like(rollout.logprobs_BL)
    lp_old[:, :-1] = rollout.logprobs_BL[:, 1:]
    return Experience(tokens_NS=tokens, targets_NS=targets, mask_NS=mask, lp_old_NS=lp_old,
                      advantages_N=advantages_N.to(torch.float32))


def frozen_logprobs(*, model: torch.nn.Module, exp: Experience, micro_batch_size: int, tp_group,
                    vocab_size: int, is_last_stage: bool, device: torch.device,
                    keep_logits: bool = False) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Log-probs ``[N, S]`` of the targets under a frozen model (vocab-parallel, no gather).

    Returns ``(lp_NS, logits)`` on the last pipeline stage and ``(None, [])`` elsewhere; ``logits``
    holds each micro-batch's vocab shard when ``keep_logits`` (forward_kl needs the teacher's).
    """
    batch = {"tokens_BS": exp.tokens_NS, "targets_BS": exp.targets_NS}
    kept: list[torch.Tensor] = []

    def loss_fn(logits_BSV: torch.Tensor, mb: dict):
        lp = vocab_parallel_logprobs_no_grad(logits_BSV, mb["targets_BS"], tp_group=tp_group, vocab_size=vocab_size)
        if keep_logits:
            kept.append(logits_BSV.detach())
        return torch.zeros((), device=logits_BSV.device), torch.tensor(1, dtype=torch.int), {"lp_BS": lp.cpu()}

    was_training = model.training
    model.eval()
    try:
        out = run_schedule(model=model, micro_batches=split_micro_batches(batch, micro_batch_size), loss_fn=loss_fn,
                           forward_only=True, device=device)
    finally:
        model.train(was_training)
    if not is_last_stage:
        return None, []
    return torch.cat([d["lp_BS"] for d in out], dim=0), kept
