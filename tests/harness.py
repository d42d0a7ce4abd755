"""Run a function on N gloo ranks in fresh processes and report failures from any rank.

    run_distributed(fn, world_size=2, args=(...,))

``fn(rank, world_size, *args)`` runs in each rank after ``init_process_group('gloo')`` and the
CPU compat shim; its return values are returned as a list indexed by rank (picklable values).
An exception in any rank is re-raised in the parent with that rank's traceback.
"""

from __future__ import annotations

import os
import pickle
import traceback

import torch.multiprocessing as mp

from rlad_megatron.distributed.init import free_port

_TIMEOUT_S = float(os.environ.get("RLAD_TEST_DIST_TIMEOUT", "300"))



def _worker(rank, world_size, port, fn, args, queue):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        from rlad_megatron.distributed import init_distributed

        init_distributed("cpu", timeout_minutes=5)
        result = fn(rank, world_size, *args)
        # Plain pickle (tensors by value): torch's queue pickler would pass tensors as shared
        # memory that the parent can no longer open once this rank has exited.
        queue.put((rank, "ok", pickle.dumps(result)))
        dist.barrier()
        from rlad_megatron.distributed import destroy_model_parallel

        destroy_model_parallel()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(fn, world_size: int, args: tuple = ()) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: dict[int, str] = {}
    try:
        for _ in range(world_size):
            try:
                rank, status, payload = queue.get(timeout=_TIMEOUT_S)
            except Exception:  # queue.Empty: some rank hung
                alive = [r for r, p in enumerate(procs) if p.is_alive()]
                raise TimeoutError(f"ranks {alive} did not finish within {_TIMEOUT_S}s; "
                                   f"errors so far: {errors}") from None
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
                break  # the other ranks are likely blocked in a collective now
        if errors:
            rank = min(errors)
            raise AssertionError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world_size)]
