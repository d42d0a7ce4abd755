"""One rollout forward step on this rank's pipeline stage, and the token exchange across TP and PP.

Shape legend: b = rows in the step's cohort, S = tokens fed in the step, h = hidden size,
V = megatron's padded vocabulary, a = rows sampling at this step.

TP: the last-position logits are all-gathered across TP (``runtime_gather_output=True``) and every
TP rank samples the same rows with the same seeds; TP rank 0's tokens are then broadcast so the
ranks can never diverge. PP: hidden states go stage to stage with send/recv over ``groups.pp``;
the last stage samples and broadcasts tokens and log-probs to every stage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext

from rlad_megatron.distributed.groups import ParallelGroups


class PipelineStage:
    """This rank's forward for one step, and the token exchange between TP ranks and PP stages."""

    def __init__(self, model, groups: ParallelGroups, device: torch.device):
        self.model, self.groups, self.device = model, groups, device
        config = model.config
        self.hidden_size = config.hidden_size
        self.pipe_dtype = config.pipeline_dtype or config.params_dtype
        if groups.pp_size > 1:
            pp_ranks = dist.get_process_group_ranks(groups.pp)
            self.prev_rank = pp_ranks[groups.pp_rank - 1] if not groups.is_first_stage else None
            self.next_rank = pp_ranks[groups.pp_rank + 1] if not groups.is_last_stage else None
        self.tp_src = dist.get_process_group_ranks(groups.tp)[0] if groups.tp_size > 1 else None

    def forward(self, ids_bS: torch.Tensor, first_position: int,
                context: StaticInferenceContext | None) -> torch.Tensor | None:
        """Last-position logits ``[b, V]`` (full vocabulary) on the last stage, None elsewhere."""
        rows, seq = ids_bS.shape
        positions_bS = torch.arange(first_position, first_position + seq, device=self.device).expand(rows, -1)
        g = self.groups
        if g.pp_size > 1:
            hidden_in_Sbh = None
            if not g.is_first_stage:
                hidden_in_Sbh = torch.empty((seq, rows, self.hidden_size), dtype=self.pipe_dtype, device=self.device)
                dist.recv(hidden_in_Sbh, src=self.prev_rank, group=g.pp)
            self.model.set_input_tensor(hidden_in_Sbh)
        out = self.model(ids_bS, positions_bS, None, inference_context=context, runtime_gather_output=True)
        if g.pp_size > 1 and not g.is_last_stage:
            dist.send(out.to(self.pipe_dtype).contiguous(), dst=self.next_rank, group=g.pp)
        if context is not None:
            context.increment_sequence_len_offset(seq)
        # The last stage returns [b, S, V] logits (S = 1 with the cache: megatron keeps only the last position).
        return out[:, -1, :] if g.is_last_stage else None

    def share(self, tokens_a: torch.Tensor | None, lp_a: torch.Tensor | None,
              rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank gets TP rank 0 of the last stage's tokens and log-probs."""
        g = self.groups
        if g.tp_size == 1 and g.pp_size == 1:
            return tokens_a, lp_a
        # float64 holds token ids exactly, so one broadcast carries both.
        packed_2a = torch.empty((2, rows), dtype=torch.float64, device=self.device)
        if g.is_last_stage:
            packed_2a[0], packed_2a[1] = tokens_a, lp_a
            if self.tp_src is not None:
                dist.broadcast(packed_2a, src=self.tp_src, group=g.tp)
        if g.pp_size > 1:
            dist.broadcast(packed_2a, src=g.pp_last_rank, group=g.pp)
        return packed_2a[0].long(), packed_2a[1].float()
