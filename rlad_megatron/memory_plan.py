"""Per-GPU memory of teacher + student, each at its own TP x PP, colocated on the same GPUs (DESIGN.md section 4).

    plan = plan_memory(load_config("run.yaml"), dp=4)
    print(format_plan(plan, gpu_memory_gib=80))

Pure arithmetic on the config tree (no process group; the objective says which models exist). The
world is the student's TP x PP x DP; the teacher runs its own TP_t x PP_t x DP_t over the same GPUs
(DP_t = world / (TP_t x PP_t)); the reference (beta > 0) is a copy of the student at its layout.
Every GPU of student stage r holds the same bytes (TP splits evenly, norms are replicated), so the
plan is per student stage. The teacher's stage on those GPUs: stage r when PP_t = PP (PP is the
outermost dimension of both grids, megatron's default order); otherwise each column adds the
teacher's largest stage, component by component: an upper bound.

Exact (tests/distributed/test_plan_memory_measured.py checks them against built models):
- parameters per rank: embedding on the first stage; final norm and output layer on the last
  (tied embeddings with PP > 1: the last stage keeps its own copy as the output layer); layers
  split evenly over PP; qkv/proj/fc1/fc2/embedding/output split over TP (each model at its own
  TP and padded vocabulary); MoE layers: the router replicated, each EP rank holding
  num_experts / EP experts, each TP-split like a dense MLP;
- student weights, the fp32 DDP gradient buffer (``grad_reduce_in_fp32``) and Adam state
  (exp_avg, exp_avg_sq, an fp32 master copy of 16-bit params), the Adam state divided over DP
  with ``parallel.use_distributed_optimizer`` (plus bucket padding: < 64 values per tensor);
- teacher (when the objective needs it) and reference (beta > 0) weights: persistent, or with
  ``teacher.offload`` / ``distill.reference_offload`` on the GPU only in the scoring phase
  (``offloaded_weights``, both counted together) and in pinned host memory (``host``, not in the peak);
- the rollout KV cache of megatron's ``StaticInferenceContext``: K and V ``[P + N, rows,
  groups/TP, kv_channels]`` per layer in the params dtype, rows = prompts_per_step * G / DP
  (at most ``rl.max_rollout_rows``).

Estimates. Activations per layer follow Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", no recompute): ``s*b*h*(10 + 24/t + 5*a*s/(h*t))``
bytes, ``s*b*h*(34 + 5*a*s/h)/t`` with sequence parallelism. The formula is derived for 16-bit
GPT layers with a 4h MLP and dropout, so it is approximate for SwiGLU/GQA without dropout; it is
scaled by dtype bytes / 2, and ``flash_attention`` drops the ``5*a*s/h`` attention-score term
(Transformer Engine does not store the scores). A micro-batch is ``rl.micro_batch_size`` rows at
full width s, or with ``rl.max_tokens_per_micro_batch`` max(budget, s) / s rows (fractional).
Logits are over ``rl.logprob_chunk_size`` positions at a time when set. Per phase of a step:
- rollout: the prefill's forward over all rows and the prompt, one layer at a time (no grad);
- scoring (teacher, then reference; forward only): one layer at a micro-batch plus that
  micro-batch's logits shard ``[b, s, V/TP]`` in the model's dtype (last stage), each at its own
  TP; the teacher's micro-batch holds at most its rows per GPU (the world's rollout / DP_t);
- training: the stage's layers for each micro-batch in flight (stage r of a 1F1B schedule
  holds up to PP - r), plus the micro-batch's float32 logits shard and one same-size float32
  buffer for the vocab-parallel loss backward (last stage);
- an objective that uses the teacher's logits (forward_kl) keeps the teacher's signal of the
  replica's rollout from scoring to training on the student's last stage: top-k ids (int32) and
  log-probs (float32), ``rows x s x k x 8``, or with ``distill.teacher_topk = 0`` its logits shard.
Not counted: the CUDA context and allocator fragmentation (typically 1-3 GiB), communication
buffers, the ``[rows, V]`` per-step sampling logits and small temporaries.

Peak of a stage = persistent (weights, gradients, optimizer state) + its largest phase.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlad_megatron.config import Config, ConfigError, ModelConfig, ModelSection, check_world
from rlad_megatron.objectives import build_objective

GIB = 1024 ** 3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Table rows in print order; the persistent ones live for the whole run.
PERSISTENT = ("student_weights", "student_grads", "student_optimizer", "teacher_weights", "reference_weights")
# The three phases of a step never overlap in time, except forward_kl's kept teacher signal,
# which is made while scoring and lives through training; offloaded frozen weights are on the GPU
# only while scoring.
PHASES = {
    "rollout": ("kv_cache", "prefill_activations"),
    "scoring": ("offloaded_weights", "scoring_activations", "scoring_logits", "teacher_logits_kept"),
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
    host: int = 0  # pinned host bytes of this GPU's offloaded frozen weights (not in the peak)

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
    # "student", "teacher", "reference" -> pp_rank of that model's own pipeline -> parameters on one
    # GPU; only the models built.
    params: dict[str, dict[int, ParamCount]]
    # The same models unsharded (vocab padded for this TP), for the headline.
    model_params: dict[str, int]
    stages: list[StageMemory] = field(default_factory=list)
    # The teacher's (TP, PP, DP) when it is built; paired: its stage r shares the GPUs of student
    # stage r (same PP); otherwise every column adds its largest stage (an upper bound).
    teacher: tuple[int, int, int] | None = None
    paired: bool = True
    offloaded: tuple[str, ...] = ()  # frozen models in host memory outside scoring

    @property
    def host_bytes(self) -> int:
        return max(s.host for s in self.stages)

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


def micro_batch_rows(cfg: Config, *, seq: int) -> int | float:
    """Rows of the largest micro-batch at full width ``seq`` (the worst case for memory).

    ``rl.micro_batch_size``; with a token budget (``rl.max_tokens_per_micro_batch``, which objectives
    using the teacher's logits ignore) ``max(budget, seq) / seq`` rows, fractional: the budget's tokens
    at full width, or one oversized row alone.
    """
    budget = token_budget(cfg)
    return max(budget, seq) / seq if budget else cfg.rl.micro_batch_size


def token_budget(cfg: Config) -> int:
    """``rl.max_tokens_per_micro_batch`` as the trainer applies it (0: off, as for forward_kl)."""
    return 0 if build_objective(cfg.distill).uses_teacher_logits else cfg.rl.max_tokens_per_micro_batch


def _frozen_stage(section: ModelSection, count: ParamCount, *, last: bool, rows: int | float, seq: int,
                  chunk: int, flash_attention: bool, norm_dtype_bytes: int | None) -> dict[str, int]:
    """Weights and scoring-phase bytes of one GPU of a frozen model's stage, at its own TP."""
    m, tp = section.model, section.parallel.tensor_model_parallel_size
    b = DTYPE_BYTES[m.params_dtype]
    positions = rows * (min(seq, chunk) if chunk else seq)  # logits computed at once (chunked: per chunk)
    return {"weights": weight_bytes(count, dtype_bytes=b, norm_bytes=norm_dtype_bytes or b),
            "scoring_activations": activation_bytes_per_layer(
                m, tp=tp, seq=seq, micro_batch=rows, sequence_parallel=section.parallel.sequence_parallel,
                flash_attention=flash_attention),
            "scoring_logits": int(positions * (section.padded_vocab_size // tp) * b) if last else 0}


def plan_memory(cfg: Config, *, dp: int = 1, flash_attention: bool = False,
                norm_dtype_bytes: int | None = None) -> MemoryPlan:
    """Bytes per GPU of every student pipeline stage for the run ``cfg`` at student data-parallel size ``dp``.

    The world is the student's TP x PP x ``dp``; the teacher runs its own TP x PP over the same GPUs.
    ``norm_dtype_bytes``: bytes of the RMSNorm weights; ``None`` means the params dtype
    (Transformer Engine on GPU); megatron-core's local spec without apex (the CPU path) uses 4.
    """
    _check_batching(cfg, dp)
    st, te, rl = cfg.student, cfg.teacher, cfg.rl
    tp, pp = st.parallel.tensor_model_parallel_size, st.parallel.pipeline_model_parallel_size
    world = tp * pp * dp
    check_world(cfg, world)
    tp_t, pp_t = te.parallel.tensor_model_parallel_size, te.parallel.pipeline_model_parallel_size
    dp_t = world // (tp_t * pp_t)
    for name, section, d in (("student", st, dp), ("teacher", te, dp_t)):
        ep = section.parallel.expert_model_parallel_size
        if d % ep:
            # megatron's expert grid: world = TP x PP x DP must be a multiple of TP x PP x EP.
            raise ConfigError(f"{name}.parallel.expert_model_parallel_size: expected a divisor of the "
                              f"data-parallel size {d}, got {ep}")
    objective = build_objective(cfg.distill)
    sections = {"student": st}
    if objective.needs_teacher:
        sections["teacher"] = te
    if objective.needs_reference:
        sections["reference"] = st
    offload = {"teacher": te.offload, "reference": cfg.distill.reference_offload}
    plan = MemoryPlan(tp=tp, pp=pp, dp=dp, params={k: param_counts(s) for k, s in sections.items()},
                      model_params={k: model_param_count(s) for k, s in sections.items()},
                      teacher=(tp_t, pp_t, dp_t) if "teacher" in sections else None, paired=pp_t == pp,
                      offloaded=tuple(k for k in sections if offload.get(k)))

    seq = cfg.data.max_prompt_length + rl.max_new_tokens
    total_rows = rl.prompts_per_step * rl.group_size
    rows = total_rows // dp
    kv_rows = min(rows, rl.max_rollout_rows) if rl.max_rollout_rows else rows
    micro = micro_batch_rows(cfg, seq=seq)
    # Micro-batches per update per replica (a token budget: at least one row each).
    in_flight_max = rl.mini_batch_size // dp // (1 if token_budget(cfg) else micro)
    chunk = 0 if objective.uses_teacher_logits else rl.logprob_chunk_size
    s_bytes = DTYPE_BYTES[st.model.params_dtype]

    def frozen(name: str, r: int) -> dict[str, int]:
        section = sections[name]
        n_stages = section.parallel.pipeline_model_parallel_size
        # The teacher's rows on one GPU: the whole world's rollout over its own DP (ceil: uneven splits).
        rows_here = rows if name == "reference" else -(-total_rows // dp_t)
        return _frozen_stage(section, plan.params[name][r], last=r == n_stages - 1, rows=min(micro, rows_here),
                             seq=seq, chunk=chunk, flash_attention=flash_attention,
                             norm_dtype_bytes=norm_dtype_bytes)

    teacher_stages = ({r: frozen("teacher", r) for r in range(pp_t)} if "teacher" in sections else {})
    for r in range(pp):
        last = r == pp - 1
        out = dict.fromkeys(COMPONENTS, 0)
        out.update(student_state_bytes(plan.params["student"][r], dtype_bytes=s_bytes,
                                       norm_bytes=norm_dtype_bytes or s_bytes, dp=dp,
                                       distributed_optimizer=st.parallel.use_distributed_optimizer,
                                       ep=st.parallel.expert_model_parallel_size))
        # Frozen models on these GPUs: the reference at the student's stage r; the teacher's stage r when both
        # have as many stages (PP outermost in both grids), else its largest stage, component by component.
        on_gpu = {}
        if teacher_stages:
            picked = [teacher_stages[r]] if plan.paired else list(teacher_stages.values())
            on_gpu["teacher"] = {k: max(t[k] for t in picked) for k in picked[0]}
        if "reference" in sections:
            on_gpu["reference"] = frozen("reference", r)
        host = 0
        for name, f in on_gpu.items():
            if offload[name]:
                out["offloaded_weights"] += f["weights"]
                host += f["weights"]
            else:
                out[f"{name}_weights"] = f["weights"]
        out["scoring_activations"] = max((f["scoring_activations"] for f in on_gpu.values()), default=0)
        out["scoring_logits"] = max((f["scoring_logits"] for f in on_gpu.values()), default=0)
        layers = st.model.num_layers // pp
        out["kv_cache"] = kv_cache_bytes(st.model, tp=tp, layers=layers, rows=kv_rows, seq=seq)
        out["prefill_activations"] = activation_bytes_per_layer(
            st.model, tp=tp, seq=cfg.data.max_prompt_length, micro_batch=kv_rows,
            sequence_parallel=st.parallel.sequence_parallel, flash_attention=flash_attention)
        out["activations"] = activation_bytes_per_layer(
            st.model, tp=tp, seq=seq, micro_batch=micro, sequence_parallel=st.parallel.sequence_parallel,
            flash_attention=flash_attention) * layers * min(pp - r, in_flight_max)
        if last:
            out["logits"] = int(2 * micro * (min(seq, chunk) if chunk else seq) * (st.padded_vocab_size // tp) * 4)
            if objective.uses_teacher_logits:
                out["teacher_logits_kept"] = teacher_signal_bytes(cfg, rows=rows, seq=seq)
        plan.stages.append(StageMemory(pp_rank=r, bytes=out, host=host))
    return plan


def teacher_signal_bytes(cfg: Config, *, rows: int, seq: int) -> int:
    """The teacher's signal kept from scoring to training on one GPU of the student's last stage.

    Top-k (``distill.teacher_topk`` = k >= 1, clipped to the vocabulary): int32 ids + float32
    log-probs, ``rows x seq x k x 8``; 0: the teacher's logits shard ``rows x seq x V/TP`` in its dtype.
    """
    k, te = cfg.distill.teacher_topk, cfg.teacher
    if k:
        return rows * seq * min(k, te.model.vocab_size) * 8
    shard = te.padded_vocab_size // te.parallel.tensor_model_parallel_size
    return rows * seq * shard * DTYPE_BYTES[te.model.params_dtype]


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M" if n >= 1e5 else str(n)


def format_plan(plan: MemoryPlan, *, gpu_memory_gib: float | None = None) -> str:
    """A table of GiB per GPU: components as rows, student pipeline stages as columns, then the verdict."""
    models = ", ".join(f"{k} {_count(v)} params" for k, v in plan.model_params.items())
    lines = [f"layout: TP={plan.tp} PP={plan.pp} DP={plan.dp} ({plan.tp * plan.pp * plan.dp} GPUs); {models}"]
    if plan.teacher is not None:
        tp_t, pp_t, dp_t = plan.teacher
        lines.append(f"teacher layout: TP={tp_t} PP={pp_t} DP={dp_t}" + (
            "" if plan.paired else f"; its {pp_t} stages do not line up with the student's {plan.pp}: each column "
                                   "adds the teacher's largest stage, component by component (an upper bound)"))
    if plan.offloaded:
        lines.append(f"offloaded to pinned host memory outside scoring: {', '.join(plan.offloaded)}")
    lines.append("per GPU, GiB (activations are an estimate; the rest is exact):")
    head = [f"stage {s.pp_rank}" for s in plan.stages]
    width = max(10, *(len(h) for h in head))

    def per_column(name: str) -> list[str]:
        counts = plan.params[name]
        if name == "teacher" and not plan.paired:
            return [_count(max(c.total for c in counts.values()))] * len(plan.stages)
        return [_count(counts[s.pp_rank].total) for s in plan.stages]

    rows = [("params/GPU " + k, per_column(k)) for k in plan.params]
    rows += [(k, [_gib(s.bytes[k]) for s in plan.stages]) for k in COMPONENTS]
    rows += [("= persistent", [_gib(s.persistent) for s in plan.stages])]
    rows += [(f"  {name} phase", [_gib(s.phase(name)) for s in plan.stages]) for name in PHASES]
    rows += [("= peak (persistent + largest phase)", [_gib(s.peak) for s in plan.stages]),
             ("  largest phase", [s.peak_phase for s in plan.stages])]
    if plan.offloaded:
        rows += [("host (pinned, not in the peak)", [_gib(s.host) for s in plan.stages])]
    label = max(len(r[0]) for r in rows)
    lines.append(" " * label + "".join(h.rjust(width + 2) for h in head))
    lines += [name.ljust(label) + "".join(v.rjust(width + 2) for v in values) for name, values in rows]
    if plan.offloaded:
        lines.append(f"host: {plan.host_bytes / GIB:.2f} GiB of pinned host memory per GPU "
                     f"({', '.join(plan.offloaded)} weights; not in the GPU peak)")
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
