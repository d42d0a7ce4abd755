"""Long-tailed rollouts: today's padded micro-batches vs token-budget micro-batches (+ chunked
log-probs), for the student update and the teacher's scoring, side by side in one run.

    MALLOC_MMAP_THRESHOLD_=65536 OMP_NUM_THREADS=1 python benchmarks/bench_long.py

(a single process on the CPU; ``torchrun --nproc-per-node 2 ... --tp 2`` for TP=2). The batch is
rollout-shaped: ``--rows`` rows of a ``--prompt``-token prompt and a response whose length is
lognormal with median ``--max-len / 8`` (sigma 1), clipped to the row width ``--max-len``.

Reported per phase and path: tokens processed (real and padding: what the micro-batches' shapes
make the model compute), wall time (min over ``--reps``), and peak memory = the process's peak RSS
during the phase minus its RSS before it (psutil, sampled every 1 ms by a thread; glibc returns
large blocks to the OS at once only with a fixed mmap threshold, hence ``MALLOC_MMAP_THRESHOLD_``).
A third part times nothing: the peak memory of log-probs with gradients at ``--lp-positions``
positions x ``--lp-vocab`` vocabulary, materialised logits vs chunks of ``--chunk`` positions.
"""

from __future__ import annotations

import argparse
import threading
import time

import psutil
import torch


class PeakRSS:
    """Peak RSS increase (bytes) over a ``with`` block, sampled by a thread."""

    def __enter__(self):
        self.proc, self.base, self.peak, self.stop = psutil.Process(), 0, 0, threading.Event()
        self.base = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.delta = self.peak - self.base


def _experience(args, vocab: int):
    from rlad_megatron.rl.experience import Experience

    gen = torch.Generator().manual_seed(0)
    n, width = args.rows, args.max_len
    lengths = torch.exp(torch.randn(n, generator=gen) + torch.log(torch.tensor(width / 8.0)))
    responses = lengths.round().long().clamp(1, width - args.prompt)
    tokens = torch.zeros((n, width), dtype=torch.int64)
    mask = torch.zeros((n, width), dtype=torch.bool)
    for i, r in enumerate(responses.tolist()):
        tokens[i, :args.prompt + r] = torch.randint(3, vocab, (args.prompt + r,), generator=gen)
        mask[i, args.prompt - 1:args.prompt + r - 1] = True
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    return Experience(tokens_NS=tokens, targets_NS=targets, mask_NS=mask,
                      lp_old_NS=-torch.rand((n, width), generator=gen) * 3, advantages_N=torch.randn(n, generator=gen))


def _dp_balance(exp, replicas: int) -> tuple[float, float]:
    """Largest replica's tokens / mean when the rows are ``replicas`` equal DP slices (their own rows),
    and with rl.balance_dp_tokens' cuts (the plan only; the exchange is tested in test_dp_balance.py)."""
    from rlad_megatron.distributed.row_exchange import balanced_cuts
    from rlad_megatron.rl.micro_batches import row_lengths

    widths = row_lengths(exp.mask_NS).tolist()
    per = len(widths) // replicas

    def ratio(cuts):
        loads = [sum(widths[a:b]) for a, b in zip(cuts, cuts[1:])]
        return max(loads) / (sum(loads) / len(loads))

    return (ratio([i * per for i in range(replicas + 1)]),
            ratio(balanced_cuts(widths[:per * replicas], replicas, nonempty=True)))


def _timed(fn, reps: int):
    best, peak, out = float("inf"), 0, None
    for _ in range(reps):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        peak = max(peak, mem.delta)
    return out, best, peak


def _logprob_memory(args) -> dict:
    from rlad_megatron.losses import chunked_linear_logprobs, vocab_parallel_logprobs

    gen = torch.Generator().manual_seed(1)
    h = torch.randn(args.lp_positions, 1, args.lp_hidden, generator=gen)
    w = torch.randn(args.lp_vocab, args.lp_hidden, generator=gen) * 0.02
    t = torch.randint(0, args.lp_vocab, (args.lp_positions, 1), generator=gen)
    out = {}
    for name in ("materialised", "chunked"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            if name == "chunked":
                lp = chunked_linear_logprobs(hh, ww, t, tp_group=None, vocab_size=args.lp_vocab, chunk_size=args.chunk)
            else:
                lp = vocab_parallel_logprobs(hh @ ww.t(), t, tp_group=None, vocab_size=args.lp_vocab)
            lp.sum().backward()
            dt = time.perf_counter() - t0
        out[name] = {"peak_mb": mem.delta / 2**20, "time_s": dt}
        del hh, ww, lp
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--micro-batch-size", type=int, default=8, help="today's path: rows per micro-batch")
    p.add_argument("--max-tokens", type=int, default=2048, help="new path: rl.max_tokens_per_micro_batch")
    p.add_argument("--chunk", type=int, default=128, help="new path: rl.logprob_chunk_size (positions)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--dp-replicas", type=int, default=4, help="DP replicas for the token-balance plan line")
    p.add_argument("--lp-positions", type=int, default=4096)
    p.add_argument("--lp-vocab", type=int, default=32768)
    p.add_argument("--lp-hidden", type=int, default=256)
    args = p.parse_args()

    from rlad_megatron.config import load_config
    from rlad_megatron.distributed import init_distributed, initialize_model_parallel
    from rlad_megatron.objectives import build_objective
    from rlad_megatron.rl.micro_batches import PlanStats, fixed_plan, plan_micro_batches, plan_stats, row_lengths
    from rlad_megatron.rl.scorer import Scorer
    from rlad_megatron.rl.train_module import StudentTrainModule

    world = init_distributed("cpu")
    model = [f"--{m}.model.{k}={v}" for m in ("student", "teacher") for k, v in (
        ("vocab_size", args.vocab), ("make_vocab_size_divisible_by", 128), ("max_position_embeddings", args.max_len),
        ("hidden_size", 128), ("ffn_hidden_size", 512), ("num_layers", 2))]
    cfg = load_config("launch/configs/tiny_cpu.yaml", model + [
        f"--student.parallel.tensor_model_parallel_size={args.tp}",
        f"--teacher.parallel.tensor_model_parallel_size={args.tp}",
        "--student.load=null", "--teacher.load=null", "--distill.objective=rlad",
        "--rl.prompts_per_step=1", f"--rl.group_size={args.rows}", f"--rl.mini_batch_size={args.rows}",
        f"--rl.micro_batch_size={args.micro_batch_size}", "--optimizer.lr=0.0", "--optimizer.warmup_steps=0"])
    g = initialize_model_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=1, seed=1)
    objective = build_objective(cfg.distill, tp_group=g.tp, vocab_size=args.vocab)
    dev = world.device
    student = StudentTrainModule.build(cfg, g, objective=objective, device=dev)
    teacher = Scorer.build(cfg.teacher, g, vocab_size=args.vocab, micro_batch_size=args.micro_batch_size, device=dev)
    exp = _experience(args, args.vocab)
    lengths = row_lengths(exp.mask_NS)
    index = torch.arange(len(exp))
    paths = {"padded": (0, 0), "budget": (args.max_tokens, 0), "budget+chunked": (args.max_tokens, args.chunk)}
    real = int(lengths.sum())
    fixed = fixed_plan(len(exp), args.micro_batch_size)
    plans = {"padded": PlanStats(real_tokens=real, padded_tokens=len(exp) * args.max_len, micro_batches=len(fixed),
                                 oversized_rows=0),
             "budget": plan_stats(lengths, plan_micro_batches(lengths, max_tokens=args.max_tokens),
                                  max_tokens=args.max_tokens)}
    results = {}
    for name, (budget, chunk) in paths.items():
        teacher.max_tokens_per_micro_batch, teacher.logprob_chunk_size = budget, chunk
        student.configure(max_tokens_per_micro_batch=budget, logprob_chunk_size=chunk)
        (lp_t, _), t_score, m_score = _timed(lambda: teacher.logprobs(exp), args.reps)
        exp.lp_t_NS = lp_t
        metrics, t_update, m_update = _timed(lambda: student.train_mini_batch(exp, index), args.reps)
        results[name] = dict(score_s=t_score, score_mb=m_score / 2**20, update_s=t_update,
                             update_mb=m_update / 2**20, loss=metrics.get("loss"),
                             plan=plans["padded" if budget == 0 else "budget"])
    lp_mem = _logprob_memory(args)
    if world.rank != 0:
        return 0
    responses = exp.mask_NS.sum(1)
    print(f"rows={args.rows} max_len={args.max_len} response length median={int(responses.median())} "
          f"max={int(responses.max())} "
          f"real tokens={real} vocab={args.vocab} TP={args.tp} micro_batch_size={args.micro_batch_size} "
          f"max_tokens={args.max_tokens} chunk={args.chunk}; peak memory = peak RSS increase (psutil)")
    print(f"{'path':<16}{'processed':>10}{'padding':>9}{'mbs':>5}{'score s':>9}{'score MB':>9}"
          f"{'update s':>10}{'update MB':>10}{'loss':>12}")
    for name, r in results.items():
        st = r["plan"]
        print(f"{name:<16}{st.padded_tokens:>10}{st.padded_tokens - real:>9}{st.micro_batches:>5}"
              f"{r['score_s']:>9.2f}{r['score_mb']:>9.0f}{r['update_s']:>10.2f}{r['update_mb']:>10.0f}"
              f"{r['loss']:>12.6f}")
    base = results["padded"]
    for name in ("budget", "budget+chunked"):
        r = results[name]
        print(f"{name}: padding {results[name]['plan'].padding_fraction:.1%} of processed "
              f"(padded path {base['plan'].padding_fraction:.1%}); update {base['update_s'] / r['update_s']:.2f}x, "
              f"scoring {base['score_s'] / r['score_s']:.2f}x faster than padded")
    own, spread = _dp_balance(exp, args.dp_replicas)
    print(f"DP={args.dp_replicas} replicas of these rows: largest replica's tokens / mean {own:.2f} (own rows), "
          f"{spread:.2f} (rl.balance_dp_tokens)")
    m, c = lp_mem["materialised"], lp_mem["chunked"]
    print(f"log-probs with grad at {args.lp_positions} positions x {args.lp_vocab} vocab (hidden {args.lp_hidden}): "
          f"materialised {m['peak_mb']:.0f} MB {m['time_s']:.2f} s, chunked({args.chunk}) {c['peak_mb']:.0f} MB "
          f"{c['time_s']:.2f} s: ratio {c['peak_mb'] / m['peak_mb']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
