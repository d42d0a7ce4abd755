"""Train a small sentencepiece tokenizer on local GSM8K-format JSONL text (questions + answers).

    python tools/train_tokenizer.py data/gsm8k/train.jsonl --vocab-size 1024 --out data/gsm8k/sp1024

writes ``<out>.model`` and ``<out>.vocab``. Ids: <unk>=0, <s>=1 (BOS), </s>=2 (EOS), <pad>=3;
byte fallback is on, so any UTF-8 text encodes without <unk>. Training is single-threaded so the
model file is reproducible from the same inputs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlad_megatron.data.jsonl import DataError, load_jsonl
from rlad_megatron.data.prompts import strip_calculator_annotations


def training_text(paths: list[str], *, fields: tuple[str, ...], strip_calculator: bool) -> list[str]:
    """One line of text per field value (multi-line answers are split into their lines)."""
    lines: list[str] = []
    for path in paths:
        for rec in load_jsonl(path, fields=fields):
            for name in fields:
                text = rec.fields[name]
                if strip_calculator:
                    text = strip_calculator_annotations(text)
                lines.extend(t for t in text.splitlines() if t.strip())
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="JSONL files to read")
    p.add_argument("--out", required=True, help="output prefix: writes <out>.model and <out>.vocab")
    p.add_argument("--vocab-size", type=int, default=1024, help="number of pieces (incl. 4 specials, 256 bytes)")
    p.add_argument("--model-type", choices=["unigram", "bpe"], default="bpe")
    p.add_argument("--fields", default="question,answer", help="comma-separated JSON fields to train on")
    p.add_argument("--keep-calculator", action="store_true", help="keep GSM8K '<<a*b=c>>' annotations")
    args = p.parse_args(argv)

    import sentencepiece as spm

    try:
        lines = training_text(args.inputs, fields=tuple(args.fields.split(",")),
                              strip_calculator=not args.keep_calculator)
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.Train(
            sentence_iterator=iter(lines), model_prefix=args.out, vocab_size=args.vocab_size,
            model_type=args.model_type, character_coverage=1.0, byte_fallback=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, minloglevel=2,
            normalization_rule_name="identity",  # NFKC tables would add ~240 KB to the file
            remove_extra_whitespaces=False,  # lossless: decode(encode(text)) == text
            split_digits=True,  # one piece per digit: arithmetic stays compositional
        )
    except RuntimeError as e:
        print(f"error: --vocab-size {args.vocab_size}: sentencepiece refused ({str(e).splitlines()[0]})",
              file=sys.stderr)
        return 1
    print(f"trained {args.model_type} vocab {args.vocab_size} on {len(lines)} lines -> {args.out}.model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
