"""Prompt datasets: a validated JSONL file -> (prompt text, gold answer) pairs.

    ds = build_prompt_dataset(cfg.data, split="train", tokenizer=tok)
    prompt, gold = ds[i]            # ds.examples[i].prompt_ids when a tokenizer was given

With a tokenizer, prompts longer than ``data.max_prompt_length`` tokens (BOS included) are
dropped with a warning naming how many; the choice is deterministic, so resume is unaffected.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from rlad_megatron.config import DataConfig
from rlad_megatron.data.jsonl import DEFAULT_MAX_LINE_BYTES, DataError, load_jsonl
from rlad_megatron.data.prompts import encode_prompt, format_prompt, gold_answer
from rlad_megatron.data.tokenizers import Tokenizer


@dataclass(frozen=True)
class PromptExample:
    question: str
    answer: str  # the full answer field (reasoning + '#### N')
    gold: str  # the final answer after '####'
    prompt: str
    line: int  # 1-based line in the source file, for error messages and debugging
    prompt_ids: Optional[tuple[int, ...]] = None


class PromptDataset:
    def __init__(self, *, examples: list[PromptExample], path: str | Path):
        if not examples:
            raise DataError("expected at least one usable example, got none", path=path)
        self.examples = examples
        self.path = str(path)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> tuple[str, str]:
        ex = self.examples[index]
        return ex.prompt, ex.gold

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return (self[i] for i in range(len(self)))


def load_prompt_dataset(path: str | Path, *, question_field: str = "question", answer_field: str = "answer",
                        prompt_template: str = "Question: {question}\nAnswer:",
                        tokenizer: Optional[Tokenizer] = None, max_prompt_length: Optional[int] = None,
                        max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> PromptDataset:
    """Read and validate ``path``; see the module docstring for the over-long prompt rule."""
    records = load_jsonl(path, fields=(question_field, answer_field), max_line_bytes=max_line_bytes)
    examples: list[PromptExample] = []
    dropped = 0
    for rec in records:
        question, answer = rec.fields[question_field], rec.fields[answer_field]
        try:
            gold = gold_answer(answer)
        except ValueError:
            raise DataError(f"field {answer_field!r}: expected a final line '#### <answer>', "
                            f"got {answer[-60:]!r}", path=path, line=rec.line, field=answer_field) from None
        prompt = format_prompt(template=prompt_template, question=question)
        prompt_ids = None
        if tokenizer is not None:
            try:
                prompt_ids = tuple(encode_prompt(tokenizer=tokenizer, prompt=prompt))
            except ValueError as e:
                raise DataError(f"field {question_field!r}: {e}", path=path, line=rec.line,
                                field=question_field) from None
            if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
                dropped += 1
                continue
        examples.append(PromptExample(question=question, answer=answer, gold=gold, prompt=prompt,
                                      line=rec.line, prompt_ids=prompt_ids))
    if dropped:
        warnings.warn(f"{path}: dropped {dropped} of {len(records)} prompts longer than "
                      f"max_prompt_length={max_prompt_length} tokens", stacklevel=2)
    return PromptDataset(examples=examples, path=path)


def build_prompt_dataset(data_cfg: DataConfig, *, split: Literal["train", "eval"] = "train",
                         tokenizer: Optional[Tokenizer] = None) -> PromptDataset:
    """The dataset named by ``data.train_path`` (its first ``data.max_train_examples`` usable rows)
    or ``data.eval_path``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
    path = data_cfg.train_path if split == "train" else data_cfg.eval_path
    if path is None:
        raise ValueError(f"data.{split}_path: expected a JSONL path, got None")
    ds = load_prompt_dataset(path, question_field=data_cfg.question_field, answer_field=data_cfg.answer_field,
                             prompt_template=data_cfg.prompt_template, tokenizer=tokenizer,
                             max_prompt_length=data_cfg.max_prompt_length)
    limit = data_cfg.max_train_examples
    if split == "train" and limit is not None and limit < len(ds):
        ds = PromptDataset(examples=ds.examples[:limit], path=path)
    return ds
