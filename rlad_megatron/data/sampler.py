"""Deterministic, resumable prompt order.

The whole state is ``position`` = prompts consumed so far. Prompt number ``p`` is
``perm(epoch)[p % n]`` with ``epoch = p // n`` and ``perm(epoch)`` a permutation drawn from
``numpy.random.default_rng([seed, epoch])`` (identity when shuffle is off). So a run resumed from
``state_dict()`` sees exactly the prompts an uninterrupted run would, and batches may straddle
epochs without special cases.

Under data parallelism every rank builds the same sampler and takes its slice of the global
batch (:func:`shard_for_rank`), so the global order does not depend on the DP size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


class PromptSampler:
    def __init__(self, *, num_examples: int, seed: int, shuffle: bool = True, position: int = 0):
        if num_examples < 1:
            raise ValueError(f"num_examples: expected >= 1, got {num_examples}")
        if position < 0:
            raise ValueError(f"position: expected >= 0, got {position}")
        self.num_examples = num_examples
        self.seed = seed
        self.shuffle = shuffle
        self.position = position
        self._perm_epoch = -1
        self._perm: np.ndarray = np.arange(num_examples)

    @property
    def epoch(self) -> int:
        return self.position // self.num_examples

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
            self._perm_epoch = epoch
        return self._perm

    def peek(self, batch_size: int) -> list[int]:
        """The next ``batch_size`` example indices without consuming them."""
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        out: list[int] = []
        for p in range(self.position, self.position + batch_size):
            out.append(int(self._order(p // self.num_examples)[p % self.num_examples]))
        return out

    def next_batch(self, batch_size: int) -> list[int]:
        """The next ``batch_size`` example indices; advances ``position``."""
        out = self.peek(batch_size)
        self.position += batch_size
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "num_examples": self.num_examples,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``position``; refuse a state from a different dataset size, seed or shuffle setting,
        which would silently change which prompts come next."""
        for key in ("seed", "num_examples", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"sampler state {key}: expected {getattr(self, key)!r} (this run), "
                                 f"got {state[key]!r} (the checkpoint)")
        position = state.get("position")
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise ValueError(f"sampler state position: expected an integer >= 0, got {position!r}")
        self.position = position


def shard_for_rank(items: Sequence[T], *, rank: int, world_size: int) -> list[T]:
    """Contiguous slice ``rank`` of ``world_size`` equal slices of a global batch."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    if len(items) % world_size:
        raise ValueError(f"batch size: expected a multiple of the data-parallel size {world_size}, got {len(items)}")
    n = len(items) // world_size
    return list(items[rank * n:(rank + 1) * n])
