"""Rollout speed: one batch vs the KV-bounded row pool, eager vs graphed decode, in one run.

    python benchmarks/bench_generate.py                                   # one CPU process, TP=1
    python benchmarks/bench_generate.py --long-tail --batch 32 --new-tokens 128   # lognormal EOS lengths
    torchrun --nproc-per-node 2 benchmarks/bench_generate.py --tp 2
    python benchmarks/bench_generate.py --device cuda --dtype bfloat16 --layers 16 --hidden 2048 ... --mismatch

Every variant runs ``rlad_megatron.rl.rollout.generate`` on the same randomly initialised
GPTModel and prompts, greedy unless ``--temperature`` > 0: ``one batch`` holds every row in one
KV cache, ``pool`` holds at most ``--max-rows`` rows and admits the rest as rows finish;
``graphed`` (CUDA only) runs decode steps, sampling included, as captured CUDA graphs
(``cuda_graphs=True``); ``--recompute`` adds the no-cache baseline.

Without ``--long-tail`` no row stops early (every row makes ``--new-tokens`` tokens). With it, a
logit bias makes row i emit a countdown from its target length to EOS, so response lengths follow
a lognormal distribution (median ``--new-tokens / 8``, sigma ``--tail-sigma``, clipped to
[1, --new-tokens]): the case where a few long rows hold a whole batch.

``graphs (capture s)``: CUDA graphs captured in the timed call and the wall time of the steps that
captured them (a warm-up step, the capture, the first replay; inside ``wall s``): graphs live with
a cohort's KV buffers, so every call captures again, once per cohort and batch bucket.

Roofline: the bytes a step must read at least (this rank's weights, plus every cached K/V entry
it attends over) divided by the device copy bandwidth measured here (a large tensor copy, read +
write), over the measured time. ``--mismatch`` samples at temperature 1 and reports
|sampler log-prob - training-forward log-prob| (rl/rollout_metrics.py) on response tokens.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
import traceback
import warnings

import torch

EOS = 1  # the long-tail countdown ends here


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (world size must equal it)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--query-groups", type=int, default=4)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096, help="true vocabulary size (tokens)")
    p.add_argument("--batch", type=int, default=8, help="rows generated per call")
    p.add_argument("--max-rows", type=int, default=0, help="the pool's KV budget in rows (0: batch / 4)")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt (all prompts this long)")
    p.add_argument("--new-tokens", type=int, default=256, help="max tokens generated per row")
    p.add_argument("--long-tail", action="store_true", help="EOS at lognormal lengths (see the docstring)")
    p.add_argument("--tail-sigma", type=float, default=1.0)
    p.add_argument("--recompute", action="store_true", help="add the no-cache baseline (slow)")
    p.add_argument("--no-pool", action="store_true", help="skip the pool variants")
    p.add_argument("--fixed-shape", action="store_true",
                   help="on CPU, add the graphed variant's fixed-shape decode step run eagerly (cuda_graphs=True)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy; > 0 samples (row seeds 0..batch-1, so every variant draws the same streams)")
    p.add_argument("--mismatch", action="store_true", help="report the sampler / training-forward log-prob gap")
    p.add_argument("--reps", type=int, default=1, help="timed runs per variant, interleaved; the median is shown")
    p.add_argument("--profile", type=int, default=0, metavar="TOKENS",
                   help="also profile each one-batch variant for TOKENS new tokens (torch.profiler): one line each "
                        "with CPU and GPU time and kernels per decode step")
    p.add_argument("--profile-out", default=None, help="write the profiles' top-op tables to this file")
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
    if args.long_tail and args.vocab < args.new_tokens + 2:
        raise ValueError(f"--vocab: expected >= --new-tokens + 2 for the long-tail countdown, got {args.vocab}")
    section = ModelSection(
        model=ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                          num_query_groups=args.query_groups, ffn_hidden_size=args.ffn, vocab_size=args.vocab,
                          max_position_embeddings=args.prompt_len + args.new_tokens, params_dtype=args.dtype),
        parallel=ParallelConfig(tensor_model_parallel_size=args.tp))
    groups = initialize_model_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=1,
                                       seed=args.seed)
    model = build_gpt_model(section, groups, device=info.device).eval()
    return info, groups, model


def add_countdown_bias(model) -> dict:
    """Last-position logits favour (last input token - 1) by a margin no random logit reaches.

    Hooks on the embedding (sees the fed ids) and the output layer (full-vocabulary logits), which
    both megatron's forward and the graphed step call, so a captured graph captures the bias too.
    Returns the hooks' state: ``state["on"] = False`` turns the bias off (the mismatch check).
    """
    state = {"on": True}

    def keep_ids(_module, args, kwargs):
        state["last_b"] = (kwargs["input_ids"] if "input_ids" in kwargs else args[0])[:, -1]

    def bias(_module, _args, out):
        if not state["on"]:
            return out
        logits_SbV, extra = out
        target_b = (state["last_b"] - 1).clamp(min=EOS)
        bump_bV = torch.zeros_like(logits_SbV[-1]).scatter_(1, target_b[:, None], 1e4)
        return torch.cat([logits_SbV[:-1], (logits_SbV[-1] + bump_bV)[None]]), extra

    model.embedding.register_forward_pre_hook(keep_ids, with_kwargs=True)
    model.output_layer.register_forward_hook(bias)
    return state


def make_prompts(args) -> tuple[list[list[int]], list[int] | None]:
    gen = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(2, args.vocab, (args.batch, args.prompt_len), generator=gen).tolist()
    if not args.long_tail:
        return prompts, None
    median = args.new_tokens / 8
    normal_B = torch.randn(args.batch, generator=gen, dtype=torch.float64)
    lengths = (median * torch.exp(args.tail_sigma * normal_B)).round().clamp(1, args.new_tokens).long().tolist()
    for prompt, length in zip(prompts, lengths):
        prompt[-1] = length + 1  # the countdown from here emits `length` tokens, EOS last
    return prompts, lengths


def timed_generate(model, groups, prompts, args, **kw):
    from rlad_megatron.rl.rollout import generate

    _sync(model)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = generate(model=model, groups=groups, prompts=prompts, max_new_tokens=args.new_tokens,
                         temperature=args.temperature, top_p=1.0, eos_id=EOS if args.long_tail else None, pad_id=0,
                         vocab_size=args.vocab, generator=None, row_seeds=list(range(len(prompts))), **kw)
    _sync(model)
    return batch, time.perf_counter() - start


def _sync(model) -> None:
    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large on-device copy (read + write counted)."""
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    reps = 10 if device.type == "cuda" else 3
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * nbytes * reps / (time.perf_counter() - start)


def kv_bytes_per_row_position(model) -> int:
    config = model.config
    groups_local = config.num_query_groups // config.tensor_model_parallel_size
    return 2 * config.num_layers * groups_local * config.kv_channels * config.params_dtype.itemsize


def mismatch(model, groups, prompts, args, **kw) -> dict[str, float]:
    """The sampler's log-probs vs one training-style forward of the same tokens (vocab-parallel kernel)."""
    from rlad_megatron.losses import vocab_parallel_logprobs_no_grad
    from rlad_megatron.rl.rollout import generate
    from rlad_megatron.rl.rollout_metrics import logprob_mismatch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = generate(model=model, groups=groups, prompts=prompts, max_new_tokens=args.new_tokens,
                         temperature=1.0, top_p=1.0, eos_id=None, pad_id=0, vocab_size=args.vocab,
                         generator=None, row_seeds=list(range(len(prompts))), **kw)
    tokens_BL = batch.tokens_BL
    lp_BL = torch.zeros(tokens_BL.shape, dtype=torch.float32, device=tokens_BL.device)
    with torch.no_grad():
        for rows in torch.arange(tokens_BL.shape[0], device=tokens_BL.device).split(8):  # bound the logits memory
            ids_bL = tokens_BL[rows]
            logits_bLv = model(ids_bL, torch.arange(ids_bL.shape[1], device=ids_bL.device).expand_as(ids_bL), None)
            lp_BL[rows, 1:] = vocab_parallel_logprobs_no_grad(logits_bLv[:, :-1], ids_bL[:, 1:], tp_group=groups.tp,
                                                              vocab_size=args.vocab).float()
    return logprob_mismatch(batch.logprobs_BL, lp_BL, batch.response_mask_BL)


def profile_variant(model, groups, prompts, args, name: str, kw: dict) -> tuple[str, str]:
    """(summary line, top-op table) of one short generate() call under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    cuda = next(model.parameters()).is_cuda
    short = argparse.Namespace(**{**vars(args), "new_tokens": args.profile, "long_tail": False})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        batch, wall = timed_generate(model, groups, prompts, short, **kw)
    events = prof.key_averages()
    cpu_s = sum(e.self_cpu_time_total for e in events) / 1e6
    device_s = sum(e.self_device_time_total for e in events) / 1e6
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    s = batch.stats
    steps = s.loop_steps
    line = (f"profile ({name}, {args.profile} new tokens, {steps} loop steps): wall {1e3 * wall / steps:.2f} ms/step, "
            f"CPU {1e3 * cpu_s / steps:.2f} ms/step")
    if cuda:
        line += f", GPU {1e3 * device_s / steps:.2f} ms/step, {kernels / steps:.0f} kernels/step"
    if s.graph_captures:  # the capturing steps run eagerly and capture: their CPU time is in the totals
        line += (f"; {s.graph_captures} capture(s) {s.graph_capture_s:.3f} s, the other steps' wall "
                 f"{1e3 * (wall - s.graph_capture_s) / max(1, steps - s.graph_captures):.2f} ms/step")
    table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=15)
    return line, f"## {name}\n{line}\n{table}\n"


def attempt(failed: dict[str, str], name: str, fn, *args, **kw):
    """``fn(*args, **kw)``, or None with the error recorded under ``name`` (its traceback on stderr)."""
    try:
        return fn(*args, **kw)
    except Exception as e:  # any failure of one variant is reported, the others still run
        traceback.print_exc()
        failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        return None


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info, groups, model = build(args)
    bias = add_countdown_bias(model) if args.long_tail else {}
    device = next(model.parameters()).device
    prompts, lengths = make_prompts(args)
    max_rows = args.max_rows or max(1, args.batch // 4)
    variants = [("one batch, eager", {})]
    if not args.no_pool:
        variants.append((f"pool {max_rows} rows, eager", dict(max_rows=max_rows)))
    if device.type == "cuda":
        variants.append(("one batch, graphed", dict(cuda_graphs=True)))
        if not args.no_pool:
            variants.append((f"pool {max_rows} rows, graphed", dict(max_rows=max_rows, cuda_graphs=True)))
    elif args.fixed_shape:
        variants.append(("one batch, fixed-shape eager", dict(cuda_graphs=True)))
    if args.recompute:
        variants.append(("recompute (no cache)", dict(use_kv_cache=False)))
    # Warm-up: allocator growth, lazy initialisation (and one graph capture per bucket size seen here).
    # A variant that fails here is reported and dropped: a GPU lent for minutes still gets the others' numbers.
    warm = argparse.Namespace(**{**vars(args), "new_tokens": min(4, args.new_tokens), "long_tail": False})
    failed: dict[str, str] = {}
    for name, kw in variants:
        if attempt(failed, name, timed_generate, model, groups, prompts, warm, **kw) is None and device.type == "cuda":
            torch.cuda.synchronize()  # an asynchronous CUDA error of the failed variant surfaces here, not later
    variants = [(name, kw) for name, kw in variants if name not in failed]
    walls: dict[str, list[float]] = {name: [] for name, _ in variants}
    batches = {}
    for _ in range(args.reps):  # interleaved, so load changes on a shared machine hit every variant
        for name, kw in variants:
            batches[name], wall = timed_generate(model, groups, prompts, args, **kw)
            walls[name].append(wall)
    results = [(name, batches[name], statistics.median(walls[name])) for name, _ in variants]
    bandwidth = copy_bandwidth(device)
    if info.rank == 0:  # the table first: a step killed at its timeout later still leaves it in the log
        print_table(args, model, device, lengths, results, bandwidth)
    one_batch = [(name, kw) for name, kw in variants if "pool" not in name and "recompute" not in name]
    profiles = []
    for name, kw in one_batch if args.profile else ():
        profile = attempt(failed, f"profile of {name}", profile_variant, model, groups, prompts, args, name, kw)
        if profile is not None and info.rank == 0:
            print(profile[0])
            profiles.append(profile)
    if args.profile_out and profiles:
        with open(args.profile_out, "w", encoding="utf-8") as f:
            f.write("".join(table for _, table in profiles))
    bias["on"] = False  # the mismatch compares the model's own log-probs
    for name, kw in one_batch if args.mismatch else ():
        gap = attempt(failed, f"mismatch of {name}", mismatch, model, groups, prompts, args, **kw)
        if gap is not None and info.rank == 0:
            print(f"log-prob mismatch ({name}, temperature 1, {args.dtype}): "
                  + ", ".join(f"{k} = {v:.3g}" for k, v in gap.items()))
    if info.rank == 0:
        for name, error in failed.items():
            print(f"FAILED {name}: {error}")
        if not math.isfinite(bandwidth):
            print("warning: copy bandwidth measurement failed")


def print_table(args, model, device, lengths, results, bandwidth: float) -> None:
    """The model line and one row per variant: tokens/s, ms per step and forward, roofline fraction."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = kv_bytes_per_row_position(model)
    ref = results[0][1]
    print(f"model: {weight_bytes * args.tp / model.config.params_dtype.itemsize / 1e6:.1f}M params, {args.layers} "
          f"layers, hidden {args.hidden}, vocab {args.vocab}; TP={args.tp}; batch {args.batch} x prompt "
          f"{args.prompt_len} + up to {args.new_tokens} new tokens; temperature {args.temperature}; "
          f"{args.dtype}; torch threads/rank "
          f"{torch.get_num_threads()}; "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or platform.machine()}")
    if lengths is not None:
        q = sorted(lengths)
        print(f"long tail: response lengths median {q[len(q) // 2]}, p90 {q[int(0.9 * (len(q) - 1))]}, max {q[-1]}, "
              f"mean {sum(q) / len(q):.1f}")
    print(f"device copy bandwidth {bandwidth / 1e9:.1f} GB/s; weights {weight_bytes / 1e6:.1f} MB/rank; "
          f"K/V {kv_bytes} B per row-position")
    print(f"wall s: median of {args.reps} interleaved run(s)")
    print("| variant | wall s | new tokens/s | decode steps | forwards | ms/step | ms/forward | roofline | "
          "graphs (capture s) | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, batch, wall in results:
        s = batch.stats
        new_tokens = int(batch.response_lengths_B.sum())
        kv_positions = s.kv_row_positions if "recompute" not in name else 0
        roofline_s = (s.forward_calls * weight_bytes + kv_positions * kv_bytes) / bandwidth
        same = (batch.tokens_BL.shape == ref.tokens_BL.shape
                and bool((batch.tokens_BL == ref.tokens_BL).all(dim=1).float().mean() == 1))
        print(f"| {name} | {wall:.2f} | {new_tokens / wall:.0f} | {s.loop_steps} | {s.forward_calls} | "
              f"{1e3 * wall / s.loop_steps:.2f} | {1e3 * wall / s.forward_calls:.2f} | {roofline_s / wall:.1%} | "
              f"{f'{s.graph_captures} ({s.graph_capture_s:.2f})' if s.graph_captures else '-'} | "
              f"{'yes' if same else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
