"""megatron-core on a CPU-only torch build: the one place where we patch around CUDA.

megatron-core (pinned 0.16.x; checked against 0.19 on GPU) assumes CUDA in a few places that
the CPU path reaches. Each patch below names the megatron-core call that needs it.
``tests/unit/test_compat.py`` runs each call without the patch and fails once megatron-core
stops needing it, so the shim shrinks instead of rotting.

Nothing here runs when CUDA is available: the GPU path uses megatron-core unpatched.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_applied = False


def _to_cpu(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    # An int device is a CUDA ordinal (torch.cuda.current_device() style).
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU
    return device


class CudaToCpuMode(TorchFunctionMode):
    """Redirects ``device="cuda"`` literals to the CPU.

    Needed for: ``pipeline_parallel/schedules.py`` (``torch.zeros(..., device="cuda")`` for the
    token counter in every schedule), ``optimizer/clip_grads.py`` (``device='cuda'`` buffers in
    ``get_grad_norm_fp32`` / ``clip_grad_by_total_norm_fp32``, and its
    ``param.grad.type() == 'torch.cuda.FloatTensor'`` assertion), and
    ``language_module.py`` (``weight.data.cuda()`` for tied embeddings across pipeline stages).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu(kwargs["device"])
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # clip_grads asserts CUDA tensor type names; report the CUDA name of the CPU type.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], (torch.dtype, torch.Tensor)):
            args = (args[0], _to_cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


def needs_cpu_compat() -> bool:
    return not torch.cuda.is_available()


def apply_cpu_compat() -> bool:
    """Install the CPU patches once per process; no-op (returns False) when CUDA is available."""
    global _applied
    if _applied:
        return True
    if not needs_cpu_compat():
        return False
    import megatron.core.tensor_parallel.random as mcore_random

    # rotary_pos_embedding.py, dot_product_attention.py, attention.py, mappings.py,
    # p2p_communication.py, param_and_grad_buffer.py, utils.GlobalMemoryBuffer:
    # ``device=torch.cuda.current_device()``.
    torch.cuda.current_device = lambda: _CPU
    # p2p_communication.py: ``torch.cuda.synchronize()`` after batched isend/irecv.
    torch.cuda.synchronize = lambda *args, **kwargs: None
    # tensor_parallel/random.py: the model-parallel RNG tracker forks the CUDA generator
    # (``model_parallel_cuda_manual_seed``, ``CudaRNGStatesTracker.add/fork``); on CPU the
    # same bookkeeping runs on the CPU default generator.
    torch.cuda.manual_seed = lambda seed: torch.manual_seed(seed)
    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    # Entered for the life of the process, the way torch.set_default_device installs its mode.
    CudaToCpuMode().__enter__()
    _patch_dist_ckpt_writer()
    _applied = True
    return True


# ---------------------------------------------------------------- dist_checkpointing writer
# Patched: megatron.core.dist_checkpointing.strategies.filesystem_async
#   ``_get_write_results_queue`` and ``FileSystemWriterAsync.write_preloaded_data_multiproc``
# (reached by every ``dist_checkpointing.save`` with the torch_dist format, sync or async).
# Unpatched, a sync save starts a ``multiprocessing`` Manager with the *spawn* method (which
# re-imports ``__main__``: an unguarded script re-runs itself and hangs in its collectives) and
# forks one writer process per bucket (impossible in a daemonic process such as a test rank,
# and a fork of a process holding gloo threads). The writer calls psutil outside its try
# block, so without psutil it dies and the parent waits on its JoinableQueue forever.
# On CPU we write the same buckets with the same torch ``_write_item`` in this process.
# Checked by tests/distributed/test_checkpointing_compat.py.


def write_buckets_in_process(transform_list, use_msc, rank, write_buckets, global_results_queue) -> None:
    """In-process stand-in for ``FileSystemWriterAsync.write_preloaded_data_multiproc``.

    Same arguments and the same result protocol (one ``{bucket_idx: [WriteResult]}`` dict on
    ``global_results_queue``); an exception propagates to the caller instead of hanging.
    """
    import inspect
    import os

    from megatron.core.dist_checkpointing.strategies.filesystem_async import _write_item

    if use_msc:
        raise NotImplementedError("multi-storage-client checkpoints are not supported by the CPU writer")
    extra = {}
    if "serialization_format" in inspect.signature(_write_item).parameters:
        from torch.distributed.checkpoint.filesystem import SerializationFormat

        extra["serialization_format"] = SerializationFormat.TORCH_SAVE
    results = {}
    for idx, (file_name, storage_key, (bytes_data, tensor_data)) in enumerate(write_buckets):
        written = []
        with open(file_name, "wb") as stream:
            for item, data in [*bytes_data, *tensor_data]:
                written.append(_write_item(*transform_list, stream, data, item, storage_key, **extra))
            stream.flush()
            os.fsync(stream.fileno())
        results[idx] = written
    global_results_queue.put(results)


def _patch_dist_ckpt_writer() -> None:
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    # retrieve_write_results() reads this queue with get_nowait() after the writer returns.
    filesystem_async._get_write_results_queue = queue.Queue
    filesystem_async.FileSystemWriterAsync.write_preloaded_data_multiproc = staticmethod(write_buckets_in_process)


# ---------------------------------------------------------------- MoE router without Transformer Engine


def patch_moe_router_without_te() -> None:
    """Let megatron-core's MoE router run where Transformer Engine is not installed (CPU or GPU).

    ``transformer/moe/moe_utils.py`` ``RouterGatingLinearFunction.forward/backward`` test
    ``te_general_gemm is not None``, a name only imported when TE imports: without TE every router
    forward raises NameError. None selects the function's own ``torch.mm`` path. Called by the
    model builder for MoE models; a no-op once megatron-core defines the name itself.
    Checked by tests/unit/test_compat.py::test_moe_router_still_needs_the_patch.
    """
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
