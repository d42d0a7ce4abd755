"""tools/prepare_data.py and tools/train_tokenizer.py, run in-process."""

import json
import random
from pathlib import Path

from rlad_megatron.data.tokenizers import SentencePieceTokenizer
from tools.prepare_data import main as prepare_main
from tools.train_tokenizer import main as train_tokenizer_main

REPO = Path(__file__).resolve().parents[2]


def test_prepare_data_lists_every_bad_line_and_exits_1(tmp_path, capsys):
    good = [json.loads(line) for line in open(REPO / "data" / "tiny_arith" / "test.jsonl")][:5]
    lines = [json.dumps(r) for r in good]
    lines.insert(2, "{broken")
    lines.insert(4, json.dumps({"question": "1+1=", "answer": "2"}))
    lines.append(json.dumps({"question": "1/1=", "answer": "#### 1"}))
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    rc = prepare_main([str(src), "--tokenizer-type", "char", "--prompt-template", "{question}", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 1 and not out.exists()
    bad = [line for line in captured.err.splitlines() if line.startswith(str(src))]
    assert [b.split(":")[1] for b in bad] == ["3", "5", "8"]
    assert "5 good examples, 3 bad lines" in captured.out


def test_prepare_data_writes_tokenized_examples(tmp_path, capsys):
    src = REPO / "data" / "gsm8k" / "test.jsonl"
    out = tmp_path / "o.jsonl"
    rc = prepare_main([str(src), "--tokenizer-type", "sentencepiece", "--tokenizer-path",
                       str(REPO / "data" / "gsm8k" / "sp1024.model"), "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in open(out)]
    n = sum(1 for _ in open(src))
    assert len(rows) == n and f"{n} good examples, 0 bad lines" in capsys.readouterr().out
    tok = SentencePieceTokenizer(path=REPO / "data" / "gsm8k" / "sp1024.model")
    row = random.choice(rows)
    assert row["prompt_ids"] == [tok.bos_id] + tok.encode(row["prompt"])


def test_prepare_data_missing_file_is_one_error(tmp_path, capsys):
    assert prepare_main([str(tmp_path / "x.jsonl"), "--tokenizer-type", "char"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "x.jsonl" in err and "\n" not in err


def test_train_tokenizer_small_vocab(tmp_path, capsys):
    prefix = tmp_path / "sp"
    src = str(REPO / "data" / "gsm8k" / "test.jsonl")
    assert train_tokenizer_main([src, "--vocab-size", "50", "--out", str(prefix)]) == 1
    assert "--vocab-size 50: sentencepiece refused" in capsys.readouterr().err
    assert train_tokenizer_main([src, "--vocab-size", "400", "--out", str(prefix)]) == 0
    tok = SentencePieceTokenizer(path=f"{prefix}.model")
    assert tok.vocab_size == 400 and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    text = "Janet’s ducks lay 16 eggs per day.\n#### 18"
    assert tok.decode(tok.encode(text)) == text
