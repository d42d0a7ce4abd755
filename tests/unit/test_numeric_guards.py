"""Numeric guards: the loss never turns extreme log-probs into NaN, a non-finite gradient skips the
optimizer step (parameters and Adam state untouched), and the trainer aborts after too many
consecutive skipped steps with a message naming ``train.max_nonfinite_steps``.

Shape legend: B sequences, S positions, V vocabulary columns.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rlad_megatron.config import Config, DistillConfig
from rlad_megatron.losses import vocab_parallel_logprobs
from tests.harness import run_distributed
from tests.helpers import objective_loss

B, S = 6, 7
INF = math.inf

# Objective variants: every code path of the ratio (mixed / gated / straight-through / dual clip / k3).
VARIANTS = [
    dict(objective="rlad"),
    dict(objective="rlad", teacher_clamp_grad="straight_through"),
    dict(objective="rlad", tau_align=0.5, tau_adv=0.0, gate_level="sequence", dual_clip=True),
    dict(objective="rlad", alpha=0.0, loss_agg="token_mean", beta=0.1),
    dict(objective="grpo", dual_clip=True),
    dict(objective="grpo", beta=0.2),
    dict(objective="kdrl"),
]


def _finite_case(dtype: torch.dtype, *, lp_old_value: float, lp_t_value: float, lp_s_scale: float):
    """Valid tokens carry extreme (but legal) log-probs; masked tokens carry garbage (NaN, +-inf)."""
    lp_s = -torch.rand(B, S, dtype=dtype) * lp_s_scale
    lp_old = lp_s + 0.3 * torch.randn(B, S, dtype=dtype)
    lp_t = lp_s + torch.randn(B, S, dtype=dtype)
    # Three advantage signs, including a zero-variance group (A = 0), where inf * 0 = NaN would bite.
    adv = torch.tensor([1.5, -1.2, 0.0, 0.0, -0.5, 2.0], dtype=dtype)
    mask = torch.rand(B, S) < 0.7
    mask[:, 0] = True
    mask[:, -1] = False
    # Extreme values on valid tokens, in different columns so they combine with each advantage sign.
    lp_old[:, 1] = lp_old_value
    lp_t[:, 2] = lp_t_value
    lp_s[:, 3] = -1e4
    lp_old[:, 3] = 0.0
    mask[:, 1:4] = True
    # The reference tracks the student (it is the initial student); k3 = exp(lp_ref - lp_s) - ... is
    # unbounded by definition where lp_ref >> lp_s, so only a reference with (near) zero mass is extreme.
    lp_ref = lp_s + 0.2 * torch.randn(B, S, dtype=dtype)
    lp_ref[:, 2] = -1e4
    # Garbage on masked positions, which must not leak through exp() or the gradient.
    for t in (lp_s, lp_old, lp_t, lp_ref):
        t[:, -1] = torch.tensor([math.nan, INF, -INF, math.nan, -INF, INF], dtype=dtype)
    return dict(lp_s=lp_s.requires_grad_(), lp_old=lp_old, lp_t=lp_t, lp_ref=lp_ref, advantages=adv, mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lp_old_value", [-1e30, -1e4, -200.0, -INF])
@pytest.mark.parametrize("lp_t_value", [-INF, -1e30, -1e4])
@pytest.mark.parametrize("variant", VARIANTS, ids=[str(v) for v in VARIANTS])
def test_loss_and_grads_finite_for_extreme_logprobs(dtype, lp_old_value, lp_t_value, variant):
    if variant["objective"] == "kdrl" and lp_t_value < -1e3:
        # k2 = 0.5 (lp_s - lp_t)^2 to a teacher with (near) zero mass is infinite or ~1e60 by definition.
        lp_t_value = -30.0
    x = _finite_case(dtype, lp_old_value=lp_old_value, lp_t_value=lp_t_value, lp_s_scale=3.0)
    cfg = DistillConfig(**variant)
    loss, metrics = objective_loss(cfg=cfg, **x)
    (grad,) = torch.autograd.grad(loss, x["lp_s"])
    assert torch.isfinite(loss), (variant, loss.item())
    assert torch.isfinite(grad).all(), (variant, grad)
    assert (grad[~x["mask"]] == 0).all(), "masked tokens must get exactly zero gradient"
    for key, value in metrics.items():
        assert not torch.isnan(value), (variant, key)


def test_zero_advantage_with_overflowing_ratio_regression():
    """exp(1e30) = inf and inf * A with A = 0 was NaN before the log-ratio bound."""
    lp_s = torch.zeros(2, 3, requires_grad=True)
    lp_old = torch.full((2, 3), -1e30)
    for adv in (torch.zeros(2), torch.tensor([1.0, -1.0])):
        loss, _ = objective_loss(lp_s=lp_s, lp_old=lp_old, lp_t=lp_old, advantages=adv,
                                 mask=torch.ones(2, 3, dtype=bool), cfg=DistillConfig())
        (grad,) = torch.autograd.grad(loss, lp_s)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), (adv, loss, grad)


def test_bound_does_not_change_ordinary_losses():
    """Inside |log r| < 20 the bound is the identity: same loss and gradient as the unbounded formula."""
    from rlad_megatron.losses.trrd import LOG_RATIO_BOUND, ppo_surrogate

    log_r = (torch.randn(B, S, dtype=torch.float64) * 3).clamp(-LOG_RATIO_BOUND + 1, LOG_RATIO_BOUND - 1)
    log_r.requires_grad_()
    adv = torch.randn(B, S, dtype=torch.float64)
    got = ppo_surrogate(log_r, adv, eps_low=0.2, eps_high=0.28, dual_clip=False, c_dual=3.0).sum()
    r = log_r.exp()
    want = torch.minimum(r * adv, r.clamp(0.8, 1.28) * adv).sum()
    (g_got,) = torch.autograd.grad(got, log_r)
    (g_want,) = torch.autograd.grad(want, log_r)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=0)


def test_logprobs_finite_for_extreme_logits():
    """Huge and tiny logits, garbage (-inf / NaN) in padded columns: log-probs, entropy and gradients
    stay finite on valid targets and the padded columns get zero gradient."""
    V, vocab = 13, 10
    logits = torch.randn(B, S, V) * 5
    logits[0] = 1e4  # all equal and huge
    logits[1, :, 3] = 3e4  # one dominant column
    logits[2, :, 5:vocab] = -1e30  # (near) zero-probability columns
    logits[3] = -1e30
    logits[:, :, vocab:] = torch.tensor([-INF, math.nan, INF])  # padded rows are never read
    logits = logits.requires_grad_()
    targets = torch.randint(0, 5, (B, S))
    lp, entropy = vocab_parallel_logprobs(logits, targets, tp_group=None, vocab_size=vocab, with_entropy=True)
    assert torch.isfinite(lp).all() and (lp <= 0).all()
    assert torch.isfinite(entropy).all()
    (grad,) = torch.autograd.grad(lp.sum() + entropy.sum(), logits)
    assert torch.isfinite(grad).all()
    assert (grad[..., vocab:] == 0).all()
    ref = torch.log_softmax(logits.detach()[..., :vocab].double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- guarded optimizer step


def _optimizer_steps(rank, world_size, bad_value):
    from rlad_megatron.config import ModelConfig, ModelSection, OptimizerConfig
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.models.builder import build_gpt_model
    from rlad_megatron.optim import build_optimizer, wrap_ddp
    from rlad_megatron.rl.train_module import guarded_optimizer_step

    groups = initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=3)
    section = ModelSection(model=ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2,
                                             num_query_groups=2, ffn_hidden_size=64, vocab_size=40,
                                             make_vocab_size_divisible_by=8))
    model = wrap_ddp(build_gpt_model(section, groups, device=torch.device("cpu")), use_distributed_optimizer=False)
    optimizer, scheduler = build_optimizer([model], OptimizerConfig(lr=1e-2, clip_grad=1.0),
                                           use_distributed_optimizer=False, total_steps=10)
    ids = torch.randint(0, 40, (2, 8))
    pos = torch.arange(8).unsqueeze(0).expand(2, -1)

    def backward(poison: bool):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        model(ids, pos, None).float().pow(2).mean().backward()
        model.finish_grad_sync()
        if poison:
            # One element of one parameter's gradient is non-finite: the whole step must be skipped.
            name, p = next((n, p) for n, p in model.named_parameters() if "linear_fc1" in n)
            p.main_grad.view(-1)[0] = bad_value

    def snapshot():
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
        state = {(i, k): {n: v.clone() for n, v in s.items() if torch.is_tensor(v)}
                 for i, opt in enumerate(inner) for k, s in enumerate(opt.state.values())}
        return params, state

    out = {}
    backward(poison=False)
    out["good_first"] = guarded_optimizer_step(optimizer, clip_grad=1.0)
    before_params, before_state = snapshot()
    backward(poison=True)
    out["bad"] = guarded_optimizer_step(optimizer, clip_grad=1.0)
    after_params, after_state = snapshot()
    out["params_unchanged"] = all(torch.equal(before_params[n], after_params[n]) for n in before_params)
    out["state_unchanged"] = all(torch.equal(before_state[k][n], after_state[k][n])
                                 for k in before_state for n in before_state[k])
    backward(poison=False)
    out["good_after"] = guarded_optimizer_step(optimizer, clip_grad=1.0)
    final, _ = snapshot()
    out["moved_after"] = any(not torch.equal(final[n], after_params[n]) for n in final)
    out["finite_after"] = all(torch.isfinite(t).all() for t in final.values())
    return out


@pytest.mark.parametrize("bad_value", [math.nan, INF])
def test_guarded_step_skips_nonfinite_grads(bad_value):
    (out,) = run_distributed(_optimizer_steps, 1, args=(bad_value,))
    stepped, norm = out["good_first"]
    assert stepped and math.isfinite(norm)
    stepped, norm = out["bad"]
    assert not stepped and not math.isfinite(norm)
    assert out["params_unchanged"], "a skipped step changed the parameters"
    assert out["state_unchanged"], "a skipped step changed the Adam state"
    stepped, norm = out["good_after"]
    assert stepped and math.isfinite(norm)
    assert out["moved_after"] and out["finite_after"]


# ---------------------------------------------------------------- trainer abort rule


def _guard_only_trainer(limit: int):
    try:
        from rlad_megatron.trainer import NonFiniteError, Trainer
    except ImportError as e:  # trainer.py imports modules other helpers are still writing
        pytest.skip(f"rlad_megatron.trainer does not import yet: {e}")
    trainer = Trainer.__new__(Trainer)
    cfg = Config()
    cfg.train = dataclasses.replace(cfg.train, max_nonfinite_steps=limit)
    trainer.cfg, trainer.nonfinite_streak = cfg, 0
    return trainer, NonFiniteError


def _metrics(kind: str) -> dict[str, float]:
    return {"ok": {"loss": 0.3, "skipped_step": 0.0}, "skip": {"loss": 0.3, "skipped_step": 1.0},
            "nan": {"loss": math.nan, "skipped_step": 0.0}, "inf": {"loss": INF, "skipped_step": 0.0}}[kind]


@pytest.mark.parametrize("limit", [0, 1, 3])
def test_guard_counts_consecutive_nonfinite_steps(limit):
    trainer, NonFiniteError = _guard_only_trainer(limit)
    kinds = ["skip", "nan", "inf"]
    # `limit` bad steps in a row are tolerated; a good step resets the streak.
    for i in range(limit):
        trainer._guard(_metrics(kinds[i % 3]))
    trainer._guard(_metrics("ok"))
    assert trainer.nonfinite_streak == 0
    for i in range(limit):
        trainer._guard(_metrics(kinds[(i + 1) % 3]))
    assert trainer.nonfinite_streak == limit
    with pytest.raises(NonFiniteError, match=r"train\.max_nonfinite_steps.*" + str(limit + 1)) as info:
        trainer._guard(_metrics("nan"))
    assert "\n" not in str(info.value)
