"""MetricsWriter: metrics.jsonl always, W&B (offline) when enabled, a clear error when wandb is absent."""

from __future__ import annotations

import builtins
import json
import math
import random

import pytest

from rlad_megatron.config import WandbConfig, load_config
from rlad_megatron.metrics import MetricsWriter


def _steps(n: int) -> list[dict[str, float]]:
    return [{"reward_mean": random.random(), "loss": random.uniform(-1, 1), "grad_norm": math.nan} for _ in range(n)]


def test_jsonl_holds_each_step_without_nans(tmp_path):
    steps = _steps(random.randint(2, 6))
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    for i, m in enumerate(steps):
        writer.write(i + 1, m)
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(steps) + 1))
    for row, m in zip(rows, steps):
        assert row["reward_mean"] == m["reward_mean"] and row["loss"] == m["loss"]
        assert "grad_norm" not in row


def test_wandb_section_parses_from_overrides():
    cfg = load_config(None, ["--logging.wandb.enabled=true", "--logging.wandb.project=p",
                             "--logging.wandb.run_name=r", "--logging.wandb.mode=online"])
    assert cfg.logging.wandb == WandbConfig(enabled=True, project="p", run_name="r", mode="online")
    assert load_config(None, []).logging.wandb.enabled is False


def test_wandb_offline_run_records_the_steps(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    steps = _steps(3)
    cfg = load_config(None, [f"--logging.run_dir={tmp_path}"])
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False,
                           wandb=WandbConfig(enabled=True, project="rlad-test", mode="offline"), config=cfg)
    run = writer._wandb
    assert run is not None and run.name == tmp_path.name
    assert run.config["logging"]["run_dir"] == str(tmp_path)
    logged = []
    real_log = run.log
    monkeypatch.setattr(run, "log", lambda data, step: (logged.append((step, dict(data))), real_log(data, step=step)))
    for i, m in enumerate(steps):
        writer.write(i + 1, m)
    writer.close()
    assert logged == [(i + 1, {k: v for k, v in m.items() if not math.isnan(v)}) for i, m in enumerate(steps)]
    assert wandb.run is None
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")), sorted(p.name for p in tmp_path.rglob("*"))


def test_wandb_missing_names_the_setting(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ImportError, match=r"logging\.wandb\.enabled: the wandb package is not installed"):
        MetricsWriter(tmp_path, enabled=True, tensorboard=False, wandb=WandbConfig(enabled=True))
    # Disabled W&B never imports it.
    MetricsWriter(tmp_path, enabled=True, tensorboard=False, wandb=WandbConfig(enabled=False)).close()
