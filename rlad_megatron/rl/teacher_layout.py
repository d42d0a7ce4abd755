"""A frozen scorer on its own parallel layout, called with the student's experience (docs/teacher_layout.md).

    teacher = LayoutScorer.build(cfg, student_groups, pad_id=tok.pad_id, **scoring)   # teacher.parallel's grid
    signal = teacher.teacher_signal(exp, topk=objective.teacher_topk)                 # on the student's layout

Legend: N rows of this rank's student replica, S their width, M rows of this rank's teacher
replica, k top-k entries per position.

The student's rollout rows go to the teacher replicas (:class:`~rlad_megatron.distributed.row_exchange.RowExchange`:
token ids and the response mask, each row cut to the positions its loss reads), the teacher scores
its slice with its own TP/PP groups (vocab-parallel over *its* shards: nothing gathers the
vocabulary), and the log-probs (and top-k ids / log-probs) come back to the last pipeline stage of
the student replica that owns each row. Positions past a row's last counted target are 0, as in
the token-budget scorer; the losses mask them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from rlad_megatron.config import Config, same_layout
from rlad_megatron.distributed.groups import ParallelGroups, build_layout_groups
from rlad_megatron.distributed.row_exchange import RowExchange, layout_ranks
from rlad_megatron.models.forward import shift_left
from rlad_megatron.rl.micro_batches import row_lengths
from rlad_megatron.rl.scorer import Scorer, TeacherSignal


@dataclass
class _Rows:
    """The three tensors a Scorer reads."""

    tokens_NS: torch.Tensor
    targets_NS: torch.Tensor
    mask_NS: torch.Tensor


def teacher_groups(cfg: Config, student_groups: ParallelGroups) -> ParallelGroups:
    """The student's groups when both layouts agree; otherwise a second grid for ``teacher.parallel``."""
    if same_layout(cfg.student, cfg.teacher):
        return student_groups
    p = cfg.teacher.parallel
    return build_layout_groups(tensor_model_parallel_size=p.tensor_model_parallel_size,
                               pipeline_model_parallel_size=p.pipeline_model_parallel_size,
                               expert_model_parallel_size=p.expert_model_parallel_size)


class LayoutScorer:
    """Same interface as :class:`Scorer` (``teacher_signal``, ``logprobs``, ``resident``, ``model``)."""

    def __init__(self, scorer: Scorer, *, student_groups: ParallelGroups, pad_id: int, device: torch.device):
        self.scorer, self.student_groups, self.pad_id = scorer, student_groups, pad_id
        # Expert-parallel ranks of different teacher replicas all-gather tokens inside every MoE layer,
        # so every teacher replica must run the same micro-batch shapes: equal row counts and width,
        # fixed micro-batches (a token-budget plan would follow each replica's own lengths).
        self.uniform = scorer.groups.ep_size > 1
        if self.uniform:
            scorer.max_tokens_per_micro_batch = 0
        self.exchange = RowExchange(src=layout_ranks(student_groups, device), dst=layout_ranks(scorer.groups, device),
                                    device=device)

    @property
    def model(self) -> torch.nn.Module:
        return self.scorer.model

    @property
    def groups(self) -> ParallelGroups:
        return self.scorer.groups

    @property
    def copy_s(self) -> float:
        return self.scorer.copy_s

    @property
    def last_stats(self) -> dict[str, float]:
        return self.scorer.last_stats

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        with self.scorer.resident():
            yield

    def logprobs(self, exp, *, keep_logits: bool = False) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        return self.teacher_signal(exp, keep_logits=keep_logits).lp_NS, []

    def teacher_signal(self, exp, *, topk: int = 0, keep_logits: bool = False) -> TeacherSignal:
        if keep_logits:
            raise ValueError("keep_logits: full teacher logits need the student's layout (use distill.teacher_topk)")
        # The columns a row's loss reads (row_lengths) plus the token after the last one: its target.
        n, s = exp.tokens_NS.shape
        widths = (row_lengths(exp.mask_NS) + 1).clamp(max=s) if s else torch.zeros(n, dtype=torch.int64)
        plan = self.exchange.plan(widths)
        got = self.exchange.to_dst(plan, {"tokens": exp.tokens_NS, "mask": exp.mask_NS.to(torch.uint8)})
        tokens = got["tokens"]
        # Columns past a row's width arrive as 0; make them padding like the rollout's.
        cols = torch.arange(tokens.shape[1]).expand_as(tokens)
        mine = [plan.all_widths[r] for r in plan.dst_rows(self.scorer.groups.dp_rank)]
        tokens = torch.where(cols < torch.tensor(mine, dtype=torch.int64).unsqueeze(1), tokens,
                             torch.full_like(tokens, self.pad_id)) if mine else tokens
        mask = got["mask"].to(torch.bool)
        if self.uniform:
            tokens, mask = self._pad_to_uniform(plan, tokens, mask)
        rows = _Rows(tokens_NS=tokens, targets_NS=shift_left(tokens, self.pad_id), mask_NS=mask)
        signal = self.scorer.teacher_signal(rows, topk=topk)
        if self.scorer.groups.is_last_stage:
            out = {"lp": signal.lp_NS, "ids": signal.topk_ids_NSK, "topk_lp": signal.topk_lp_NSK}
        else:
            # Not a sender: empty tensors that only tell the receivers' dtypes and trailing dims.
            out = {"lp": torch.zeros((0, 0), dtype=torch.float32), "ids": torch.zeros((0, 0, topk), dtype=torch.int32),
                   "topk_lp": torch.zeros((0, 0, topk), dtype=torch.float32)}
        if not topk:
            del out["ids"], out["topk_lp"]
        back = self.exchange.to_src(plan, out)
        if back is None:
            return TeacherSignal()
        return TeacherSignal(lp_NS=_widen(back["lp"], s), topk_ids_NSK=_widen(back.get("ids"), s),
                             topk_lp_NSK=_widen(back.get("topk_lp"), s))


    def _pad_to_uniform(self, plan, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This replica's rows padded with empty rows (all padding, nothing counted) to the largest slice's
        row count and the widest row; the results of padding rows are never sent back."""
        rows = max(b - a for a, b in zip(plan.cuts, plan.cuts[1:]))
        width = max(plan.all_widths, default=1)
        out_tokens = torch.full((rows, width), self.pad_id, dtype=tokens.dtype)
        out_mask = torch.zeros((rows, width), dtype=torch.bool)
        out_tokens[:tokens.shape[0], :tokens.shape[1]] = tokens
        out_mask[:mask.shape[0], :mask.shape[1]] = mask
        return out_tokens, out_mask


def _widen(x: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """``[N, w, ...]`` -> ``[N, width, ...]``, zeros past ``w`` (the rollout's width)."""
    if x is None or x.shape[1] == width:
        return x
    out = torch.zeros((x.shape[0], width, *x.shape[2:]), dtype=x.dtype)
    out[:, :x.shape[1]] = x
    return out
