"""Numeric proof of a conversion: HF vs megatron logits on the same random tokens (CPU, float32).

    python checkpoints_convert/verify.py --hf DIR --megatron DIR                    # TP=1
    torchrun --nproc-per-node 2 checkpoints_convert/verify.py --hf DIR --megatron DIR --tp 2
    torchrun --nproc-per-node 2 checkpoints_convert/verify.py --hf DIR --megatron DIR --pp 2
    torchrun --nproc-per-node 2 checkpoints_convert/verify.py --hf DIR --megatron DIR --ep 2   # MoE

--megatron may also be an HF directory (the trainer's direct-HF loading path). Prints the max
|logit difference| and the mean/max per-token KL(HF || megatron) over the true vocabulary;
exits 1 when the max difference exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf", required=True, help="HF model directory")
    parser.add_argument("--megatron", required=True, help="converted megatron directory (or an HF directory)")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE models)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-3, help="max |logit diff| that passes")
    args = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    from rlad_megatron.config import ModelSection, ParallelConfig
    from rlad_megatron.distributed import init_distributed, initialize_model_parallel
    from rlad_megatron.hf import read_checkpoint_config
    from rlad_megatron.models.equivalence import compare_logits, hf_logits, megatron_logits
    from rlad_megatron.models.weights import build_model

    init_distributed("cpu")
    groups = initialize_model_parallel(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                                       expert_model_parallel_size=args.ep, seed=args.seed)
    cfg = read_checkpoint_config(args.megatron)
    cfg.params_dtype = "float32"
    section = ModelSection(model=cfg, parallel=ParallelConfig(
        tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp, expert_model_parallel_size=args.ep),
        load=args.megatron)
    section.validate("verify")
    model = build_model(section, groups, device=torch.device("cpu"))
    tokens_BS = torch.randint(0, cfg.vocab_size, (args.batch, args.seq),
                              generator=torch.Generator().manual_seed(args.seed))
    logits_BSV = megatron_logits(model, groups, tokens_BS, vocab_size=cfg.vocab_size)
    ok = True
    if logits_BSV is not None and groups.tp_rank == 0:
        stats = compare_logits(hf_logits(args.hf, tokens_BS), logits_BSV)
        ok = stats["max_abs_diff"] <= args.tolerance
        print(json.dumps({"tp": args.tp, "pp": args.pp, "ep": args.ep, **stats, "pass": ok}))
    flag = torch.tensor([0 if ok else 1])
    dist.all_reduce(flag)
    dist.destroy_process_group()
    return int(flag.item() > 0)


if __name__ == "__main__":
    sys.exit(main())
