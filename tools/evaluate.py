"""Accuracy of a trained or converted model on a JSONL task, with the training run's reward.

    python tools/evaluate.py --config launch/configs/tiny_cpu.yaml --model student \
        [--load runs/tiny/rlad/checkpoints] [--split eval|train] [--limit N] \
        [--samples K --temperature T --top-p P] [--batch-size B] [--out results.jsonl]
    torchrun --nproc-per-node 2 tools/evaluate.py --config ... # TP/PP from <model>.parallel

``--load`` (default: ``<model>.load``) takes anything ``<model>.load`` does: a converted
directory, its ``dist/``, an HF directory, or a training checkpoint (save dir or step dir).
Greedy by default; with ``--samples K`` (temperature > 0) it reports mean@K as ``accuracy`` and
pass@K. Prints one JSON summary line; ``--out`` also writes one JSON record per example
(question, gold, completions, rewards) on rank 0. Extra ``--section.key=value`` arguments are
config overrides (e.g. ``--rl.max_new_tokens=256``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--model", choices=["student", "teacher"], default="student")
    parser.add_argument("--load", default=None, help="weights to evaluate (default: <model>.load)")
    parser.add_argument("--split", choices=["eval", "train"], default="eval",
                        help="data.eval_path or data.train_path")
    parser.add_argument("--limit", type=int, default=None, help="first N examples only")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=64, help="examples per generate() call, per DP replica")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="per-example JSONL output")
    args, overrides = parser.parse_known_args(argv)

    from rlad_megatron.config import load_config_or_exit

    cfg = load_config_or_exit(args.config, overrides)
    section = getattr(cfg, args.model)
    load = args.load if args.load is not None else section.load
    if not load:
        print(f"error: --load: expected weights to evaluate, got none ({args.model}.load is unset)",
              file=sys.stderr)
        return 2
    problems = [(name, f"expected >= 1, got {value}") for name, value in
                (("--limit", args.limit), ("--samples", args.samples), ("--batch-size", args.batch_size))
                if value is not None and value < 1]
    if args.temperature < 0:
        problems.append(("--temperature", f"expected >= 0, got {args.temperature}"))
    if args.temperature == 0 and args.samples > 1:
        problems.append(("--samples", f"greedy decoding (--temperature 0) gives one answer, got {args.samples}"))
    if not 0 < args.top_p <= 1:
        problems.append(("--top-p", f"expected in (0, 1], got {args.top_p}"))
    if problems:
        print(f"error: {problems[0][0]}: {problems[0][1]}", file=sys.stderr)
        return 2

    from rlad_megatron.data import build_prompt_dataset, build_tokenizer, check_vocab_fits, shard_for_rank
    from rlad_megatron.distributed import init_distributed, initialize_model_parallel
    from rlad_megatron.evaluation import answer_and_score, gather_records, summarize
    from rlad_megatron.models.weights import build_model
    from rlad_megatron.rl.generator import Generator

    world = init_distributed(cfg.train.device)
    groups = initialize_model_parallel(tensor_model_parallel_size=section.parallel.tensor_model_parallel_size,
                                       pipeline_model_parallel_size=section.parallel.pipeline_model_parallel_size,
                                       expert_model_parallel_size=section.parallel.expert_model_parallel_size,
                                       seed=args.seed)
    tokenizer = build_tokenizer(cfg.data)
    check_vocab_fits(tokenizer, model_vocab_size=section.model.vocab_size, name=f"{args.model}.model.vocab_size")
    data = build_prompt_dataset(dataclasses.replace(cfg.data, max_train_examples=None), split=args.split,
                                tokenizer=tokenizer)
    examples = data.examples[:args.limit]
    # DP replicas take equal slices; replica 0 also takes the remainder.
    usable = len(examples) - len(examples) % groups.dp_size
    mine = shard_for_rank(examples[:usable], rank=groups.dp_rank, world_size=groups.dp_size)
    if groups.dp_rank == 0:
        mine += examples[usable:]
    model = build_model(dataclasses.replace(section, load=load), groups, device=world.device)
    generator = Generator(model=model, groups=groups, vocab_size=section.model.vocab_size, eos_id=tokenizer.eos_id,
                          pad_id=tokenizer.pad_id, max_new_tokens=cfg.rl.max_new_tokens,
                          temperature=args.temperature, top_p=args.top_p)
    records = answer_and_score(generator=generator, tokenizer=tokenizer, examples=mine, samples=args.samples,
                               batch_size=args.batch_size, seed=args.seed + groups.dp_rank)
    records = sorted(gather_records(records, groups), key=lambda r: r.line)
    summary = {"model": args.model, "load": str(load), "split": args.split, **summarize(records)}
    if world.rank == 0:
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_text("".join(json.dumps(dataclasses.asdict(r)) + "\n" for r in records))
            tmp.replace(out)
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
