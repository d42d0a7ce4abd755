"""The CPU compat patch of megatron-core's dist_checkpointing writer is still needed, and works.

Unpatched, ``dist_checkpointing.save`` starts child processes (a spawn-method Manager and forked
writers), which a daemonic process (a test rank, a dataloader-style worker) may not do. When a
megatron-core release writes in-process, the first assertion fails and the patch in
``rlad_megatron/distributed/compat.py`` (``write_buckets_in_process``) can be deleted.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from rlad_megatron.distributed.init import free_port

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim only applies without CUDA")



def _child(port, root, values, queue):
    import traceback

    try:
        import torch.distributed as dist
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
        unpatched_dir, patched_dir = os.path.join(root, "unpatched"), os.path.join(root, "patched")
        os.makedirs(unpatched_dir)
        os.makedirs(patched_dir)
        try:
            dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", values.clone())}, unpatched_dir)
            unpatched = "saved"
        except AssertionError as e:
            unpatched = str(e)

        from rlad_megatron.distributed.compat import apply_cpu_compat

        apply_cpu_compat()
        dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", values.clone())}, patched_dir)
        loaded = dist_checkpointing.load({"w": ShardedTensor.from_rank_offsets("w", torch.zeros_like(values))},
                                         patched_dir)
        queue.put(("ok", unpatched, loaded["w"].tolist()))  # by value: this process exits next
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report everything to the parent
        queue.put(("error", traceback.format_exc(), None))


def test_dist_ckpt_writer_patch_is_needed_and_works(tmp_path):
    values = torch.randn(6, 4)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(free_port(), str(tmp_path), values, queue), daemon=True)
    proc.start()
    try:
        status, unpatched, loaded = queue.get(timeout=180)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert status == "ok", unpatched
    assert "daemonic processes are not allowed to have children" in unpatched, (
        f"megatron-core's writer no longer starts child processes ({unpatched!r}): "
        "remove write_buckets_in_process from rlad_megatron/distributed/compat.py")
    assert torch.equal(torch.tensor(loaded), values)
