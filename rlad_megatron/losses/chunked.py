"""Log-probs of sampled tokens from the final hidden states, the output layer applied in chunks of
positions: a micro-batch's whole ``[S, B, V/TP]`` logits never exist (DESIGN.md section 4).

Per chunk of ``C`` positions the forward computes ``logits_CV = hidden_CH @ W_VH^T`` (this rank's
vocabulary shard of the output layer, megatron's ``ColumnParallelLinear`` weight), takes the
vocab-parallel log-prob (and entropy) of the targets with the same kernel as
:func:`~rlad_megatron.losses.vocab_parallel.vocab_parallel_logprobs`, and drops the logits. The
backward recomputes each chunk's logits and softmax (Liger's fused linear cross entropy does the
same) and accumulates::

    grad_logits_CV = g * (onehot(y) - softmax)          (local shard)
    grad_hidden_CH = grad_logits_CV @ W                 then all_reduce_SUM over TP (what
                                                        ColumnParallelLinear's input copy does)
    grad_W_VH     += grad_logits_CV^T @ hidden_CH

Peak extra memory is ``O(C x V/TP)`` instead of ``O(S x B x V/TP)``. The weight may be the tied
embedding's (its gradient reaches it like any other parameter's).

Three layers (STYLE.md habit 4): helpers (from vocab_parallel), the autograd Function, the public
function. Process groups are passed in.

Shape legend:
    S positions, B sequences, H hidden size, V local vocabulary shard (padded vocab / TP)
    N = S x B tokens, C positions x B tokens per chunk
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from rlad_megatron.losses.vocab_parallel import _all_reduce, _forward_stats, _tp_rank_size


def _chunks(n: int, step: int):
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


class _ChunkedLinearLogProbs(torch.autograd.Function):
    """lp (and entropy) of ``target`` under ``hidden @ weight^T`` over a TP-sharded vocabulary, by chunks."""

    @staticmethod
    def forward(ctx, hidden_SBH, weight_VH, target_SB, tp_group, vocab_size, chunk_tokens, with_entropy):
        if hidden_SBH.dim() != 3 or tuple(target_SB.shape) != tuple(hidden_SBH.shape[:2]):
            raise ValueError(f"hidden: expected [S, B, H] with target [S, B], got {tuple(hidden_SBH.shape)} "
                             f"and {tuple(target_SB.shape)}")
        if weight_VH.dim() != 2 or weight_VH.shape[1] != hidden_SBH.shape[2]:
            raise ValueError(f"weight: expected [V/TP, H={hidden_SBH.shape[2]}], got {tuple(weight_VH.shape)}")
        h_NH, t_N = hidden_SBH.reshape(-1, hidden_SBH.shape[2]), target_SB.reshape(-1)
        n = h_NH.shape[0]
        lp_N = torch.empty(n, dtype=torch.float32, device=h_NH.device)
        ent_N = torch.empty(n, dtype=torch.float32, device=h_NH.device) if with_entropy else None
        for lo, hi in _chunks(n, chunk_tokens):
            logits_CV = h_NH[lo:hi] @ weight_VH.t()
            lp, ent, _, _, _ = _forward_stats(logits_CV, t_N[lo:hi], tp_group=tp_group, vocab_size=vocab_size,
                                              padded_vocab_size=None, with_entropy=with_entropy, softmax_out=None)
            lp_N[lo:hi] = lp
            if with_entropy:
                ent_N[lo:hi] = ent
        ctx.save_for_backward(hidden_SBH, weight_VH, target_SB)
        ctx.tp_group, ctx.vocab_size, ctx.chunk_tokens = tp_group, vocab_size, chunk_tokens
        lp = lp_N.view(target_SB.shape)
        if with_entropy:
            ent = ent_N.view(target_SB.shape)
            ctx.mark_non_differentiable(ent)  # a metric, as in vocab_parallel_logprobs
            return lp, ent
        return lp

    @staticmethod
    def backward(ctx, grad_lp, *unused):
        hidden_SBH, weight_VH, target_SB = ctx.saved_tensors
        h_NH, t_N = hidden_SBH.reshape(-1, hidden_SBH.shape[2]), target_SB.reshape(-1)
        g_N = grad_lp.reshape(-1).float()
        grad_h_NH = torch.empty_like(h_NH)
        grad_w_VH = torch.zeros_like(weight_VH, dtype=torch.float32)
        _, tp_size = _tp_rank_size(ctx.tp_group)
        for lo, hi in _chunks(h_NH.shape[0], ctx.chunk_tokens):
            logits_CV = h_NH[lo:hi] @ weight_VH.t()
            exp_CV = torch.empty(logits_CV.shape, dtype=torch.float32, device=logits_CV.device)
            _, _, sum_exp, in_shard, local_t = _forward_stats(
                logits_CV, t_N[lo:hi], tp_group=ctx.tp_group, vocab_size=ctx.vocab_size, padded_vocab_size=None,
                with_entropy=False, softmax_out=exp_CV)
            del logits_CV
            g = g_N[lo:hi]
            exp_CV.mul_((-g / sum_exp).unsqueeze(-1))  # -g * softmax
            rows = torch.arange(hi - lo, device=exp_CV.device)
            exp_CV[rows, local_t] += torch.where(in_shard, g, torch.zeros_like(g))
            grad_CV = exp_CV.to(weight_VH.dtype)
            grad_h_NH[lo:hi] = grad_CV @ weight_VH
            grad_w_VH.add_(grad_CV.t().float() @ h_NH[lo:hi].float())
        # Each shard's vocabulary contributes part of d lp / d hidden: summed over TP.
        _all_reduce(grad_h_NH, dist.ReduceOp.SUM, ctx.tp_group, tp_size)
        return (grad_h_NH.view(hidden_SBH.shape), grad_w_VH.to(weight_VH.dtype), None, None, None, None, None)


def chunked_linear_logprobs(hidden_SBH: torch.Tensor, weight_VH: torch.Tensor, target_SB: torch.Tensor, *,
                            tp_group: Optional[dist.ProcessGroup], vocab_size: int, chunk_size: int,
                            with_entropy: bool = False):
    """Log-probs ``[S, B]`` of ``target_SB`` under ``hidden_SBH @ weight_VH^T`` without the whole logits.

    Args:
        hidden_SBH: the final hidden states (after the final norm), megatron's ``[S, B, H]`` layout.
        weight_VH: this rank's shard of the output layer (or tied embedding) weight ``[V/TP, H]``.
        target_SB: global token ids; ids outside ``[0, vocab_size)`` get ``lp = -inf`` (mask them).
        tp_group: the tensor-parallel group the vocabulary is sharded over (None: no sharding).
        vocab_size: the true vocabulary size (padded columns get no mass and zero gradient).
        chunk_size: positions per chunk (``chunk_size x B`` tokens of logits at a time).
        with_entropy: also return the per-token entropy ``[S, B]`` (no gradient).

    Returns:
        ``lp [S, B]`` float32 (and ``entropy``), differentiable w.r.t. ``hidden_SBH`` and ``weight_VH``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size: expected >= 1, got {chunk_size}")
    chunk_tokens = chunk_size * max(1, hidden_SBH.shape[1])
    return _ChunkedLinearLogProbs.apply(hidden_SBH, weight_VH, target_SB, tp_group, vocab_size, chunk_tokens,
                                        with_entropy)
