"""Prompt and target text for GSM8K-format data (``question``; ``answer`` ending in ``#### N``).

The same three functions serve RL and SFT so both see identical token layouts:

    prompt ids   = [bos] + encode(format_prompt(template, question))       (encode_prompt)
    target ids   = encode(sft_completion(answer)) + [eos]                    (sft_example)

The prompt and the completion are encoded separately (not as one string) because that is what
a rollout produces: the model continues the prompt's ids. Put any separator you want between
them (e.g. a trailing space in ``"Answer: "``) in the template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from rlad_megatron.data.tokenizers import Tokenizer

ANSWER_MARKER = "####"
# GSM8K reasoning carries calculator annotations like '<<48/2=24>>'; they are not natural text.
_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")


def format_prompt(*, template: str, question: str) -> str:
    """Substitute ``{question}``; plain replacement so braces in the question are safe."""
    if "{question}" not in template:
        raise ValueError(f"prompt template: expected a '{{question}}' placeholder, got {template!r}")
    return template.replace("{question}", question)


def gold_answer(answer_text: str) -> str:
    """The final answer after the last ``####`` with thousands commas removed (``'1,000'`` -> ``'1000'``)."""
    if ANSWER_MARKER not in answer_text:
        raise ValueError(f"answer: expected a final line '#### <answer>', got {answer_text[-60:]!r}")
    gold = answer_text.rsplit(ANSWER_MARKER, 1)[1].strip()
    if not gold:
        raise ValueError(f"answer: expected text after '####', got {answer_text[-60:]!r}")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", gold):
        gold = gold.replace(",", "")
    return gold


def strip_calculator_annotations(text: str) -> str:
    return _CALCULATOR_RE.sub("", text)


SFTStyle = Literal["full", "final"]


def sft_completion(*, answer_text: str, style: SFTStyle = "full", strip_calculator: bool = True) -> str:
    """The text the model should produce after the prompt.

    ``full``: the reasoning and the ``#### N`` line (GSM8K SFT); ``final``: only the final answer
    (the tiny task, where short completions keep rollouts at a few tokens).
    """
    if style == "final":
        return gold_answer(answer_text)
    if style == "full":
        gold_answer(answer_text)  # validates the '####' line
        return strip_calculator_annotations(answer_text) if strip_calculator else answer_text
    raise ValueError(f"sft style: expected one of ['full', 'final'], got {style!r}")


def encode_prompt(*, tokenizer: Tokenizer, prompt: str) -> list[int]:
    """``[bos] + encode(prompt)`` (no BOS when the tokenizer has none)."""
    ids = tokenizer.encode(prompt)
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids


@dataclass(frozen=True)
class SFTExample:
    """``ids`` = prompt ids + completion ids + [eos]; ``loss_mask`` is 1 on the completion and eos."""

    ids: list[int]
    loss_mask: list[int]
    prompt_len: int


def sft_example(*, tokenizer: Tokenizer, template: str, question: str, answer_text: str,
                style: SFTStyle = "full", strip_calculator: bool = True) -> SFTExample:
    """Token ids and loss mask for one supervised (question, answer) pair."""
    prompt_ids = encode_prompt(tokenizer=tokenizer, prompt=format_prompt(template=template, question=question))
    target = sft_completion(answer_text=answer_text, style=style, strip_calculator=strip_calculator)
    target_ids = tokenizer.encode(target) + [tokenizer.eos_id]
    return SFTExample(ids=prompt_ids + target_ids, loss_mask=[0] * len(prompt_ids) + [1] * len(target_ids),
                      prompt_len=len(prompt_ids))


def sft_text(*, template: str, question: str, answer_text: str, style: SFTStyle = "full",
             strip_calculator: bool = True) -> tuple[str, str]:
    """(prompt text, completion text) of :func:`sft_example`, for logging and inspection."""
    return (format_prompt(template=template, question=question),
            sft_completion(answer_text=answer_text, style=style, strip_calculator=strip_calculator))
