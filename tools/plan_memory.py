"""Estimate per-GPU memory of teacher + student at a TP x PP x DP layout, before renting nodes.

    python tools/plan_memory.py CONFIG [--section.key=value ...] [--dp N] [--gpu-memory-gib 80]
                                [--flash-attention]

Prints GiB per GPU for each pipeline stage (student weights, fp32 grads, Adam state, teacher and
reference weights, rollout KV cache, training activations and logits) and whether the worst
stage fits in ``--gpu-memory-gib``. Activations are an estimate (Korthikanti et al. 2022);
``--flash-attention`` drops the stored attention scores (Transformer Engine). See docs/memory.md.
Exits 1 with a one-line message naming the field on bad input; 0 otherwise, fit or not.

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

_FLAGS = {"--dp": int, "--gpu-memory-gib": float}


def _split_args(argv: list[str]) -> tuple[list[str], dict]:
    """(config overrides, tool options): ``--dp``/``--gpu-memory-gib`` take ``=V`` or a separate value."""
    overrides: list[str] = []
    opts: dict = {"dp": 1, "gpu_memory_gib": 80.0, "flash_attention": False}
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, sep, value = arg.partition("=")
        if arg == "--flash-attention":
            opts["flash_attention"] = True
        elif name in _FLAGS:
            if not sep:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{name}: option has no value")
                i += 1
                value = argv[i]
            try:
                parsed = _FLAGS[name](value)
            except ValueError:
                raise ConfigError(f"{name}: expected a number, got {value!r}") from None
            if parsed <= 0:
                raise ConfigError(f"{name}: expected a positive number, got {value!r}")
            opts[name[2:].replace("-", "_")] = parsed
        else:
            overrides.append(arg)
        i += 1
    return overrides, opts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        overrides, opts = _split_args(argv[1:])
        cfg = load_config(argv[0], overrides)
        plan = plan_memory(cfg, dp=opts["dp"], flash_attention=opts["flash_attention"])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_plan(plan, gpu_memory_gib=opts["gpu_memory_gib"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
