"""Supervised fine-tuning of the teacher or the student of a config, on its training data.

    python tools/sft.py --config launch/configs/tiny_cpu.yaml --model teacher --steps 800 --out runs/tiny/sft/teacher

Runs in one process at TP=1/PP=1 (the tiny default's models are small) and writes the full
megatron layout (model.safetensors + megatron_config.yaml) that ``<model>.load`` reads at
any TP/PP. Also reports greedy accuracy on ``data.eval_path`` in ``sft_metrics.json``. The
output directory appears only once complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time

import torch

from rlad_megatron.models.forward import shift_left


def _batch(examples, rows: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(examples[i].ids) for i in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, i in enumerate(rows):
        ids, loss_mask = examples[i].ids, examples[i].loss_mask
        tokens[r, :len(ids)] = torch.tensor(ids)
        mask[r, :len(ids)] = torch.tensor(loss_mask, dtype=torch.bool)
    return tokens, shift_left(tokens, pad_id), shift_left(mask, False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--model", choices=["teacher", "student"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--style", choices=["final", "full"], default="final",
                        help="'final': only the '#### N' answer (tiny task); 'full': reasoning + answer")
    parser.add_argument("--eval-samples", type=int, default=200)
    args, overrides = parser.parse_known_args(argv)

    from rlad_megatron.config import ParallelConfig, load_config_or_exit

    cfg = load_config_or_exit(args.config, overrides)

    from rlad_megatron.data import build_prompt_dataset, build_tokenizer, check_vocab_fits, load_jsonl, sft_example
    from rlad_megatron.distributed import init_distributed, initialize_model_parallel
    from rlad_megatron.evaluation import answer_and_score, summarize
    from rlad_megatron.hf.checkpoint import write_full_layout
    from rlad_megatron.hf.io import atomic_output_dir
    from rlad_megatron.losses import vocab_parallel_logprobs
    from rlad_megatron.models.forward import position_ids_like
    from rlad_megatron.models.weights import build_model, model_state_dict
    from rlad_megatron.rl.generator import Generator

    # SFT starts from random weights at TP=1/PP=1, whatever the config's section says.
    section = dataclasses.replace(getattr(cfg, args.model), parallel=ParallelConfig(), load=None)
    world = init_distributed("cpu")
    groups = initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=args.seed)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(cfg.data)
    check_vocab_fits(tokenizer, model_vocab_size=section.model.vocab_size, name=f"{args.model}.model.vocab_size")
    rows = load_jsonl(cfg.data.train_path, fields=[cfg.data.question_field, cfg.data.answer_field])
    examples = [sft_example(tokenizer=tokenizer, template=cfg.data.prompt_template,
                            question=r.fields[cfg.data.question_field], answer_text=r.fields[cfg.data.answer_field],
                            style=args.style) for r in rows]
    model = build_model(section, groups, device=world.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / max(args.steps, 1)))
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        tokens, targets, mask = _batch(examples, rng.sample(range(len(examples)), args.batch_size), tokenizer.pad_id)
        logits = model(tokens, position_ids_like(tokens), None)
        lp = vocab_parallel_logprobs(logits, targets, tp_group=groups.tp, vocab_size=section.model.vocab_size)
        loss = -(torch.where(mask, lp, 0.0)).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - t0
            print(f"[sft {args.model}] step {step} loss {loss.item():.4f} ({elapsed:.0f}s)", flush=True)

    metrics = {"model": args.model, "steps": args.steps, "final_loss": loss.item(), "seconds": time.perf_counter() - t0}
    if cfg.data.eval_path and args.eval_samples > 0:
        data = build_prompt_dataset(cfg.data, split="eval", tokenizer=tokenizer)
        greedy = Generator(model=model, groups=groups, vocab_size=section.model.vocab_size, eos_id=tokenizer.eos_id,
                           pad_id=tokenizer.pad_id, max_new_tokens=cfg.rl.max_new_tokens, temperature=0.0)
        records = answer_and_score(generator=greedy, tokenizer=tokenizer, examples=data.examples[:args.eval_samples])
        metrics["eval_accuracy"] = summarize(records)["accuracy"]
    print(f"[sft {args.model}] {json.dumps(metrics)}", flush=True)
    with atomic_output_dir(args.out, overwrite=True) as tmp:
        write_full_layout(model_state_dict(model), section.model, tmp)
        (tmp / "sft_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
