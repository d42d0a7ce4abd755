"""From a rollout to training tensors (frozen-model log-probs over them: rl/scorer.py).

Legend: N rollout rows (prompts x G), S row width, B micro-batch rows, V/TP local vocab shard.

Targets are the tokens shifted left: position ``t`` holds the logits that predict token ``t+1``,
so every per-token tensor here is aligned with the *logits* (``lp_BS[:, t] = log p(tok[t+1])``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rlad_megatron.models.forward import shift_left
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
    # forward_kl: the teacher's top-k ids (int32) and log-probs per position (last stage only) ...
    teacher_topk_ids_NSK: torch.Tensor | None = None
    teacher_topk_lp_NSK: torch.Tensor | None = None
    # ... or, with distill.teacher_topk = 0, its logits shard of each scoring micro-batch.
    teacher_logits: list[torch.Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return self.tokens_NS.shape[0]

    def select(self, index: torch.Tensor) -> Experience:
        """The rows ``index`` as an Experience of their own (not with kept teacher logits)."""
        def pick(x):
            return None if x is None else x[index]

        return Experience(tokens_NS=self.tokens_NS[index], targets_NS=self.targets_NS[index],
                          mask_NS=self.mask_NS[index], lp_old_NS=self.lp_old_NS[index],
                          advantages_N=self.advantages_N[index], lp_t_NS=pick(self.lp_t_NS),
                          lp_ref_NS=pick(self.lp_ref_NS), teacher_topk_ids_NSK=pick(self.teacher_topk_ids_NSK),
                          teacher_topk_lp_NSK=pick(self.teacher_topk_lp_NSK))

    def rows(self, index: torch.Tensor) -> dict:
        """The tensors of rows ``index`` as one batch dict (teacher logits are handled by the caller)."""
        e = self.select(index)
        out = {"tokens_BS": e.tokens_NS, "targets_BS": e.targets_NS, "mask_BS": e.mask_NS, "lp_old_BS": e.lp_old_NS,
               "adv_B": e.advantages_N}
        for key, value in (("lp_t_BS", e.lp_t_NS), ("lp_ref_BS", e.lp_ref_NS),
                           ("teacher_topk_ids_BSK", e.teacher_topk_ids_NSK),
                           ("teacher_topk_lp_BSK", e.teacher_topk_lp_NSK)):
            if value is not None:
                out[key] = value
        return out


def build_experience(rollout: RolloutBatch, advantages_N: torch.Tensor, *, pad_id: int) -> Experience:
    return Experience(tokens_NS=rollout.tokens_BL, targets_NS=shift_left(rollout.tokens_BL, pad_id),
                      mask_NS=shift_left(rollout.response_mask_BL, False),
                      lp_old_NS=shift_left(rollout.logprobs_BL, 0.0), advantages_N=advantages_N.to(torch.float32))
