"""TRRD objective (rlad_megatron/losses/trrd.py) against an independent float64 reference.

The reference below is written from DESIGN.md section 1 with different primitives (per-sequence
Python loop, the PPO min written as A * min(r, 1 + eps_high) / A * max(r, 1 - eps_low)).
Inputs are drawn fresh in every test.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rlad_megatron.config import DistillConfig
from tests.helpers import objective_loss

B, S = 6, 9
F64 = torch.float64


def _inputs(b=B, s=S, *, spread=1.0):
    lp_s = (-torch.rand(b, s, dtype=F64) * 3).requires_grad_()
    lp_old = lp_s.detach() + spread * 0.3 * torch.randn(b, s, dtype=F64)
    lp_t = lp_s.detach() + spread * 1.5 * torch.randn(b, s, dtype=F64)
    lp_ref = lp_s.detach() + 0.2 * torch.randn(b, s, dtype=F64)
    adv = torch.randn(b, dtype=F64)
    mask = torch.rand(b, s) < 0.8
    mask[:, 0] = True  # every sequence has a token
    return dict(lp_s=lp_s, lp_old=lp_old, lp_t=lp_t, lp_ref=lp_ref, advantages=adv, mask=mask)


def _ref_loss(lp_s, lp_old, lp_t, lp_ref, advantages, mask, cfg: DistillConfig, num_sequences=None, num_tokens=None):
    """Independent float64 reference of -J (DESIGN.md section 1)."""
    alpha = 1.0 if cfg.objective in ("grpo", "kdrl") else cfg.alpha
    A = advantages.unsqueeze(-1).expand(lp_s.shape) if advantages.dim() == 1 else advantages
    c = cfg.teacher_clamp
    raw = lp_s - lp_t
    if cfg.teacher_clamp_grad == "clamp":
        d = torch.where(raw.abs() <= c, raw, torch.sign(raw.detach()) * c)
    else:
        d = raw + (raw.detach().clamp(-c, c) - raw).detach()
    gap = raw.detach().abs()
    if cfg.gate_level == "sequence":
        seq_gap = torch.stack([gap[i][mask[i]].mean() for i in range(lp_s.shape[0])])
        aligned = (seq_gap <= cfg.tau_align).unsqueeze(-1).expand(lp_s.shape)
    else:
        aligned = gap <= cfg.tau_align
    gate = aligned & (A >= cfg.tau_adv)
    grpo_log_r = lp_s - lp_old
    log_r = torch.where(gate, alpha * grpo_log_r + (1 - alpha) * d, grpo_log_r) if alpha != 1.0 else grpo_log_r
    r = torch.exp(log_r)
    pos = A * torch.minimum(r, torch.full_like(r, 1 + cfg.eps_high))
    neg_factor = torch.maximum(r, torch.full_like(r, 1 - cfg.eps_low))
    if cfg.dual_clip:
        neg_factor = torch.minimum(neg_factor, torch.full_like(r, cfg.c_dual))
    s = torch.where(A >= 0, pos, A * neg_factor)
    tok = -s
    if cfg.objective == "kdrl":
        tok = tok + cfg.beta_kd * 0.5 * (lp_s - lp_t) ** 2
    if cfg.beta > 0:
        x = lp_ref - lp_s
        tok = tok + cfg.beta * (torch.exp(x) - x - 1)
    if cfg.loss_agg == "seq_mean_token_mean":
        per_seq = [tok[i][mask[i]].mean() if mask[i].any() else tok.new_zeros(()) for i in range(tok.shape[0])]
        return torch.stack(per_seq).sum() / (num_sequences or tok.shape[0])
    return tok[mask].sum() / (num_tokens or mask.sum())


def _grad(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


CONFIGS = [
    dict(),
    dict(teacher_clamp_grad="straight_through"),
    dict(alpha=0.3, dual_clip=True, loss_agg="token_mean"),
    dict(tau_align=1.0, tau_adv=0.0),
    dict(tau_align=1.2, gate_level="sequence", teacher_clamp_grad="straight_through", beta=0.05),
    dict(objective="kdrl", beta_kd=0.3),
    dict(objective="grpo", dual_clip=True, beta=0.1, loss_agg="token_mean"),
]


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_matches_float64_reference(overrides):
    cfg = DistillConfig(**overrides)
    x = _inputs()
    loss, metrics = objective_loss(cfg=cfg, **x)
    ref = _ref_loss(cfg=cfg, **x)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, x["lp_s"]), _grad(ref, x["lp_s"]), rtol=1e-10, atol=1e-12)
    for key, val in metrics.items():
        assert torch.isfinite(val), key
    # clip fractions equal direct counts over valid tokens
    r = torch.exp(x["lp_s"].detach() - x["lp_old"]) if cfg.objective != "rlad" else None
    if r is not None:
        a = x["advantages"].unsqueeze(-1).expand_as(r)
        m = x["mask"]
        want_high = ((r > 1 + cfg.eps_high) & (a > 0))[m].float().mean()
        want_low = ((r < 1 - cfg.eps_low) & (a < 0))[m].float().mean()
        torch.testing.assert_close(metrics["clip_frac_high"], want_high.float())
        torch.testing.assert_close(metrics["clip_frac_low"], want_low.float())


@pytest.mark.parametrize("gates", [dict(), dict(tau_align=0.8, tau_adv=0.0, gate_level="sequence"),
                                   dict(tau_align=0.5, dual_clip=True)])
def test_alpha_one_is_grpo_bitwise(gates):
    x = _inputs()
    x["advantages"] = torch.randn(B, S, dtype=F64)  # per-token advantages take the same path
    loss_rlad, _ = objective_loss(cfg=DistillConfig(objective="rlad", alpha=1.0, **gates), **x)
    loss_grpo, _ = objective_loss(cfg=DistillConfig(objective="grpo", **gates), **{**x, "lp_t": None})
    assert torch.equal(loss_rlad, loss_grpo)
    assert torch.equal(_grad(loss_rlad, x["lp_s"]), _grad(loss_grpo, x["lp_s"]))
    ref = _ref_loss(cfg=DistillConfig(objective="grpo", **gates), **x)
    torch.testing.assert_close(loss_grpo, ref, rtol=1e-13, atol=1e-13)


def test_open_gates_equal_ungated_loss():
    x = _inputs()
    cfg = DistillConfig(tau_align=math.inf, tau_adv=-math.inf)
    loss, metrics = objective_loss(cfg=cfg, **x)
    ref = _ref_loss(cfg=cfg, **x)  # the reference with both gates open is the paper's objective
    assert metrics["gated_frac"] == 0
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_grad(loss, x["lp_s"]), _grad(ref, x["lp_s"]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gated_tokens_carry_exact_grpo_gradient(level):
    x = _inputs(spread=2.0)
    # Both token sets must be non-empty whatever was drawn: sequence 0 imitates (A > 0, and tau
    # admits at least one of its tokens), sequence 1 is gated out by its advantage (A < 0).
    x["advantages"][0] = x["advantages"][0].abs() + 0.1
    x["advantages"][1] = -x["advantages"][1].abs() - 0.1
    gap = (x["lp_s"].detach() - x["lp_t"]).abs()
    if level == "token":
        gaps = gap[x["mask"]]
        floor = max(float(gaps.median()), float(gap[0][x["mask"][0]].min()))
    else:
        gaps = torch.stack([gap[i][x["mask"][i]].mean() for i in range(B)])
        floor = max(float(gaps.median()), float(gaps[0]))
    # tau halfway to the next larger gap: no gap sits on the boundary, where the library's and
    # this test's float rounding of a sequence mean could disagree.
    above = gaps[gaps > floor]
    tau = (floor + float(above.min())) / 2 if above.numel() else floor + 1.0
    # No PPO clip: a clipped kept token would have zero gradient under both objectives.
    common = dict(loss_agg="token_mean", dual_clip=True, eps_low=1e9, eps_high=1e9)
    cfg = DistillConfig(tau_align=tau, tau_adv=0.0, gate_level=level, **common)
    # num_tokens=1: a plain sum, so each token's gradient depends on that token only
    loss, metrics = objective_loss(cfg=cfg, num_tokens=1, **x)
    grpo, _ = objective_loss(cfg=DistillConfig(objective="grpo", **common), num_tokens=1, **x)
    g, g_grpo = _grad(loss, x["lp_s"]), _grad(grpo, x["lp_s"])
    a = x["advantages"].unsqueeze(-1).expand(B, S)
    if level == "token":
        aligned = gap <= tau
    else:
        seq_gap = torch.stack([gap[i][x["mask"][i]].mean() for i in range(B)])
        aligned = (seq_gap <= tau).unsqueeze(-1).expand(B, S)
    gated_out = ~(aligned & (a >= 0)) & x["mask"]
    kept = ~gated_out & x["mask"]
    assert gated_out.any() and kept.any()
    assert torch.equal(g[gated_out], g_grpo[gated_out])
    assert not torch.equal(g[kept], g_grpo[kept])
    torch.testing.assert_close(metrics["gated_frac"], gated_out.sum().float() / x["mask"].sum().float())


@pytest.mark.parametrize("mode", ["clamp", "straight_through"])
def test_teacher_clamp_gradient_modes(mode):
    x = _inputs(spread=2.0)
    x["mask"] = torch.ones(B, S, dtype=torch.bool)
    alpha, c = 0.4, 0.5
    cfg = DistillConfig(alpha=alpha, teacher_clamp=c, teacher_clamp_grad=mode, eps_high=1e9,
                        loss_agg="token_mean")
    # no PPO clip is active: A > 0 and eps_high huge; num_tokens=1 makes the loss a plain sum
    loss, metrics = objective_loss(cfg=cfg, num_tokens=1, **{**x, "advantages": x["advantages"].abs() + 0.1})
    lp_s, lp_old, lp_t = x["lp_s"].detach(), x["lp_old"], x["lp_t"]
    a = (x["advantages"].abs() + 0.1).unsqueeze(-1)
    raw = lp_s - lp_t
    d = raw.clamp(-c, c)
    r = torch.exp(alpha * (lp_s - lp_old) + (1 - alpha) * d)
    inside = (raw.abs() <= c).to(F64)
    dd = inside if mode == "clamp" else torch.ones_like(inside)
    # loss = -sum r * A  ->  d loss / d lp_s = -A * r * (alpha + (1 - alpha) * dd)
    want = -a * r * (alpha + (1 - alpha) * dd)
    assert (inside == 0).any() and (inside == 1).any()
    torch.testing.assert_close(_grad(loss, x["lp_s"]), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["teacher_clamp_frac"], (1 - inside).mean().float())


@pytest.mark.parametrize("objective", ["rlad", "grpo", "kdrl"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_no_nan_for_extreme_logprobs(objective, dtype):
    x = _inputs()
    lp_s = x["lp_s"].detach().to(dtype)
    lp_t, lp_old, lp_ref = x["lp_t"].to(dtype), x["lp_old"].to(dtype), x["lp_ref"].to(dtype)
    mask = x["mask"].clone()
    mask[:, 1] = False
    mask[-1] = False  # an empty sequence
    for t in (lp_s, lp_t, lp_old, lp_ref):  # masked tokens may hold anything
        t[:, 1] = -math.inf
        t[0, 1] = math.nan
    if objective != "kdrl":  # k2 to a teacher with zero mass is infinite by definition
        lp_t[:, 0] = -math.inf
        lp_t[:, 2] = -1e30
    else:
        lp_t[:, 0] = -1e4
    lp_s.requires_grad_()
    for extra in (dict(), dict(teacher_clamp_grad="straight_through", gate_level="sequence", tau_align=2.0),
                  dict(tau_align=0.5, tau_adv=0.0, dual_clip=True, beta=0.1, loss_agg="token_mean")):
        cfg = DistillConfig(objective=objective, **extra)
        loss, metrics = objective_loss(lp_s=lp_s, lp_old=lp_old, lp_t=lp_t, lp_ref=lp_ref, advantages=x["advantages"],
                                       mask=mask, cfg=cfg)
        grad = _grad(loss, lp_s)
        assert torch.isfinite(loss), (objective, extra)
        assert torch.isfinite(grad).all(), (objective, extra)
        assert (grad[~mask] == 0).all()
        for key, val in metrics.items():
            assert not torch.isnan(val), (objective, extra, key)


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean"])
def test_micro_batches_sum_to_mini_batch(agg):
    x = _inputs(b=8)
    cfg = DistillConfig(loss_agg=agg, beta=0.05)
    full, _ = objective_loss(cfg=cfg, **x)
    g_full = _grad(full, x["lp_s"])
    total = torch.zeros((), dtype=F64)
    num_tokens = int(x["mask"].sum())
    for lo in range(0, 8, 3):  # uneven micro-batches: 3, 3, 2
        part = {k: v[lo:lo + 3] for k, v in x.items()}
        loss, _ = objective_loss(cfg=cfg, num_sequences=8, num_tokens=num_tokens, **part)
        total = total + loss
    torch.testing.assert_close(total, full, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(_grad(total, x["lp_s"]), g_full, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("topk", [0, 11, 64])
def test_forward_kl_objective_single_rank(topk):
    """The teacher's whole logits (teacher_topk=0) and its top-k with k >= the vocabulary give the
    full-vocabulary KL."""
    from rlad_megatron.losses import vocab_parallel_topk_logprobs

    v, vocab = 13, 11  # two padded columns
    s_logits = torch.randn(B, S, v, dtype=torch.float32, requires_grad=True)
    t_logits = torch.randn(B, S, v, dtype=torch.float32)
    x = _inputs()
    cfg = DistillConfig(objective="forward_kl", teacher_topk=topk)
    teacher = dict(teacher_logits=t_logits)
    if topk:
        ids, lp = vocab_parallel_topk_logprobs(t_logits, topk, tp_group=None, vocab_size=vocab)
        assert ids.shape == (B, S, vocab)  # k clipped to the vocabulary
        teacher = dict(teacher_topk_ids=ids.to(torch.int32), teacher_topk_lp=lp)
    loss, metrics = objective_loss(cfg=cfg, student_logits=s_logits, vocab_size=vocab, **teacher,
                                   **{k: (v_.float() if v_.is_floating_point() else v_) for k, v_ in x.items()})
    s64 = s_logits.detach().double().requires_grad_()
    ls = torch.log_softmax(s64[..., :vocab], -1)
    lt = torch.log_softmax(t_logits.double()[..., :vocab], -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)
    m = x["mask"]
    ref = torch.stack([kl[i][m[i]].mean() for i in range(B)]).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    (g,) = torch.autograd.grad(loss, s_logits)
    (g_ref,) = torch.autograd.grad(ref, s64)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-7)
    assert (g[..., vocab:] == 0).all()
    assert torch.isfinite(metrics["kl_forward"])


def test_user_errors_name_the_field():
    x = _inputs()
    with pytest.raises(ValueError, match="lp_t"):
        objective_loss(cfg=DistillConfig(), **{**x, "lp_t": None})
    with pytest.raises(ValueError, match="lp_ref"):
        objective_loss(cfg=DistillConfig(beta=0.1), **{**x, "lp_ref": None})
    with pytest.raises(ValueError, match="mask"):
        objective_loss(cfg=DistillConfig(), **{**x, "mask": x["mask"][:, :-1]})
    with pytest.raises(ValueError, match="objective"):
        objective_loss(cfg=dataclasses.replace(DistillConfig(), objective="ppo"), **x)
    with pytest.raises(ValueError, match="student_logits"):
        objective_loss(cfg=DistillConfig(objective="forward_kl"), **x)


def test_full_teacher_logits_refused_for_a_large_vocabulary():
    from rlad_megatron.objectives import build_objective

    with pytest.raises(ValueError, match="distill.teacher_topk: expected >= 1 for a vocabulary of 151936"):
        build_objective(DistillConfig(objective="forward_kl", teacher_topk=0), vocab_size=151936)
    assert build_objective(DistillConfig(objective="forward_kl"), vocab_size=151936).teacher_topk == 64
    assert build_objective(DistillConfig(objective="rlad", teacher_topk=0), vocab_size=151936).teacher_topk == 0
