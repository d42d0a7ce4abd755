"""Tokenizers behind one small interface.

    encode(text) -> list[int]      never adds BOS/EOS (callers decide; see prompts.encode_prompt)
    decode(ids) -> str             skips special tokens; ids outside [0, vocab_size) become U+FFFD
    vocab_size, eos_id, bos_id (or None), pad_id (falls back to eos_id when the model has none)

Backends (``DataConfig.tokenizer_type``): ``sentencepiece`` (a ``.model`` file), ``huggingface``
(a LOCAL directory, loaded with ``transformers.AutoTokenizer(local_files_only=True)``; the hub is
never contacted) and ``char`` (a tiny deterministic character vocabulary for the embedded task).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

from rlad_megatron.config import DataConfig

REPLACEMENT = "\ufffd"

# The embedded tiny arithmetic task (data/tiny_arith) needs only these characters; the GSM8K-style
# '#### N' answer line is covered too. 3 specials + 17 characters = 20 ids (padded to 128).
TINY_ALPHABET = "0123456789+-*=# \n"
CHAR_SPECIALS = ("<pad>", "<eos>", "<bos>")


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    bos_id: Optional[int]
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def _decode_segments(ids: Sequence[int], vocab_size: int, decode: Callable[[list[int]], str]) -> str:
    """Decode runs of valid ids with ``decode``; each out-of-range id (e.g. a sampled padded-vocab
    row) becomes U+FFFD so a bad sample is visible in the text instead of crashing the rollout."""
    out: list[str] = []
    run: list[int] = []
    for i in ids:
        i = int(i)
        if 0 <= i < vocab_size:
            run.append(i)
            continue
        if run:
            out.append(decode(run))
            run = []
        out.append(REPLACEMENT)
    if run:
        out.append(decode(run))
    return "".join(out)


class CharTokenizer:
    """One id per character of ``alphabet`` after the specials <pad>=0, <eos>=1, <bos>=2."""

    def __init__(self, *, alphabet: str = TINY_ALPHABET):
        if not alphabet:
            raise ValueError("char tokenizer alphabet: expected a non-empty string, got ''")
        if len(set(alphabet)) != len(alphabet):
            dupes = sorted({c for c in alphabet if alphabet.count(c) > 1})
            raise ValueError(f"char tokenizer alphabet: expected distinct characters, got duplicates {dupes}")
        self.alphabet = alphabet
        self._to_id = {c: i + len(CHAR_SPECIALS) for i, c in enumerate(alphabet)}
        self.vocab_size = len(CHAR_SPECIALS) + len(alphabet)
        self.pad_id, self.eos_id, self.bos_id = 0, 1, 2

    def encode(self, text: str) -> list[int]:
        try:
            return [self._to_id[c] for c in text]
        except KeyError as e:
            pos = text.index(e.args[0])
            raise ValueError(f"char tokenizer: expected characters from {self.alphabet!r}, got {e.args[0]!r} "
                             f"at position {pos} of {text[:60]!r}") from None

    def decode(self, ids: Sequence[int]) -> str:
        n = len(CHAR_SPECIALS)
        return "".join(self.alphabet[i - n] if n <= i < self.vocab_size else (REPLACEMENT if not 0 <= i < n else "")
                       for i in map(int, ids))

    @classmethod
    def from_file(cls, path: str | Path) -> CharTokenizer:
        """Load ``{"alphabet": "..."}`` from a JSON file (written by tools/make_task.py)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: char tokenizer file not found (expected JSON with an 'alphabet')")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: expected a JSON char tokenizer file, got unreadable content ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("alphabet"), str):
            raise ValueError(f"{path}: expected a JSON object with a string 'alphabet', got {str(obj)[:60]!r}")
        try:
            return cls(alphabet=obj["alphabet"])
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


class SentencePieceTokenizer:
    """A sentencepiece ``.model`` file."""

    def __init__(self, *, path: str | Path):
        import sentencepiece as spm

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: sentencepiece model not found (expected a .model file; "
                                    "tools/train_tokenizer.py makes one)")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: expected a sentencepiece .model file, got a file it cannot load "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        self.path = path
        self.vocab_size = int(self.sp.GetPieceSize())
        if self.sp.eos_id() < 0:
            raise ValueError(f"{path}: expected a sentencepiece model with an EOS piece, got eos_id=-1 "
                             "(train with --eos_id)")
        self.eos_id = int(self.sp.eos_id())
        self.bos_id = int(self.sp.bos_id()) if self.sp.bos_id() >= 0 else None
        self.pad_id = int(self.sp.pad_id()) if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self.sp.EncodeAsIds(text))

    def decode(self, ids: Sequence[int]) -> str:
        # Control pieces (<s>, </s>, <pad>) decode to '' in sentencepiece.
        return _decode_segments(ids, self.vocab_size, self.sp.DecodeIds)


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory (never downloads)."""

    def __init__(self, *, path: str | Path):
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: Hugging Face tokenizer directory not found (expected a local "
                                    "directory with tokenizer.json / tokenizer_config.json)")
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"{path}: expected a Hugging Face tokenizer directory, got one that "
                             f"AutoTokenizer cannot load ({first})") from None
        self.path = path
        self.vocab_size = len(self.tok)  # includes added tokens, unlike tok.vocab_size
        if self.tok.eos_token_id is None:
            raise ValueError(f"{path}: expected a tokenizer with an eos_token, got none")
        self.eos_id = int(self.tok.eos_token_id)
        self.bos_id = int(self.tok.bos_token_id) if self.tok.bos_token_id is not None else None
        self.pad_id = int(self.tok.pad_token_id) if self.tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return _decode_segments(ids, self.vocab_size,
                                lambda run: self.tok.decode(run, skip_special_tokens=True))


def build_tokenizer(data_cfg: DataConfig) -> Tokenizer:
    """The tokenizer named by ``data.tokenizer_type`` / ``data.tokenizer_path``."""
    kind, path = data_cfg.tokenizer_type, data_cfg.tokenizer_path
    if kind == "char":
        return CharTokenizer.from_file(path) if path else CharTokenizer()
    if not path:
        raise ValueError(f"data.tokenizer_path: expected a path for tokenizer_type={kind!r}, got None")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path=path)
    if kind == "huggingface":
        return HFTokenizer(path=path)
    raise ValueError(f"data.tokenizer_type: expected one of ['sentencepiece', 'huggingface', 'char'], got {kind!r}")


def check_vocab_fits(tokenizer: Tokenizer, *, model_vocab_size: int, name: str = "student.model.vocab_size") -> None:
    """Fail clearly when the model's (unpadded) vocabulary cannot hold every tokenizer id."""
    if tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"{name}: expected >= the tokenizer's vocab_size={tokenizer.vocab_size}, "
                         f"got {model_vocab_size}")
