"""The teacher's distribution as top-k log-probs, and the forward KL against it, over TP-sharded logits.

A teacher that is scored once per rollout and read many times (and may have its own TP layout)
stores ``k`` (id, log-prob) pairs per position instead of its logits shard (as ModelOpt's
TopLogitsKLLoss and NeMo-RL's ``topk_logits_k``). The student is matched on those ``k`` ids plus
one tail bucket holding the rest of the mass::

    KL = sum_i p_t,i (lp_t,i - lp_s,i) + p_t,tail (log p_t,tail - log p_s,tail)
    p_t,tail = max(0, 1 - sum_i p_t,i)        p_s,tail = max(0, 1 - sum_i exp(lp_s,i))

that is the KL of both distributions coarsened to k + 1 buckets: never above the full-vocabulary
KL (data processing), equal to it when k covers the vocabulary, and 0 only where the student
matches the teacher's top-k exactly, tail mass included.

Nothing gathers the vocabulary: the top-k moves ``[N, k]`` candidates per rank through one
all_gather, the student's log-probs at the ids one SUM all-reduce of ``[N, k + 1]``, on top of the
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

# Floor of the student's tail mass. 1 - sum_i exp(lp_s,i) in float32 carries ~1e-7 of rounding, so
# below ~1e-6 the computed tail is noise; a lower floor would let that noise scale the tail columns'
# gradient by p_t,tail / p_s,tail (unbounded as p_s,tail -> 0), a higher one would bias real tails.
_TAIL_FLOOR = 1e-6

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
    """lp_i = logit_{id_i} - logsumexp(logits) for K ids per row; backward scatter(g) - softmax * sum_i g_i.

    The backward recomputes the softmax from the saved logits instead of saving it: a float32 softmax
    kept from forward to backward is a second shard-sized buffer (twice bf16 logits), while the
    recomputation is one exp pass per chunk. Duplicated ids get the sum of their gradients (correct for
    this Function; the tail formula of the KL is what needs distinct ids).
    """

    @staticmethod
    def forward(ctx, logits, ids, tp_group, vocab_size, padded_vocab_size):
        shape = logits.shape
        logits_NV = _flatten(logits, None)
        ids_NK = ids.reshape(-1, ids.shape[-1]).long()
        n, vocab_local, start, n_valid, tp_size = _shard(logits_NV, tp_group, vocab_size, padded_vocab_size)
        src = logits_NV[:, :n_valid]
        max_N = _global_max(src, n, vocab_local, tp_group, tp_size)
        sum_exp, _ = _exp_sums(src, max_N, out_NVv=None, with_entropy=False)

        in_shard, local = _local_ids(ids_NK, start, n_valid)
        z_NK = logits_NV.gather(1, local).float() - max_N.unsqueeze(-1)
        # One SUM all-reduce: the K shifted logits (each owned by one rank, 0 elsewhere) and the row sum.
        stacked = torch.cat([torch.where(in_shard, z_NK, torch.zeros_like(z_NK)), sum_exp.unsqueeze(-1)], -1)
        _all_reduce(stacked, dist.ReduceOp.SUM, tp_group, tp_size)
        sum_exp = stacked[:, -1].contiguous()
        lp_NK = stacked[:, :-1] - torch.log(sum_exp).unsqueeze(-1)
        in_vocab = (ids_NK >= 0) & (ids_NK < vocab_size)  # padding or invalid ids: no mass
        lp_NK = torch.where(in_vocab, lp_NK, torch.full_like(lp_NK, -math.inf))

        ctx.save_for_backward(logits, max_N, sum_exp, in_shard, local)
        ctx.shape, ctx.n_valid = shape, n_valid
        return lp_NK.view(ids.shape)

    @staticmethod
    def backward(ctx, grad_lp):
        logits, max_N, sum_exp, in_shard, local = ctx.saved_tensors
        n_valid, vocab_local = ctx.n_valid, ctx.shape[-1]
        logits_NV = logits.reshape(-1, vocab_local)
        n = logits_NV.shape[0]
        # g is replicated on every TP rank (all that follows the gather is), so no collective here.
        g_NK = grad_lp.reshape(n, -1).float()
        scale_N = -g_NK.sum(-1) / sum_exp
        g_local = torch.where(in_shard, g_NK, torch.zeros_like(g_NK))
        grad_NV = torch.empty((n, vocab_local), dtype=logits.dtype, device=logits.device)
        direct = logits.dtype == torch.float32
        for lo, hi in _row_chunks(n, vocab_local):
            # bf16/fp16: float32 per chunk, cast once, so the scatter_add adds in float32
            out = grad_NV[lo:hi] if direct else torch.empty((hi - lo, vocab_local), dtype=torch.float32,
                                                            device=logits.device)
            valid = out[:, :n_valid]
            torch.sub(logits_NV[lo:hi, :n_valid], max_N[lo:hi].unsqueeze(-1), out=valid)
            valid.exp_().mul_(scale_N[lo:hi].unsqueeze(-1))
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
        top-k holds all its mass (p_t,tail == 0, always when K >= vocab_size); the student's tail is
        floored at ``_TAIL_FLOOR`` (float32 resolution of ``1 - sum``), where it has no gradient.
    """
    _check_k_shapes(tuple(student_logits.shape[:-1]), teacher_ids, teacher_lp)
    lp_s = _VocabParallelGatherLogprobs.apply(student_logits, teacher_ids, tp_group, vocab_size,
                                              padded_vocab_size)
    lp_t = teacher_lp.detach().float()
    p_t = lp_t.exp()
    # where(), not a product: a zero-mass teacher entry (lp_t = -inf) would give 0 * inf = NaN
    kl = torch.where(p_t > 0, p_t * (lp_t - lp_s), torch.zeros_like(lp_s)).sum(-1)
    if teacher_ids.shape[-1] >= vocab_size:
        # Distinct ids cover the vocabulary: both tails are exactly 0, not the rounding of 1 - sum.
        return kl
    pt_tail = (1.0 - p_t.sum(-1)).clamp(min=0.0)
    ps_tail = (1.0 - lp_s.exp().sum(-1)).clamp(min=_TAIL_FLOOR)
    has_tail = pt_tail > 0
    # where() sends a zero gradient into the unused branch, which log's backward turns into 0 / ps_tail:
    # the floor keeps that 0, not NaN, when the student's tail is 0 too. The teacher's log is made safe
    # only to keep the forward finite (it has no gradient).
    log_pt_tail = torch.where(has_tail, pt_tail, torch.ones_like(pt_tail)).log()
    tail = torch.where(has_tail, pt_tail * (log_pt_tail - ps_tail.log()), torch.zeros_like(kl))
    return kl + tail
