"""Verifiable math reward on real GSM8K answers, number formats, math-verify fallback, threads."""

import json
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rlad_megatron.rl.rewards import answers_match, extract_answer, format_reward, math_reward, reward_batch

REPO = Path(__file__).resolve().parents[2]


def _gsm8k(split="test"):
    return [json.loads(line) for line in open(REPO / "data" / "gsm8k" / f"{split}.jsonl", encoding="utf-8")]


def _gold_number(answer: str) -> int:
    return int(answer.split("####")[-1].strip().replace(",", ""))


def test_real_gold_answers_reward_their_own_number_and_not_others():
    rows = _gsm8k("test") + random.sample(_gsm8k("train"), 100)
    for row in rows:
        n = _gold_number(row["answer"])
        assert math_reward(completion=row["answer"], gold=row["answer"]) == 1.0
        assert math_reward(completion=row["answer"], gold=str(n)) == 1.0
        wrong = n + random.choice([-1, 1]) * random.randint(1, 1000)
        assert math_reward(completion=row["answer"], gold=str(wrong)) == 0.0
        # The reasoning without its '####' line still has the answer as its last number on most
        # lines; the gold never rewards a completion whose last number differs.
        body = row["answer"].rsplit("####", 1)[0]
        last = extract_answer(body)
        expected = 1.0 if last is not None and float(last) == n else 0.0
        assert math_reward(completion=body, gold=row["answer"]) == expected


def test_real_answers_with_thousands_commas():
    rows = [r for r in _gsm8k("train") if "," in r["answer"].split("####")[-1]]
    assert rows, "GSM8K train has answers like '#### 1,000'"
    for row in rows[:20]:
        n = _gold_number(row["answer"])
        assert math_reward(completion=f"The total is {n:,}.", gold=row["answer"]) == 1.0
        assert math_reward(completion=f"#### {n}", gold=row["answer"]) == 1.0


@pytest.mark.parametrize("completion, gold, reward", [
    ("She pays $1,000.", "#### 1000", 1.0),
    ("#### $1,000.00", "1000", 1.0),
    ("It is -5 degrees", "#### -5", 1.0),
    ("It is 5 degrees", "#### -5", 0.0),
    ("12-7=5", "5", 1.0),  # '-7' is subtraction, not a negative answer
    ("He runs 72.0 miles", "#### 72", 1.0),
    ("He runs 72.5 miles", "#### 72", 0.0),
    ("0.50", "#### .5", 1.0),
    ("#### 18 dollars", "#### 18", 1.0),
    ("18 apples and then 3 more\n#### 21 apples", "#### 21", 1.0),
    ("#### 21\nActually 20", "21", 1.0),  # the marker wins over later numbers
    ("The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{42}", "#### 42", 1.0),
    ("\\boxed{\\frac{3}{4}}", "0.5", 0.0),
    ("3/4 of the cake", "0.75", 1.0),
    ("no idea", "#### 3", 0.0),
    ("", "#### 3", 0.0),
    ("#### seventy", "#### 70", 0.0),
    ("\u22125 is the answer", "-5", 1.0),
])
def test_formats(completion, gold, reward):
    assert math_reward(completion=completion, gold=gold) == reward


def test_extract_answer_normalises():
    assert extract_answer("a 1,234,567.50 b") == "1234567.5"
    assert extract_answer("x +7") == "7"
    assert extract_answer("1,2,3") == "3"
    assert extract_answer("nothing here") is None
    assert extract_answer("#### ") is None
    assert extract_answer("\\boxed{x^2}") == "x^2"


def test_gold_without_an_answer_is_an_error():
    with pytest.raises(ValueError, match="gold: expected an answer"):
        math_reward(completion="3", gold="no number")


def test_math_verify_path_works_off_the_main_thread():
    cases = [("\\boxed{\\frac{1}{2}}", "0.5", 1.0), ("\\boxed{\\sqrt{4}}", "2", 1.0), ("\\boxed{x+1}", "3", 0.0),
             ("#### 10", "10", 1.0)] * 4
    random.shuffle(cases)
    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(lambda c: math_reward(completion=c[0], gold=c[1]), cases))
    assert got == [c[2] for c in cases]
    assert answers_match(gold="1/2", pred="\\frac{1}{2}")


def test_reward_batch_and_format_reward():
    rows = random.sample(_gsm8k("test"), 4)
    golds = [r["answer"] for r in rows for _ in range(3)]
    completions = [f"#### {_gold_number(g)}" if i % 3 == 0 else (f"{_gold_number(g)}" if i % 3 == 1 else "#### x")
                   for i, g in enumerate(golds)]
    assert reward_batch(completions=completions, golds=golds) == [1.0, 1.0, 0.0] * 4
    assert reward_batch(completions=completions, golds=golds, format_weight=0.5) == [1.5, 1.0, 0.0] * 4
    assert format_reward("so #### 3") == 1.0 and format_reward("3") == 0.0 and format_reward("#### x") == 0.0
    with pytest.raises(ValueError, match=r"golds: expected one per completion \(12\), got 11"):
        reward_batch(completions=completions, golds=golds[:-1])


def _reward_in_child(case):
    return math_reward(completion=case[0], gold=case[1])


def test_math_verify_path_works_in_a_worker_process():
    import multiprocessing as mp

    cases = [("\\boxed{\\frac{1}{2}}", "0.5"), ("\\boxed{\\sqrt{9}}", "3"), ("\\boxed{x}", "3")]
    with mp.get_context("fork").Pool(1) as pool:
        assert pool.map(_reward_in_child, cases) == [1.0, 1.0, 0.0]
