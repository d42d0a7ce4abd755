"""The embedded tiny task: reproducible files, correct answers, short char-level sequences."""

import json
import random
from pathlib import Path

import pytest

from rlad_megatron.config import DataConfig
from rlad_megatron.data import CharTokenizer, build_prompt_dataset, sft_example
from rlad_megatron.data.tiny_arith import (
    OPS,
    TINY_PROMPT_TEMPLATE,
    TINY_SFT_STYLE,
    has_carry,
    make_carry_task,
    make_problem,
    make_tiny_arith,
)
from rlad_megatron.rl.rewards import math_reward
from tools.make_task import main as make_task_main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "data" / "tiny_arith"


def test_committed_files_are_reproduced_byte_for_byte(tmp_path):
    assert make_task_main(["--out-dir", str(tmp_path)]) == 0
    for name in ("train.jsonl", "test.jsonl", "char_vocab.json"):
        assert (tmp_path / name).read_bytes() == (TINY / name).read_bytes(), name


def test_answers_are_correct_and_splits_disjoint():
    train, test = make_tiny_arith(max_operand=random.randint(5, 30), ops=("+", "-", "*"), num_train=60,
                                  num_test=40, seed=random.randrange(1000))
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    for row in train + test:
        q = row["question"]
        op = next(o for o in OPS if o in q[1:])  # skip a leading digit, never a sign here
        a, b = q[:-1].split(op)
        assert row["answer"] == f"#### {OPS[op](int(a), int(b))}"
        assert math_reward(completion=row["answer"].removeprefix("#### "), gold=row["answer"]) == 1.0
    assert make_tiny_arith(max_operand=9, num_train=10, num_test=5, seed=3) == \
        make_tiny_arith(max_operand=9, num_train=10, num_test=5, seed=3)


def test_errors():
    with pytest.raises(ValueError, match="num_train \\+ num_test: expected <= 8"):
        make_tiny_arith(max_operand=1, ops=("+", "-"), num_train=8, num_test=1)
    with pytest.raises(ValueError, match="ops"):
        make_tiny_arith(ops=("/",))
    with pytest.raises(ValueError, match="op: expected"):
        make_problem(a=1, op="/", b=2)


def test_committed_task_loads_with_the_char_tokenizer_and_stays_short():
    tok = CharTokenizer.from_file(TINY / "char_vocab.json")
    cfg = DataConfig(train_path=str(TINY / "train.jsonl"), eval_path=str(TINY / "test.jsonl"),
                     prompt_template=TINY_PROMPT_TEMPLATE, tokenizer_type="char",
                     tokenizer_path=str(TINY / "char_vocab.json"), max_prompt_length=8)
    for split in ("train", "eval"):
        ds = build_prompt_dataset(cfg, split=split, tokenizer=tok)
        n_lines = sum(1 for _ in open(TINY / ("train.jsonl" if split == "train" else "test.jsonl")))
        assert len(ds) == n_lines  # nothing dropped at max_prompt_length=8
    ex = random.choice(ds.examples)
    sft = sft_example(tokenizer=tok, template=TINY_PROMPT_TEMPLATE, question=ex.question, answer_text=ex.answer,
                      style=TINY_SFT_STYLE)
    assert len(sft.ids) - sft.prompt_len <= 4  # completion + EOS fits max_new_tokens=8 with room
    assert math_reward(completion=tok.decode(sft.ids[sft.prompt_len:]), gold=ex.gold) == 1.0
    rows = [json.loads(line) for line in open(TINY / "test.jsonl")]
    assert len(rows) == 500 and tok.vocab_size < 64


def _digit_sum(n: int) -> int:
    return sum(int(c) for c in str(n))


def _operands(row: dict[str, str]) -> tuple[int, int]:
    a, b = row["question"].removesuffix("=").split("+")
    return int(a), int(b)


def test_has_carry_matches_the_digit_sum_rule():
    # Each carry lowers the digit sum by 9: no carry <=> digit sums add up.
    for _ in range(2000):
        a, b = random.randrange(10_000), random.randrange(10_000)
        assert has_carry(a, b) == (_digit_sum(a) + _digit_sum(b) != _digit_sum(a + b)), (a, b)


def test_committed_carry_task_is_reproduced_byte_for_byte(tmp_path):
    assert make_task_main(["--layout", "carry", "--out-dir", str(tmp_path)]) == 0
    for name in ("train.jsonl", "test.jsonl", "sft_teacher.jsonl", "sft_student.jsonl", "char_vocab.json"):
        assert (tmp_path / name).read_bytes() == (TINY / "carry" / name).read_bytes(), name


def test_carry_splits_hold_what_the_tiny_default_claims():
    max_operand, fraction = random.randint(20, 60), random.uniform(0.01, 0.1)
    n_carry = sum(has_carry(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1))
    num_test, num_rl = n_carry // 5, n_carry // 3
    s = make_carry_task(max_operand=max_operand, num_test=num_test, num_rl=num_rl, student_carry_fraction=fraction,
                        seed=random.randrange(1000))
    q = {name: [r["question"] for r in rows] for name, rows in s.items()}
    assert len(q["test"]) == num_test and len(q["train"]) == num_rl
    assert all(has_carry(*_operands(r)) for r in s["test"] + s["train"])
    for name in q:
        assert len(set(q[name])) == len(q[name]), f"{name} repeats a problem"
    assert not set(q["test"]) & (set(q["train"]) | set(q["sft_teacher"]) | set(q["sft_student"]))
    assert not set(q["train"]) & set(q["sft_student"])
    assert set(q["train"]) <= set(q["sft_teacher"])
    plain = {r["question"] for r in s["sft_teacher"] if not has_carry(*_operands(r))}
    assert plain == {r["question"] for r in s["sft_student"] if not has_carry(*_operands(r))}
    student_carry = sum(has_carry(*_operands(r)) for r in s["sft_student"])
    assert student_carry == round(fraction * n_carry)
    for row in s["sft_student"] + s["test"]:
        assert row["answer"] == f"#### {sum(_operands(row))}"
    with pytest.raises(ValueError, match="student_carry_fraction: expected in"):
        make_carry_task(student_carry_fraction=1.5)
    with pytest.raises(ValueError, match=r"expected <= \d+ carry problems"):
        make_carry_task(max_operand=20, num_test=100, num_rl=100, student_carry_fraction=0.5)
