"""HF logits == logits of the converted megatron model at TP=1, TP=2 and PP=2 (float32, 1e-4).

One 2-rank spawn covers every architecture and layout: each model is converted once (padded for
TP=2 with make_vocab_size_divisible_by=100, so loading at TP=1 also exercises vocab re-padding),
then loaded at each layout from the converted directory and, at TP=2, straight from the HF one.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed
from tests.unit.hf_fixtures import VOCAB, save_tiny_hf

pytest.importorskip("transformers")

MODELS = [("llama", False), ("qwen2", True), ("qwen3", False)]
LAYOUTS = [(1, 1), (2, 1), (1, 2)]
BATCH, SEQ = 2, 10


def _run(rank, world_size, sources, tokens_BS):
    from rlad_megatron.config import ModelSection, ParallelConfig
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.hf import read_checkpoint_config
    from rlad_megatron.models.builder import build_gpt_model
    from rlad_megatron.models.equivalence import megatron_logits
    from rlad_megatron.models.weights import load_weights

    out = {}
    for tp, pp in LAYOUTS:
        groups = initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=3)
        for key, path in sources.items():
            if key[1] == "hf" and tp == 1:
                continue  # HF-direct loading is checked at the TP=2 and PP=2 layouts
            section = ModelSection(model=read_checkpoint_config(path), parallel=ParallelConfig(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
            section.model.make_vocab_size_divisible_by = 100
            model = build_gpt_model(section, groups, device=torch.device("cpu"))
            load_weights(model, path, groups)
            logits = megatron_logits(model, groups, tokens_BS, vocab_size=VOCAB, micro_batch_size=1)
            if logits is not None and groups.tp_rank == 0:
                out[(*key, tp, pp)] = (logits, section.padded_vocab_size)
    return out


def test_converted_models_match_hf_logits(tmp_path):
    from rlad_megatron.conversion import convert_hf_to_megatron
    from rlad_megatron.models.equivalence import compare_logits, hf_logits

    tokens_BS = torch.randint(0, VOCAB, (BATCH, SEQ))
    sources, reference = {}, {}
    for model_type, tied in MODELS:
        hf_dir = save_tiny_hf(tmp_path / f"{model_type}_hf", model_type, tied=tied)
        meg_dir = tmp_path / f"{model_type}_meg"
        convert_hf_to_megatron(hf_dir=hf_dir, out_dir=meg_dir, tp=2, make_vocab_size_divisible_by=100)
        sources[(model_type, "meg")], sources[(model_type, "hf")] = meg_dir, hf_dir
        reference[model_type] = hf_logits(hf_dir, tokens_BS)

    results = {}
    for rank_out in run_distributed(_run, 2, args=(sources, tokens_BS)):
        results.update(rank_out)
    expected = {(m, src, tp, pp) for m, _ in MODELS for src in ("meg", "hf") for tp, pp in LAYOUTS
                if not (src == "hf" and tp == 1)}
    assert set(results) == expected
    padded = {(tp, pp): p for (_, _, tp, pp), (_, p) in results.items()}
    assert padded[(1, 1)] == 300 and padded[(2, 1)] == 400  # re-padded at load time
    for (model_type, src, tp, pp), (logits, _) in results.items():
        stats = compare_logits(reference[model_type], logits)
        assert stats["max_abs_diff"] < 1e-4, (model_type, src, tp, pp, stats)
