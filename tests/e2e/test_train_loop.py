"""A few RLAD steps end to end at TP=2 and PP=2 on CPU: finite losses, parameters move, TensorBoard
events readable, checkpoint written, and resuming replays the uninterrupted run's losses exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.harness import run_distributed
from tests.helpers import drop_checkpoints_after, read_losses, train_run

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _tensorboard_scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_rlad_steps_resume_exactly(tmp_path, tp, pp, rl_overrides):
    overrides = rl_overrides(tmp_path, tp, pp, "full", "rlad", steps=STEPS)
    results = run_distributed(train_run, tp * pp, args=(overrides, False))
    assert all(r["moved"] for r in results), "the student's parameters did not change"
    full = read_losses(tmp_path / "full")
    assert sorted(full) == list(range(1, STEPS + 1))
    assert all(math.isfinite(v) for v in full.values()), full

    scalars = _tensorboard_scalars(tmp_path / "full")
    for tag in ("loss", "reward_mean", "accuracy", "ratio_mean", "clip_frac_low", "gated_frac",
                "teacher_logratio_mean", "kl_teacher_k3", "entropy", "grad_norm", "tokens_per_s",
                "time/rollout_s", "time/teacher_s", "time/train_s"):
        assert tag in scalars and len(scalars[tag]) == STEPS, (tag, sorted(scalars))
    assert scalars["loss"] == pytest.approx([full[s] for s in range(1, STEPS + 1)], rel=1e-6)

    ckpts = sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("step_"))
    assert ckpts and ckpts[-1].endswith(str(STEPS)), ckpts
    # Drop the last checkpoint so that resuming starts from step 2, then replay steps 3-4.
    drop_checkpoints_after(tmp_path / "ckpt", 2)
    resumed_overrides = rl_overrides(tmp_path, tp, pp, "resumed", "rlad", steps=STEPS)
    results = run_distributed(train_run, tp * pp, args=(resumed_overrides, True))
    assert {r["start"] for r in results} == {2}
    resumed = read_losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == full[step], (step, resumed[step], full[step])


def _one_step_each(rank, world_size, base_overrides):
    from rlad_megatron.config import load_config
    from rlad_megatron.distributed.init import init_distributed
    from rlad_megatron.trainer import Trainer

    out = {}
    for objective in ("grpo", "kdrl", "forward_kl"):
        overrides = [o for o in base_overrides if not o.startswith(("--distill.objective", "--train.steps"))]
        cfg = load_config(ROOT / "launch" / "configs" / "tiny_cpu.yaml",
                          overrides + [f"--distill.objective={objective}", "--distill.beta=0.05", "--train.steps=1",
                                       "--checkpoint.save_interval=0"])
        metrics = Trainer(cfg, init_distributed("cpu")).train()
        out[objective] = {k: metrics[k] for k in ("loss", "kl_ref", "kd_k2", "kl_forward", "grad_norm")}
    return out


def test_baseline_objectives_run_with_reference(tmp_path, rl_overrides):
    """grpo, kdrl and forward_kl (with a k3 KL to the reference) each train a step at TP=2."""
    overrides = rl_overrides(tmp_path, 2, 1, "objectives", "grpo", steps=STEPS)
    (metrics, _) = run_distributed(_one_step_each, 2, args=(overrides,))
    for objective, m in metrics.items():
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]), (objective, m)
        assert math.isfinite(m["kl_ref"]), (objective, m)
    assert math.isfinite(metrics["kdrl"]["kd_k2"]) and math.isnan(metrics["grpo"]["kd_k2"])
    assert math.isfinite(metrics["forward_kl"]["kl_forward"]) and metrics["forward_kl"]["kl_forward"] > 0
