"""The embedded tiny task: GSM8K-format integer arithmetic small enough for a 2-layer model.

    {"question": "12+7=", "answer": "#### 19"}

Every problem ``a op b`` with ``0 <= a, b <= max_operand`` and ``op`` in ``ops`` is enumerated,
shuffled with ``random.Random(seed)`` and cut into disjoint test and train splits, so the files
are a pure function of the arguments. With the char tokenizer and template ``"{question}"`` a
prompt is at most 8 ids (BOS included) and a completion at most 4 ids (EOS included), so
``rl.max_new_tokens`` of 8 is plenty. SFT targets use ``sft_completion(style="final")``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

# The data config that goes with data/tiny_arith (documented in docs/data.md).
TINY_PROMPT_TEMPLATE = "{question}"
TINY_SFT_STYLE = "final"


def make_problem(*, a: int, op: str, b: int) -> dict[str, str]:
    if op not in OPS:
        raise ValueError(f"op: expected one of {sorted(OPS)}, got {op!r}")
    return {"question": f"{a}{op}{b}=", "answer": f"#### {OPS[op](a, b)}"}


def make_tiny_arith(*, max_operand: int = 49, ops: Sequence[str] = ("+", "-"), num_train: int = 4000,
                    num_test: int = 500, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, test rows), disjoint, deterministic in the arguments."""
    if max_operand < 1:
        raise ValueError(f"max_operand: expected >= 1, got {max_operand}")
    bad = [op for op in ops if op not in OPS]
    if bad or not ops:
        raise ValueError(f"ops: expected a non-empty subset of {sorted(OPS)}, got {list(ops)}")
    problems = [(a, op, b) for op in sorted(set(ops)) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    if num_train + num_test > len(problems):
        raise ValueError(f"num_train + num_test: expected <= {len(problems)} distinct problems for "
                         f"max_operand={max_operand}, ops={list(ops)}, got {num_train + num_test}")
    random.Random(seed).shuffle(problems)
    rows = [make_problem(a=a, op=op, b=b) for a, op, b in problems[:num_test + num_train]]
    return rows[num_test:], rows[:num_test]
