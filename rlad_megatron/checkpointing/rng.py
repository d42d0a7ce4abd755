"""Per-rank RNG states: python, numpy, torch CPU (+CUDA) and megatron's model-parallel tracker.

Stored with ``torch.save`` and read back with ``torch.load(weights_only=True)``: only tensors,
ints, floats, strings, lists, tuples and dicts, so loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker


def capture_rng_state() -> dict:
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch_cpu": torch.get_rng_state(),
        # On CPU the compat shim runs megatron's tracker on CPU generator states.
        "tracker": {name: s.clone() for name, s in get_cuda_rng_tracker().get_states().items()},
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available() and "torch_cuda" in state:
        torch.cuda.set_rng_state(state["torch_cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def rng_file(checkpoint_dir: str | Path, rank: int) -> Path:
    return Path(checkpoint_dir) / "rng" / f"rank_{rank:05d}.pt"


def save_rng_state(checkpoint_dir: str | Path, rank: int) -> None:
    path = rng_file(checkpoint_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(capture_rng_state(), path)


def load_rng_state(checkpoint_dir: str | Path, rank: int) -> None:
    path = rng_file(checkpoint_dir, rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: RNG state of rank {rank} is missing from the checkpoint")
    try:
        state = torch.load(path, weights_only=True)
        restore_rng_state(state)
    except Exception as e:  # noqa: BLE001 - garbage bytes make the unpickler raise anything (IndexError, ...)
        raise ValueError(f"{path}: corrupt RNG state ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                         ) from None
