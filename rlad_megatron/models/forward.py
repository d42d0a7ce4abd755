"""Run a model stage over micro-batches through megatron-core's pipeline schedule.

Legend: B micro-batch size, S sequence length, V/TP the local vocab shard.

A micro-batch is a dict of tensors with at least ``tokens_BS``. The caller's ``loss_fn(logits_BSV,
micro_batch)`` runs on the last pipeline stage and returns what megatron's schedule expects:
``(loss, num_tokens: int tensor, metrics dict)``. ``forward_only`` runs serve teacher, reference
and old-policy log-probs; the training step runs with gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.utils import get_model_config

from rlad_megatron.distributed.groups import ParallelGroups
from rlad_megatron.models.logprobs import final_hidden_states

LossFn = Callable[[torch.Tensor, dict], tuple[torch.Tensor, torch.Tensor, dict]]


def position_ids_like(tokens_BS: torch.Tensor) -> torch.Tensor:
    """Right-padded sequences start at position 0, so positions are a plain arange."""
    return torch.arange(tokens_BS.shape[1], device=tokens_BS.device).unsqueeze(0).expand_as(tokens_BS)


def shift_left(x_BS: torch.Tensor, fill) -> torch.Tensor:
    """``x[:, t + 1]`` at position ``t``, ``fill`` in the last column: per-token targets aligned with
    the logits (the logits at ``t`` predict token ``t + 1``)."""
    out = torch.full_like(x_BS, fill)
    out[:, :-1] = x_BS[:, 1:]
    return out


def run_schedule(*, model: torch.nn.Module, micro_batches: list[dict], loss_fn: LossFn, forward_only: bool,
                 device: torch.device, hidden_states: bool = False,
                 groups: ParallelGroups | None = None) -> list[dict]:
    """Forward (and backward unless ``forward_only``) over ``micro_batches``; returns the metric dicts
    produced on the last stage (an empty list on other stages).

    ``hidden_states``: ``loss_fn`` gets the last stage's final hidden states ``[S, B, H]`` instead of
    the logits (it applies the output layer itself, e.g. in chunks: :mod:`rlad_megatron.models.logprobs`).

    ``groups``: the model's own process groups (a teacher on its own layout); None runs on megatron's
    global ``parallel_state`` (the student's grid).
    """
    if not micro_batches:
        return []
    shapes = {tuple(mb["tokens_BS"].shape) for mb in micro_batches}
    micro_batch_size, seq_length = max(shapes, key=lambda bs: bs[0] * bs[1])
    # Micro-batches of different shapes (token-budget micro-batches, each trimmed to its longest row):
    # megatron's p2p then sends each activation's shape ahead of it (``variable_seq_lengths``); with
    # one shape the schedule's fixed ``seq_length`` x ``micro_batch_size`` is used as before.
    config = get_model_config(model)
    variable = len(shapes) > 1
    saved = config.variable_seq_lengths
    config.variable_seq_lengths = saved or variable

    def forward_step(data_iterator: Iterable[dict], stage: torch.nn.Module):
        mb = next(data_iterator)
        mb = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}
        tokens = mb["tokens_BS"]
        if hidden_states:
            out = final_hidden_states(stage, tokens, position_ids_like(tokens))
        else:
            out = stage(tokens, position_ids_like(tokens), None)
        return out, lambda last: loss_fn(last, mb)

    extra: dict = {}
    schedule = get_forward_backward_func()
    if groups is not None:
        schedule = get_forward_backward_func(pp_size=groups.pp_size)
        extra = dict(pg_collection=groups.collection, p2p_communicator=P2PCommunicator(pp_group=groups.pp,
                                                                                        config=config))
    try:
        with torch.no_grad() if forward_only else torch.enable_grad():
            return schedule(
                forward_step_func=forward_step,
                data_iterator=iter(micro_batches),
                model=[model],
                num_microbatches=len(micro_batches),
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=forward_only,
                **extra,
            )
    finally:
        config.variable_seq_lengths = saved


def split_micro_batches(batch: dict, micro_batch_size: int, *, allow_remainder: bool = False) -> list[dict]:
    """Split a dict of [N, ...] tensors along dim 0 into micro-batches of ``micro_batch_size`` (the last one
    smaller when ``allow_remainder``: forward-only scoring of a slice of rows)."""
    n = next(v for v in batch.values() if torch.is_tensor(v)).shape[0]
    if n % micro_batch_size and not allow_remainder:
        raise ValueError(f"batch of {n} sequences is not divisible by micro_batch_size={micro_batch_size}")
    return [{k: (v[i:i + micro_batch_size] if torch.is_tensor(v) else v) for k, v in batch.items()}
            for i in range(0, n, micro_batch_size)]
