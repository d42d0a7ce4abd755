"""Llama 3 RoPE scaling, Qwen3-MoE and Mixtral: HF logits == megatron logits at TP=2, PP=2 and EP=2.

One 2-rank spawn. Every layout (TP=2, PP=2, EP=2) loads through ``models.weights.load_weights``
(from the converted directory and, for llama3, straight from the HF one); at EP=2 each rank's
experts are megatron-core's own (its ``sharded_state_dict`` offsets are checked too).
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.harness import run_distributed
from tests.unit.hf_fixtures import VOCAB, save_tiny_hf

pytest.importorskip("transformers")

FAMILIES = ["llama3", "qwen3_moe", "mixtral"]
# (tp, pp, ep)
LAYOUTS = {"llama3": [(2, 1, 1), (1, 2, 1)], "qwen3_moe": [(2, 1, 1), (1, 2, 1), (1, 1, 2)],
           "mixtral": [(2, 1, 1), (1, 2, 1), (1, 1, 2)]}
BATCH, SEQ = 2, 48
_EXPERT = re.compile(r"^(decoder\.layers\.\d+\.mlp\.experts\.local_experts\.)(\d+)(\..+)$")


def _expert_offsets(model) -> dict[str, int]:
    """megatron-core's global expert index of each local linear_fc2 (its ShardedTensor offset on dim 0)."""
    return {name: sh.global_offset[0] for name, sh in model.sharded_state_dict().items()
            if name.endswith("linear_fc2.weight") and ".local_experts." in name}


def _run(rank, world_size, sources, tokens_BS):
    import torch.distributed as dist

    from rlad_megatron.config import ModelSection, ParallelConfig
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.hf import read_checkpoint_config
    from rlad_megatron.models.builder import build_gpt_model
    from rlad_megatron.models.equivalence import megatron_logits
    from rlad_megatron.models.weights import load_weights

    out = {}
    for family, layouts in LAYOUTS.items():
        for tp, pp, ep in layouts:
            groups = initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                               expert_model_parallel_size=ep, seed=3)
            assert (groups.ep_size, groups.ep_rank) == (ep, rank if ep > 1 else 0)
            # Expert TP = TP; each expert shard is replicated over world / (TP x PP x EP) ranks.
            assert dist.get_world_size(groups.expert_tp) == tp
            assert dist.get_world_size(groups.expert_dp) == world_size // (tp * pp * ep)
            assert groups.collection.ep is groups.ep
            kinds = ["meg", "hf"] if family == "llama3" else ["meg"]
            for kind in kinds:
                path = sources[(family, kind)]
                section = ModelSection(model=read_checkpoint_config(path), parallel=ParallelConfig(
                    tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep))
                section.model.make_vocab_size_divisible_by = 100
                model = build_gpt_model(section, groups, device=torch.device("cpu"))
                load_weights(model, path, groups)
                if ep > 1:
                    per_rank = section.model.num_experts // ep
                    offsets = _expert_offsets(model)
                    assert offsets and all(o == groups.ep_rank * per_rank + int(_EXPERT.match(n).group(2))
                                           for n, o in offsets.items()), offsets
                logits = megatron_logits(model, groups, tokens_BS, vocab_size=VOCAB, micro_batch_size=1)
                if logits is not None and groups.tp_rank == 0:
                    out[(family, kind, tp, pp, ep, rank)] = logits
    return out


def test_families_match_hf_logits_at_tp2_pp2_ep2(tmp_path):
    from rlad_megatron.conversion import convert_hf_to_megatron
    from rlad_megatron.models.equivalence import compare_logits, hf_logits

    tokens_BS = torch.randint(0, VOCAB, (BATCH, SEQ))
    sources, reference = {}, {}
    for family in FAMILIES:
        hf_dir = save_tiny_hf(tmp_path / f"{family}_hf", family)
        meg_dir = tmp_path / f"{family}_meg"
        # Padded for TP=2 (400 rows); loading at TP=1 re-pads to 300.
        convert_hf_to_megatron(hf_dir=hf_dir, out_dir=meg_dir, tp=2, make_vocab_size_divisible_by=100)
        sources[(family, "meg")], sources[(family, "hf")] = meg_dir, hf_dir
        reference[family] = hf_logits(hf_dir, tokens_BS)

    results = {}
    for rank_out in run_distributed(_run, 2, args=(sources, tokens_BS)):
        results.update(rank_out)
    # Every layout reported: the last stage's TP rank 0 (TP=2, PP=2), or both EP ranks (each a DP replica).
    expected = {(f, kind, tp, pp, ep) for f, layouts in LAYOUTS.items() for tp, pp, ep in layouts
                for kind in (["meg", "hf"] if f == "llama3" else ["meg"])}
    assert {k[:5] for k in results} == expected
    assert sum(1 for k in results if k[4] == 2) == 4  # EP=2: both ranks, two families
    for (family, kind, tp, pp, ep, rank), logits in results.items():
        stats = compare_logits(reference[family], logits)
        assert stats["max_abs_diff"] < 1e-4, (family, kind, tp, pp, ep, rank, stats)


def test_verify_cli_on_the_new_families(tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from rlad_megatron.conversion import convert_hf_to_megatron

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    # (launcher, layout, expected EP): Mixtral at EP=2 x TP=2 on 4 ranks.
    runs = {"llama3": ([sys.executable], [], 1), "qwen3_moe": ([*torchrun, "2"], ["--pp", "2"], 1),
            "mixtral": ([*torchrun, "4"], ["--tp", "2", "--ep", "2"], 2)}
    for family, (launcher, layout, ep) in runs.items():
        hf_dir = save_tiny_hf(tmp_path / f"{family}_hf", family)
        convert_hf_to_megatron(hf_dir=hf_dir, out_dir=tmp_path / f"{family}_meg")
        proc = subprocess.run(
            [*launcher, str(root / "checkpoints_convert" / "verify.py"), "--hf", str(hf_dir), "--megatron",
             str(tmp_path / f"{family}_meg"), "--seq", "40", "--tolerance", "1e-4", *layout],
            capture_output=True, text=True, env=env, timeout=240, cwd=root)
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
        assert report["pass"] and report["ep"] == ep and report["max_abs_diff"] < 1e-4, (family, report)
