"""The sampler of a model: its stage, process groups, token ids and sampling settings in one place.

    gen = Generator(model=student.policy, groups=groups, vocab_size=V, eos_id=tok.eos_id, pad_id=tok.pad_id,
                    max_new_tokens=256, temperature=1.0, top_p=1.0)
    rollout = gen.generate(rows, row_seeds=rollout_row_seeds(...))   # a RolloutBatch (rl/rollout.py)
    greedy = dataclasses.replace(gen, temperature=0.0)       # the same model, evaluation settings
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from rlad_megatron.distributed.groups import ParallelGroups
from rlad_megatron.rl.rollout import RolloutBatch, generate


@dataclass(frozen=True)
class Generator:
    model: torch.nn.Module
    groups: ParallelGroups
    vocab_size: int  # the tokenizer's: padded vocabulary ids are never sampled
    eos_id: Optional[int]
    pad_id: int
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    max_rows: int = 0  # rows in the KV caches at once (0: all); the rest wait (rl/rollout_pool.py)
    cuda_graphs: bool = False  # decode steps as captured CUDA graphs (rl/graphed_decode.py)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompts: list[list[int]], *, row_seeds: Optional[Sequence[int]] = None,
                 seed: Optional[int] = None, use_kv_cache: bool = True) -> RolloutBatch:
        """Responses to ``prompts`` (each row sampled once); every rank of the model returns the same batch.

        ``row_seeds`` (one per row, e.g. ``rollout_row_seeds``) gives each row its own random
        stream; otherwise ``seed`` seeds the draw of the row seeds. Greedy decoding needs neither.
        """
        gen = (torch.Generator(device=self.device).manual_seed(seed)
               if seed is not None and row_seeds is None else None)
        return generate(model=self.model, groups=self.groups, prompts=prompts, max_new_tokens=self.max_new_tokens,
                        temperature=self.temperature, top_p=self.top_p, eos_id=self.eos_id, pad_id=self.pad_id,
                        vocab_size=self.vocab_size, generator=gen, use_kv_cache=use_kv_cache, row_seeds=row_seeds,
                        max_rows=self.max_rows, cuda_graphs=self.cuda_graphs)
