"""Rollout speed: KV-cached generation vs recomputing the whole prefix every step, same model, same run.

    python benchmarks/bench_generate.py                      # one CPU process, TP=1
    torchrun --nproc-per-node 2 benchmarks/bench_generate.py --tp 2
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --layers 16 --hidden 2048 ...

Both variants run ``rlad_megatron.rl.rollout.generate`` greedily (no EOS, so every row produces
``--new-tokens`` tokens) on a randomly initialised GPTModel; the only difference is
``use_kv_cache``. Prints a markdown table on rank 0 (results: benchmarks/RESULTS_generate.md).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (world size must equal it)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--query-groups", type=int, default=4)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096, help="true vocabulary size (tokens)")
    p.add_argument("--batch", type=int, default=8, help="rows generated together")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (all prompts this long)")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per row")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per rank (0: torch default)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    return p.parse_args(argv)


def build(args):
    from rlad_megatron.config import ModelConfig, ModelSection, ParallelConfig
    from rlad_megatron.distributed import init_distributed, initialize_model_parallel
    from rlad_megatron.models.builder import build_gpt_model

    info = init_distributed(args.device)
    if info.world_size != args.tp:
        raise ValueError(f"--tp: expected the world size {info.world_size}, got {args.tp}")
    section = ModelSection(
        model=ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                          num_query_groups=args.query_groups, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
                          max_position_embeddings=args.prompt_len + args.new_tokens, params_dtype=args.dtype),
        parallel=ParallelConfig(tensor_model_parallel_size=args.tp))
    groups = initialize_model_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=1,
                                       seed=args.seed)
    model = build_gpt_model(section, groups, device=info.device).eval()
    params = sum(p.numel() for p in model.parameters()) * args.tp
    return info, groups, model, params


def timed_generate(model, groups, prompts, args, *, use_kv_cache: bool):
    from rlad_megatron.rl.rollout import generate

    _sync(model)
    start = time.perf_counter()
    batch = generate(model=model, groups=groups, prompts=prompts, max_new_tokens=args.new_tokens, temperature=0.0,
                     top_p=1.0, eos_id=None, pad_id=0, vocab_size=args.vocab, generator=None,
                     use_kv_cache=use_kv_cache)
    _sync(model)
    return batch, time.perf_counter() - start


def _sync(model) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info, groups, model, params = build(args)
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt_len), generator=gen).tolist()
    # Warm-up: first calls pay for allocator growth and lazy initialisation.
    warm = argparse.Namespace(**{**vars(args), "new_tokens": 4})
    timed_generate(model, groups, prompts, warm, use_kv_cache=True)
    timed_generate(model, groups, prompts, warm, use_kv_cache=False)

    cached, t_cached = timed_generate(model, groups, prompts, args, use_kv_cache=True)
    recomputed, t_recomputed = timed_generate(model, groups, prompts, args, use_kv_cache=False)
    if info.rank != 0:
        return
    new_tokens = int(cached.response_lengths_B.sum())
    # Greedy argmax can flip on float-rounding ties between the two attention paths; report it.
    same = (cached.tokens_BL == recomputed.tokens_BL).all(dim=1).float().mean().item()
    print(f"model: {params / 1e6:.1f}M params, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; "
          f"TP={args.tp}; batch {args.batch} x prompt {args.prompt_len} + {args.new_tokens} new tokens; "
          f"{args.dtype}; torch threads/rank {torch.get_num_threads()}; "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else platform.processor() or platform.machine()}")
    print("| variant | wall time (s) | new tokens/s | speed-up |")
    print("|---|---|---|---|")
    print(f"| recompute (no cache) | {t_recomputed:.2f} | {new_tokens / t_recomputed:.0f} | 1.0x |")
    print(f"| KV cache (megatron StaticInferenceContext) | {t_cached:.2f} | {new_tokens / t_cached:.0f} | "
          f"{t_recomputed / t_cached:.1f}x |")
    print(f"rows with identical greedy tokens in both variants: {same:.0%}")


if __name__ == "__main__":
    main()
