"""A training checkpoint (TP=2) is usable as weights: `megatron_to_hf.py` exports it to an HF
directory whose logits equal the trained model's, and `<model>.load` starts a run from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import run_distributed

ROOT = Path(__file__).resolve().parents[2]
TOKENS = torch.tensor([[1, 5, 9, 3, 7, 2, 4], [2, 2, 8, 6, 1, 3, 5]])


def _train_and_logits(rank, world_size, overrides):
    from rlad_megatron.config import load_config
    from rlad_megatron.distributed.init import init_distributed
    from rlad_megatron.models.forward import position_ids_like
    from rlad_megatron.trainer import Trainer

    trainer = Trainer(load_config(ROOT / "launch" / "configs" / "tiny_cpu.yaml", overrides), init_distributed("cpu"))
    trainer.train()
    model = trainer.student.policy
    model.eval()
    with torch.no_grad():
        return model(TOKENS, position_ids_like(TOKENS), None)  # this rank's vocab shard [B, S, V/TP]


def _load_and_logits(rank, world_size, load: str):
    from rlad_megatron.config import load_config
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.models.forward import position_ids_like
    from rlad_megatron.models.weights import build_model

    cfg = load_config(ROOT / "launch" / "configs" / "tiny_cpu.yaml", [f"--student.load={load}"])
    groups = initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=0)
    model = build_model(cfg.student, groups, device=torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        return model(TOKENS, position_ids_like(TOKENS), None)


def test_training_checkpoint_exports_to_hf_and_loads_as_weights(tmp_path, rl_overrides):
    from transformers import AutoModelForCausalLM

    shards = run_distributed(_train_and_logits, 2, args=(rl_overrides(tmp_path, 2, 1, "run", "grpo"),))
    vocab = 32
    trained = torch.cat(shards, dim=-1)[..., :vocab]
    save_dir = tmp_path / "ckpt"

    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, str(ROOT / "checkpoints_convert" / "megatron_to_hf.py"),
                           "--megatron", str(save_dir), "--out", str(out), "--model-type", "llama", "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(TOKENS).logits
    torch.testing.assert_close(hf_logits, trained, rtol=0, atol=1e-4)

    # The newest step dir of the save dir, as `student.load` reads it (here at TP=1).
    (loaded,) = run_distributed(_load_and_logits, 1, args=(str(save_dir),))
    torch.testing.assert_close(loaded[..., :vocab], trained, rtol=0, atol=1e-4)


def test_a_checkpoint_without_any_model_config_is_refused(tmp_path):
    from rlad_megatron.hf.checkpoint import dist_checkpoint_config

    step = tmp_path / "step_0000001"
    step.mkdir()
    (step / "meta.json").write_text("{}")
    (step / "extra_state.json").write_text('{"step": 1}')
    with pytest.raises(ValueError, match=r"extra_state.json: no 'model_config' mapping and no config.yaml"):
        dist_checkpoint_config(step)


def test_a_training_config_without_student_model_is_named(tmp_path):
    from rlad_megatron.hf.checkpoint import dist_checkpoint_config

    step = tmp_path / "step_0000001"
    step.mkdir()
    (step / "meta.json").write_text("{}")
    (step / "extra_state.json").write_text('{"step": 1}')
    (step / "config.yaml").write_text("student: {}\n")
    with pytest.raises(ValueError, match=r"config.yaml:student.model: expected a mapping"):
        dist_checkpoint_config(Path(step))
