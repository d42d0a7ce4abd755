"""Prompt datasets, prompt/SFT formatting and the resumable sampler."""

import json
import random
from pathlib import Path

import pytest

from rlad_megatron.config import DataConfig
from rlad_megatron.data import (
    CharTokenizer,
    DataError,
    PromptSampler,
    SentencePieceTokenizer,
    build_prompt_dataset,
    encode_prompt,
    format_prompt,
    gold_answer,
    sft_completion,
    sft_example,
    shard_for_rank,
)

REPO = Path(__file__).resolve().parents[2]
GSM8K_TRAIN = REPO / "data" / "gsm8k" / "train.jsonl"
SP_MODEL = REPO / "data" / "gsm8k" / "sp1024.model"


def _raw(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def test_gsm8k_dataset_yields_prompt_and_gold():
    cfg = DataConfig(train_path=str(GSM8K_TRAIN), prompt_template="Q: {question}\nA:")
    ds = build_prompt_dataset(cfg, split="train")
    raw = _raw(GSM8K_TRAIN)
    assert len(ds) == len(raw)
    i = random.randrange(len(ds))
    prompt, gold = ds[i]
    assert prompt == f"Q: {raw[i]['question']}\nA:"
    assert gold == raw[i]["answer"].split("####")[-1].strip().replace(",", "")
    assert list(ds)[i] == (prompt, gold)


def test_max_train_examples_keeps_the_first_rows_of_the_train_split_only():
    raw = _raw(GSM8K_TRAIN)
    n = random.randrange(1, len(raw))
    cfg = DataConfig(train_path=str(GSM8K_TRAIN), eval_path=str(GSM8K_TRAIN), max_train_examples=n)
    train, full = build_prompt_dataset(cfg, split="train"), build_prompt_dataset(cfg, split="eval")
    assert len(train) == n and len(full) == len(raw)
    assert [ex.line for ex in train.examples] == [ex.line for ex in full.examples[:n]]
    assert list(train) == list(full)[:n]
    big = DataConfig(train_path=str(GSM8K_TRAIN), max_train_examples=len(raw) + 5)
    assert len(build_prompt_dataset(big, split="train")) == len(raw)


def test_max_train_examples_must_be_positive():
    from rlad_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"data\.max_train_examples: expected >= 1 or null, got 0"):
        load_config(None, ["--data.max_train_examples=0"])


def test_overlong_prompts_are_dropped_with_a_warning():
    tok = SentencePieceTokenizer(path=SP_MODEL)
    cfg = DataConfig(train_path=str(GSM8K_TRAIN), tokenizer_type="sentencepiece", tokenizer_path=str(SP_MODEL),
                     max_prompt_length=100)
    raw = _raw(GSM8K_TRAIN)
    lens = [len(encode_prompt(tokenizer=tok, prompt=format_prompt(template=cfg.prompt_template,
                                                                      question=r["question"]))) for r in raw]
    n_over = sum(n > 100 for n in lens)
    assert 0 < n_over < len(raw), "pick a threshold that drops some but not all"
    with pytest.warns(UserWarning, match=f"dropped {n_over} of {len(raw)}"):
        ds = build_prompt_dataset(cfg, tokenizer=tok)
    assert len(ds) == len(raw) - n_over
    assert all(len(ex.prompt_ids) <= 100 and ex.prompt_ids[0] == tok.bos_id for ex in ds.examples)


def test_answer_without_marker_is_a_data_error(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q", "answer": "just 2"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: field 'answer': expected a final line '#### <answer>'"):
        build_prompt_dataset(DataConfig(train_path=str(path)))
    with pytest.raises(ValueError, match="data.eval_path: expected a JSONL path, got None"):
        build_prompt_dataset(DataConfig(train_path=str(path)), split="eval")


def test_char_tokenizer_rejects_unknown_characters_with_the_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"question": "1+2=", "answer": "#### 3"}\n{"question": "1+x=", "answer": "#### 3"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: field 'question': char tokenizer: .*'x' at position 2"):
        build_prompt_dataset(DataConfig(train_path=str(path), prompt_template="{question}"),
                             tokenizer=CharTokenizer())


def test_format_prompt_and_gold_answer():
    assert format_prompt(template="{question} {x}", question="a {b}") == "a {b} {x}"
    with pytest.raises(ValueError, match="placeholder"):
        format_prompt(template="no slot", question="q")
    assert gold_answer("so\n#### 1,234") == "1234"
    assert gold_answer("#### -7") == "-7"
    assert gold_answer("a #### 1 #### 2") == "2"
    for bad in ("no marker", "#### "):
        with pytest.raises(ValueError, match="answer: expected"):
            gold_answer(bad)


def test_sft_example_layout_real_gsm8k():
    tok = SentencePieceTokenizer(path=SP_MODEL)
    row = random.choice(_raw(GSM8K_TRAIN))
    template = "Question: {question}\nAnswer: "
    ex = sft_example(tokenizer=tok, template=template, question=row["question"], answer_text=row["answer"])
    prompt_ids = encode_prompt(tokenizer=tok, prompt=format_prompt(template=template, question=row["question"]))
    target = sft_completion(answer_text=row["answer"])
    assert "<<" not in target and target.endswith(row["answer"].split("\n")[-1])
    assert ex.ids == prompt_ids + tok.encode(target) + [tok.eos_id]
    assert ex.loss_mask == [0] * len(prompt_ids) + [1] * (len(ex.ids) - len(prompt_ids))
    assert ex.prompt_len == len(prompt_ids) and ex.ids[0] == tok.bos_id
    assert tok.decode(ex.ids[ex.prompt_len:]) == target
    full = sft_completion(answer_text=row["answer"], strip_calculator=False)
    assert full == row["answer"]


def test_sft_example_final_style_tiny():
    tok = CharTokenizer()
    ex = sft_example(tokenizer=tok, template="{question}", question="12-30=", answer_text="#### -18", style="final")
    assert tok.decode(ex.ids) == "12-30=-18"
    assert ex.ids[0] == tok.bos_id and ex.ids[-1] == tok.eos_id
    assert sum(ex.loss_mask) == len("-18") + 1
    with pytest.raises(ValueError, match="style"):
        sft_completion(answer_text="#### 1", style="short")


# ------------------------------------------------------------------ sampler


def test_sampler_epochs_are_permutations_and_batches_straddle_epochs():
    n, seed = random.randint(5, 40), random.randrange(10**6)
    s = PromptSampler(num_examples=n, seed=seed)
    seen = [i for _ in range(3) for i in s.next_batch(n)]
    for e in range(3):
        assert sorted(seen[e * n:(e + 1) * n]) == list(range(n))
    assert seen[:n] != seen[n:2 * n] or n < 3
    # Odd batch sizes across epoch boundaries give the same stream.
    s2 = PromptSampler(num_examples=n, seed=seed)
    stream = []
    while len(stream) < 3 * n:
        stream += s2.next_batch(7)
    assert stream[:3 * n] == seen
    assert PromptSampler(num_examples=n, seed=seed + 1).next_batch(n) != seen[:n] or n < 3


def test_sampler_resume_sees_the_same_prompts():
    n, seed, bs = 23, random.randrange(10**6), 5
    ref = PromptSampler(num_examples=n, seed=seed)
    uninterrupted = [ref.next_batch(bs) for _ in range(12)]
    a = PromptSampler(num_examples=n, seed=seed)
    first = [a.next_batch(bs) for _ in range(7)]
    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint's serialisation
    b = PromptSampler(num_examples=n, seed=seed)
    b.load_state_dict(state)
    assert b.peek(bs) == uninterrupted[7]
    assert first + [b.next_batch(bs) for _ in range(5)] == uninterrupted
    assert b.position == 12 * bs and b.epoch == 12 * bs // n


def test_sampler_no_shuffle_and_state_checks():
    s = PromptSampler(num_examples=4, seed=0, shuffle=False)
    assert s.next_batch(6) == [0, 1, 2, 3, 0, 1]
    other = PromptSampler(num_examples=5, seed=0, shuffle=False)
    with pytest.raises(ValueError, match=r"num_examples: expected 5 \(this run\), got 4 \(the checkpoint\)"):
        other.load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="position"):
        s.load_state_dict({"position": -1})
    with pytest.raises(ValueError, match="batch_size"):
        s.next_batch(0)


def test_shard_for_rank_partitions_the_global_batch():
    items = list(range(12))
    shards = [shard_for_rank(items, rank=r, world_size=3) for r in range(3)]
    assert sum(shards, []) == items
    with pytest.raises(ValueError, match="multiple of the data-parallel size 5"):
        shard_for_rank(items, rank=0, world_size=5)
