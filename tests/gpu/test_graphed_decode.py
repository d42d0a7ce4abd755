"""Graphed decode on CUDA (generate(cuda_graphs=True)) gives megatron's eager tokens; skipped without CUDA.

float32, so the captured fixed-shape step (sampling included) and megatron's step agree to rounding:
tokens equal, log-probs close, for one batch and for the row pool, greedy, sampled and top-p.
"""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_graphed_decode_matches_eager_on_cuda():
    import os

    import torch.distributed as dist

    from rlad_megatron.config import ModelConfig, ModelSection
    from rlad_megatron.distributed import destroy_model_parallel, init_distributed, initialize_model_parallel
    from rlad_megatron.distributed.init import free_port
    from rlad_megatron.models.builder import build_gpt_model
    from rlad_megatron.rl.rollout import generate, repeat_prompts, rollout_row_seeds

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    world = init_distributed("cuda")
    try:
        groups = initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=0)
        section = ModelSection(model=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                                                 num_query_groups=2, ffn_hidden_size=128, vocab_size=250,
                                                 make_vocab_size_divisible_by=8, init_method_std=0.3))
        model = build_gpt_model(section, groups, device=world.device)
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
        prompts = [torch.randint(1, 250, (int(n),), generator=gen).tolist() for n in (2, 6, 3, 5)]
        rows = repeat_prompts(prompts, group_size=4)
        seeds = rollout_row_seeds(seed=1, step=0, prompt_indices=range(4), group_size=4)
        base = dict(model=model, groups=groups, prompts=rows, max_new_tokens=24, pad_id=0,
                    vocab_size=250, generator=None, row_seeds=seeds)
        # Sampling runs inside the graph: greedy, the seeded inverse CDF, and top-p's sort.
        for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (1.0, 0.9)):
            free = generate(temperature=temperature, top_p=top_p, eos_id=None, **base)
            eos = int(torch.bincount(torch.cat([torch.tensor(r) for r in free.responses()])).argmax())
            for max_rows in (None, 4):
                kw = dict(base, temperature=temperature, top_p=top_p, eos_id=eos, max_rows=max_rows)
                eager = generate(**kw)
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    graphed = generate(cuda_graphs=True, **kw)
                assert not [w for w in caught if "cuda_graphs" in str(w.message)], "fell back to eager on CUDA"
                assert graphed.stats.graph_captures > 0 and graphed.stats.fixed_shape_steps > 0
                assert graphed.stats.graph_capture_s > 0
                torch.testing.assert_close(graphed.tokens_BL, eager.tokens_BL, rtol=0, atol=0)
                torch.testing.assert_close(graphed.logprobs_BL, eager.logprobs_BL, rtol=1e-4, atol=1e-4)
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()
