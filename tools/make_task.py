"""Write the embedded tiny arithmetic task (GSM8K format) as train/test JSONL.

    python tools/make_task.py --out-dir data/tiny_arith
    python tools/make_task.py --out-dir /tmp/harder --max-operand 99 --ops +-* --num-train 3000
    python tools/make_task.py --layout carry --out-dir data/tiny_arith/carry   # the tiny default's task

Deterministic in its arguments: rerunning with the defaults reproduces the committed files
byte for byte (tests/unit/test_data_tiny_arith.py checks this). Also writes ``char_vocab.json``
for ``data.tokenizer_type=char`` / ``data.tokenizer_path=<out-dir>/char_vocab.json``.

``--layout carry`` writes the tiny default's carry task instead (``make_carry_task``): ``train.jsonl``
(RL prompts with carries), ``test.jsonl`` (held-out, with carries), ``sft_teacher.jsonl`` and
``sft_student.jsonl`` (without carries but ``--student-carry-fraction`` of them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlad_megatron.data.jsonl import write_jsonl
from rlad_megatron.data.tiny_arith import make_carry_task, make_tiny_arith
from rlad_megatron.data.tokenizers import TINY_ALPHABET


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=["plain", "carry"], default="plain",
                   help="'plain': train/test of mixed problems; 'carry': the tiny default's four splits")
    p.add_argument("--out-dir", default="data/tiny_arith", help="directory for train.jsonl, test.jsonl")
    p.add_argument("--max-operand", type=int, default=None, help="operands are 0..max_operand (plain: 49, carry: 99)")
    p.add_argument("--ops", default="+-", help="operators to use, a subset of '+-*'")
    p.add_argument("--num-train", type=int, default=4000, help="training problems")
    p.add_argument("--num-test", type=int, default=500, help="test problems (disjoint from train)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--student-carry-fraction", type=float, default=0.03,
                   help="carry layout: share of all carry problems in the student's SFT split")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    if args.layout == "carry":
        splits = make_carry_task(max_operand=args.max_operand or 99, num_test=args.num_test, num_rl=args.num_train,
                                 student_carry_fraction=args.student_carry_fraction, seed=args.seed)
    else:
        train, test = make_tiny_arith(max_operand=args.max_operand or 49, ops=tuple(args.ops),
                                      num_train=args.num_train, num_test=args.num_test, seed=args.seed)
        splits = {"train": train, "test": test}
    for name, rows in splits.items():
        write_jsonl(out / f"{name}.jsonl", rows)
    (out / "char_vocab.json").write_text(json.dumps({"alphabet": TINY_ALPHABET}) + "\n", encoding="utf-8")
    print(f"wrote {', '.join(f'{len(rows)} {name}' for name, rows in splits.items())} problems to {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
