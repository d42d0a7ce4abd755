"""hf_to_megatron.py --dist-checkpoint: the dist/ checkpoint loads at other TP/PP and padded vocab sizes.

One CLI run converts a tiny Llama (vocab 250 padded to 400 for TP=2), one 2-rank spawn loads it
at TP=2 (same padding, and 512 rows: more than saved) and TP=1 PP=2 (300 rows: fewer than saved)
and compares the logits with HF's; it also checks that a converted directory prefers its
safetensors, and that a truncated dist checkpoint fails in one line naming its directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.harness import run_distributed
from tests.unit.hf_fixtures import VOCAB, save_tiny_hf

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
BATCH, SEQ = 2, 10
# (name, tp, pp, make_vocab_size_divisible_by of the loading model, padded rows it gets)
LAYOUTS = [("same_rows", 2, 1, 100, 400), ("more_rows", 2, 1, 256, 512), ("fewer_rows", 1, 2, 100, 300)]


def _run(rank, world_size, sources, tokens_BS):
    from rlad_megatron.config import ModelSection, ParallelConfig
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.hf import read_checkpoint_config
    from rlad_megatron.models.builder import build_gpt_model
    from rlad_megatron.models.equivalence import megatron_logits
    from rlad_megatron.models.weights import load_weights

    out, errors = {}, {}
    for name, tp, pp, divisible_by, _ in LAYOUTS:
        groups = initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=3)
        keys = [k for k in sources if k[0] == name]
        for key in keys:
            path = sources[key]
            section = ModelSection(model=read_checkpoint_config(path), parallel=ParallelConfig(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
            section.model.make_vocab_size_divisible_by = divisible_by
            model = build_gpt_model(section, groups, device=torch.device("cpu"))
            try:
                load_weights(model, path, groups)
            except ValueError as e:
                errors[key] = str(e)
                continue
            logits = megatron_logits(model, groups, tokens_BS, vocab_size=VOCAB, micro_batch_size=1)
            if logits is not None and groups.tp_rank == 0:
                out[key] = (logits, section.padded_vocab_size)
    return out, errors


def test_dist_checkpoint_loads_at_other_layouts(tmp_path):
    from rlad_megatron.hf.checkpoint import dist_checkpoint_path
    from rlad_megatron.models.equivalence import compare_logits, hf_logits

    hf_dir = save_tiny_hf(tmp_path / "hf", "llama")
    meg = tmp_path / "meg"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "checkpoints_convert" / "hf_to_megatron.py"), "--hf", str(hf_dir), "--out",
         str(meg), "--tp", "2", "--make-vocab-size-divisible-by", "100", "--dist-checkpoint", "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (meg / "model.safetensors").is_file() and (meg / "dist" / "step_0000000" / "meta.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temp dir was renamed

    # A converted directory whose safetensors were removed loads from its dist/.
    dist_only = tmp_path / "dist_only"
    shutil.copytree(meg, dist_only)
    (dist_only / "model.safetensors").unlink()
    # Truncated dist/: a converted directory still loads its safetensors, dist/ itself fails.
    truncated = tmp_path / "truncated"
    shutil.copytree(meg, truncated)
    victim = sorted((truncated / "dist" / "step_0000000").glob("*.distcp"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert dist_checkpoint_path(meg) is None and dist_checkpoint_path(truncated) is None
    assert dist_checkpoint_path(dist_only) == dist_only / "dist"
    assert dist_checkpoint_path(meg / "dist") == meg / "dist"

    sources = {("same_rows", "dist"): meg / "dist", ("same_rows", "prefers_safetensors"): truncated,
               ("same_rows", "truncated"): truncated / "dist",
               ("more_rows", "step_dir"): meg / "dist" / "step_0000000",
               ("fewer_rows", "dist_only"): dist_only}
    tokens_BS = torch.randint(0, VOCAB, (BATCH, SEQ))
    reference = hf_logits(hf_dir, tokens_BS)

    results, errors = {}, {}
    for rank_out, rank_errors in run_distributed(_run, 2, args=(sources, tokens_BS)):
        results.update(rank_out)
        errors.update(rank_errors)
    assert set(errors) == {("same_rows", "truncated")}, errors
    message = errors[("same_rows", "truncated")]
    assert str(truncated / "dist") in message and "\n" not in message and "truncated" in message, message
    assert set(results) == set(sources) - set(errors)
    rows = {name: padded for name, _, _, _, padded in LAYOUTS}
    for key, (logits, padded) in results.items():
        assert padded == rows[key[0]], (key, padded)
        stats = compare_logits(reference, logits)
        assert stats["max_abs_diff"] < 1e-4, (key, stats)
