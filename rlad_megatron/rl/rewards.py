"""Verifiable math reward: 1.0 when the completion's final answer equals the gold answer, else 0.0.

Answer extraction, in order (:func:`extract_answer`):
1. text after the last ``####`` (GSM8K format): its first number, else the stripped text;
2. the last ``\\boxed{...}`` (MATH format): its content;
3. the last number anywhere in the text (``$1,000.50`` -> ``1000.50``, ``-3``, ``3/4``).

Comparison (:func:`answers_match`): two plain numbers compare exactly as fractions (so
``72 == 72.0 == 72.00`` and ``1,000 == 1000``); anything else goes to math-verify's symbolic
``verify``. math-verify's own timeouts use ``signal.alarm``, which only works in the main thread,
so off the main thread (reward workers, data-loader threads) it runs with timeouts disabled;
plain numbers, the common case, never reach it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from fractions import Fraction
from typing import Optional

MARKER = "####"
# Thousands-grouped numbers first so '1,000' is one number but '1,2' is two.
# A sign counts only when it does not follow a digit or letter ('12+7' is 12 and 7, not +7).
_NUMBER = r"(?:(?<![\w.])[-+])?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-"})
_MATH_VERIFY_TIMEOUT_S = 5
# Off the main thread math-verify runs without a timeout; sympy's slow cases are long expressions,
# so longer answers are judged wrong instead of risking a stuck reward worker.
_MATH_VERIFY_MAX_CHARS = 200


def _normalize_number(text: str) -> str:
    """'$1,000.50' -> '1000.5', '+7' -> '7', '3 / 4' -> '3/4', '-0' -> '0'."""
    text = text.replace(",", "").replace(" ", "").lstrip("+")
    value = _to_fraction(text)
    if value is None:
        return text
    if value.denominator == 1:
        return str(value.numerator)
    if "/" in text:
        return f"{value.numerator}/{value.denominator}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _to_fraction(text: str) -> Optional[Fraction]:
    try:
        return Fraction(text.replace(",", "").replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        return None


def _last_boxed(text: str) -> Optional[str]:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a completion or a gold answer text, normalised; ``None`` if there is none."""
    text = text.translate(_MINUS_SIGNS)
    if MARKER in text:
        tail = text.rsplit(MARKER, 1)[1].strip()
        match = _NUMBER_RE.search(tail)
        if match:
            return _normalize_number(match.group(0))
        return tail.splitlines()[0].strip() if tail else None
    boxed = _last_boxed(text)
    if boxed:
        return _normalize_number(boxed) if _NUMBER_RE.fullmatch(boxed) else boxed
    numbers = _NUMBER_RE.findall(text)
    return _normalize_number(numbers[-1]) if numbers else None


def _math_verify_match(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    if max(len(gold), len(pred)) > _MATH_VERIFY_MAX_CHARS:
        return False
    timeout = _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    # math-verify only reads LaTeX inside delimiters; the extracted answers are bare.
    gold, pred = (t if "$" in t else f"${t}$" for t in (gold, pred))
    try:
        gold_parsed = parse(gold, parsing_timeout=timeout)
        pred_parsed = parse(pred, parsing_timeout=timeout)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))
    except Exception:  # a verifier failure (timeout, sympy error) is a wrong answer, not a crash
        return False


def answers_match(*, gold: str, pred: str) -> bool:
    """Exact rational equality for two numbers; math-verify for anything else."""
    g, p = _to_fraction(gold), _to_fraction(pred)
    if g is not None and p is not None:
        return g == p
    if g is not None and _NUMBER_RE.fullmatch(pred.strip()) is None and not any(c in pred for c in "\\{^"):
        # A number against plain words ('seventy two', 'unknown'): not a match, skip the slow path.
        return False
    return _math_verify_match(gold, pred)


def math_reward(*, completion: str, gold: str) -> float:
    """1.0 if ``completion``'s final answer equals ``gold`` (a bare answer or a GSM8K answer text)."""
    gold_answer = extract_answer(gold)
    if gold_answer is None:
        raise ValueError(f"gold: expected an answer (a number, '#### N' or \\boxed{{}}), got {gold[-60:]!r}")
    pred = extract_answer(completion)
    if pred is None:
        return 0.0
    return 1.0 if answers_match(gold=gold_answer, pred=pred) else 0.0


def format_reward(completion: str) -> float:
    """1.0 if the completion states its answer in GSM8K format ('#### <number>')."""
    if MARKER not in completion:
        return 0.0
    return 1.0 if _NUMBER_RE.search(completion.rsplit(MARKER, 1)[1]) else 0.0


def reward_batch(*, completions: Sequence[str], golds: Sequence[str], format_weight: float = 0.0) -> list[float]:
    """``math_reward`` per completion (+ ``format_weight * format_reward``); ``golds[i]`` belongs to
    ``completions[i]`` (repeat each prompt's gold G times for a group of G samples)."""
    if len(completions) != len(golds):
        raise ValueError(f"golds: expected one per completion ({len(completions)}), got {len(golds)}")
    out = []
    for completion, gold in zip(completions, golds):
        r = math_reward(completion=completion, gold=gold)
        if format_weight:
            r += format_weight * format_reward(completion)
        out.append(r)
    return out
