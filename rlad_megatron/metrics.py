"""Step metrics: reduced over ranks with fixed keys, written to TensorBoard, a JSONL log and
(optionally) Weights & Biases on rank 0."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

# What an objective's loss reports per micro-batch (Objective.loss; a key it does not report is NaN).
LOSS_METRICS = ("loss", "ratio_mean", "clip_frac_low", "clip_frac_high", "dual_clip_frac", "gated_frac",
                "teacher_logratio_mean", "teacher_clamp_frac", "kl_teacher_k3", "kd_k2", "kl_forward",
                "kl_ref", "entropy")
# Per optimizer update: the loss metrics and the step's outcome, reduced over the last pipeline stage.
UPDATE_METRICS = LOSS_METRICS + ("grad_norm", "skipped_step")
# The one-line log of a step, in this order (keys a step lacks or that are NaN are left out).
LOG_LINE = ("reward_mean", "accuracy", "loss", "ratio_mean", "clip_frac_low", "clip_frac_high", "gated_frac",
            "teacher_logratio_mean", "kl_teacher_k3", "entropy", "grad_norm", "response_length", "tokens_per_s",
            "eval/student_accuracy", "eval/teacher_accuracy")


def format_log_line(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={metrics[k]:.4g}" for k in LOG_LINE if k in metrics and not math.isnan(metrics[k]))


def mean_of_dicts(dicts: list[dict], keys) -> dict[str, float]:
    """Average each key over the micro-batch metric dicts that carry it (absent -> NaN)."""
    out = {}
    for key in keys:
        vals = [float(d[key]) for d in dicts if key in d]
        out[key] = sum(vals) / len(vals) if vals else math.nan
    return out


def reduce_last_stage_metrics(values: dict[str, float] | None, keys, *, is_last_stage: bool,
                              device: torch.device) -> dict[str, float]:
    """Mean over the ranks of the last pipeline stage, visible on every rank.

    Metrics exist only where the loss ran (the last stage); other ranks contribute zeros and the
    count of contributing ranks is reduced alongside, so keys must be the same on every rank.
    """
    buf = torch.zeros(2 * len(keys) + 1, dtype=torch.float64, device=device)
    if is_last_stage and values is not None:
        for i, key in enumerate(keys):
            v = values.get(key, math.nan)
            if not math.isnan(v):
                buf[2 * i] = v
                buf[2 * i + 1] = 1.0
        buf[-1] = 1.0
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(buf)
    return {key: (buf[2 * i] / buf[2 * i + 1]).item() if buf[2 * i + 1] > 0 else math.nan
            for i, key in enumerate(keys)}


def mean_over_ranks(values: dict[str, float], *, device: torch.device, group=None) -> dict[str, float]:
    """Mean of per-rank scalars over ``group`` (e.g. rollout statistics over DP replicas)."""
    keys = sorted(values)
    buf = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(buf, group=group)
        buf /= dist.get_world_size(group)
    return dict(zip(keys, buf.tolist()))


class MetricsWriter:
    """TensorBoard + ``metrics.jsonl`` in the run directory; a no-op off rank 0."""

    def __init__(self, run_dir: str | Path, *, enabled: bool, tensorboard: bool, wandb=None, config=None):
        """``wandb``: a ``config.WandbConfig`` (None or ``enabled: false``: no W&B); ``config``: the
        resolved run config (a dataclass or dict), recorded with the W&B run."""
        self.enabled = enabled
        self._tb = None
        self._jsonl = None
        self._wandb = None
        if not enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb is not None and wandb.enabled:
            self._wandb = _start_wandb(wandb, run_dir=run_dir, config=config)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        finite = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isnan(v)}
        if self._tb is not None:
            for key, value in finite.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        self._jsonl.write(json.dumps({"step": step, **finite}) + "\n")
        self._jsonl.flush()
        if self._wandb is not None:
            self._wandb.log(finite, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(cfg, *, run_dir: Path, config: dict | None):
    """A W&B run writing under ``run_dir/wandb``; wandb is imported only here (an optional extra)."""
    try:
        import wandb
    except ImportError:
        raise ImportError('logging.wandb.enabled: the wandb package is not installed '
                          '(pip install -e ".[wandb]", or set logging.wandb.enabled=false)') from None
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    return wandb.init(project=cfg.project, name=cfg.run_name or run_dir.name, mode=cfg.mode, dir=str(run_dir),
                      config=config)
