"""Validate and tokenize a GSM8K-format JSONL prompt file; list every bad line.

    python tools/prepare_data.py data/gsm8k/train.jsonl --tokenizer-type sentencepiece \
        --tokenizer-path data/gsm8k/sp1024.model [--out /tmp/train.tok.jsonl]
    python tools/prepare_data.py data/tiny_arith/train.jsonl --tokenizer-type char --prompt-template '{question}'

Prints one ``file:line: problem`` per bad line and a summary (examples, prompt and target token
lengths, prompts over --max-prompt-length). Exit status 1 if any line is bad (nothing is written
then), 0 otherwise. ``--out`` writes ``question, answer, gold, prompt, prompt_ids`` per line.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from rlad_megatron.config import DataConfig
from rlad_megatron.data.jsonl import DataError, scan_jsonl, write_jsonl
from rlad_megatron.data.prompts import encode_prompt, format_prompt, gold_answer, sft_completion
from rlad_megatron.data.tokenizers import build_tokenizer


def _stats(name: str, values: list[int]) -> str:
    if not values:
        return f"{name}: none"
    q = sorted(values)
    p95 = q[min(len(q) - 1, int(0.95 * len(q)))]
    return (f"{name}: min {q[0]}  mean {statistics.fmean(q):.1f}  median {statistics.median(q):g}  "
            f"p95 {p95}  max {q[-1]}")


def main(argv: list[str] | None = None) -> int:
    d = DataConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="JSONL file with a question and a GSM8K answer ('... #### N') per line")
    p.add_argument("--tokenizer-type", choices=["sentencepiece", "huggingface", "char"], required=True)
    p.add_argument("--tokenizer-path", default=None, help=".model file, HF directory, or char_vocab.json")
    p.add_argument("--out", default=None, help="write the tokenized examples here (JSONL)")
    p.add_argument("--question-field", default=d.question_field)
    p.add_argument("--answer-field", default=d.answer_field)
    p.add_argument("--prompt-template", default=d.prompt_template, help="must contain {question}")
    p.add_argument("--max-prompt-length", type=int, default=d.max_prompt_length, help="in tokens, BOS included")
    p.add_argument("--sft-style", choices=["full", "final"], default="full", help="target text for the stats")
    args = p.parse_args(argv)

    try:
        cfg = DataConfig(train_path=args.input, question_field=args.question_field, answer_field=args.answer_field,
                         prompt_template=args.prompt_template, tokenizer_type=args.tokenizer_type,
                         tokenizer_path=args.tokenizer_path, max_prompt_length=args.max_prompt_length)
        cfg.validate("data")
        tokenizer = build_tokenizer(cfg)
        records, errors = scan_jsonl(args.input, fields=(args.question_field, args.answer_field))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    rows, prompt_lens, target_lens = [], [], []
    for rec in records:
        q, a = rec.fields[args.question_field], rec.fields[args.answer_field]
        try:
            gold = gold_answer(a)
        except ValueError:
            errors.append(DataError(f"field {args.answer_field!r}: expected a final line '#### <answer>', "
                                    f"got {a[-60:]!r}", path=args.input, line=rec.line, field=args.answer_field))
            continue
        prompt = format_prompt(template=args.prompt_template, question=q)
        try:
            ids = encode_prompt(tokenizer=tokenizer, prompt=prompt)
            target = tokenizer.encode(sft_completion(answer_text=a, style=args.sft_style)) + [tokenizer.eos_id]
        except ValueError as e:
            errors.append(DataError(f"cannot tokenize: {e}", path=args.input, line=rec.line))
            continue
        prompt_lens.append(len(ids))
        target_lens.append(len(target))
        rows.append({"question": q, "answer": a, "gold": gold, "prompt": prompt, "prompt_ids": ids})

    errors.sort(key=lambda e: e.line or 0)
    for e in errors:
        print(e, file=sys.stderr)
    over = sum(n > args.max_prompt_length for n in prompt_lens)
    print(f"{args.input}: {len(rows)} good examples, {len(errors)} bad lines")
    print(f"tokenizer: {args.tokenizer_type} vocab_size={tokenizer.vocab_size} eos={tokenizer.eos_id} "
          f"bos={tokenizer.bos_id} pad={tokenizer.pad_id}")
    print(_stats("prompt tokens", prompt_lens))
    print(_stats(f"target tokens ({args.sft_style}, with EOS)", target_lens))
    print(f"prompts over max_prompt_length={args.max_prompt_length}: {over} (training drops them)")
    if errors:
        return 1
    if args.out:
        write_jsonl(args.out, rows)
        print(f"wrote {len(rows)} examples to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
