"""The teacher's distribution as top-k log-probs, and the forward KL against it, over TP-sharded logits.

A teacher that is scored once per rollout and read many times (and may have its own TP layout)
stores ``k`` (id, log-prob) pairs per position instead of its logits shard (as ModelOpt's
TopLogitsKLLoss and NeMo-RL's ``topk_logits_k``). The student is matched on those ``k`` ids plus
one tail bucket holding the rest of the mass::

    KL = sum_i p_t,i (lp_t,i - lp_s,i) + p_t,tail (log p_t,tail - log p_s,tail)
    p_t,tail = max(0, 1 - sum_i p_t,i)        p_s,tail = sum of p_s over every other column

that is the KL of both distributions coarsened to k + 1 buckets: never above the full-vocabulary
KL (data processing), equal to it when k covers the vocabulary, and 0 only where the student
matches the teacher's top-k exactly, tail mass included.

Nothing gathers the vocabulary: the top-k moves ``[N, k]`` candidates per rank through one
all_gather, the student's log-probs at the ids and its tail one SUM all-reduce of ``[N, k + 2]``, on top of the
``[N]``-sized MAX / SUM reductions of :mod:`rlad_megatron.losses.vocab_parallel` (whose layout,
padding rules and helpers this module reuses).

Three layers (STYLE.md habit 4): numeric helpers, the autograd Function, public functions.

Shape legend (as vocab_parallel.py):
    ...  any leading dims        N  number of positions = prod(...)
    V    local vocabulary shard  Vv valid (unpadded) columns of the shard
    K    the number of top-k ids, k clipped to vocab_size
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from rlad_megatron.losses.vocab_parallel import (
    _all_reduce,
    _exp_sums,
    _flatten,
    _global_max,
    _row_chunks,
    _shard,
)

# Below every real key (a NaN bit pattern aside): fills the candidate slots of shards with fewer
# valid columns than K, which the global top-k then never picks (all shards together hold >= K).
_PAD_KEY = -(1 << 63)
_LOW32 = (1 << 32) - 1


# ----------------------------------------------------------------------------- numeric helpers


def _sort_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as (value descending, id ascending): float32 ``values`` and int64 ``ids``
    (broadcastable, ids in [0, 2^32)) packed into one tensor, so that a plain top-k on the keys is
    deterministic on ties and one all_gather carries both values and ids."""
    values = torch.where(values == 0, torch.zeros_like(values), values)  # -0.0 and +0.0 must tie
    bits = values.view(torch.int32).long()
    # IEEE order for negatives is reversed bit order: flipping the 31 low bits makes it monotone.
    bits = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return bits * (1 << 32) + (_LOW32 - ids)


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_sort_keys`: (float32 values, int64 ids)."""
    high = torch.div(keys, 1 << 32, rounding_mode="floor")
    ids = _LOW32 - (keys - high * (1 << 32))
    bits = torch.where(high >= 0, high, high ^ 0x7FFFFFFF)
    return bits.to(torch.int32).view(torch.float32), ids


def _log_sum_exp(src_NVv: torch.Tensor, n: int, vocab_local: int, tp_group, tp_size: int):
    """(global row max [N], global sum_v exp(logits_v - max) [N]), both float32."""
    max_N = _global_max(src_NVv, n, vocab_local, tp_group, tp_size)
    sum_exp, _ = _exp_sums(src_NVv, max_N, out_NVv=None, with_entropy=False)
    _all_reduce(sum_exp, dist.ReduceOp.SUM, tp_group, tp_size)
    return max_N, sum_exp


def _local_ids(ids_NK: torch.Tensor, start: int, n_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(in_shard mask [N, K], local column [N, K], 0 where not in this shard's valid columns)."""
    local = ids_NK - start
    in_shard = (local >= 0) & (local < n_valid)
    return in_shard, torch.where(in_shard, local, torch.zeros_like(local))


def _shifted_exp(src_BVv: torch.Tensor, max_B: torch.Tensor) -> torch.Tensor:
    """float32 ``exp(logits - max)`` of a chunk of rows."""
    return (src_BVv.float() - max_B.unsqueeze(-1)).exp_()


def _not_ids(local_BK: torch.Tensor, in_shard_BK: torch.Tensor, n_valid: int) -> torch.Tensor:
    """float32 ``[B, Vv]``: 1 on the shard's valid columns that are none of the row's ids, 0 on the ids.

    Counted with scatter_add (ids of other shards add 0 at column 0), so that no write order matters."""
    hits = torch.zeros((local_BK.shape[0], n_valid), dtype=torch.float32, device=local_BK.device)
    if n_valid:
        hits.scatter_add_(1, local_BK, in_shard_BK.float())
    return (hits == 0).float()


def _check_k_shapes(lead: tuple, ids: torch.Tensor, lp: Optional[torch.Tensor]) -> None:
    if ids.dim() < 1 or tuple(ids.shape[:-1]) != lead or ids.shape[-1] < 1:
        raise ValueError(f"teacher_ids: expected shape {lead + ('k',)} with k >= 1 (the logits' leading dims), "
                         f"got {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"teacher_ids: expected an integer dtype (int32 or int64), got {ids.dtype}")
    if lp is not None and lp.shape != ids.shape:
        raise ValueError(f"teacher_lp: expected teacher_ids' shape {tuple(ids.shape)}, got {tuple(lp.shape)}")


# ----------------------------------------------------------------------------- autograd Function


class _VocabParallelGatherLogprobs(torch.autograd.Function):
    """lp_i = logit_{id_i} - logsumexp(logits) for K ids per row, and log p_tail = log of the mass on all
    other columns, summed directly over them (not ``1 - sum_i p_i``, whose float32 rounding would drown
    a tail below ~1e-6).

    Backward, with g the gradient of lp [N, K] and h that of log p_tail [N] (replicated on every TP rank:
    everything after the gather is)::

        d/dz_j = scatter(g)_j - p_j (sum_i g_i + h) + h [j not an id] exp(z_j) / rest

    The softmax is recomputed from the saved logits instead of saved: a float32 softmax kept from
    forward to backward is a second shard-sized buffer (twice bf16 logits), the recomputation one exp
    pass per chunk. Duplicated ids get the sum of their gradients and count once in the tail.
    """

    @staticmethod
    def forward(ctx, logits, ids, tp_group, vocab_size, padded_vocab_size):
        shape = logits.shape
        logits_NV = _flatten(logits, None)
        ids_NK = ids.reshape(-1, ids.shape[-1]).long()
        n, vocab_local, start, n_valid, tp_size = _shard(logits_NV, tp_group, vocab_size, padded_vocab_size)
        src = logits_NV[:, :n_valid]
        max_N = _global_max(src, n, vocab_local, tp_group, tp_size)
        in_shard, local = _local_ids(ids_NK, start, n_valid)
        sums = torch.zeros((n, 2), dtype=torch.float32, device=logits.device)  # all columns, the tail's
        for lo, hi in _row_chunks(n, n_valid):
            e = _shifted_exp(src[lo:hi], max_N[lo:hi])
            sums[lo:hi, 0] = e.sum(-1)
            sums[lo:hi, 1] = (e * _not_ids(local[lo:hi], in_shard[lo:hi], n_valid)).sum(-1)

        z_NK = logits_NV.gather(1, local).float() - max_N.unsqueeze(-1)
        # One SUM all-reduce: the K shifted logits (each owned by one rank, 0 elsewhere) and both sums.
        stacked = torch.cat([torch.where(in_shard, z_NK, torch.zeros_like(z_NK)), sums], -1)
        _all_reduce(stacked, dist.ReduceOp.SUM, tp_group, tp_size)
        sum_exp = stacked[:, -2].contiguous()
        # A tail that underflows float32 is held at the smallest normal number: a finite log, finite grads.
        rest = stacked[:, -1].clamp(min=torch.finfo(torch.float32).tiny).contiguous()
        log_sum = torch.log(sum_exp)
        lp_NK = stacked[:, :-2] - log_sum.unsqueeze(-1)
        in_vocab = (ids_NK >= 0) & (ids_NK < vocab_size)  # padding or invalid ids: no mass
        lp_NK = torch.where(in_vocab, lp_NK, torch.full_like(lp_NK, -math.inf))
        log_tail = torch.log(rest) - log_sum

        ctx.save_for_backward(logits, max_N, sum_exp, rest, in_shard, local)
        ctx.shape, ctx.n_valid = shape, n_valid
        return lp_NK.view(ids.shape), log_tail.view(ids.shape[:-1])

    @staticmethod
    def backward(ctx, grad_lp, grad_tail):
        logits, max_N, sum_exp, rest, in_shard, local = ctx.saved_tensors
        n_valid, vocab_local = ctx.n_valid, ctx.shape[-1]
        logits_NV = logits.reshape(-1, vocab_local)
        n = logits_NV.shape[0]
        g_NK = grad_lp.reshape(n, -1).float() if grad_lp is not None else torch.zeros_like(local, dtype=torch.float32)
        h_N = grad_tail.reshape(n).float() if grad_tail is not None else torch.zeros(n, device=logits.device)
        scale_N = -(g_NK.sum(-1) + h_N) / sum_exp
        tail_N = h_N / rest
        g_local = torch.where(in_shard, g_NK, torch.zeros_like(g_NK))
        grad_NV = torch.empty((n, vocab_local), dtype=logits.dtype, device=logits.device)
        direct = logits.dtype == torch.float32
        for lo, hi in _row_chunks(n, vocab_local):
            # bf16/fp16: float32 per chunk, cast once, so the scatter_add adds in float32
            out = grad_NV[lo:hi] if direct else torch.empty((hi - lo, vocab_local), dtype=torch.float32,
                                                            device=logits.device)
            e = _shifted_exp(logits_NV[lo:hi, :n_valid], max_N[lo:hi])
            not_ids = _not_ids(local[lo:hi], in_shard[lo:hi], n_valid)
            torch.mul(e, scale_N[lo:hi].unsqueeze(-1) + not_ids * tail_N[lo:hi].unsqueeze(-1), out=out[:, :n_valid])
            out[:, n_valid:].zero_()  # padded columns: zero gradient
            out.scatter_add_(1, local[lo:hi], g_local[lo:hi])  # ids of other shards add 0 at column 0
            if not direct:
                grad_NV[lo:hi].copy_(out)
        return grad_NV.view(ctx.shape), None, None, None, None


# ----------------------------------------------------------------------------- public functions


@torch.no_grad()
def vocab_parallel_topk_logprobs(logits: torch.Tensor, k: int, *, tp_group: Optional[dist.ProcessGroup],
                                 vocab_size: int, padded_vocab_size: Optional[int] = None):
    """The top-``k`` tokens of TP-sharded ``logits`` and their log-probs over the full true vocabulary.

    Args:
        logits: ``[..., V]`` this rank's vocabulary shard (any float dtype; ranked in float32, which is
            exact for bf16/fp16, and only chunk rows are copied).
        k: number of tokens per position, >= 1; clipped to ``vocab_size`` (``k >= vocab_size`` returns
            the whole vocabulary).
        tp_group, vocab_size, padded_vocab_size: as
            :func:`rlad_megatron.losses.vocab_parallel.vocab_parallel_logprobs` (padded columns are
            never returned).

    Returns:
        ``ids [..., K]`` int64 global token ids and ``lp [..., K]`` float32 log-probs, sorted by
        descending log-prob, ties by ascending id; identical on every rank of ``tp_group``.
        Communication per position: the ``[N]`` max and sum reductions plus an all_gather of K int64.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an integer >= 1, got {k!r}")
    logits_NV = _flatten(logits, None)
    n, vocab_local, start, n_valid, tp_size = _shard(logits_NV, tp_group, vocab_size, padded_vocab_size)
    k = min(k, vocab_size)
    src = logits_NV[:, :n_valid]
    max_N, sum_exp = _log_sum_exp(src, n, vocab_local, tp_group, tp_size)

    k_local = min(k, n_valid)
    cand_NK = torch.full((n, k), _PAD_KEY, dtype=torch.int64, device=logits.device)
    col_ids = torch.arange(start, start + n_valid, device=logits.device)
    if k_local > 0:
        for lo, hi in _row_chunks(n, n_valid):
            cand_NK[lo:hi, :k_local] = torch.topk(_sort_keys(src[lo:hi].float(), col_ids), k_local, dim=-1).values
    if tp_size > 1:
        parts = [torch.empty_like(cand_NK) for _ in range(tp_size)]
        dist.all_gather(parts, cand_NK, group=tp_group)
        cand_NK = torch.cat(parts, dim=-1)  # [N, TP * K]; the same on every rank, so the same top-k
    values_NK, ids_NK = _decode_keys(torch.topk(cand_NK, k, dim=-1, sorted=True).values)
    lp_NK = values_NK - (max_N + torch.log(sum_exp)).unsqueeze(-1)
    lead = logits.shape[:-1]
    return ids_NK.view(*lead, k), lp_NK.view(*lead, k)


def vocab_parallel_topk_forward_kl(student_logits: torch.Tensor, teacher_ids: torch.Tensor,
                                   teacher_lp: torch.Tensor, *, tp_group: Optional[dist.ProcessGroup],
                                   vocab_size: int, padded_vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-position forward ``KL(teacher || student)`` from the teacher's top-k plus one tail bucket,
    differentiable w.r.t. ``student_logits`` only (module docstring for the formula).

    Args:
        student_logits: ``[..., V]`` the student's vocabulary shard (any float dtype), laid out as in
            :func:`vocab_parallel_topk_logprobs`; its gradient has the same dtype, 0 on padded columns.
        teacher_ids: ``[..., K]`` int32 or int64 global ids, assumed distinct per position (as
            :func:`vocab_parallel_topk_logprobs` returns them; duplicates would count mass twice in
            the tails). They need not come from the student's TP layout.
        teacher_lp: ``[..., K]`` the teacher's log-probs at those ids (float32; ``-inf`` allowed).
        tp_group, vocab_size, padded_vocab_size: the student's, as
            :func:`vocab_parallel_topk_logprobs`.

    Returns:
        ``kl [...]`` float32. The tail term is exactly 0, in value and gradient, where the teacher's
        top-k holds all its mass (p_t,tail == 0, always when K >= vocab_size). The student's tail is its
        mass summed directly over the other columns, exact down to float32's smallest normal number.
    """
    _check_k_shapes(tuple(student_logits.shape[:-1]), teacher_ids, teacher_lp)
    lp_s, log_ps_tail = _VocabParallelGatherLogprobs.apply(student_logits, teacher_ids, tp_group, vocab_size,
                                                           padded_vocab_size)
    lp_t = teacher_lp.detach().float()
    p_t = lp_t.exp()
    # where(), not a product: a zero-mass teacher entry (lp_t = -inf) would give 0 * inf = NaN
    kl = torch.where(p_t > 0, p_t * (lp_t - lp_s), torch.zeros_like(lp_s)).sum(-1)
    if teacher_ids.shape[-1] >= vocab_size:
        # Distinct ids cover the vocabulary: both tails are exactly 0, not the rounding of 1 - sum.
        return kl
    pt_tail = (1.0 - p_t.sum(-1)).clamp(min=0.0)
    has_tail = pt_tail > 0
    # The teacher's log is made safe only to keep the forward finite (it has no gradient); the
    # student's log-tail is finite by construction (its mass summed directly, underflow held).
    log_pt_tail = torch.where(has_tail, pt_tail, torch.ones_like(pt_tail)).log()
    tail = torch.where(has_tail, pt_tail * (log_pt_tail - log_ps_tail), torch.zeros_like(kl))
    return kl + tail
