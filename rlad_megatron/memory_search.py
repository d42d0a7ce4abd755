"""Layout search: student and teacher TP x PP over a cluster, the ones that fit, ranked by a cost proxy.

    found = search_layouts(load_config("run.yaml"), nodes=2, gpus_per_node=8, gpu_memory_gib=80)
    print(format_search(found, top=5))

Enumerates, over world = nodes x gpus_per_node GPUs:
- student TP in the divisors of gpus_per_node up to 8 (tensor parallelism stays inside a node), PP a
  divisor of its layers with TP x PP dividing the world, DP = world / (TP x PP);
- the same for the teacher (TP_t, PP_t; DP_t = world / (TP_t x PP_t)), each with and without
  ``teacher.offload`` (one teacher layout when the objective builds no teacher);
keeps the layouts the config accepts (its own validation: heads, query groups, FFN and layers
divisible; ``check_world``; prompts_per_step and mini_batch_size divisible by DP and micro-batches
by the per-replica mini-batch, as :func:`plan_memory` checks) whose worst stage peak fits in
``gpu_memory_gib``, and sorts them by :func:`step_cost`. Everything else (EP, sequence
parallelism, the distributed optimizer, reference_offload) stays as the config sets it.

The cost proxy (:func:`step_cost`) ranks layouts; it is not a step-time prediction. Seconds at
``PROXY_FLOPS`` per GPU for:
- the student's update: 6 x params x tokens x epochs_per_rollout / GPUs;
- the reference's and the teacher's forward (when built): 2 x params x tokens / GPUs;
each x (1 + ``TP_PENALTY`` x log2 TP) for TP communication and x (1 + (PP - 1) / m) for the pipeline
bubble, m = micro-batches per pipeline (per update for the student, per rollout when scoring);
plus, at ``PROXY_HBM_BYTES`` per GPU, the rollout's decode, which is memory-bound: each of the
max_new_tokens steps reads every stage's student weights and half its KV cache (the mean fill),
stage after stage, x (1 + ``TP_PENALTY`` x log2 TP); plus the offloaded weights copied host ->
device once a step at ``PROXY_HOST_BYTES`` per GPU (frozen weights are never copied back).
tokens = prompts_per_step x group_size x (max_prompt_length + max_new_tokens), every row at full
length. Not in the proxy: DP gradient reduction, pipeline point-to-point traffic, decode latency
(kernel launches, small all-reduces), shorter responses.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from rlad_megatron.config import Config, ConfigError, ModelSection
from rlad_megatron.memory_plan import GIB, MemoryPlan, micro_batch_rows, plan_memory, token_budget
from rlad_megatron.objectives import build_objective

PROXY_FLOPS = 400e12  # achieved 16-bit FLOP/s per GPU the proxy assumes
PROXY_HOST_BYTES = 25e9  # pinned host -> device bytes/s per GPU
PROXY_HBM_BYTES = 3e12  # device memory bytes/s per GPU (decode is bound by it)
TP_PENALTY = 0.1  # +10 % per doubling of TP (all-reduces in every layer)
MAX_TP = 8


@dataclass(frozen=True)
class Candidate:
    """One layout that fits: (TP, PP, DP) of the student and of the teacher (``plan.teacher`` is None
    when the objective builds no teacher; its layout then only has to be valid)."""

    student: tuple[int, int, int]
    teacher: tuple[int, int, int]
    offload: bool
    plan: MemoryPlan
    cost: float  # proxy seconds per step (step_cost)

    def overrides(self) -> list[str]:
        """Config overrides selecting this layout (plus ``dp=student[2]`` for plan_memory)."""
        out = [f"--student.parallel.tensor_model_parallel_size={self.student[0]}",
               f"--student.parallel.pipeline_model_parallel_size={self.student[1]}"]
        return out + [f"--teacher.parallel.tensor_model_parallel_size={self.teacher[0]}",
                      f"--teacher.parallel.pipeline_model_parallel_size={self.teacher[1]}",
                      f"--teacher.offload={str(self.offload).lower()}"]


@dataclass
class SearchResult:
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    valid: int  # layouts the config accepts
    fits: list[Candidate]  # those that fit, cheapest first


def _grids(section: ModelSection, *, world: int, gpus_per_node: int) -> list[tuple[int, int]]:
    """(TP, PP) with TP a divisor of gpus_per_node up to MAX_TP, PP a divisor of the layers, TP x PP | world."""
    layers = section.model.num_layers
    return [(tp, pp) for tp in range(1, min(gpus_per_node, MAX_TP) + 1) if gpus_per_node % tp == 0
            for pp in range(1, layers + 1) if layers % pp == 0 and world % (tp * pp) == 0]


def _with_layout(section: ModelSection, tp: int, pp: int, **extra) -> ModelSection:
    parallel = dataclasses.replace(section.parallel, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return dataclasses.replace(section, parallel=parallel, **extra)


def _tp_pp_factor(tp: int, pp: int, micro_batches: float) -> float:
    return (1 + TP_PENALTY * math.log2(tp)) * (1 + (pp - 1) / max(1.0, micro_batches))


def step_cost(cfg: Config, plan: MemoryPlan) -> float:
    """The ranking proxy in seconds per step (module docstring); not a step-time prediction."""
    rl = cfg.rl
    seq = cfg.data.max_prompt_length + rl.max_new_tokens
    total_rows = rl.prompts_per_step * rl.group_size
    tokens = total_rows * seq
    world = plan.tp * plan.pp * plan.dp
    # Full-width rows per micro-batch (a token budget: how many fit), for the bubble's micro-batch count.
    rows_per_micro = max(1, int(micro_batch_rows(cfg, seq=seq))) if token_budget(cfg) else rl.micro_batch_size
    update_micro = rl.mini_batch_size / plan.dp / rows_per_micro
    p_s = plan.model_params["student"]
    flops = 6 * p_s * tokens * rl.epochs_per_rollout / world * _tp_pp_factor(plan.tp, plan.pp, update_micro)
    if "reference" in plan.params:
        flops += 2 * p_s * tokens / world * _tp_pp_factor(plan.tp, plan.pp, total_rows / plan.dp / rows_per_micro)
    if plan.teacher is not None:
        tp_t, pp_t, dp_t = plan.teacher
        flops += (2 * plan.model_params["teacher"] * tokens / world
                  * _tp_pp_factor(tp_t, pp_t, total_rows / dp_t / rows_per_micro))
    # Decode: every new token reads each stage's weights and (on average) half its KV cache, stage after stage.
    read = max(s.bytes["student_weights"] + s.bytes["kv_cache"] / 2 for s in plan.stages)
    decode = rl.max_new_tokens * plan.pp * read * (1 + TP_PENALTY * math.log2(plan.tp))
    offloaded = max(s.bytes["offloaded_weights"] for s in plan.stages)
    return flops / PROXY_FLOPS + decode / PROXY_HBM_BYTES + offloaded / PROXY_HOST_BYTES


def search_layouts(cfg: Config, *, nodes: int, gpus_per_node: int, gpu_memory_gib: float,
                   flash_attention: bool = False, norm_dtype_bytes: int | None = None) -> SearchResult:
    """Every valid student x teacher layout (and teacher offload) on the cluster; those that fit, cheapest first."""
    for key, value in (("--nodes", nodes), ("--gpus-per-node", gpus_per_node), ("--gpu-memory-gib", gpu_memory_gib)):
        if value <= 0:
            raise ConfigError(f"{key}: expected a positive number, got {value}")
    world = nodes * gpus_per_node
    needs_teacher = build_objective(cfg.distill).needs_teacher
    teacher_grids = _grids(cfg.teacher, world=world, gpus_per_node=gpus_per_node)
    valid, fits = 0, []
    for tp, pp in _grids(cfg.student, world=world, gpus_per_node=gpus_per_node):
        dp, found = world // (tp * pp), False
        for tp_t, pp_t in teacher_grids:
            if found and not needs_teacher:
                break  # the teacher is not built: one valid teacher layout stands for all
            for offload in ((False, True) if needs_teacher else (False,)):
                try:
                    trial = dataclasses.replace(cfg, student=_with_layout(cfg.student, tp, pp),
                                                teacher=_with_layout(cfg.teacher, tp_t, pp_t, offload=offload))
                    plan = plan_memory(trial.validate(), dp=dp, flash_attention=flash_attention,
                                       norm_dtype_bytes=norm_dtype_bytes)
                except ConfigError:
                    continue
                valid, found = valid + 1, True
                if plan.peak_bytes <= gpu_memory_gib * GIB:
                    fits.append(Candidate(student=(tp, pp, dp), teacher=(tp_t, pp_t, world // (tp_t * pp_t)),
                                          offload=offload, plan=plan, cost=step_cost(trial, plan)))
    fits.sort(key=lambda c: (c.cost, c.plan.peak_bytes))
    return SearchResult(nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory_gib=gpu_memory_gib, valid=valid,
                        fits=fits)


def format_search(result: SearchResult, *, top: int = 5) -> str:
    world = result.nodes * result.gpus_per_node
    lines = [f"layout search: {result.nodes} node{'s' if result.nodes > 1 else ''} x {result.gpus_per_node} GPUs "
             f"= {world} GPUs, {result.gpu_memory_gib:g} GiB per GPU: {result.valid} valid layouts, "
             f"{len(result.fits)} fit",
             f"ranked by a cost proxy, not a step-time prediction (docs/memory.md): the student's update "
             f"(6 x params x tokens) and the teacher/reference forward (2 x params x tokens) per GPU at "
             f"{PROXY_FLOPS / 1e12:g} TFLOP/s, x (1 + {TP_PENALTY:g} log2 TP) x (1 + (PP-1)/micro-batches);",
             f"+ the rollout's decode (per new token, every stage's weights and half its KV cache at "
             f"{PROXY_HBM_BYTES / 1e12:g} TB/s) + offloaded weights copied in at {PROXY_HOST_BYTES / 1e9:g} GB/s"]
    if not result.fits:
        lines.append("no layout fits")
        return "\n".join(lines)
    header = ("#", "student TP PP DP", "teacher TP PP DP", "offload", "peak GiB", "stage", "phase", "host GiB",
              "proxy s")
    table = []
    for i, c in enumerate(result.fits[:top], 1):
        worst = c.plan.worst
        teacher = " ".join(f"{x if c.plan.teacher else '-':>2}" for x in c.teacher)
        table.append((str(i), " ".join(f"{x:>2}" for x in c.student), teacher, "yes" if c.offload else "no",
                      f"{worst.peak / GIB:.2f}", str(worst.pp_rank), worst.peak_phase,
                      f"{c.plan.host_bytes / GIB:.2f}", f"{c.cost:.4g}"))
    widths = [max(len(row[j]) for row in (header, *table)) for j in range(len(header))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in (header, *table)]
    if result.fits[0].plan.teacher is None:
        lines.append("the objective builds no teacher: its layout is not searched")
    best = result.fits[0]
    lines.append(f"plan the best: {' '.join(best.overrides())} --dp {best.student[2]}")
    return "\n".join(lines)
