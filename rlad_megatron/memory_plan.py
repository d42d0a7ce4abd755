"""Per-GPU memory of teacher + student at a TP x PP x DP layout (DESIGN.md section 4).

    plan = plan_memory(load_config("run.yaml"), dp=4)
    print(format_plan(plan, gpu_memory_gib=80))

Pure arithmetic on the config tree (no process group; the objective says which models exist). Every GPU of stage r
holds the same bytes (TP splits evenly, norms are replicated), so the plan is per stage.

Exact (tests/distributed/test_plan_memory_measured.py checks them against built models):
- parameters per rank: embedding on the first stage; final norm and output layer on the last
  (tied embeddings with PP > 1: the last stage keeps its own copy as the output layer); layers
  split evenly over PP; qkv/proj/fc1/fc2/embedding/output split over TP; MoE layers: the router
  replicated, each EP rank holding num_experts / EP experts, each TP-split like a dense MLP;
- student weights, the fp32 DDP gradient buffer (``grad_reduce_in_fp32``) and Adam state
  (exp_avg, exp_avg_sq, an fp32 master copy of 16-bit params), the Adam state divided over DP
  with ``parallel.use_distributed_optimizer`` (plus bucket padding: < 64 values per tensor);
- teacher (when the objective needs it) and reference (beta > 0) weights;
- the rollout KV cache of megatron's ``StaticInferenceContext``: K and V ``[P + N, rows,
  groups/TP, kv_channels]`` per layer in the params dtype, rows = prompts_per_step * G / DP.

Estimates. Activations per layer follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", no recompute): ``s*b*h*(10 + 24/t + 5*a*s/(h*t))``
bytes, ``s*b*h*(34 + 5*a*s/h)/t`` with sequence parallelism. The formula is derived for 16-bit
GPT layers with a 4h MLP and dropout, so it is approximate for SwiGLU/GQA without dropout; it is
scaled by dtype bytes / 2, and ``flash_attention`` drops the ``5*a*s/h`` attention-score term
(Transformer Engine does not store the scores). Per phase of a step:
- rollout: the prefill's forward over all rows and the prompt, one layer at a time (no grad);
- scoring (teacher, then reference; forward only): one layer at a micro-batch plus that
  micro-batch's logits shard ``[b, s, V/TP]`` in the model's dtype (last stage);
- training: the stage's layers for each micro-batch in flight (stage r of a 1F1B schedule
  holds up to PP - r), plus the micro-batch's float32 logits shard and one same-size float32
  buffer for the vocab-parallel loss backward (last stage);
- an objective that uses the teacher's logits (forward_kl) keeps the teacher's logits shard of the whole
  rollout from scoring to training.
Not counted: the CUDA context and allocator fragmentation (typically 1-3 GiB), communication
buffers, the ``[rows, V]`` per-step sampling logits and small temporaries.

Peak of a stage = persistent (weights, gradients, optimizer state) + its largest phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlad_megatron.config import Config, ConfigError, ModelConfig, ModelSection
from rlad_megatron.objectives import build_objective

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Table rows in print order; the persistent ones live for the whole run.
PERSISTENT = ("student_weights", "student_grads", "student_optimizer", "teacher_weights", "reference_weights")
# The three phases of a step never overlap in time, except forward_kl's kept teacher logits,
# which are made while scoring and live through training.
PHASES = {
    "rollout": ("kv_cache", "prefill_activations"),
    "scoring": ("scoring_activations", "scoring_logits", "teacher_logits_kept"),
    "training": ("activations", "logits", "teacher_logits_kept"),
}
COMPONENTS = PERSISTENT + tuple(dict.fromkeys(k for phase in PHASES.values() for k in phase))


@dataclass(frozen=True)
class ParamCount:
    """Parameters on one GPU of one pipeline stage."""

    total: int
    # Replicated RMSNorm weights (included in ``total``); megatron-core's local spec without apex
    # builds them as torch norms in float32 whatever params_dtype is.
    norms: int
    # Routed-expert weights (included in ``total``): their gradients reduce over expert-DP, not DP.
    experts: int = 0


@dataclass
class StageMemory:
    pp_rank: int
    bytes: dict[str, int]  # component -> bytes on one GPU of this stage

    @property
    def persistent(self) -> int:
        return sum(self.bytes[k] for k in PERSISTENT)

    def phase(self, name: str) -> int:
        return sum(self.bytes[k] for k in PHASES[name])

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase)

    @property
    def peak(self) -> int:
        return self.persistent + self.phase(self.peak_phase)


@dataclass
class MemoryPlan:
    tp: int
    pp: int
    dp: int
    # "student", "teacher", "reference" -> pp_rank -> parameters on one GPU; only the models built.
    params: dict[str, dict[int, ParamCount]]
    # The same models unsharded (vocab padded for this TP), for the headline.
    model_params: dict[str, int]
    stages: list[StageMemory] = field(default_factory=list)

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.peak)

    @property
    def peak_bytes(self) -> int:
        return self.worst.peak


def _mlp_params(ffn: int, h: int, tp: int) -> int:
    return 2 * ffn // tp * h + h * ffn // tp  # linear_fc1 (SwiGLU gate and up) + linear_fc2


def _layer_params(m: ModelConfig, tp: int, *, moe: bool = False, ep: int = 1) -> ParamCount:
    kv = m.kv_channels or m.hidden_size // m.num_attention_heads
    h, q, kv_size = m.hidden_size, m.num_attention_heads * kv, m.num_query_groups * kv
    qkv_out = (q + 2 * kv_size) // tp
    sharded = (qkv_out * h + (qkv_out if m.add_qkv_bias else 0)  # linear_qkv (column parallel)
               + h * q // tp)  # linear_proj (row parallel)
    norms = 2 * h + (2 * kv if m.qk_layernorm else 0)  # input/pre-MLP norms, per-head q/k norms
    if not moe:
        return ParamCount(total=sharded + _mlp_params(m.ffn_hidden_size, h, tp) + norms, norms=norms)
    experts = m.num_experts // ep * _mlp_params(m.expert_ffn_hidden_size, h, tp)
    router = m.num_experts * h  # replicated over TP and EP
    return ParamCount(total=sharded + router + experts + norms, norms=norms, experts=experts)


def _stage_params(m: ModelConfig, *, tp: int, pp: int, padded_vocab: int, pp_rank: int, ep: int = 1) -> ParamCount:
    per_stage = m.num_layers // pp
    moe_layers = m.moe_layers[pp_rank * per_stage:(pp_rank + 1) * per_stage]
    counts = [_layer_params(m, tp, moe=moe, ep=ep) for moe in moe_layers]
    total, norms = sum(c.total for c in counts), sum(c.norms for c in counts)
    experts = sum(c.experts for c in counts)
    table = padded_vocab // tp * m.hidden_size
    if pp_rank == 0:
        total += table
    if pp_rank == pp - 1:
        total += m.hidden_size
        norms += m.hidden_size
        # Tied and PP == 1: the output layer reuses the embedding; tied and PP > 1: the last stage
        # keeps its own copy (megatron syncs the two through the embedding group).
        if m.untie_embeddings_and_output_weights or pp > 1:
            total += table
    return ParamCount(total=total, norms=norms, experts=experts)


def param_counts(section: ModelSection) -> dict[int, ParamCount]:
    """pp_rank -> parameters (and the replicated norms among them) on one GPU of that stage."""
    p = section.parallel
    return {r: _stage_params(section.model, tp=p.tensor_model_parallel_size, pp=p.pipeline_model_parallel_size,
                             padded_vocab=section.padded_vocab_size, pp_rank=r, ep=p.expert_model_parallel_size)
            for r in range(p.pipeline_model_parallel_size)}


def param_count_per_rank(section: ModelSection) -> dict[int, int]:
    """pp_rank -> ``sum(p.numel())`` of the stage megatron-core builds on each TP rank of it."""
    return {r: c.total for r, c in param_counts(section).items()}


def model_param_count(section: ModelSection) -> int:
    """The unsharded model (at this layout's padded vocabulary), tied weights counted once."""
    return _stage_params(section.model, tp=1, pp=1, padded_vocab=section.padded_vocab_size, pp_rank=0).total


def student_state_bytes(count: ParamCount, *, dtype_bytes: int, norm_bytes: int, dp: int,
                        distributed_optimizer: bool, ep: int = 1) -> dict[str, int]:
    """Weights, fp32 gradient buffer and Adam state of the student on one GPU."""
    # exp_avg + exp_avg_sq in float32, plus an fp32 master copy of every 16-bit parameter.
    def adam(n: int, b: int) -> int:
        return n * (8 + (4 if b < 4 else 0))

    dense = adam(count.total - count.norms - count.experts, dtype_bytes) + adam(count.norms, norm_bytes)
    experts = adam(count.experts, dtype_bytes)
    # The distributed optimizer shards dense state over DP, expert state over expert-DP = DP / EP.
    optimizer = -(-dense // dp) + -(-experts // (dp // ep)) if distributed_optimizer else dense + experts
    return {"student_weights": weight_bytes(count, dtype_bytes=dtype_bytes, norm_bytes=norm_bytes),
            # grad_reduce_in_fp32: the DDP buffer is float32 whatever the params dtype.
            "student_grads": 4 * count.total,
            "student_optimizer": optimizer}


def weight_bytes(count: ParamCount, *, dtype_bytes: int, norm_bytes: int) -> int:
    return (count.total - count.norms) * dtype_bytes + count.norms * norm_bytes


def kv_cache_bytes(m: ModelConfig, *, tp: int, layers: int, rows: int, seq: int) -> int:
    """K and V buffers of ``layers`` attention layers for ``rows`` sequences of ``seq`` positions."""
    kv = m.kv_channels or m.hidden_size // m.num_attention_heads
    return 2 * layers * rows * seq * (m.num_query_groups // tp) * kv * DTYPE_BYTES[m.params_dtype]


def activation_bytes_per_layer(m: ModelConfig, *, tp: int, seq: int, micro_batch: int, sequence_parallel: bool,
                               flash_attention: bool) -> int:
    """Korthikanti et al. 2022, no recompute (an estimate; see the module docstring)."""
    s, b, h, a = seq, micro_batch, m.hidden_size, m.num_attention_heads
    scores = 0.0 if flash_attention else 5 * a * s / h
    per_token = (34 + scores) / tp if sequence_parallel and tp > 1 else 10 + 24 / tp + scores / tp
    return int(s * b * h * per_token * DTYPE_BYTES[m.params_dtype] / 2)


def _check_batching(cfg: Config, dp: int) -> None:
    rl = cfg.rl
    if dp < 1:
        raise ConfigError(f"dp: expected >= 1, got {dp}")
    # The trainer's own checks, so a plan is never made for a layout that cannot start.
    for key, total in (("prompts_per_step", rl.prompts_per_step), ("mini_batch_size", rl.mini_batch_size)):
        if total % dp:
            raise ConfigError(f"rl.{key}: expected a multiple of the data-parallel size {dp}, got {total}")
    if (rl.mini_batch_size // dp) % rl.micro_batch_size:
        raise ConfigError(f"rl.micro_batch_size: expected a divisor of the per-replica mini-batch "
                          f"{rl.mini_batch_size // dp}, got {rl.micro_batch_size}")


def plan_memory(cfg: Config, *, dp: int = 1, flash_attention: bool = False,
                norm_dtype_bytes: int | None = None) -> MemoryPlan:
    """Bytes per GPU of every pipeline stage for the run ``cfg`` at data-parallel size ``dp``.

    ``norm_dtype_bytes``: bytes of the RMSNorm weights; ``None`` means the params dtype
    (Transformer Engine on GPU); megatron-core's local spec without apex (the CPU path) uses 4.
    """
    _check_batching(cfg, dp)
    st, te, rl = cfg.student, cfg.teacher, cfg.rl
    for name, section in (("student", st), ("teacher", te)):
        ep = section.parallel.expert_model_parallel_size
        if dp % ep:
            # megatron's expert grid: world = TP x PP x DP must be a multiple of TP x PP x EP.
            raise ConfigError(f"{name}.parallel.expert_model_parallel_size: expected a divisor of the "
                              f"data-parallel size {dp}, got {ep}")
    tp, pp = st.parallel.tensor_model_parallel_size, st.parallel.pipeline_model_parallel_size
    objective = build_objective(cfg.distill)
    sections = {"student": st}
    if objective.needs_teacher:
        sections["teacher"] = te
    if objective.needs_reference:
        sections["reference"] = st
    plan = MemoryPlan(tp=tp, pp=pp, dp=dp, params={k: param_counts(s) for k, s in sections.items()},
                      model_params={k: model_param_count(s) for k, s in sections.items()})

    seq = cfg.data.max_prompt_length + rl.max_new_tokens
    rows = rl.prompts_per_step * rl.group_size // dp
    micro = rl.micro_batch_size
    in_flight_max = rl.mini_batch_size // dp // micro
    vocab_local = st.padded_vocab_size // tp

    def one_layer(section: ModelSection, *, s: int, b: int) -> int:
        return activation_bytes_per_layer(section.model, tp=tp, seq=s, micro_batch=b,
                                          sequence_parallel=section.parallel.sequence_parallel,
                                          flash_attention=flash_attention)

    s_bytes = DTYPE_BYTES[st.model.params_dtype]
    frozen = [sections[k] for k in ("teacher", "reference") if k in sections]
    for r in range(pp):
        last = r == pp - 1
        out = dict.fromkeys(COMPONENTS, 0)
        out.update(student_state_bytes(plan.params["student"][r], dtype_bytes=s_bytes,
                                       norm_bytes=norm_dtype_bytes or s_bytes, dp=dp,
                                       distributed_optimizer=st.parallel.use_distributed_optimizer,
                                       ep=st.parallel.expert_model_parallel_size))
        for name in ("teacher", "reference"):
            if name in sections:
                b = DTYPE_BYTES[sections[name].model.params_dtype]
                out[f"{name}_weights"] = weight_bytes(plan.params[name][r], dtype_bytes=b,
                                                      norm_bytes=norm_dtype_bytes or b)
        layers = st.model.num_layers // pp
        out["kv_cache"] = kv_cache_bytes(st.model, tp=tp, layers=layers, rows=rows, seq=seq)
        out["prefill_activations"] = one_layer(st, s=cfg.data.max_prompt_length, b=rows)
        out["scoring_activations"] = max((one_layer(f, s=seq, b=micro) for f in frozen), default=0)
        out["activations"] = one_layer(st, s=seq, b=micro) * layers * min(pp - r, in_flight_max)
        if last:
            out["scoring_logits"] = max((micro * seq * vocab_local * DTYPE_BYTES[f.model.params_dtype]
                                         for f in frozen), default=0)
            out["logits"] = 2 * micro * seq * vocab_local * 4
            if objective.uses_teacher_logits:
                out["teacher_logits_kept"] = rows * seq * vocab_local * DTYPE_BYTES[te.model.params_dtype]
        plan.stages.append(StageMemory(pp_rank=r, bytes=out))
    return plan


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


def format_plan(plan: MemoryPlan, *, gpu_memory_gib: float | None = None) -> str:
    """A table of GiB per GPU: components as rows, pipeline stages as columns, then the verdict."""
    models = ", ".join(f"{k} {_count(v)} params" for k, v in plan.model_params.items())
    lines = [f"layout: TP={plan.tp} PP={plan.pp} DP={plan.dp} ({plan.tp * plan.pp * plan.dp} GPUs); {models}",
             "per GPU, GiB (activations are an estimate; the rest is exact):"]
    head = [f"stage {s.pp_rank}" for s in plan.stages]
    width = max(10, *(len(h) for h in head))
    rows = [("params/GPU " + k, [_count(plan.params[k][s.pp_rank].total) for s in plan.stages])
            for k in plan.params]
    rows += [(k, [_gib(s.bytes[k]) for s in plan.stages]) for k in COMPONENTS]
    rows += [("= persistent", [_gib(s.persistent) for s in plan.stages])]
    rows += [(f"  {name} phase", [_gib(s.phase(name)) for s in plan.stages]) for name in PHASES]
    rows += [("= peak (persistent + largest phase)", [_gib(s.peak) for s in plan.stages]),
             ("  largest phase", [s.peak_phase for s in plan.stages])]
    label = max(len(r[0]) for r in rows)
    lines.append(" " * label + "".join(h.rjust(width + 2) for h in head))
    lines += [name.ljust(label) + "".join(v.rjust(width + 2) for v in values) for name, values in rows]
    worst = plan.worst
    if gpu_memory_gib is not None:
        need = worst.peak / GIB
        verdict = (f"fits: peak {need:.2f} GiB on stage {worst.pp_rank} ({worst.peak_phase}) <= "
                   f"{gpu_memory_gib:g} GiB per GPU"
                   if need <= gpu_memory_gib else
                   f"does NOT fit: stage {worst.pp_rank} needs {need:.2f} GiB ({worst.peak_phase}) > "
                   f"{gpu_memory_gib:g} GiB per GPU")
        lines.append(verdict)
    return "\n".join(lines)
