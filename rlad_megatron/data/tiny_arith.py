"""The embedded tiny task: GSM8K-format integer arithmetic small enough for a 2-layer model.

    {"question": "12+7=", "answer": "#### 19"}

Every problem ``a op b`` with ``0 <= a, b <= max_operand`` and ``op`` in ``ops`` is enumerated,
shuffled with ``random.Random(seed)`` and cut into disjoint test and train splits, so the files
are a pure function of the arguments. With the char tokenizer and template ``"{question}"`` a
prompt is at most 8 ids (BOS included) and a completion at most 4 ids (EOS included), so
``rl.max_new_tokens`` of 8 is plenty. SFT targets use ``sft_completion(style="final")``.

``make_carry_task`` is the tiny default's layout (data/tiny_arith/carry): 2-digit additions, split
by whether a column carries. The teacher's SFT sees every problem outside the test split, the
student's SFT sees the problems without carries and only a few with them, and RL and held-out
evaluation use problems with carries that neither SFT saw, so the skill RL must teach is one the
teacher has and the student lacks.
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


def has_carry(a: int, b: int) -> bool:
    """Whether ``a + b`` (non-negative) carries out of any decimal column."""
    carry = 0
    while a or b:
        carry = (a % 10 + b % 10 + carry) // 10
        if carry:
            return True
        a, b = a // 10, b // 10
    return False


def make_carry_task(*, max_operand: int = 99, num_test: int = 500, num_rl: int = 4000,
                    student_carry_fraction: float = 0.03, seed: int = 0) -> dict[str, list[dict[str, str]]]:
    """The four splits of the carry task, disjoint where it matters, deterministic in the arguments.

    Of every ``a+b`` with ``0 <= a, b <= max_operand`` (shuffled with ``seed``), the problems with a
    carry go to ``test`` (held-out evaluation), ``train`` (RL prompts) and a remainder; the
    ``sft_teacher`` split is every problem without a carry plus the RL prompts and the remainder,
    ``sft_student`` every problem without a carry plus ``student_carry_fraction`` of all carry
    problems, drawn from the remainder (so no RL prompt or test problem is in a student's SFT).
    """
    if max_operand < 10:
        raise ValueError(f"max_operand: expected >= 10 (two-digit operands), got {max_operand}")
    if not 0.0 <= student_carry_fraction <= 1.0:
        raise ValueError(f"student_carry_fraction: expected in [0, 1], got {student_carry_fraction}")
    problems = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
    random.Random(seed).shuffle(problems)
    carry = [p for p in problems if has_carry(*p)]
    plain = [p for p in problems if not has_carry(*p)]
    rest = carry[num_test + num_rl:]
    n_student = round(student_carry_fraction * len(carry))
    if n_student > len(rest):
        raise ValueError(f"num_test + num_rl + student_carry_fraction * {len(carry)}: expected <= {len(carry)} "
                         f"carry problems for max_operand={max_operand}, got {num_test} + {num_rl} + {n_student}")
    student_carry = random.Random(seed + 1).sample(rest, n_student)

    def rows(ps):
        return [make_problem(a=a, op="+", b=b) for a, b in ps]

    return {"train": rows(carry[num_test:num_test + num_rl]), "test": rows(carry[:num_test]),
            "sft_teacher": rows(random.Random(seed + 3).sample(plain + carry[num_test:], len(problems) - num_test)),
            "sft_student": rows(random.Random(seed + 2).sample(plain + student_carry, len(plain) + n_student))}
