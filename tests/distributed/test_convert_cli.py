"""The three conversion CLIs end to end: hf_to_megatron, megatron_to_hf, verify under torchrun (TP=2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.unit.hf_fixtures import save_tiny_hf

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "checkpoints_convert"))


def test_cli_round_trip_and_verify(tmp_path, capsys):
    import hf_to_megatron
    import megatron_to_hf

    hf_dir = save_tiny_hf(tmp_path / "hf", "qwen2")
    meg_dir, back_dir = tmp_path / "meg", tmp_path / "back"
    assert hf_to_megatron.main(["--hf", str(hf_dir), "--out", str(meg_dir), "--tp", "2", "--rank-layout",
                                "--no-progress"]) == 0
    assert "converted qwen2" in capsys.readouterr().out
    assert (meg_dir / "mp_rank_01_000" / "model.safetensors").is_file()

    assert hf_to_megatron.main(["--hf", str(hf_dir), "--out", str(tmp_path / "bad"), "--tp", "3"]) == 1
    assert "num_attention_heads=4, got 3" in capsys.readouterr().err and not (tmp_path / "bad").exists()

    assert megatron_to_hf.main(["--megatron", str(meg_dir), "--out", str(back_dir), "--no-progress"]) == 0
    original, back = load_file(hf_dir / "model.safetensors"), load_file(back_dir / "model.safetensors")
    assert set(original) == set(back) and all(torch.equal(original[n], back[n]) for n in original)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "checkpoints_convert" / "verify.py"), "--hf", str(hf_dir), "--megatron", str(meg_dir),
         "--tp", "2", "--seq", "12", "--tolerance", "1e-4"],
        capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert report["pass"] and report["tp"] == 2 and report["max_abs_diff"] < 1e-4 and report["kl_mean"] < 1e-8
