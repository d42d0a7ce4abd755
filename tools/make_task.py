"""Write the embedded tiny arithmetic task (GSM8K format) as train/test JSONL.

    python tools/make_task.py --out-dir data/tiny_arith
    python tools/make_task.py --out-dir /tmp/harder --max-operand 99 --ops +-* --num-train 3000

Deterministic in its arguments: rerunning with the defaults reproduces the committed files
byte for byte (tests/unit/test_data_tiny_arith.py checks this). Also writes ``char_vocab.json``
for ``data.tokenizer_type=char`` / ``data.tokenizer_path=<out-dir>/char_vocab.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rlad_megatron.data.jsonl import write_jsonl
from rlad_megatron.data.tiny_arith import make_tiny_arith
from rlad_megatron.data.tokenizers import TINY_ALPHABET


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="data/tiny_arith", help="directory for train.jsonl, test.jsonl")
    p.add_argument("--max-operand", type=int, default=49, help="operands are 0..max_operand")
    p.add_argument("--ops", default="+-", help="operators to use, a subset of '+-*'")
    p.add_argument("--num-train", type=int, default=4000, help="training problems")
    p.add_argument("--num-test", type=int, default=500, help="test problems (disjoint from train)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    args = p.parse_args(argv)
    train, test = make_tiny_arith(max_operand=args.max_operand, ops=tuple(args.ops), num_train=args.num_train,
                                  num_test=args.num_test, seed=args.seed)
    out = Path(args.out_dir)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    (out / "char_vocab.json").write_text(json.dumps({"alphabet": TINY_ALPHABET}) + "\n", encoding="utf-8")
    print(f"wrote {len(train)} train and {len(test)} test problems to {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
