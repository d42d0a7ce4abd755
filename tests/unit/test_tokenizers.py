"""The three tokenizer backends behind one interface, and their error messages."""

import json
import random
from pathlib import Path

import pytest

from rlad_megatron.config import DataConfig
from rlad_megatron.data.tokenizers import (
    REPLACEMENT,
    TINY_ALPHABET,
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    check_vocab_fits,
)

REPO = Path(__file__).resolve().parents[2]
SP_MODEL = REPO / "data" / "gsm8k" / "sp1024.model"


def _gsm8k_texts(n=20):
    rows = [json.loads(line) for line in open(REPO / "data" / "gsm8k" / "test.jsonl", encoding="utf-8")]
    return [t for r in random.sample(rows, n) for t in (r["question"], r["answer"])]


def _check_interface(tok):
    assert isinstance(tok, Tokenizer)
    ids = {tok.eos_id, tok.pad_id} | ({tok.bos_id} if tok.bos_id is not None else set())
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_char_round_trip_specials_and_errors():
    tok = CharTokenizer()
    _check_interface(tok)
    assert tok.vocab_size == 3 + len(TINY_ALPHABET) < 64
    text = "".join(random.choices(TINY_ALPHABET, k=50))
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) == len(text)
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
    assert tok.decode([tok.vocab_size, 127]) == REPLACEMENT * 2
    with pytest.raises(ValueError, match=r"got 'x' at position 3"):
        tok.encode("12+x")
    with pytest.raises(ValueError, match="duplicates"):
        CharTokenizer(alphabet="aba")


def test_char_from_file(tmp_path):
    path = tmp_path / "v.json"
    path.write_text(json.dumps({"alphabet": "ab"}))
    tok = build_tokenizer(DataConfig(tokenizer_type="char", tokenizer_path=str(path)))
    assert tok.vocab_size == 5 and tok.encode("ba") == [4, 3]
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CharTokenizer.from_file(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="v.json: expected a JSON char tokenizer file"):
        CharTokenizer.from_file(path)
    assert build_tokenizer(DataConfig(tokenizer_type="char")).vocab_size == 3 + len(TINY_ALPHABET)


def test_committed_tiny_vocab_matches_the_default():
    vocab = json.loads((REPO / "data" / "tiny_arith" / "char_vocab.json").read_text())
    assert vocab["alphabet"] == TINY_ALPHABET


def test_sentencepiece_is_lossless_on_real_gsm8k():
    tok = build_tokenizer(DataConfig(tokenizer_type="sentencepiece", tokenizer_path=str(SP_MODEL)))
    _check_interface(tok)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (1024, 1, 2, 3)
    for text in _gsm8k_texts():
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == text
    assert tok.decode(tok.encode("7") + [5000]) == "7" + REPLACEMENT


def test_sentencepiece_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model: sentencepiece model not found"):
        SentencePieceTokenizer(path=tmp_path / "nope.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(random.randbytes(300))
    with pytest.raises(ValueError, match="bad.model: expected a sentencepiece .model file"):
        SentencePieceTokenizer(path=bad)
    with pytest.raises(ValueError, match="data.tokenizer_path: expected a path"):
        build_tokenizer(DataConfig(tokenizer_type="sentencepiece"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A local HF tokenizer built offline from a word-level vocabulary (no hub access)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "the", "answer", "is", "####"] + [str(i) for i in range(10)]
    raw = RawTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    out = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(out)
    return out


def test_huggingface_local_directory(hf_dir):
    tok = build_tokenizer(DataConfig(tokenizer_type="huggingface", tokenizer_path=str(hf_dir)))
    _check_interface(tok)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 18)
    ids = tok.encode("the answer is #### 7")
    assert tok.bos_id not in ids and len(ids) == 5
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == "the answer is #### 7"
    assert REPLACEMENT in tok.decode(ids + [999])


def test_huggingface_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing: Hugging Face tokenizer directory not found"):
        HFTokenizer(path=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: expected a Hugging Face tokenizer directory"):
        HFTokenizer(path=tmp_path / "empty")


def test_check_vocab_fits():
    tok = CharTokenizer()
    check_vocab_fits(tok, model_vocab_size=tok.vocab_size)
    with pytest.raises(ValueError, match=f"student.model.vocab_size: expected >= the tokenizer's "
                                         f"vocab_size={tok.vocab_size}, got 10"):
        check_vocab_fits(tok, model_vocab_size=10)
