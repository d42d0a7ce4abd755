"""Loss benchmark: time and peak memory of the TRRD loss vs megatron-core's cross entropy vs a naive gather.

    python benchmarks/bench_loss.py --tp 2 --sizes 4096x32768,4096x65536 --dtype bfloat16 \
        --out benchmarks/RESULTS_loss.md

Runs TP ranks on CPU with gloo (torch.multiprocessing spawn). Per size and method, on each rank:
fresh logits shard ``[N, V/TP]`` -> forward + backward; one untimed run per method gives the peak
memory, then ``--iters`` timed runs interleaved across methods (min reported; ``gathered`` gets
one timed run since it is slow; barriers around each run, so the slowest rank's time counts). Methods:

- ``rlad``: ``vocab_parallel_logprobs`` + the rlad objective's loss (TRRD, default DistillConfig) + backward.
- ``megatron_ce``: megatron-core ``vocab_parallel_cross_entropy(...).mean()`` + backward.
- ``gathered``: all-gather the vocabulary, float32 ``log_softmax`` on ``[N, V]``, same TRRD loss.

Peak memory: the process's peak resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` before each method) minus the resident set just before that method
allocates its logits, so the logits, every temporary and the logits' gradient count. Large
tensors are ``mmap``-backed and go back to the OS when freed, so methods do not see each other's
memory. The first (untimed) run gives the peak.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

METHODS = ("rlad", "megatron_ce", "gathered")


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status: no {key} line")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _loss_inputs(n: int, vocab: int):
    g = torch.Generator().manual_seed(n + vocab)  # identical on every rank (per-token tensors are replicated)
    target = torch.randint(0, vocab, (n,), generator=g)
    noise = torch.randn(3, n, generator=g)
    return target, noise


def _run_once(method: str, logits: torch.Tensor, target, noise, tp_group, tp_rank: int, tp: int, vocab: int,
              b: int, overwrite: bool) -> None:
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from rlad_megatron.config import DistillConfig
    from rlad_megatron.losses import vocab_parallel_logprobs
    from rlad_megatron.objectives import LossInputs, build_objective

    n = target.shape[0]
    if method == "megatron_ce":
        vocab_parallel_cross_entropy(logits, target).mean().backward()
        return
    if method == "rlad":
        lp = vocab_parallel_logprobs(logits, target, tp_group=tp_group, vocab_size=vocab, overwrite_logits=overwrite)
    else:  # gathered: the naive loss every rank computes on the full vocabulary
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits.detach(), group=tp_group)
        full = torch.cat(parts, dim=-1).float().requires_grad_()
        del parts
        lp = torch.log_softmax(full, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    lp_BS = lp.view(b, n // b)
    lp_old = lp_BS.detach() + 0.05 * noise[0].view(b, -1)
    lp_t = lp_BS.detach() + 0.5 * noise[1].view(b, -1)
    loss, _ = build_objective(DistillConfig()).loss(LossInputs(lp_s=lp_BS, lp_old=lp_old, lp_t=lp_t,
                                                               advantages=noise[2, :b],
                                                               mask=torch.ones_like(lp_BS, dtype=torch.bool)))
    loss.backward()
    if method == "gathered":
        width = logits.shape[-1]
        logits.grad = full.grad[:, tp_rank * width:(tp_rank + 1) * width].to(logits.dtype)


def _bench_rank(rank: int, world: int, port: int, sizes, dtype_name: str, iters: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from rlad_megatron.distributed import init_distributed, initialize_model_parallel

    init_distributed("cpu")
    groups = initialize_model_parallel(tensor_model_parallel_size=world, pipeline_model_parallel_size=1, seed=0)
    dtype = getattr(torch, dtype_name)
    rows = []
    overwrite = dtype == torch.float32  # rlad may reuse fp32 logits' storage, as megatron's CE does

    def fresh_logits(n, width):  # normal_ in place: no float32 temporaries in the measured peak
        return torch.empty(n, width, dtype=dtype).normal_(0.0, 2.0).requires_grad_()

    for n, vocab in sizes:
        b = 8 if n % 8 == 0 else 1
        width = vocab // world
        target, noise = _loss_inputs(n, vocab)
        args = (target, noise, groups.tp, groups.tp_rank, world, vocab, b, overwrite)
        peaks, times = {}, {m: [] for m in METHODS}
        for method in METHODS:  # first run of each method, alone: its peak memory
            gc.collect()
            dist.barrier()
            base = _status_mib("VmRSS")
            _reset_peak()
            logits = fresh_logits(n, width)
            _run_once(method, logits, *args)
            peaks[method] = _status_mib("VmHWM") - base
            del logits
        # Timed runs interleaved across methods so that load drift on a shared machine hits all alike;
        # the naive method is slow and gets at most one timed run.
        for it in range(iters):
            for method in METHODS:
                if method == "gathered" and it > 0:
                    continue
                logits = fresh_logits(n, width)
                dist.barrier()
                t0 = time.perf_counter()
                _run_once(method, logits, *args)
                dist.barrier()
                times[method].append(time.perf_counter() - t0)
                del logits
        shard_mib = n * width * torch.finfo(dtype).bits / 8 / 2**20
        for method in METHODS:
            rows.append((n, vocab, method, min(times[method]), peaks[method], shard_mib))
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(sizes, *, tp: int, dtype: str, iters: int):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_bench_rank, args=(r, tp, port, sizes, dtype, iters, queue)) for r in range(tp)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=1800)
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"benchmark rank exited with {p.exitcode}")
    return rows


def format_table(rows, *, tp: int, dtype: str) -> str:
    lines = [f"| tokens x vocab ({dtype}, TP={tp}) | method | time fwd+bwd (s) | x CE time | peak MiB / rank "
             "| x CE peak | logits shard MiB |",
             "|---|---|---|---|---|---|---|"]
    ce = {(n, v): (t, m) for n, v, meth, t, m, _ in rows if meth == "megatron_ce"}
    for n, v, meth, t, m, shard in rows:
        ct, cm = ce[(n, v)]
        lines.append(f"| {n} x {v} | {meth} | {t:.3f} | {t / ct:.2f} | {m:.0f} | {m / cm:.2f} | {shard:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=2, help="tensor-parallel ranks (processes)")
    parser.add_argument("--sizes", default="4096x32768,4096x65536",
                        help="comma-separated TOKENSxVOCAB (global vocabulary, divisible by --tp)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--iters", type=int, default=3, help="timed runs per method (min is reported)")
    parser.add_argument("--out", default=None, help="also append the table to this markdown file")
    args = parser.parse_args(argv)
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    for _n, v in sizes:
        if v % args.tp:
            raise ValueError(f"--sizes: vocabulary {v} is not divisible by --tp={args.tp}")
    t0 = time.time()
    table = format_table(run(sizes, tp=args.tp, dtype=args.dtype, iters=args.iters), tp=args.tp, dtype=args.dtype)
    print(table)
    print(f"total wall time {time.time() - t0:.0f} s")
    if args.out:
        with open(args.out, "a") as f:
            f.write(table + "\n\n")


if __name__ == "__main__":
    main()
