"""HF (Llama / Qwen2 / Qwen3, safetensors) -> rlad-megatron checkpoint directory.

    python checkpoints_convert/hf_to_megatron.py --hf DIR --out DIR [--tp 2 --pp 2] \
        [--make-vocab-size-divisible-by 128] [--rank-layout] [--dist-checkpoint] [--overwrite]

Writes the full megatron-core layout (loadable at any TP/PP by the trainer), with
--rank-layout the per-rank shards mp_rank_{tp:02d}_{pp:03d}/ for the given --tp/--pp, and with
--dist-checkpoint dist/, a megatron-core dist checkpoint of the same weights (also loadable at
any TP/PP; its metadata is pickled, so share the safetensors and keep dist/ for your own runs).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF model directory (config.json + *.safetensors)")
    parser.add_argument("--out", required=True, help="output directory (created atomically)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size the vocab is padded and checked for")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size checked (and sharded with "
                        "--rank-layout)")
    parser.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                        help="pad the vocabulary to a multiple of this x TP (rows are zero)")
    parser.add_argument("--rank-layout", action="store_true", help="also write mp_rank_XX_YYY per-rank shards")
    parser.add_argument("--dist-checkpoint", action="store_true",
                        help="also write dist/, a megatron-core dist checkpoint (torch_dist format)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from rlad_megatron.conversion import convert_hf_to_megatron, format_summary

    try:
        summary = convert_hf_to_megatron(
            hf_dir=args.hf, out_dir=args.out, tp=args.tp, pp=args.pp,
            make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
            writer="full" + ("+ranks" if args.rank_layout else "") + ("+dist" if args.dist_checkpoint else ""),
            overwrite=args.overwrite,
            progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
