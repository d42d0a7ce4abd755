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
    _applied = True
    return True
