"""rlad-megatron checkpoint directory -> HF directory (safetensors + config.json).

    python checkpoints_convert/megatron_to_hf.py --megatron DIR --out DIR [--tokenizer DIR] \
        [--model-type llama|qwen2|qwen3] [--max-shard-size-gb 5] [--overwrite]

The output loads with ``transformers.AutoModelForCausalLM.from_pretrained(out)``.
--model-type is needed only when the directory carries no conversion.json / hf_config.json.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megatron", required=True, help="converted megatron directory")
    parser.add_argument("--out", required=True, help="output HF directory (created atomically)")
    parser.add_argument("--tokenizer", default=None, help="directory whose tokenizer files are copied")
    parser.add_argument("--model-type", default=None, choices=["llama", "qwen2", "qwen3"])
    parser.add_argument("--max-shard-size-gb", type=float, default=5.0, help="safetensors shard size (GiB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from rlad_megatron.conversion import convert_megatron_to_hf, format_summary

    try:
        summary = convert_megatron_to_hf(
            megatron_dir=args.megatron, out_dir=args.out, tokenizer_dir=args.tokenizer, model_type=args.model_type,
            max_shard_bytes=int(args.max_shard_size_gb * 1024**3), overwrite=args.overwrite,
            progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
