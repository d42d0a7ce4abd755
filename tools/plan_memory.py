"""Estimate per-GPU memory of teacher + student at a TP x PP x DP layout, before renting nodes.

    python tools/plan_memory.py CONFIG [--section.key=value ...] [--dp N] [--gpu-memory-gib 80]
                                [--flash-attention]
    python tools/plan_memory.py CONFIG [--section.key=value ...] --search --nodes 2 [--gpus-per-node 8]
                                [--gpu-memory-gib 80] [--top 5] [--flash-attention]

Prints GiB per GPU for each pipeline stage (student weights, fp32 grads, Adam state, teacher and
reference weights, rollout KV cache, training activations and logits) and whether the worst
stage fits in ``--gpu-memory-gib``. ``--dp`` is the student's data-parallel size; the teacher
runs its own ``teacher.parallel`` TP x PP over the same GPUs. Activations are an estimate
(Korthikanti et al. 2022); ``--flash-attention`` drops the stored attention scores (Transformer
Engine). See docs/memory.md.

``--search`` replaces the config's student and teacher TP/PP (and ``teacher.offload``) by every
layout of ``--nodes`` x ``--gpus-per-node`` GPUs the config accepts, and prints the ``--top``
that fit in ``--gpu-memory-gib``, ranked by a cost proxy (rlad_megatron/memory_search.py).
Exits 1 with a one-line message naming the option or field on bad input; 0 otherwise, fit or not.

Example: a 71B teacher (Llama-3-70B shape with a 152k vocabulary and qkv bias) and a 6.9B student at
TP=8 x PP=4 (32 GPUs, DP=1); ``--teacher.model.num_layers=112`` makes the teacher ~99B:

    python tools/plan_memory.py launch/configs/tiny_cpu.yaml \\
        --teacher.model.num_layers=80 --teacher.model.hidden_size=8192 \\
        --teacher.model.num_attention_heads=64 --teacher.model.num_query_groups=8 \\
        --teacher.model.ffn_hidden_size=28672 --teacher.model.add_qkv_bias=true \\
        --student.model.num_layers=32 --student.model.hidden_size=4096 \\
        --student.model.num_attention_heads=32 --student.model.num_query_groups=8 \\
        --student.model.ffn_hidden_size=11008 \\
        --teacher.model.vocab_size=152064 --student.model.vocab_size=152064 \\
        --teacher.model.make_vocab_size_divisible_by=128 --student.model.make_vocab_size_divisible_by=128 \\
        --teacher.model.params_dtype=bfloat16 --student.model.params_dtype=bfloat16 \\
        --teacher.parallel.tensor_model_parallel_size=8 --student.parallel.tensor_model_parallel_size=8 \\
        --teacher.parallel.pipeline_model_parallel_size=4 --student.parallel.pipeline_model_parallel_size=4 \\
        --rl.prompts_per_step=32 --rl.group_size=8 --rl.max_new_tokens=2048 --data.max_prompt_length=512 \\
        --rl.mini_batch_size=64 --rl.micro_batch_size=1 --dp 1 --gpu-memory-gib 80 --flash-attention
"""

from __future__ import annotations

import sys

from rlad_megatron.config import ConfigError, load_config
from rlad_megatron.memory_plan import format_plan, plan_memory
from rlad_megatron.memory_search import format_search, search_layouts

_FLAGS = {"--dp": int, "--gpu-memory-gib": float, "--nodes": int, "--gpus-per-node": int, "--top": int}
_SEARCH_ONLY = ("--nodes", "--gpus-per-node", "--top")


def _split_args(argv: list[str]) -> tuple[list[str], dict]:
    """(config overrides, tool options): the numeric options take ``=V`` or a separate value."""
    overrides: list[str] = []
    opts: dict = {"dp": 1, "gpu_memory_gib": 80.0, "flash_attention": False, "search": False,
                  "gpus_per_node": 8, "top": 5}
    given: set[str] = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, sep, value = arg.partition("=")
        if arg in ("--flash-attention", "--search"):
            opts[arg[2:].replace("-", "_")] = True
        elif name in _FLAGS:
            if not sep:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name}: option has no value")
                i += 1
                value = argv[i]
            kind = _FLAGS[name]
            try:
                parsed = kind(value)
            except ValueError:
                raise ConfigError(f"{name}: expected {'an integer' if kind is int else 'a number'}, "
                                  f"got {value!r}") from None
            if parsed <= 0:
                raise ConfigError(f"{name}: expected a positive number, got {value!r}")
            opts[name[2:].replace("-", "_")] = parsed
            given.add(name)
        else:
            overrides.append(arg)
        i += 1
    if opts["search"]:
        if "--dp" in given:
            raise ConfigError("--dp: not used with --search (the search chooses the student's DP)")
        if "--nodes" not in given:
            raise ConfigError("--nodes: required with --search")
    elif given & set(_SEARCH_ONLY):
        raise ConfigError(f"{sorted(given & set(_SEARCH_ONLY))[0]}: only used with --search")
    return overrides, opts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        overrides, opts = _split_args(argv[1:])
        cfg = load_config(argv[0], overrides)
        if opts["search"]:
            found = search_layouts(cfg, nodes=opts["nodes"], gpus_per_node=opts["gpus_per_node"],
                                   gpu_memory_gib=opts["gpu_memory_gib"], flash_attention=opts["flash_attention"])
            text = format_search(found, top=opts["top"])
        else:
            plan = plan_memory(cfg, dp=opts["dp"], flash_attention=opts["flash_attention"])
            text = format_plan(plan, gpu_memory_gib=opts["gpu_memory_gib"])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(text)
    return 0

if __name__ == "__main__":
    sys.exit(main())
