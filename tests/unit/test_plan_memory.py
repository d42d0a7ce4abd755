"""The memory planner: hand-computed counts and bytes, phases, the CLI.

Built megatron-core models (parameter counts at TP=1 and at TP/PP/DP layouts, allocated bytes)
are compared with the planner in tests/distributed/test_plan_memory_measured.py; that needs
spawned processes, and one spawn costs more than this whole file.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest

from rlad_megatron.config import (
    Config,
    ConfigError,
    DataConfig,
    DistillConfig,
    ModelConfig,
    ModelSection,
    ParallelConfig,
    RLConfig,
)
from rlad_megatron.memory_plan import (
    GIB,
    activation_bytes_per_layer,
    format_plan,
    kv_cache_bytes,
    model_param_count,
    param_count_per_rank,
    param_counts,
    plan_memory,
    student_state_bytes,
)

ROOT = Path(__file__).resolve().parents[2]
TINY_YAML = ROOT / "launch" / "configs" / "tiny_cpu.yaml"


def _section(tp=1, pp=1, **model) -> ModelSection:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                vocab_size=30, make_vocab_size_divisible_by=8)
    return ModelSection(model=ModelConfig(**{**base, **model}),
                        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))


def _config(section: ModelSection, *, objective="rlad", beta=0.0, teacher_topk=None, teacher=None, **rl) -> Config:
    # teacher_topk None: 0 when the teacher shares the student's section (forward_kl keeps the full logits
    # shard, the numbers before top-k), else the default 64; the top-k signal is tested with it set.
    if teacher_topk is None:
        teacher_topk = 0 if teacher is None else DistillConfig().teacher_topk
    rl_cfg = RLConfig(**{**dict(prompts_per_step=4, group_size=4, max_new_tokens=32, mini_batch_size=16,
                                micro_batch_size=4), **rl})
    return Config(student=section, teacher=teacher or section, rl=rl_cfg,
                  distill=DistillConfig(objective=objective, beta=beta, teacher_topk=teacher_topk),
                  data=DataConfig(max_prompt_length=128)).validate()


# Per layer at TP=1: qkv (64 + 2*32) x 64 = 8192, proj 4096, fc1 2*128 x 64 = 16384, fc2 8192, norms 2*64.
LAYER_TP1 = 8192 + 4096 + 16384 + 8192 + 128
TABLE_TP1 = 32 * 64  # padded vocab 32 x hidden 64


def test_param_counts_by_hand():
    assert param_count_per_rank(_section()) == {0: 2 * LAYER_TP1 + TABLE_TP1 + 64 + TABLE_TP1}
    assert param_count_per_rank(_section(untie_embeddings_and_output_weights=False)) == {0: 2 * LAYER_TP1
                                                                                          + TABLE_TP1 + 64}
    # qkv bias: 128 per layer; q/k norms: 2 x kv_channels 16 per layer.
    assert param_count_per_rank(_section(add_qkv_bias=True, qk_layernorm=True)) == {
        0: 2 * (LAYER_TP1 + 128 + 32) + 2 * TABLE_TP1 + 64}
    # TP=2 x PP=2: one layer per stage, matrices halved, norms replicated; the padded vocab stays 32.
    layer_tp2 = (LAYER_TP1 - 128) // 2 + 128
    for tied in (False, True):
        counts = param_counts(_section(2, 2, untie_embeddings_and_output_weights=not tied))
        # Tied and PP > 1: the last stage holds its own copy of the embedding as the output layer.
        assert {r: c.total for r, c in counts.items()} == {0: layer_tp2 + TABLE_TP1 // 2,
                                                           1: layer_tp2 + 64 + TABLE_TP1 // 2}
        assert {r: c.norms for r, c in counts.items()} == {0: 128, 1: 128 + 64}
    # kv_channels need not be hidden/heads: 4 heads x 32 + 2 groups x 2 x 32 = 256 qkv rows, proj 128 x 64.
    assert param_count_per_rank(_section(kv_channels=32, num_layers=1)) == {
        0: 256 * 64 + 64 * 128 + 16384 + 8192 + 128 + 2 * TABLE_TP1 + 64}


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_shards_add_up_to_the_whole_model(tp):
    # vocab 32 is a multiple of 8 * tp for tp <= 4, so every layout pads to the same table.
    section = _section(tp, 1, vocab_size=32, num_query_groups=4, add_qkv_bias=True, qk_layernorm=True)
    (count,) = param_counts(section).values()
    whole = model_param_count(section)
    assert tp * count.total - (tp - 1) * count.norms == whole
    assert whole == param_count_per_rank(dataclasses.replace(section, parallel=ParallelConfig()))[0]


def test_student_state_bytes():
    count = param_counts(_section())[0]
    n, norms = count.total, count.norms
    fp32 = student_state_bytes(count, dtype_bytes=4, norm_bytes=4, dp=1, distributed_optimizer=False)
    assert fp32 == {"student_weights": 4 * n, "student_grads": 4 * n, "student_optimizer": 8 * n}
    # bf16 with float32 norms (the CPU local spec): only 16-bit params get an fp32 master copy.
    bf16 = student_state_bytes(count, dtype_bytes=2, norm_bytes=4, dp=1, distributed_optimizer=False)
    assert bf16 == {"student_weights": 2 * (n - norms) + 4 * norms, "student_grads": 4 * n,
                    "student_optimizer": 12 * (n - norms) + 8 * norms}
    sharded = student_state_bytes(count, dtype_bytes=2, norm_bytes=2, dp=4, distributed_optimizer=True)
    assert sharded["student_optimizer"] == 12 * n // 4 and sharded["student_grads"] == 4 * n


def test_kv_cache_and_activation_formulas_by_hand():
    m = _section().model  # float32, 2 groups x kv_channels 16
    assert kv_cache_bytes(m, tp=1, layers=2, rows=16, seq=160) == 2 * 2 * 16 * 160 * 2 * 16 * 4
    assert kv_cache_bytes(m, tp=2, layers=1, rows=16, seq=160) == 2 * 1 * 16 * 160 * 1 * 16 * 4
    # s=160, b=4, h=64, a=4, t=1: 10 + 24 + 5*4*160/64 = 84 bytes per s*b*h at 16 bits; float32 doubles it.
    assert activation_bytes_per_layer(m, tp=1, seq=160, micro_batch=4, sequence_parallel=False,
                                      flash_attention=False) == 160 * 4 * 64 * 84 * 2
    # t=2: 10 + 12 + 25 = 47; with sequence parallelism (34 + 50) / 2 = 42; flash attention drops 25.
    kw = dict(seq=160, micro_batch=4, tp=2)
    assert activation_bytes_per_layer(m, sequence_parallel=False, flash_attention=False, **kw) == 160 * 4 * 64 * 47 * 2
    assert activation_bytes_per_layer(m, sequence_parallel=True, flash_attention=False, **kw) == 160 * 4 * 64 * 42 * 2
    assert activation_bytes_per_layer(m, sequence_parallel=False, flash_attention=True, **kw) == 160 * 4 * 64 * 22 * 2


def test_plan_components_follow_the_objective():
    section = _section(1, 2)
    grpo = plan_memory(_config(section, objective="grpo"))
    assert set(grpo.params) == {"student"}
    assert all(s.bytes["teacher_weights"] == 0 == s.bytes["reference_weights"] for s in grpo.stages)
    rlad_ref = plan_memory(_config(section, objective="rlad", beta=0.1))
    assert set(rlad_ref.params) == {"student", "teacher", "reference"}
    for s in rlad_ref.stages:
        assert s.bytes["reference_weights"] == s.bytes["student_weights"] > 0
    fkl = plan_memory(_config(section, objective="forward_kl"), dp=2)
    first, last = fkl.stages
    rows, seq = 4 * 4 // 2, 128 + 32
    assert last.bytes["teacher_logits_kept"] == rows * seq * 32 * 4
    assert last.bytes["logits"] == 2 * 4 * seq * 32 * 4
    assert first.bytes["logits"] == first.bytes["teacher_logits_kept"] == 0
    assert first.bytes["kv_cache"] == last.bytes["kv_cache"] == kv_cache_bytes(section.model, tp=1, layers=1,
                                                                               rows=rows, seq=seq)
    # The prefill runs all rows over the prompt, one layer at a time; scoring one layer of a micro-batch.
    layer = dict(tp=1, sequence_parallel=False, flash_attention=False)
    assert first.bytes["prefill_activations"] == activation_bytes_per_layer(section.model, seq=128, micro_batch=rows,
                                                                            **layer)
    assert first.bytes["scoring_activations"] == activation_bytes_per_layer(section.model, seq=seq, micro_batch=4,
                                                                            **layer)
    assert last.bytes["scoring_logits"] == 4 * seq * 32 * 4 and first.bytes["scoring_logits"] == 0
    # forward_kl's kept teacher logits count in both phases they live through.
    assert last.phase("scoring") == (last.bytes["scoring_activations"] + last.bytes["scoring_logits"]
                                     + last.bytes["teacher_logits_kept"])
    assert last.phase("training") == (last.bytes["activations"] + last.bytes["logits"]
                                      + last.bytes["teacher_logits_kept"])
    assert all(s.bytes["scoring_activations"] == s.bytes["scoring_logits"] == 0 for s in grpo.stages)


def test_peak_and_pipeline_in_flight_micro_batches():
    section = _section(1, 2, num_layers=4)
    plan = plan_memory(_config(section, mini_batch_size=16, micro_batch_size=2))  # 8 micro-batches per update
    per_layer = activation_bytes_per_layer(section.model, tp=1, seq=160, micro_batch=2, sequence_parallel=False,
                                           flash_attention=False)
    # 1F1B: stage 0 holds PP = 2 micro-batches in flight, the last stage one.
    assert [s.bytes["activations"] for s in plan.stages] == [2 * 2 * per_layer, 2 * per_layer]
    for s in plan.stages:
        phases = {"rollout": s.bytes["kv_cache"] + s.bytes["prefill_activations"],
                  "scoring": s.bytes["scoring_activations"] + s.bytes["scoring_logits"],
                  "training": s.bytes["activations"] + s.bytes["logits"]}
        assert {name: s.phase(name) for name in phases} == phases
        assert s.peak == s.persistent + max(phases.values()) and s.phase(s.peak_phase) == max(phases.values())
        assert s.persistent == sum(s.bytes[k] for k in ("student_weights", "student_grads", "student_optimizer",
                                                        "teacher_weights", "reference_weights"))
    assert plan.peak_bytes == max(s.peak for s in plan.stages) == plan.worst.peak
    # One micro-batch per update: a single micro-batch is ever in flight, whatever the stage.
    single = plan_memory(_config(section, mini_batch_size=4, micro_batch_size=4))
    assert len({s.bytes["activations"] for s in single.stages}) == 1


def test_layouts_that_cannot_start_name_the_field():
    cfg = _config(_section(), prompts_per_step=6, group_size=2, mini_batch_size=12, micro_batch_size=2)
    with pytest.raises(ConfigError, match=r"^rl\.prompts_per_step: .*data-parallel size 4"):
        plan_memory(cfg, dp=4)
    with pytest.raises(ConfigError, match=r"^rl\.micro_batch_size: .*per-replica mini-batch 4"):
        plan_memory(_config(_section(), mini_batch_size=16, micro_batch_size=8), dp=4)
    with pytest.raises(ConfigError, match=r"^dp: expected >= 1"):
        plan_memory(cfg, dp=0)


def _main(argv, capsys):
    from tools.plan_memory import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_prints_a_table_and_the_verdict(capsys):
    rc, out, err = _main([TINY_YAML, "--dp", "2", "--rl.group_size=8"], capsys)
    assert rc == 0 and err == ""
    assert "layout: TP=2 PP=1 DP=2 (4 GPUs)" in out and "= peak" in out and "fits: peak" in out
    rc, out, _ = _main([TINY_YAML, "--gpu-memory-gib=0.001"], capsys)
    assert rc == 0 and "does NOT fit: stage 0 needs" in out


@pytest.mark.parametrize("args,field", [
    (["--student.model.num_layers=0"], "student.model.num_layers"),
    (["--rl.group_size"], "rl.group_size"),
    (["--dp", "three"], "--dp"),
    (["--dp=0"], "--dp"),
    (["--gpu-memory-gib"], "--gpu-memory-gib"),
    (["--dp", "3"], "rl.prompts_per_step"),
])
def test_cli_bad_input_exits_1_naming_the_field(capsys, args, field):
    rc, out, err = _main([TINY_YAML, *args], capsys)
    assert rc == 1 and out == ""
    assert err.startswith("error: ") and field in err and err.count("\n") == 1, err


def test_cli_docstring_example_fits_a_70b_teacher_in_80_gib(capsys):
    import tools.plan_memory as tool

    example = tool.__doc__.split("    python tools/plan_memory.py ")[-1].replace("\\\n", " ")
    args = shlex.split(example)
    rc, out, err = _main([ROOT / args[0], *args[1:]], capsys)
    assert rc == 0, err
    assert "TP=8 PP=4 DP=1 (32 GPUs)" in out and "teacher 70.95B params" in out
    peak = float(out.split("fits: peak ")[1].split(" GiB")[0])
    # Teacher weights alone are 70.95B x 2 bytes over 32 GPUs (~4.1 GiB); the peak must exceed them.
    assert 70.95e9 * 2 / 32 / GIB < peak < 80


def test_format_plan_lists_every_stage():
    text = format_plan(plan_memory(_config(_section(1, 2))), gpu_memory_gib=None)
    assert "stage 0" in text and "stage 1" in text and "fits" not in text


# ---------------------------------------------------------------- the teacher at its own layout


def _teacher(tp=1, pp=1, *, offload=False) -> ModelSection:
    """A larger teacher (4 layers, hidden 128), its own TP x PP, same true vocabulary (30)."""
    section = _section(tp, pp, num_layers=4, hidden_size=128, ffn_hidden_size=256)
    return dataclasses.replace(section, offload=offload)


ROWS, SEQ = 4 * 4 // 2, 128 + 32  # rows per student replica at DP=2, prompt + new tokens


def test_teacher_at_its_own_tp_and_pp():
    student = _section(1, 2)  # world = 1 x 2 x DP 2 = 4 GPUs
    layer = dict(seq=SEQ, micro_batch=4, sequence_parallel=False, flash_attention=False)
    # TP=2 x PP=1 (DP_t=2): one teacher stage, on every GPU; padded vocab 32 at TP=2 -> shard 16.
    teacher = _teacher(2, 1)
    plan = plan_memory(_config(student, teacher=teacher), dp=2)
    assert plan.teacher == (2, 1, 2) and not plan.paired and set(plan.params["teacher"]) == {0}
    count = param_counts(teacher)[0]
    for s in plan.stages:
        assert s.bytes["teacher_weights"] == 4 * count.total
        assert s.bytes["scoring_activations"] == activation_bytes_per_layer(teacher.model, tp=2, **layer)
        assert s.bytes["scoring_logits"] == 4 * SEQ * 16 * 4  # the teacher's last stage may be on any GPU
    # Both at PP=2 (teacher TP=2): stage r of each on the same GPUs, exact per stage.
    teacher = _teacher(2, 2)
    paired = plan_memory(_config(student, teacher=teacher), dp=2)
    assert paired.paired and paired.teacher == (2, 2, 1)
    counts = param_counts(teacher)
    assert [s.bytes["teacher_weights"] for s in paired.stages] == [4 * counts[r].total for r in (0, 1)]
    assert [s.bytes["scoring_logits"] for s in paired.stages] == [0, 4 * SEQ * 16 * 4]
    # PP=4 vs the student's 2: every column takes the teacher's largest stage, component by component.
    teacher = _teacher(1, 4)
    bound = plan_memory(_config(student, teacher=teacher), dp=2)
    biggest = max(c.total for c in param_counts(teacher).values())
    assert not bound.paired and all(s.bytes["teacher_weights"] == 4 * biggest for s in bound.stages)
    assert all(s.bytes["scoring_logits"] == 4 * SEQ * 32 * 4 for s in bound.stages)
    text = format_plan(bound, gpu_memory_gib=80)
    assert "teacher layout: TP=1 PP=4 DP=1" in text and "upper bound" in text


def test_teacher_grid_must_divide_the_world():
    with pytest.raises(ConfigError, match=r"^teacher\.parallel: .*divide the world size 2"):
        plan_memory(_config(_section(1, 1), teacher=_teacher(1, 4)), dp=2)


@pytest.mark.parametrize("tp_t,pp_t", [(1, 2), (2, 1), (1, 4)])
def test_offload_moves_exactly_the_teacher_weights_out_of_the_persistent_bytes(tp_t, pp_t):
    student = _section(1, 2)
    kept = plan_memory(_config(student, teacher=_teacher(tp_t, pp_t)), dp=2)
    moved = plan_memory(_config(student, teacher=_teacher(tp_t, pp_t, offload=True)), dp=2)
    assert moved.offloaded == ("teacher",) and kept.offloaded == () and kept.host_bytes == 0
    for a, b in zip(kept.stages, moved.stages):
        w = a.bytes["teacher_weights"]
        assert w > 0 and b.bytes["teacher_weights"] == 0
        assert a.persistent - b.persistent == w == b.bytes["offloaded_weights"] == b.host
        assert b.phase("scoring") == a.phase("scoring") + w  # on the GPU only while scoring
        assert b.phase("rollout") == a.phase("rollout") and b.phase("training") == a.phase("training")
    assert moved.host_bytes == max(s.bytes["teacher_weights"] for s in kept.stages)
    assert "host: " in format_plan(moved) and "host" not in format_plan(kept)


def test_reference_offload():
    student = _section(1, 2)
    cfg = _config(student, beta=0.1)
    kept, moved = plan_memory(cfg), plan_memory(dataclasses.replace(
        cfg, distill=dataclasses.replace(cfg.distill, reference_offload=True)))
    assert moved.offloaded == ("reference",)
    for a, b in zip(kept.stages, moved.stages):
        assert a.persistent - b.persistent == a.bytes["reference_weights"] == b.host == b.bytes["offloaded_weights"]


@pytest.mark.parametrize("teacher", [None, _teacher(2, 1)], ids=["shared-layout", "own-layout"])
def test_topk_signal_is_rows_x_seq_x_k_x_8(teacher):
    student = _section(1, 2)
    plan = plan_memory(_config(student, objective="forward_kl", teacher_topk=16, teacher=teacher), dp=2)
    first, last = plan.stages
    # int32 ids + float32 log-probs of the top 16, every position of the replica's rollout, on the last stage.
    assert last.bytes["teacher_logits_kept"] == ROWS * SEQ * 16 * 8 and first.bytes["teacher_logits_kept"] == 0
    assert last.phase("scoring") - last.bytes["teacher_logits_kept"] == (last.bytes["offloaded_weights"]
                                                                        + last.bytes["scoring_activations"]
                                                                        + last.bytes["scoring_logits"])
    # k past the vocabulary (30) is clipped to it.
    clipped = plan_memory(_config(student, objective="forward_kl", teacher_topk=64, teacher=teacher), dp=2)
    assert clipped.stages[-1].bytes["teacher_logits_kept"] == ROWS * SEQ * 30 * 8
    # Objectives that use only the teacher's log-probs keep nothing.
    rlad = plan_memory(_config(student, objective="rlad", teacher_topk=16, teacher=teacher), dp=2)
    assert all(s.bytes["teacher_logits_kept"] == 0 for s in rlad.stages)


def test_token_budget_and_chunked_logits():
    student = _section(1, 1)
    base = plan_memory(_config(student, mini_batch_size=16, micro_batch_size=4))
    # 480 tokens at width 160: 3 full rows (the budget's worst case), logits 64 positions at a time per row.
    budget = plan_memory(_config(student, mini_batch_size=16, micro_batch_size=4, max_tokens_per_micro_batch=480,
                                 logprob_chunk_size=64))
    (s0,), (s1,) = base.stages, budget.stages
    per_row = activation_bytes_per_layer(student.model, tp=1, seq=SEQ, micro_batch=1, sequence_parallel=False,
                                         flash_attention=False)
    assert s0.bytes["activations"] == 2 * 4 * per_row and s1.bytes["activations"] == 2 * 3 * per_row
    assert s1.bytes["logits"] == 2 * 3 * 64 * 32 * 4 and s1.bytes["scoring_logits"] == 3 * 64 * 32 * 4
    # Bounded rollout rows bound the KV cache (8 of 16 rows at once).
    pool = plan_memory(_config(student, max_rollout_rows=8))
    assert pool.stages[0].bytes["kv_cache"] == base.stages[0].bytes["kv_cache"] // 2
