"""Vocab-parallel log-prob, entropy and forward-KL kernels over TP-sharded logits (DESIGN.md section 2).

Logits are sharded along the vocabulary across the tensor-parallel group; nothing here gathers them.
Per token, for the sampled id ``y`` (DESIGN.md section 2, steps 1-4)::

    m       = all_reduce_MAX(max_v logits_v)                      (no grad)
    S       = all_reduce_SUM(sum_v exp(logits_v - m))
    z_y     = all_reduce_SUM(logits_y - m if y is in this shard else 0)
    lp      = z_y - log S
    d lp / d logits = onehot(y) - softmax                         (local shard only)

``S`` and ``z_y`` (and the entropy term) travel in one stacked SUM all-reduce, so a call costs two
all-reduces of ``[N]``-sized float32 vectors (three rows in the second one with entropy).

Padded vocabulary: megatron pads the vocabulary to a multiple of ``divisible_by * TP``; entries
with global index ``>= vocab_size`` get no probability mass and zero gradient. They are skipped by
slicing each shard to its valid columns, which is exactly what masking them to ``-inf`` would do.

Three layers (STYLE.md habit 4): numeric helpers, the autograd Functions, public functions.
Process groups are always passed in (``tp_group``); nothing here reads megatron's parallel_state.

Shape legend:
    ...  any leading dims (megatron's GPTModel gives [B, S]; DESIGN.md writes [S, B])
    N    number of tokens = prod(...)
    V    local vocabulary shard = padded_vocab_size / TP
    Vv   valid (unpadded) columns of the local shard, 0 <= Vv <= V
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

# Rows per chunk are chosen so a chunk holds about this many elements: bounds the float32
# temporaries of the no-grad and entropy paths and keeps each chunk roughly cache-sized.
_CHUNK_ELEMS = 1 << 20


# ----------------------------------------------------------------------------- numeric helpers


def _tp_rank_size(tp_group: Optional[dist.ProcessGroup]) -> tuple[int, int]:
    if tp_group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def _all_reduce(x: torch.Tensor, op, tp_group, tp_size: int) -> None:
    if tp_size > 1:
        dist.all_reduce(x, op=op, group=tp_group)


def check_vocab_layout(*, vocab_local: int, tp_size: int, vocab_size: int,
                       padded_vocab_size: Optional[int] = None) -> None:
    """Raise ValueError when the vocabulary does not fit a ``tp_size`` x ``vocab_local`` shard layout."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size: expected a positive integer, got {vocab_size}")
    if padded_vocab_size is not None:
        if padded_vocab_size % tp_size:
            raise ValueError(
                f"padded_vocab_size: expected a multiple of the tensor-parallel size {tp_size} (pad the "
                f"vocabulary, see ModelSection.padded_vocab_size), got {padded_vocab_size}")
        if padded_vocab_size // tp_size != vocab_local:
            raise ValueError(
                f"logits: expected a vocabulary shard of padded_vocab_size / TP = {padded_vocab_size} / "
                f"{tp_size} = {padded_vocab_size // tp_size} columns, got {vocab_local}")
    if vocab_size > vocab_local * tp_size:
        raise ValueError(
            f"vocab_size: expected <= shard size x TP = {vocab_local} x {tp_size} = {vocab_local * tp_size}, "
            f"got {vocab_size}")


def _valid_columns(vocab_local: int, tp_rank: int, vocab_size: int) -> tuple[int, int]:
    """Global start of this shard and its number of unpadded columns."""
    start = tp_rank * vocab_local
    return start, max(0, min(vocab_local, vocab_size - start))


class Shard(NamedTuple):
    """This rank's part of the vocabulary: ``rows`` x ``width`` logits, global columns from ``start``,
    the first ``n_valid`` unpadded, over ``tp_size`` ranks."""

    rows: int
    width: int
    start: int
    n_valid: int
    tp_size: int


def _shard(logits_NV: torch.Tensor, tp_group, vocab_size: int, padded_vocab_size: Optional[int]) -> Shard:
    """The shard layout of ``[N, V/TP]`` logits, checked (ValueError naming the field)."""
    n, vocab_local = logits_NV.shape
    tp_rank, tp_size = _tp_rank_size(tp_group)
    check_vocab_layout(vocab_local=vocab_local, tp_size=tp_size, vocab_size=vocab_size,
                       padded_vocab_size=padded_vocab_size)
    start, n_valid = _valid_columns(vocab_local, tp_rank, vocab_size)
    return Shard(n, vocab_local, start, n_valid, tp_size)


def _flatten(logits: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
    if logits.dim() < 1:
        raise ValueError(f"logits: expected shape [..., V], got a scalar of shape {tuple(logits.shape)}")
    if target is not None and tuple(target.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"target: expected shape {tuple(logits.shape[:-1])} (logits' leading dims), "
                         f"got {tuple(target.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits: expected a floating dtype, got {logits.dtype}")
    return logits.reshape(-1, logits.shape[-1])


def _global_max(logits_NVv: torch.Tensor, n: int, vocab_local: int, tp_group, tp_size: int) -> torch.Tensor:
    """All-reduced row max ``[N]`` (float32). Two extra slots carry +/- the shard width so that
    unequal shards are detected with no extra collective (max(width) != min(width))."""
    buf = torch.empty(n + 2, dtype=torch.float32, device=logits_NVv.device)
    if logits_NVv.shape[1] > 0:
        buf[:n].copy_(torch.amax(logits_NVv, dim=-1))  # exact for bf16/fp16 -> fp32
    else:  # a shard made only of padding
        buf[:n].fill_(-math.inf)
    buf[n], buf[n + 1] = float(vocab_local), -float(vocab_local)
    _all_reduce(buf, dist.ReduceOp.MAX, tp_group, tp_size)
    # Checked on every call so that all ranks raise together (a per-rank cache could let one rank
    # raise while another waits in the next collective); costs one 2-element read-back.
    widest, narrowest = buf[n:].tolist()
    if widest != -narrowest:
        raise ValueError(
            f"logits: vocabulary shards differ in width across the TP group (widest {int(widest)}, "
            f"narrowest {int(-narrowest)}); the vocabulary must be padded to a multiple of TP")
    return buf[:n]


def _local_target(target_N: torch.Tensor, start: int, n_valid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(in_shard mask [N], local column index [N], 0 where not in this shard's valid columns)."""
    local = target_N - start
    in_shard = (local >= 0) & (local < n_valid)
    return in_shard, torch.where(in_shard, local, torch.zeros_like(local))


def _row_chunks(n: int, width: int):
    step = max(1, _CHUNK_ELEMS // max(width, 1))
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


def _exp_sums(src_NVv: torch.Tensor, max_N: torch.Tensor, *, out_NVv: Optional[torch.Tensor],
              with_entropy: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Local ``sum_v exp(z_v)`` and (optionally) ``sum_v exp(z_v) * z_v`` with ``z = src - max``.

    When ``out_NVv`` is given, ``exp(z)`` is written into it (it may alias ``src_NVv``); otherwise
    only chunk-sized float32 temporaries are used.
    """
    n, width = src_NVv.shape
    sum_exp = torch.zeros(n, dtype=torch.float32, device=src_NVv.device)
    sum_ez = torch.zeros(n, dtype=torch.float32, device=src_NVv.device) if with_entropy else None
    if width == 0:
        return sum_exp, sum_ez
    for lo, hi in _row_chunks(n, width):
        m = max_N[lo:hi].unsqueeze(-1)
        z = out_NVv[lo:hi] if out_NVv is not None else torch.empty((hi - lo, width), dtype=torch.float32,
                                                                     device=src_NVv.device)
        torch.sub(src_NVv[lo:hi], m, out=z)
        if with_entropy:
            e = torch.exp(z)
            torch.sum(e * z, dim=-1, out=sum_ez[lo:hi])
            z.copy_(e)
        else:
            z.exp_()
        torch.sum(z, dim=-1, out=sum_exp[lo:hi])
    return sum_exp, sum_ez


def _forward_stats(logits_NV: torch.Tensor, target_N: torch.Tensor, *, tp_group, vocab_size: int,
                   padded_vocab_size: Optional[int], with_entropy: bool, softmax_out: Optional[torch.Tensor]):
    """The shared forward: returns (lp [N], entropy [N] or None, sum_exp [N], in_shard [N], local_t [N]).

    If ``softmax_out`` ([N, V] float32, may alias fp32 logits) is given it receives the
    *unnormalised* ``exp(logits - max)`` over the valid columns and zeros over padded columns;
    the backward folds the ``1 / sum_exp`` into its one scaling pass (one pass fewer than megatron).
    """
    n, vocab_local, start, n_valid, tp_size = _shard(logits_NV, tp_group, vocab_size, padded_vocab_size)
    src = logits_NV[:, :n_valid]
    max_N = _global_max(src, n, vocab_local, tp_group, tp_size)

    in_shard, local_t = _local_target(target_N, start, n_valid)
    rows = torch.arange(n, device=logits_NV.device)
    z_y = torch.where(in_shard, logits_NV[rows, local_t].float() - max_N, torch.zeros_like(max_N))

    out_valid = softmax_out[:, :n_valid] if softmax_out is not None else None
    if softmax_out is not None and n_valid < vocab_local:
        softmax_out[:, n_valid:].zero_()
    sum_exp, sum_ez = _exp_sums(src, max_N, out_NVv=out_valid, with_entropy=with_entropy)

    stacked = torch.stack([sum_exp, z_y] + ([sum_ez] if with_entropy else []))
    _all_reduce(stacked, dist.ReduceOp.SUM, tp_group, tp_size)
    sum_exp = stacked[0]
    log_sum_exp = torch.log(sum_exp)
    lp = stacked[1] - log_sum_exp
    # Ids outside [0, vocab_size) (padding ids, ignore indices) have no mass: lp = -inf; callers mask them.
    in_vocab = (target_N >= 0) & (target_N < vocab_size)
    lp = torch.where(in_vocab, lp, torch.full_like(lp, -math.inf))
    # H = log S - sum_v p_v z_v  (z shifted by the global max)
    entropy = log_sum_exp - stacked[2] / sum_exp if with_entropy else None
    return lp, entropy, sum_exp, in_shard, local_t


# ----------------------------------------------------------------------------- autograd Functions


class _VocabParallelLogProbs(torch.autograd.Function):
    """lp = logit_y - logsumexp(logits) over a TP-sharded vocabulary; backward g * (onehot - softmax)."""

    @staticmethod
    def forward(ctx, logits, target, tp_group, vocab_size, padded_vocab_size, with_entropy, overwrite_logits):
        shape = logits.shape
        logits_NV = _flatten(logits, target)
        aliased = overwrite_logits and logits.dtype == torch.float32 and logits.is_contiguous()
        if aliased:
            softmax_NV = logits_NV  # megatron's trick: the logits' storage becomes the softmax, then the grad
        else:
            softmax_NV = torch.empty(logits_NV.shape, dtype=torch.float32, device=logits.device)
        lp_N, ent_N, sum_exp, in_shard, local_t = _forward_stats(
            logits_NV, target.reshape(-1), tp_group=tp_group, vocab_size=vocab_size,
            padded_vocab_size=padded_vocab_size, with_entropy=with_entropy, softmax_out=softmax_NV)
        # Save the logits tensor itself rather than a reshaped view of it: autograd forbids unpacking a
        # no-grad view whose base was modified in place.
        ctx.save_for_backward(logits if aliased else softmax_NV, sum_exp, in_shard, local_t)
        ctx.shape, ctx.dtype = shape, logits.dtype
        lp = lp_N.view(shape[:-1])
        if with_entropy:
            ent = ent_N.view(shape[:-1])
            ctx.mark_non_differentiable(ent)  # entropy is a metric here, not a loss term
            return lp, ent
        return lp

    @staticmethod
    def backward(ctx, grad_lp, *unused):
        exp_buf, sum_exp, in_shard, local_t = ctx.saved_tensors
        g_N = grad_lp.reshape(-1).float()
        grad_NV = exp_buf.view(-1, ctx.shape[-1])  # in place, as megatron's _VocabParallelCrossEntropy
        # exp(z) * (-g / S) = -g * softmax, then + g at the target: g * (onehot - softmax)
        grad_NV.mul_((-g_N / sum_exp).unsqueeze(-1))
        rows = torch.arange(grad_NV.shape[0], device=grad_NV.device)
        grad_NV[rows, local_t] += torch.where(in_shard, g_N, torch.zeros_like(g_N))
        grad = grad_NV.view(ctx.shape)
        if ctx.dtype != torch.float32:
            grad = grad.to(ctx.dtype)
        return grad, None, None, None, None, None, None


class _VocabParallelForwardKL(torch.autograd.Function):
    """Per-token KL(p_teacher || p_student) over the full sharded vocabulary; grad g * (p_s - p_t)."""

    @staticmethod
    def forward(ctx, student, teacher, tp_group, vocab_size, padded_vocab_size):
        if student.shape != teacher.shape:
            raise ValueError(f"teacher_logits: expected the student's shape {tuple(student.shape)}, "
                             f"got {tuple(teacher.shape)}")
        shape = student.shape
        s_NV, t_NV = _flatten(student, None), _flatten(teacher, None)
        n, vocab_local, _, n_valid, tp_size = _shard(s_NV, tp_group, vocab_size, padded_vocab_size)
        s_src, t_src = s_NV[:, :n_valid], t_NV[:, :n_valid]
        max_s = _global_max(s_src, n, vocab_local, tp_group, tp_size)
        max_t = _global_max(t_src, n, vocab_local, tp_group, tp_size)

        ps_NV = torch.zeros((n, vocab_local), dtype=torch.float32, device=student.device)
        sums = torch.zeros((3, n), dtype=torch.float32, device=student.device)  # S_s, S_t, sum e_t (z_t - z_s)
        for lo, hi in _row_chunks(n, n_valid):
            zs = ps_NV[lo:hi, :n_valid]
            torch.sub(s_src[lo:hi], max_s[lo:hi].unsqueeze(-1), out=zs)
            zt = t_src[lo:hi].float() - max_t[lo:hi].unsqueeze(-1)
            et = torch.exp(zt)
            # where(): a teacher logit of -inf has e_t = 0 and must contribute 0, not 0 * inf
            sums[2, lo:hi] = torch.where(et > 0, et * (zt - zs), torch.zeros_like(et)).sum(-1)
            sums[1, lo:hi] = et.sum(-1)
            zs.exp_()
            sums[0, lo:hi] = zs.sum(-1)
        _all_reduce(sums, dist.ReduceOp.SUM, tp_group, tp_size)
        sum_s, sum_t = sums[0], sums[1]
        # KL = sum_v p_t (log p_t - log p_s) = Q / S_t - log S_t + log S_s
        kl_N = sums[2] / sum_t - torch.log(sum_t) + torch.log(sum_s)
        ps_NV[:, :n_valid].div_(sum_s.unsqueeze(-1))
        ctx.save_for_backward(ps_NV, teacher, max_t, sum_t)
        ctx.shape, ctx.dtype, ctx.n_valid = shape, student.dtype, n_valid
        return kl_N.view(shape[:-1])

    @staticmethod
    def backward(ctx, grad_kl):
        ps_NV, teacher, max_t, sum_t = ctx.saved_tensors
        n_valid = ctx.n_valid
        t_NV = teacher.reshape(-1, teacher.shape[-1])
        g_N = grad_kl.reshape(-1).float()
        for lo, hi in _row_chunks(ps_NV.shape[0], n_valid):
            pt = (t_NV[lo:hi, :n_valid].float() - max_t[lo:hi].unsqueeze(-1)).exp_().div_(
                sum_t[lo:hi].unsqueeze(-1))
            ps_NV[lo:hi, :n_valid].sub_(pt)
        ps_NV.mul_(g_N.unsqueeze(-1))
        grad = ps_NV.view(ctx.shape)
        if ctx.dtype != torch.float32:
            grad = grad.to(ctx.dtype)
        return grad, None, None, None, None


# ----------------------------------------------------------------------------- public functions


def vocab_parallel_logprobs(logits: torch.Tensor, target: torch.Tensor, *, tp_group: Optional[dist.ProcessGroup],
                            vocab_size: int, padded_vocab_size: Optional[int] = None, with_entropy: bool = False,
                            overwrite_logits: bool = False):
    """Log-probs of ``target`` under TP-sharded ``logits``, differentiable w.r.t. the logits.

    Args:
        logits: ``[..., V]`` this rank's vocabulary shard (bf16, fp16 or fp32; float32 inside).
        target: ``[...]`` global token ids. Ids outside ``[0, vocab_size)`` get ``lp = -inf``
            (mask those tokens in the loss).
        tp_group: the tensor-parallel group the vocabulary is sharded over (None: no sharding).
        vocab_size: the true vocabulary size; columns with global index ``>= vocab_size`` are
            megatron's padding and get no probability mass and zero gradient.
        padded_vocab_size: optional global padded size, checked against ``V * TP``.
        with_entropy: also return the per-token entropy ``[...]`` (float32, no gradient).
        overwrite_logits: for contiguous fp32 logits, reuse their storage as the softmax and gradient
            buffer (as megatron's cross entropy does; saves one shard-sized buffer). The logits'
            values are destroyed; only set it when nothing else reads them.

    Returns:
        ``lp [...]`` float32 (and ``entropy [...]`` when ``with_entropy``). Backward writes
        ``g * (onehot(y) - softmax)`` into one float32 shard-sized buffer (DESIGN.md section 2).
    """
    return _VocabParallelLogProbs.apply(logits, target, tp_group, vocab_size, padded_vocab_size,
                                        with_entropy, overwrite_logits)


@torch.no_grad()
def vocab_parallel_logprobs_no_grad(logits: torch.Tensor, target: torch.Tensor, *,
                                    tp_group: Optional[dist.ProcessGroup], vocab_size: int,
                                    padded_vocab_size: Optional[int] = None, with_entropy: bool = False):
    """Same values as :func:`vocab_parallel_logprobs`, for teacher / reference / old-policy log-probs.

    Saves nothing for backward and allocates only chunk-sized float32 temporaries (no shard-sized
    buffer). Shapes and arguments as :func:`vocab_parallel_logprobs`.
    """
    logits_NV = _flatten(logits, target)
    lp_N, ent_N, _, _, _ = _forward_stats(logits_NV, target.reshape(-1), tp_group=tp_group, vocab_size=vocab_size,
                                       padded_vocab_size=padded_vocab_size, with_entropy=with_entropy,
                                       softmax_out=None)
    lp = lp_N.view(logits.shape[:-1])
    return (lp, ent_N.view(logits.shape[:-1])) if with_entropy else lp


def vocab_parallel_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
                              tp_group: Optional[dist.ProcessGroup], vocab_size: int,
                              padded_vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token ``KL(pi_teacher || pi_student)`` over the full TP-sharded vocabulary (DESIGN.md section 1,
    baseline ``forward_kl``), differentiable w.r.t. the student logits only.

    Args:
        student_logits, teacher_logits: ``[..., V]`` shards of the same layout (any float dtype).
        tp_group, vocab_size, padded_vocab_size: as :func:`vocab_parallel_logprobs`.

    Returns:
        ``kl [...]`` float32. Backward: ``g * (softmax_s - softmax_t)`` in one float32 shard buffer;
        the teacher softmax is recomputed chunk-wise from the teacher logits (kept, not copied).
    """
    return _VocabParallelForwardKL.apply(student_logits, teacher_logits.detach(), tp_group, vocab_size,
                                         padded_vocab_size)
