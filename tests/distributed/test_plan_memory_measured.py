"""The memory planner against what megatron-core really allocates on small configs.

At world sizes 1, 2 and 4 (TP=1, TP=2, PP=2, TP=2 x PP=2, DP up to 2; tied and untied embeddings,
qkv bias, q/k layernorm, float32 and bfloat16, with and without the distributed optimizer, MoE
models with a dense layer at EP=2 and PP=2, and at world size 1 a few other model shapes) each
rank builds the student, wraps it with megatron DDP, builds the megatron optimizer, runs one
forward-backward and ``optimizer.step()`` (so Adam state exists), then one KV-cached
``generate()``. Per rank we compare with the planner:
- ``sum(p.numel())`` with ``param_count_per_rank``;
- bytes of the parameters, of the DDP fp32 gradient buffers and of the Adam state (exp_avg,
  exp_avg_sq, fp32 master copies) with ``student_state_bytes``;
- bytes of megatron's ``StaticInferenceContext.key_value_memory_dict`` with ``kv_cache_bytes``.
All layouts of one world size share one set of processes (rebuilding the model-parallel grid).
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.harness import run_distributed

VOCAB, PROMPT, NEW, SEQ = 30, 5, 3, 8
ROWS_PER_REPLICA, MICRO = 4, 2


def _config(case: dict):
    from rlad_megatron.config import (
        Config,
        DataConfig,
        DistillConfig,
        ModelConfig,
        ModelSection,
        ParallelConfig,
        RLConfig,
    )

    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                 vocab_size=VOCAB, make_vocab_size_divisible_by=8, max_position_embeddings=32)
    section = ModelSection(
        model=ModelConfig(**{**shape, **case["shape"]}, untie_embeddings_and_output_weights=not case["tied"],
                          add_qkv_bias=case["bias"], qk_layernorm=case["qkln"], params_dtype=case["dtype"]),
        parallel=ParallelConfig(tensor_model_parallel_size=case["tp"], pipeline_model_parallel_size=case["pp"],
                                use_distributed_optimizer=case["dist_opt"], expert_model_parallel_size=case["ep"]))
    rows = ROWS_PER_REPLICA * case["dp"]
    rl = RLConfig(prompts_per_step=rows // 2, group_size=2, max_new_tokens=NEW, mini_batch_size=rows,
                  micro_batch_size=MICRO)
    return Config(student=section, teacher=section, rl=rl, distill=DistillConfig(objective="grpo"),
                  data=DataConfig(max_prompt_length=PROMPT)).validate()


def _optimizer_bytes(optimizer) -> int:
    """exp_avg + exp_avg_sq + fp32 master copies of 16-bit parameters (this rank's shard)."""
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            # 'step' is one scalar per parameter tensor, not per element: the planner leaves it out.
            assert set(state) <= {"step", "exp_avg", "exp_avg_sq"}, set(state)
            total += sum(state[k].numel() * state[k].element_size() for k in ("exp_avg", "exp_avg_sq"))
        masters = getattr(opt, "shard_fp32_from_float16_groups", None) or getattr(opt, "fp32_from_float16_groups", [])
        total += sum(p.numel() * p.element_size() for group in masters for p in group)
    return total


def _measure_case(case: dict, world_size: int) -> dict:
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    import rlad_megatron.rl.rollout as rollout
    import rlad_megatron.rl.rollout_pool as rollout_pool
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.models.builder import build_gpt_model
    from rlad_megatron.models.forward import run_schedule
    from rlad_megatron.optim import build_optimizer, wrap_ddp

    cfg = _config(case)
    groups = initialize_model_parallel(tensor_model_parallel_size=case["tp"], pipeline_model_parallel_size=case["pp"],
                                       expert_model_parallel_size=case["ep"], seed=0)
    assert groups.dp_size == case["dp"], (groups.dp_size, case)
    cpu = torch.device("cpu")
    model = build_gpt_model(cfg.student, groups, device=cpu)
    params = list(model.parameters())
    out = dict(case=case, pp_rank=groups.pp_rank, tp_rank=groups.tp_rank, dp_rank=groups.dp_rank,
               params=sum(p.numel() for p in params),
               weight_bytes=sum(p.numel() * p.element_size() for p in params))

    model.config.finalize_model_grads_func = finalize_model_grads
    ddp = wrap_ddp(model, use_distributed_optimizer=case["dist_opt"], pg_collection=groups.collection)
    optimizer, _ = build_optimizer([ddp], cfg.optimizer, use_distributed_optimizer=case["dist_opt"], total_steps=10,
                                   pg_collection=groups.collection)
    gen = torch.Generator().manual_seed(11 + groups.dp_rank)
    tokens = torch.randint(0, VOCAB, (ROWS_PER_REPLICA, SEQ), generator=gen)
    micro = [{"tokens_BS": tokens[i:i + MICRO]} for i in range(0, ROWS_PER_REPLICA, MICRO)]

    def loss_fn(logits_BSV, mb):
        loss = logits_BSV.float().pow(2).mean()
        return loss, torch.tensor(1, dtype=torch.int), {"loss": loss.detach()}

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    run_schedule(model=ddp, micro_batches=micro, loss_fn=loss_fn, forward_only=False, device=cpu)
    stepped, _, _ = optimizer.step()
    assert stepped, "the optimizer skipped its step, so Adam state may be missing"
    buffers = ddp.buffers + ddp.expert_parallel_buffers
    out["grad_buffer_bytes"] = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
    out["main_grad_bytes"] = sum(p.main_grad.numel() * p.main_grad.element_size() for p in params)
    # The distributed optimizer pads each parameter start to 64 values and each bucket end to lcm(DP, 128).
    buckets = sum(len(b.buckets) for b in buffers)
    out["grad_padding_bound"] = 4 * (64 * len(params) + math.lcm(case["dp"], 128) * buckets)
    out["optimizer_bytes"] = _optimizer_bytes(optimizer)

    contexts = []

    # The row pool (rl/rollout_pool.py) builds the rollout's KV caches.
    class RecordingContext(rollout_pool.StaticInferenceContext):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            contexts.append(self)

    original, rollout_pool.StaticInferenceContext = rollout_pool.StaticInferenceContext, RecordingContext
    try:
        # Equal prompt lengths and no EOS: every row stays in the cache, so no compaction shrinks it.
        prompts = [[1 + (i + j) % (VOCAB - 1) for j in range(PROMPT)] for i in range(ROWS_PER_REPLICA)]
        batch = rollout.generate(model=ddp.module, groups=groups, prompts=prompts, max_new_tokens=NEW,
                                 temperature=1.0, eos_id=None, pad_id=0, vocab_size=VOCAB,
                                 generator=torch.Generator().manual_seed(3))
    finally:
        rollout_pool.StaticInferenceContext = original
    assert batch.tokens_BL.shape == (ROWS_PER_REPLICA, PROMPT + NEW)
    (context,) = contexts
    out["kv_layers"] = len(context.key_value_memory_dict)
    out["kv_bytes"] = sum(t.numel() * t.element_size() for kv in context.key_value_memory_dict.values() for t in kv)
    return out


def _measure(rank, world_size, cases):
    return [_measure_case(case, world_size) for case in cases]


def _case(tp, pp, dp, *, tied=False, bias=False, qkln=False, dtype="float32", dist_opt=False, ep=1, **shape):
    return dict(tp=tp, pp=pp, dp=dp, tied=tied, bias=bias, qkln=qkln, dtype=dtype, dist_opt=dist_opt, ep=ep,
                shape=shape)


# Qwen3-MoE-shaped: 4 experts of FFN 32, layer 1 dense (mlp_only_layers).
MOE = dict(num_experts=4, moe_ffn_hidden_size=32, moe_layer_pattern="10")


LAYOUTS = {
    # World 1 also covers other shapes: kv_channels != hidden/heads, groups == heads, odd sizes.
    1: [_case(1, 1, 1), _case(1, 1, 1, tied=True, bias=True, qkln=True, dtype="bfloat16"),
        _case(1, 1, 1, kv_channels=32, num_query_groups=4, qkln=True),
        _case(1, 1, 1, num_layers=3, ffn_hidden_size=96, vocab_size=50, tied=True)],
    2: [_case(2, 1, 1, bias=True, qkln=True), _case(1, 2, 1, tied=True, dtype="bfloat16"),
        _case(1, 1, 2, dtype="bfloat16", dist_opt=True),
        _case(1, 1, 2, ep=2, qkln=True, dist_opt=True, **MOE), _case(1, 2, 1, dtype="bfloat16", **MOE)],
    4: [_case(2, 2, 1, qkln=True), _case(2, 2, 1, tied=True, bias=True, dtype="bfloat16"),
        _case(1, 2, 2, tied=True, dist_opt=True), _case(2, 1, 2, qkln=True, dtype="bfloat16", dist_opt=True)],
}


@pytest.mark.parametrize("world_size", sorted(LAYOUTS))
def test_planner_matches_allocated_memory(world_size):
    from rlad_megatron.memory_plan import (
        DTYPE_BYTES,
        kv_cache_bytes,
        param_count_per_rank,
        param_counts,
        student_state_bytes,
    )

    results = run_distributed(_measure, world_size, args=(LAYOUTS[world_size],))
    for i, case in enumerate(LAYOUTS[world_size]):
        cfg = _config(case)
        per_rank = [r[i] for r in results]
        for r in per_rank:
            where = f"{case} pp_rank={r['pp_rank']} tp_rank={r['tp_rank']} dp_rank={r['dp_rank']}"
            assert r["params"] == param_count_per_rank(cfg.student)[r["pp_rank"]], where
            # megatron-core's local spec without apex keeps RMSNorm weights in float32 (see memory_plan).
            planned = student_state_bytes(param_counts(cfg.student)[r["pp_rank"]],
                                          dtype_bytes=DTYPE_BYTES[case["dtype"]], norm_bytes=4, dp=case["dp"],
                                          distributed_optimizer=case["dist_opt"], ep=case["ep"])
            assert r["weight_bytes"] == planned["student_weights"], where
            assert r["main_grad_bytes"] == planned["student_grads"], where
            padding = r["grad_buffer_bytes"] - planned["student_grads"]
            if case["dist_opt"]:
                assert 0 <= padding <= r["grad_padding_bound"], (where, padding)
                # Each DP rank owns a slice of the padded buffer; the slices cover every parameter once.
                assert abs(r["optimizer_bytes"] - planned["student_optimizer"]) <= 3 * r["grad_padding_bound"], where
            else:
                assert padding == 0, where
                assert r["optimizer_bytes"] == planned["student_optimizer"], where
            assert r["kv_layers"] == cfg.student.model.num_layers // case["pp"], where
            assert r["kv_bytes"] == kv_cache_bytes(cfg.student.model, tp=case["tp"], layers=r["kv_layers"],
                                                   rows=ROWS_PER_REPLICA, seq=PROMPT + NEW), where
        if case["dist_opt"] and case["ep"] == 1:  # with EP, DP ranks hold different experts
            for pp_rank in range(case["pp"]):
                stage_full = student_state_bytes(
                    param_counts(cfg.student)[pp_rank], dtype_bytes=DTYPE_BYTES[case["dtype"]], norm_bytes=4,
                    dp=1, distributed_optimizer=False)["student_optimizer"]
                for tp_rank in range(case["tp"]):
                    replicas = [r for r in per_rank if (r["pp_rank"], r["tp_rank"]) == (pp_rank, tp_rank)]
                    assert len(replicas) == case["dp"]
                    assert sum(r["optimizer_bytes"] for r in replicas) == stage_full, (case, pp_rank, tp_rank)
