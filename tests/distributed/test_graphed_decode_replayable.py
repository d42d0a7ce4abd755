"""The fixed-shape decode step is replayable as a CUDA graph: checked on CPU, op by op.

A CUDA graph replays the kernels of one captured step with the arguments they had then. The step
is replayable only if, for a cohort of a given size and cache length, every step dispatches the
same ops with the same non-tensor arguments and tensor shapes (a Python int derived from ``pos``,
a shape that depends on the data or a tensor built from Python values would be baked in at capture
and be wrong at the next replay), and if none of its ops synchronises with the host (capture
forbids it: ``item``, ``nonzero``, boolean indexing, ``repeat_interleave`` by a tensor). On CPU the
step runs eagerly, so the CPU rollout tests check its values but not this; here every aten op the
step body dispatches is recorded under a ``TorchDispatchMode`` (TP=2, so the logits gather is in
the trace; greedy and sampled with top-p; one cohort and the pool's several, compacted) and each
(rows, cache length) group of steps must have one trace, free of host-synchronising ops.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.harness import run_distributed
from tests.helpers import rollout_model_section, spreading_eos

VOCAB, PAD, NEW, GROUP = 250, 0, 12, 4

# Ops whose CUDA kernels copy a value to the host (or size their output by the data): capture forbids them.
HOST_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select", "_unique2",
                 "unique_dim", "unique_consecutive", "bincount", "repeat_interleave"}


_PLAIN = (bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


def _describe(x):
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.dtype)
    if isinstance(x, (list, tuple)):
        return type(x).__name__, tuple(_describe(v) for v in x)
    if x is None or isinstance(x, _PLAIN):
        return x
    return type(x).__name__  # process groups and other opaque objects: fixed for the run


class _Trace(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((str(func), _host_sync(func, args), _describe(args), _describe(sorted(kwargs.items()))))
        return func(*args, **kwargs)


def _host_sync(func, args) -> str | None:
    """Why this op would synchronise with the host on CUDA, or None."""
    name = func.overloadpacket.__name__
    if name in HOST_SYNC_OPS:
        return name
    if name == "lift_fresh" and args[0].dim() > 0:  # torch.tensor(python list): a host-to-device copy
        return "torch.tensor of Python data"
    if name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
        # ATen turns x[mask] = <one-element CPU value> into masked_fill_ (canDispatchToMaskedFill; megatron's
        # vocab-parallel embedding does this at TP > 1); any other boolean index needs nonzero.
        if not (name == "index_put_" and args[2].numel() == 1 and args[2].device.type == "cpu"):
            return "boolean index"
    return None


def _run(rank, world_size, prompts, seed):
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.models.builder import build_gpt_model
    from rlad_megatron.rl import graphed_decode
    from rlad_megatron.rl.rollout import generate, repeat_prompts, rollout_row_seeds

    groups = initialize_model_parallel(tensor_model_parallel_size=world_size, pipeline_model_parallel_size=1,
                                       seed=seed)
    model = build_gpt_model(rollout_model_section(world_size, 1, vocab_size=VOCAB, num_layers=2), groups,
                            device=torch.device("cpu"))
    rows = repeat_prompts(prompts, group_size=GROUP)
    seeds = rollout_row_seeds(seed=seed, step=1, prompt_indices=range(len(prompts)), group_size=GROUP)
    traces: dict[tuple, list[list[tuple]]] = defaultdict(list)
    body = graphed_decode._step_body

    def traced(model, sample, memory, ids_b1, *args):
        with _Trace() as trace:
            out = body(model, sample, memory, ids_b1, *args)
        cache_length = next(iter(memory.values()))[0].shape[0]
        traces[(current, max_rows, ids_b1.shape[0], cache_length)].append(trace.ops)
        return out

    def gen(**kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "runs eagerly" on CPU
            return generate(model=model, groups=groups, prompts=rows, max_new_tokens=NEW, pad_id=PAD,
                            vocab_size=VOCAB, generator=None, row_seeds=seeds, cuda_graphs=True, **kw)

    for current in ("greedy", "sampled"):
        sampling = dict(temperature=0.0, top_p=1.0) if current == "greedy" else dict(temperature=1.0, top_p=0.9)
        # An EOS the model emits often: rows finish at different steps and cohorts shrink to smaller buckets.
        eos_id = spreading_eos(gen(eos_id=None, **sampling))
        graphed_decode._step_body = traced
        try:
            for max_rows in (None, len(rows) // 4):
                gen(eos_id=eos_id, max_rows=max_rows, **sampling)
        finally:
            graphed_decode._step_body = body
    return dict(traces)


def _first_difference(ops, first) -> str:
    for j, (a, b) in enumerate(zip(ops, first, strict=False)):
        if a != b:
            return f"op {j}: {a} vs {b}"
    return f"{len(ops)} ops vs {len(first)}"


def test_fixed_shape_step_replays_one_trace_without_host_syncs():
    seed = int(torch.randint(0, 2**31 - 1, ()))
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(4, VOCAB, (n,), generator=gen).tolist() for n in (2, 5, 3, 6)]
    traces = run_distributed(_run, 2, args=(prompts, seed))[0]
    assert {key[0] for key in traces} == {"greedy", "sampled"}
    assert any(len(steps) > 1 for steps in traces.values())
    for mode in ("greedy", "sampled"):  # the one-batch cohort was compacted to a smaller bucket at least once
        assert len({rows for m, max_rows, rows, _ in traces if m == mode and max_rows is None}) > 1, sorted(traces)
    for key, steps in traces.items():
        first = steps[0]
        assert any("all_gather" in op[0] or "allgather" in op[0] for op in first), f"{key}: no TP logits gather"
        for i, ops in enumerate(steps[1:], start=1):
            assert ops == first, f"{key}: step {i} differs from step 0: {_first_difference(ops, first)}"
        syncing = {f"{op[0]} ({op[1]})" for op in first if op[1]}
        assert not syncing, f"{key}: host-synchronising ops in the step: {sorted(syncing)}"
