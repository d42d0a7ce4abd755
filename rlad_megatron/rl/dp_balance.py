"""Each mini-batch's rows spread over the student's DP replicas by token count (``rl.balance_dp_tokens``).

    balancer = DPBalancer(groups, device)
    part, stats = balancer.mini_batch(exp, rows)   # this replica's balanced share of the mini-batch
    student.train_mini_batch(part, torch.arange(len(part)))

Legend: N rows of this replica's part of a mini-batch, S width, W_i the positions row i's loss reads.

Every DP replica samples its own prompts, so with long-tailed responses one replica's part of a
mini-batch can carry several times the tokens of another's, and every optimizer step waits for the
slowest replica (the gradient all-reduce). The rows of one mini-batch are independent once GRPO's
advantages are computed, and the losses return sums with their counts (normalised by the global
count in ``finalize_model_grads``), so moving rows between replicas *within* a mini-batch leaves the
mini-batch's objective and gradients unchanged (up to float summation order). The union of each
mini-batch over the replicas is kept; only which replica computes which row changes: contiguous
slices of the mini-batch's rows (in replica order) balanced by ``W_i``, each replica at least one
row; when those cuts would not lower the largest replica's tokens, nothing moves. Rows travel cut
to ``W_i`` (:class:`~rlad_megatron.distributed.row_exchange.RowExchange`), the last-stage tensors
(teacher and reference log-probs, the teacher's top-k) between last stages only.
"""

from __future__ import annotations

import torch

from rlad_megatron.distributed.groups import ParallelGroups
from rlad_megatron.distributed.row_exchange import RowExchange, layout_ranks
from rlad_megatron.rl.experience import Experience
from rlad_megatron.rl.micro_batches import row_lengths

# Experience fields on every rank of a replica; the others only its last pipeline stage holds.
_EVERYWHERE = ("tokens_NS", "targets_NS", "mask_NS", "lp_old_NS", "advantages_N")


class DPBalancer:
    """``teacher``/``reference``/``topk``: which last-stage signals the step's experience carries (the
    objective decides; the same on every rank)."""

    def __init__(self, groups: ParallelGroups, device: torch.device, *, teacher: bool, reference: bool, topk: int):
        self.groups = groups
        ranks = layout_ranks(groups, device)
        self.exchange = RowExchange(src=ranks, dst=ranks, device=device)
        # name -> an empty tensor of its dtype and trailing dims, sent by ranks that hold none.
        self.last_stage: dict[str, torch.Tensor] = {}
        if teacher:
            self.last_stage["lp_t_NS"] = torch.zeros((0, 0), dtype=torch.float32)
        if reference:
            self.last_stage["lp_ref_NS"] = torch.zeros((0, 0), dtype=torch.float32)
        if topk:
            self.last_stage["teacher_topk_ids_NSK"] = torch.zeros((0, 0, topk), dtype=torch.int32)
            self.last_stage["teacher_topk_lp_NSK"] = torch.zeros((0, 0, topk), dtype=torch.float32)

    def mini_batch(self, exp: Experience, index: torch.Tensor) -> tuple[Experience, dict[str, float]]:
        """This replica's share of the mini-batch whose local rows are ``index``, and the token imbalance
        (max replica tokens / mean) before and after."""
        if exp.teacher_logits:
            raise ValueError("rl.balance_dp_tokens: not with the teacher's full logits (distill.teacher_topk: 0)")
        rows = {k: getattr(exp, k)[index] for k in _EVERYWHERE}
        rows["mask_NS"] = rows["mask_NS"].to(torch.uint8)
        plan = self.exchange.plan(row_lengths(rows["mask_NS"]), nonempty=True)
        stats = _imbalance(plan)
        if stats["dp_token_imbalance"] >= stats["dp_token_imbalance_before"]:
            # Contiguous cuts do not beat the replicas' own rows (already even): keep them, move nothing.
            return exp.select(index), {**stats, "dp_token_imbalance": stats["dp_token_imbalance_before"]}
        got = self.exchange.to_dst(plan, rows)
        part = Experience(tokens_NS=got["tokens_NS"], targets_NS=got["targets_NS"],
                          mask_NS=got["mask_NS"].to(torch.bool), lp_old_NS=got["lp_old_NS"],
                          advantages_N=got["advantages_N"])
        if self.last_stage:
            last = self.groups.is_last_stage
            send = {k: getattr(exp, k)[index] if last else empty for k, empty in self.last_stage.items()}
            for k, value in (self.exchange.to_dst(plan, send, last_stage_only=True) or {}).items():
                setattr(part, k, value)
        return part, stats


def _imbalance(plan) -> dict[str, float]:
    def ratio(parts: list[int]) -> float:
        mean = sum(parts) / len(parts)
        return max(parts) / mean if mean else 1.0

    before = [sum(ws) for ws in plan.widths]
    flat = plan.all_widths
    after = [sum(flat[a:b]) for a, b in zip(plan.cuts, plan.cuts[1:])]
    return {"dp_token_imbalance_before": ratio(before), "dp_token_imbalance": ratio(after)}
