"""Top-k teacher log-probs and the top-k forward KL (rlad_megatron/losses/topk.py) at TP = 1, 2, 4 on gloo.

One 4-rank spawn rebuilds the TP grid per size, as test_losses.py. References are float64 on the
gathered, padding-masked logits, computed in the test; ties are ranked by a stable sort (lower id
first). Padded columns hold large logits so that any leak of padding into the kernels shows.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.harness import run_distributed

VOCAB = 22          # true vocabulary
PADDED = 32         # at TP=4 the shards hold 8, 8, 6 and 0 valid columns
LEAD_SHAPES = [(3, 5), (7,)]
KS = (1, 7, VOCAB, VOCAB + 7)  # 7: more than shard 2's 6 valid columns at TP=4
DTYPES = ((torch.float32, 1e-5), (torch.bfloat16, 1e-2))  # (dtype, gradient tolerance); values: 1e-5


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)), "inf pattern differs"
    return float((a[finite] - b[finite]).abs().max() / b[finite].abs().max().clamp(min=1e-30))


def _padded(lead, scale, ties=False):
    x = torch.randint(-2, 3, (*lead, PADDED)).float() if ties else torch.randn(*lead, PADDED) * scale
    x[..., VOCAB:] = 50.0
    return x


def _inputs():
    return [dict(student=_padded(lead, 4), teacher=_padded(lead, 3), ties=_padded(lead, 0, ties=True),
                 g=torch.randn(*lead)) for lead in LEAD_SHAPES]


def _ref_logp(full: torch.Tensor) -> torch.Tensor:
    """float64 log-softmax over the true vocabulary, ``[..., VOCAB]`` (differentiable)."""
    return torch.log_softmax(full[..., :VOCAB].double(), dim=-1)


def _ref_topk(full: torch.Tensor, k: int):
    lp, ids = torch.sort(_ref_logp(full), dim=-1, descending=True, stable=True)
    return ids[..., :min(k, VOCAB)], lp[..., :min(k, VOCAB)]


def _ref_full_kl(s64: torch.Tensor, t_full: torch.Tensor) -> torch.Tensor:
    ls, lt = _ref_logp(s64), _ref_logp(t_full)
    return torch.where(lt > -math.inf, lt.exp() * (lt - ls), torch.zeros_like(ls)).sum(-1)


def _ref_topk_kl(s64: torch.Tensor, ids: torch.Tensor, lp_t: torch.Tensor) -> torch.Tensor:
    """The top-k + tail formula in float64, written out independently of the kernel (the student's tail
    summed over the other columns)."""
    logp = _ref_logp(s64)
    ls = logp.gather(-1, ids.long())
    lt = lp_t.double()
    pt = lt.exp()
    head = torch.where(pt > 0, pt * (lt - ls), torch.zeros_like(ls)).sum(-1)
    pt_tail = (1 - pt.sum(-1)).clamp(min=0)
    others = torch.ones_like(logp).scatter(-1, ids.long(), 0.0)
    ps_tail = (logp.exp() * others).sum(-1)
    safe = torch.where(pt_tail > 0, pt_tail, torch.ones_like(pt_tail))
    return head + torch.where(pt_tail > 0, pt_tail * (safe.log() - ps_tail.log()), torch.zeros_like(head))


def _kl_and_grad(fn, s_full, dtype, lo, hi, g, *args, **kwargs):
    """``fn(student shard, *args, **kwargs)`` and its gradient against ``g``; finite, 0 on padded columns."""
    shard = s_full.to(dtype)[..., lo:hi].clone().requires_grad_()
    kl = fn(shard, *args, **kwargs)
    (grad,) = torch.autograd.grad(kl, shard, grad_outputs=g)
    assert kl.dtype == torch.float32 and grad.dtype == dtype
    pad = max(0, hi - max(lo, VOCAB))
    assert bool(torch.isfinite(kl).all()) and bool(torch.isfinite(grad).all())
    assert pad == 0 or bool((grad[..., hi - lo - pad:] == 0).all()), "gradient on padded columns"
    return kl, grad


def _ref_grad(ref_fn, s_full, dtype, lo, hi, g, *args):
    s64 = s_full.to(dtype).double().requires_grad_()
    kl = ref_fn(s64, *args)
    (grad,) = torch.autograd.grad(kl, s64, grad_outputs=g.double())
    return kl, grad[..., lo:hi]


def _check_topk(tp_group, lo, hi, inputs):
    import torch.distributed as dist

    from rlad_megatron.losses import vocab_parallel as vp
    from rlad_megatron.losses import vocab_parallel_topk_logprobs

    for case in inputs:
        for full in (case["teacher"], case["ties"]):
            for dtype, _ in DTYPES:
                for k in KS:
                    ids_ref, lp_ref = _ref_topk(full.to(dtype), k)
                    for chunk in (vp._CHUNK_ELEMS, 20):  # 20: a few rows per chunk, several chunks
                        old, vp._CHUNK_ELEMS = vp._CHUNK_ELEMS, chunk
                        try:
                            ids, lp = vocab_parallel_topk_logprobs(full.to(dtype)[..., lo:hi], k, tp_group=tp_group,
                                                                   vocab_size=VOCAB, padded_vocab_size=PADDED)
                        finally:
                            vp._CHUNK_ELEMS = old
                        assert ids.dtype == torch.int64 and lp.dtype == torch.float32
                        assert torch.equal(ids, ids_ref), (dtype, k, ids, ids_ref)
                        assert _rel_err(lp, lp_ref) <= 1e-5, (dtype, k, _rel_err(lp, lp_ref))
                    if k > VOCAB:
                        assert torch.equal(ids.sort(-1).values, torch.arange(VOCAB).expand_as(ids))
                    if dist.get_world_size(tp_group) > 1:
                        parts = [torch.empty_like(ids) for _ in range(dist.get_world_size(tp_group))]
                        dist.all_gather(parts, ids, group=tp_group)
                        assert all(torch.equal(p, ids) for p in parts), "ids differ across TP ranks"


def _check_full_k(tp_group, lo, hi, inputs):
    """k = vocabulary: the top-k KL is the full forward KL (vocab_parallel.py's kernel and float64)."""
    from rlad_megatron.losses import (
        vocab_parallel_forward_kl,
        vocab_parallel_topk_forward_kl,
        vocab_parallel_topk_logprobs,
    )

    for case in inputs:
        s_full, t_full, g = case["student"], case["teacher"], case["g"]
        for dtype, tol in DTYPES:
            t = t_full.to(dtype)
            ids, lp_t = vocab_parallel_topk_logprobs(t[..., lo:hi], VOCAB + 7, tp_group=tp_group, vocab_size=VOCAB)
            kl, grad = _kl_and_grad(vocab_parallel_topk_forward_kl, s_full, dtype, lo, hi, g, ids.int(), lp_t,
                                    tp_group=tp_group, vocab_size=VOCAB, padded_vocab_size=PADDED)
            kl_vp, grad_vp = _kl_and_grad(vocab_parallel_forward_kl, s_full, dtype, lo, hi, g, t[..., lo:hi],
                                          tp_group=tp_group, vocab_size=VOCAB)
            kl_ref, grad_ref = _ref_grad(_ref_full_kl, s_full, dtype, lo, hi, g, t)
            for name, err in (("vp", _rel_err(kl, kl_vp)), ("ref", _rel_err(kl, kl_ref)),
                              ("vp grad", _rel_err(grad, grad_vp)), ("ref grad", _rel_err(grad, grad_ref))):
                assert err <= (1e-5 if "grad" not in name else tol), (dtype, name, err)


def _check_small_k(tp_group, lo, hi, inputs):
    from rlad_megatron.losses import topk
    from rlad_megatron.losses import vocab_parallel as vp

    for case in inputs:
        s_full, t_full, g = case["student"], case["teacher"], case["g"]
        for dtype, tol in DTYPES:
            for k in (1, 7):
                ids, lp_t = topk.vocab_parallel_topk_logprobs(t_full.to(dtype)[..., lo:hi], k, tp_group=tp_group,
                                                              vocab_size=VOCAB)
                old, vp._CHUNK_ELEMS = vp._CHUNK_ELEMS, 20 if k == 7 else vp._CHUNK_ELEMS
                try:
                    kl, grad = _kl_and_grad(topk.vocab_parallel_topk_forward_kl, s_full, dtype, lo, hi, g, ids,
                                            lp_t, tp_group=tp_group, vocab_size=VOCAB)
                finally:
                    vp._CHUNK_ELEMS = old
                kl_ref, grad_ref = _ref_grad(_ref_topk_kl, s_full, dtype, lo, hi, g, ids, lp_t)
                assert _rel_err(kl, kl_ref) <= 1e-5, (dtype, k, _rel_err(kl, kl_ref))
                assert _rel_err(grad, grad_ref) <= tol, (dtype, k, _rel_err(grad, grad_ref))
            # A confident student: its mass outside the teacher's top-7 is ~1e-9, far below float32's
            # resolution of 1 - sum_i p_i, while the teacher's tail is not small.
            ids, lp_t = topk.vocab_parallel_topk_logprobs(t_full[..., lo:hi], 7, tp_group=tp_group,
                                                          vocab_size=VOCAB)
            confident = torch.full_like(s_full, -2.0).scatter(-1, ids[..., :1], 20.0)
            kl, grad = _kl_and_grad(topk.vocab_parallel_topk_forward_kl, confident, torch.float32, lo, hi, g, ids,
                                    lp_t, tp_group=tp_group, vocab_size=VOCAB)
            kl_ref, grad_ref = _ref_grad(_ref_topk_kl, confident, torch.float32, lo, hi, g, ids, lp_t)
            p = _ref_logp(confident.double()).exp()
            tail = (p * torch.ones_like(p).scatter(-1, ids.long(), 0.0)).sum(-1)
            assert float(tail.max()) < 1e-7  # below what 1 - sum resolves in float32
            assert _rel_err(kl, kl_ref) <= 1e-5, ("confident", _rel_err(kl, kl_ref))
            assert _rel_err(grad, grad_ref) <= 1e-4, ("confident", _rel_err(grad, grad_ref))


def _check_covered_mass(tp_group, lo, hi, inputs):
    """The teacher's top-k holds all its mass (p_t,tail == 0, teacher entries of zero mass, a student
    whose own tail is exactly 0): finite values and gradients, equal to the full KL."""
    from rlad_megatron.losses import vocab_parallel_topk_forward_kl, vocab_parallel_topk_logprobs

    for case in inputs:
        s_full, g = case["student"], case["g"]
        lead = g.shape
        teacher = torch.full((*lead, PADDED), -math.inf)
        live = torch.rand(*lead, VOCAB).argsort(-1)[..., :3]  # 3 tokens with mass per position
        teacher.scatter_(-1, live, torch.randn(*lead, 3) * 3)
        one_hot = torch.full((*lead, PADDED), -math.inf)
        one_hot.scatter_(-1, live[..., :1], 1.0)
        peaked_student = torch.where(one_hot > -math.inf, s_full, torch.full_like(s_full, -math.inf))
        for t, k, students in ((teacher, 3, (s_full,)), (teacher, 5, (s_full,)),
                               (one_hot, 1, (s_full, peaked_student))):
            for dtype, tol in DTYPES:
                ids, lp_t = vocab_parallel_topk_logprobs(t.to(dtype)[..., lo:hi], k, tp_group=tp_group,
                                                         vocab_size=VOCAB)
                if k == 1:
                    assert bool((lp_t == 0).all())  # p_t,tail is exactly 0
                for s in students:
                    kl, grad = _kl_and_grad(vocab_parallel_topk_forward_kl, s, dtype, lo, hi, g, ids, lp_t,
                                            tp_group=tp_group, vocab_size=VOCAB)
                    kl_ref, grad_ref = _ref_grad(_ref_full_kl, s, dtype, lo, hi, g, t.to(dtype))
                    if s is peaked_student:
                        assert bool((kl == 0).all()) and bool((grad == 0).all())
                    else:
                        assert _rel_err(kl, kl_ref) <= 1e-5, (dtype, k, _rel_err(kl, kl_ref))
                        assert _rel_err(grad, grad_ref) <= tol, (dtype, k, _rel_err(grad, grad_ref))


def _rank_main(rank, world, inputs):
    from rlad_megatron.distributed import initialize_model_parallel

    for tp in (1, 2, 4):
        groups = initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, seed=1)
        width = PADDED // tp
        lo, hi = groups.tp_rank * width, (groups.tp_rank + 1) * width
        _check_topk(groups.tp, lo, hi, inputs)
        _check_full_k(groups.tp, lo, hi, inputs)
        _check_small_k(groups.tp, lo, hi, inputs)
        _check_covered_mass(groups.tp, lo, hi, inputs)
    return True


def test_topk_kernels_tp_1_2_4():
    assert run_distributed(_rank_main, 4, args=(_inputs(),)) == [True] * 4


def test_sort_keys_order_and_round_trip():
    from rlad_megatron.losses.topk import _decode_keys, _sort_keys

    values = torch.tensor([3.0, -0.0, 0.0, -math.inf, math.inf, -1e-40, 1e-40, -2.5, 3.0, -math.inf, 1e30])
    ids = torch.tensor([5, 1, 0, 4, 9, 2, 3, 7, 6, 8, 10 ** 9])
    order = torch.argsort(_sort_keys(values, ids), descending=True)
    ref = sorted(range(len(ids)), key=lambda i: (-values[i].item(), ids[i].item()))
    assert order.tolist() == ref
    back_v, back_ids = _decode_keys(_sort_keys(values, ids))
    assert torch.equal(back_ids, ids)
    assert torch.equal(back_v, torch.where(values == 0, torch.zeros_like(values), values))


def test_argument_errors():
    from rlad_megatron.losses import vocab_parallel_topk_forward_kl, vocab_parallel_topk_logprobs

    logits = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="k: expected"):
        vocab_parallel_topk_logprobs(logits, 0, tp_group=None, vocab_size=8)
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_topk_logprobs(logits, 2, tp_group=None, vocab_size=9)
    ids, lp = vocab_parallel_topk_logprobs(logits, 2, tp_group=None, vocab_size=6)
    with pytest.raises(ValueError, match="teacher_ids: expected shape"):
        vocab_parallel_topk_forward_kl(logits, ids[0], lp[0], tp_group=None, vocab_size=6)
    with pytest.raises(ValueError, match="integer dtype"):
        vocab_parallel_topk_forward_kl(logits, ids.float(), lp, tp_group=None, vocab_size=6)
    with pytest.raises(ValueError, match="teacher_lp"):
        vocab_parallel_topk_forward_kl(logits, ids, lp[..., :1], tp_group=None, vocab_size=6)
