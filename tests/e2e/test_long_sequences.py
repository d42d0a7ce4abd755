"""Through the Trainer: token-budget micro-batches with chunked log-probs replay the default run's
losses (same seeds, same rollouts) at PP=2, and the config refuses negative settings."""

from __future__ import annotations

import pytest

from tests.harness import run_distributed
from tests.helpers import read_losses, train_run

STEPS = 2


def test_token_budget_and_chunked_logprobs_replay_default_losses(tmp_path, rl_overrides):
    losses = {}
    for run, extra in (("default", []), ("long", ["--rl.max_tokens_per_micro_batch=48", "--rl.logprob_chunk_size=3"])):
        overrides = rl_overrides(tmp_path, 1, 2, run, "rlad", steps=STEPS) + extra + ["--checkpoint.save_dir=null"]
        run_distributed(train_run, 2, args=(overrides, False))
        losses[run] = read_losses(tmp_path / run)
    assert sorted(losses["long"]) == sorted(losses["default"]) and len(losses["default"]) == STEPS
    for step, loss in losses["default"].items():
        assert losses["long"][step] == pytest.approx(loss, abs=1e-5)


@pytest.mark.parametrize("key", ["max_tokens_per_micro_batch", "logprob_chunk_size"])
def test_negative_settings_are_config_errors(key):
    from rlad_megatron.config import ConfigError, load_config
    from tests.helpers import ROOT

    with pytest.raises(ConfigError, match=f"rl.{key}"):
        load_config(ROOT / "launch" / "configs" / "tiny_cpu.yaml", [f"--rl.{key}=-1"])
