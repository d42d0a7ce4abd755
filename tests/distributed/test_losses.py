"""Vocab-parallel kernels (rlad_megatron/losses/vocab_parallel.py) at TP = 1, 2, 4 on gloo.

Every check runs inside one 4-rank spawn (spawning costs ~8 s), rebuilding the TP grid per size. References are float64
``log_softmax`` on the gathered logits, computed in the test; the inputs are drawn fresh in the
parent and each rank takes its vocabulary shard.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.harness import run_distributed

VOCAB = 22          # true vocabulary
PADDED = 32         # padded to a multiple of 8 * TP for TP in {1, 2, 4}: at TP=4 the last shard is all padding
LEAD_SHAPES = [(3, 5), (7,)]  # [B, S] as megatron's GPTModel gives, and a flat token list


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(finite, torch.isfinite(a)), "inf pattern differs"
    return float((a[finite] - b[finite]).abs().max() / b[finite].abs().max().clamp(min=1e-30))


def _ref_logprobs(full_lead_V: torch.Tensor, target: torch.Tensor):
    """float64 log-probs, entropy of the padded-masked logits (independent of the kernel)."""
    x = full_lead_V.double().clone()
    x[..., VOCAB:] = -math.inf
    logp = torch.log_softmax(x, dim=-1)
    valid = (target >= 0) & (target < VOCAB)
    lp = logp.gather(-1, target.clamp(0, PADDED - 1).unsqueeze(-1)).squeeze(-1)
    lp = torch.where(valid, lp, torch.full_like(lp, -math.inf))
    p = logp.exp()
    ent = -(torch.where(p > 0, p * logp, torch.zeros_like(p))).sum(-1)
    return lp, ent, valid


def _inputs():
    out = []
    for lead in LEAD_SHAPES:
        logits = torch.randn(*lead, PADDED) * 4
        target = torch.randint(0, VOCAB, lead)
        flat = target.view(-1)
        flat[0] = VOCAB + 3          # an id in the padded range: no mass
        flat[-1] = -100              # an ignore index
        out.append((logits, target, torch.randn(*lead), torch.randn(*lead, PADDED) * 3))
    return out


def _check_logprobs(tp_group, rank, world, lo, hi, inputs):
    from rlad_megatron.losses import vocab_parallel as vp

    for logits, target, g, _ in inputs:
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            full = logits.to(dtype)
            lp_ref, ent_ref, valid = _ref_logprobs(full, target)
            g_used = torch.where(valid, g, torch.zeros_like(g))
            full64 = full.double().requires_grad_()
            x64 = torch.cat([full64[..., :VOCAB], torch.full_like(full64[..., VOCAB:], -math.inf)], -1)
            ref_lp_for_grad = torch.log_softmax(x64, -1).gather(-1, target.clamp(0, VOCAB - 1).unsqueeze(-1))
            (ref_lp_for_grad.squeeze(-1) * g_used).sum().backward()
            grad_ref = full64.grad[..., lo:hi]

            for overwrite in ((False, True) if dtype == torch.float32 else (False,)):
                shard = full[..., lo:hi].clone().requires_grad_()
                lp, ent = vp.vocab_parallel_logprobs(shard, target, tp_group=tp_group, vocab_size=VOCAB,
                                                     padded_vocab_size=PADDED, with_entropy=True,
                                                     overwrite_logits=overwrite)
                assert lp.dtype == torch.float32 and lp.shape == target.shape
                assert _rel_err(lp, lp_ref) <= tol, (dtype, overwrite, _rel_err(lp, lp_ref))
                assert _rel_err(ent, ent_ref) <= tol, (dtype, _rel_err(ent, ent_ref))
                (lp * g_used).sum().backward()
                assert shard.grad.dtype == dtype
                assert _rel_err(shard.grad, grad_ref) <= tol, (dtype, overwrite, _rel_err(shard.grad, grad_ref))
                pad_cols = max(0, hi - max(lo, VOCAB))
                if pad_cols:
                    assert (shard.grad[..., hi - lo - pad_cols:] == 0).all()

            old_chunk = vp._CHUNK_ELEMS
            vp._CHUNK_ELEMS = 20  # several rows per chunk, several chunks
            try:
                lp_ng, ent_ng = vp.vocab_parallel_logprobs_no_grad(full[..., lo:hi], target, tp_group=tp_group,
                                                                   vocab_size=VOCAB, with_entropy=True)
            finally:
                vp._CHUNK_ELEMS = old_chunk
            assert _rel_err(lp_ng, lp_ref) <= tol and _rel_err(ent_ng, ent_ref) <= tol


def _check_forward_kl(tp_group, lo, hi, inputs):
    from rlad_megatron.losses import vocab_parallel_forward_kl

    for s_logits, _, g, t_logits in inputs:
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
            s_full, t_full = s_logits.to(dtype), t_logits.to(dtype)
            s64 = s_full.double().requires_grad_()
            ls = torch.log_softmax(s64[..., :VOCAB], -1)
            lt = torch.log_softmax(t_full.double()[..., :VOCAB], -1)
            kl_ref = (lt.exp() * (lt - ls)).sum(-1)
            (kl_ref * g).sum().backward()
            shard = s_full[..., lo:hi].clone().requires_grad_()
            kl = vocab_parallel_forward_kl(shard, t_full[..., lo:hi], tp_group=tp_group, vocab_size=VOCAB)
            assert _rel_err(kl, kl_ref) <= tol, (dtype, _rel_err(kl, kl_ref))
            (kl * g).sum().backward()
            grad_ref = torch.cat([s64.grad, torch.zeros_like(s64.grad)[..., :PADDED - VOCAB]], -1)[..., lo:hi]
            assert _rel_err(shard.grad, grad_ref) <= tol, (dtype, _rel_err(shard.grad, grad_ref))


def _check_megatron_ce(groups, lo, hi, inputs):
    """alpha = 1, A = -1, no clip: the objective's gradient equals megatron's CE gradient (DESIGN.md section 2)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from rlad_megatron.config import DistillConfig
    from rlad_megatron.losses import vocab_parallel_logprobs
    from tests.helpers import objective_loss

    logits, target, _, _ = inputs[0]
    target = target.clamp(0, PADDED - 1)  # megatron has no notion of padding: all ids are real here
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        shard = logits.to(dtype)[..., lo:hi]
        ce_in = shard.clone().requires_grad_()
        vocab_parallel_cross_entropy(ce_in, target).sum().backward()
        for adv_sign in (-1.0, 1.0):
            ours_in = shard.clone().requires_grad_()
            lp = vocab_parallel_logprobs(ours_in, target, tp_group=groups.tp, vocab_size=PADDED)
            cfg = DistillConfig(objective="rlad", alpha=1.0, loss_agg="token_mean", eps_low=0.5, eps_high=0.5)
            adv = torch.full((target.shape[0],), adv_sign)
            loss, metrics = objective_loss(lp_s=lp, lp_old=lp.detach(), lp_t=lp.detach() - 0.3, advantages=adv,
                                           mask=torch.ones_like(target, dtype=torch.bool), cfg=cfg, num_tokens=1)
            assert metrics["clip_frac_low"] == 0 and metrics["clip_frac_high"] == 0
            loss.backward()
            # loss = -J; with A = -1 the objective J's gradient is CE's, with A = +1 the loss's is.
            ours = -ours_in.grad if adv_sign < 0 else ours_in.grad
            assert _rel_err(ours, ce_in.grad) <= tol, (dtype, adv_sign, _rel_err(ours, ce_in.grad))


def _check_layout_errors(tp_group, rank, world):
    from rlad_megatron.losses import vocab_parallel_logprobs

    target = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_logprobs(torch.randn(4, 8), target, tp_group=tp_group, vocab_size=8 * world + 1)
    with pytest.raises(ValueError, match="padded_vocab_size"):
        vocab_parallel_logprobs(torch.randn(4, 8), target, tp_group=tp_group, vocab_size=5,
                                padded_vocab_size=8 * world + 1 if world > 1 else 9)
    if world > 1:  # a vocabulary that does not split evenly: every rank must raise, none may hang
        width = 9 if rank == 0 else 8
        with pytest.raises(ValueError, match="differ in width"):
            vocab_parallel_logprobs(torch.randn(4, width), target, tp_group=tp_group, vocab_size=8 * world)


def _rank_main(rank, world, inputs):
    from rlad_megatron.distributed import initialize_model_parallel

    # One spawn covers TP = 1, 2 and 4: megatron's grid is rebuilt for each TP (DP = world / TP).
    for tp in (1, 2, 4):
        groups = initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, seed=1)
        width = PADDED // tp
        lo, hi = groups.tp_rank * width, (groups.tp_rank + 1) * width
        _check_logprobs(groups.tp, groups.tp_rank, tp, lo, hi, inputs)
        _check_forward_kl(groups.tp, lo, hi, inputs)
        _check_megatron_ce(groups, lo, hi, inputs)
        _check_layout_errors(groups.tp, groups.tp_rank, tp)
    return True


def test_vocab_parallel_kernels_tp_1_2_4():
    assert run_distributed(_rank_main, 4, args=(_inputs(),)) == [True] * 4
