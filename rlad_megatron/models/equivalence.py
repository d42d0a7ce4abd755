"""Numeric proof of a conversion: HF logits vs megatron logits on the same tokens.

Legend: B batch, S sequence, V true vocab, Vp padded vocab, Vt = Vp / TP (one TP rank's slice).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

if TYPE_CHECKING:
    from rlad_megatron.distributed.groups import ParallelGroups


def megatron_logits(model: torch.nn.Module, groups: ParallelGroups, tokens_BS: torch.Tensor, *,
                    vocab_size: int, micro_batch_size: Optional[int] = None) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [B, S, V] (float32) on last-stage ranks, None on the others.

    Runs megatron-core's forward-only schedule, so any PP works; TP vocab slices are all-gathered.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens_BS.shape
    micro = micro_batch_size or batch
    positions_BS = torch.arange(seq).unsqueeze(0).expand(micro, -1)
    pieces: list[torch.Tensor] = []

    def forward_step(data_iterator, model):
        ids_BS = next(data_iterator)
        out = model(ids_BS, positions_BS[: ids_BS.shape[0]], None)

        def collect(logits_BSVt):
            pieces.append(logits_BSVt.detach().float())
            return logits_BSVt.new_zeros(()), {}

        return out, collect

    micro_batches = [tokens_BS[i:i + micro] for i in range(0, batch, micro)]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro_batches),
                                    model=[model], num_microbatches=len(micro_batches), seq_length=seq,
                                    micro_batch_size=micro, forward_only=True)
    model.train(was_training)
    if not groups.is_last_stage:
        return None
    logits_BSVt = torch.cat(pieces, dim=0).contiguous()
    if groups.tp_size > 1:
        gathered = [torch.empty_like(logits_BSVt) for _ in range(groups.tp_size)]
        dist.all_gather(gathered, logits_BSVt, group=groups.tp)
        logits_BSVt = torch.cat(gathered, dim=-1)
    return logits_BSVt[..., :vocab_size]


def hf_logits(hf_dir: str | Path, tokens_BS: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, V] (float32) of the HF model in ``hf_dir`` run in float32 on CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens_BS).logits.float()


def compare_logits(ref_BSV: torch.Tensor, test_BSV: torch.Tensor) -> dict[str, float]:
    """max |ref - test| and mean per-token KL(softmax(ref) || softmax(test)), in float64."""
    if ref_BSV.shape != test_BSV.shape:
        raise ValueError(f"logit shapes differ: reference {tuple(ref_BSV.shape)}, test {tuple(test_BSV.shape)}")
    ref, test = ref_BSV.double(), test_BSV.double()
    lp_ref, lp_test = F.log_softmax(ref, dim=-1), F.log_softmax(test, dim=-1)
    kl_BS = (lp_ref.exp() * (lp_ref - lp_test)).sum(-1)
    return {"max_abs_diff": (ref - test).abs().max().item(), "kl_mean": kl_BS.mean().item(),
            "kl_max": kl_BS.max().item()}
