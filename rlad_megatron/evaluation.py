"""Verifiable-reward evaluation of one model: generate answers to prompts and score them.

    records = answer_and_score(generator=gen, tokenizer=tok, examples=examples, samples=4)
    summary = summarize(gather_records(records, groups))   # {"accuracy": ..., "pass@4": ...}

``gen`` is a :class:`~rlad_megatron.rl.generator.Generator` with the evaluation's sampling
settings. Every rank of a model-parallel group calls ``answer_and_score`` on the same examples
(TP/PP ranks generate together); DP replicas take disjoint example slices and ``gather_records``
collects them. Greedy (``temperature == 0``) is deterministic; sampling draws from a generator
seeded by ``seed`` and the batch number, so a run is reproducible.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.distributed as dist

from rlad_megatron.data.dataset import PromptExample
from rlad_megatron.data.tokenizers import Tokenizer
from rlad_megatron.distributed.groups import ParallelGroups
from rlad_megatron.rl.generator import Generator
from rlad_megatron.rl.rewards import reward_batch
from rlad_megatron.rl.rollout import repeat_prompts


@dataclass
class EvalRecord:
    line: int  # 1-based line of the example in its JSONL file
    question: str
    gold: str
    completions: list[str]
    rewards: list[float]


def answer_and_score(*, generator: Generator, tokenizer: Tokenizer, examples: list[PromptExample],
                     samples: int = 1, batch_size: int | None = None, seed: int = 0) -> list[EvalRecord]:
    """``samples`` answers per example in batches of ``batch_size`` examples (None: one batch)."""
    if samples < 1:
        raise ValueError(f"samples: expected >= 1, got {samples}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if generator.temperature == 0 and samples > 1:
        raise ValueError(f"samples: greedy decoding (temperature 0) gives one answer, got samples={samples}")
    step = batch_size or max(len(examples), 1)
    records: list[EvalRecord] = []
    for b, start in enumerate(range(0, len(examples), step)):
        batch = examples[start:start + step]
        rollout = generator.generate(repeat_prompts([list(e.prompt_ids) for e in batch], group_size=samples),
                                     seed=seed * 1_000_003 + b if generator.temperature > 0 else None)
        texts = [tokenizer.decode(r) for r in rollout.responses()]
        rewards = reward_batch(completions=texts, golds=[e.gold for e in batch for _ in range(samples)])
        for i, e in enumerate(batch):
            span = slice(i * samples, (i + 1) * samples)
            records.append(EvalRecord(line=e.line, question=e.question, gold=e.gold, completions=texts[span],
                                      rewards=[float(r) for r in rewards[span]]))
    return records


def gather_records(records: list[EvalRecord], groups: ParallelGroups) -> list[EvalRecord]:
    """Every DP replica's records, in replica order (identical on every rank)."""
    if groups.dp_size == 1:
        return list(records)
    gathered: list = [None] * groups.dp_size
    dist.all_gather_object(gathered, [asdict(r) for r in records], group=groups.dp)
    return [EvalRecord(**r) for part in gathered for r in part]


def summarize(records: list[EvalRecord]) -> dict[str, float]:
    """``accuracy`` is the mean reward over all answers (mean@k); ``pass@k`` counts an example
    solved when any of its k answers is correct (k > 1 only)."""
    if not records:
        raise ValueError("records: expected at least one evaluated example, got none")
    k = len(records[0].rewards)
    out = {"examples": float(len(records)), "samples": float(k),
           "accuracy": sum(sum(r.rewards) for r in records) / (k * len(records))}
    if k > 1:
        out[f"pass@{k}"] = sum(max(r.rewards) >= 1.0 for r in records) / len(records)
    return out
