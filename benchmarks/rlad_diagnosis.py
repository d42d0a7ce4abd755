"""Where RLAD's gradient goes, compared with GRPO's, on rollouts of the tiny default's student.

    python benchmarks/rlad_diagnosis.py --prompts 256 --out runs/ablation/diagnosis.md

Samples ``rl.group_size`` answers to fresh RL prompts with the SFT student (the policy RL starts
from), scores them, computes GRPO advantages and the teacher's log-probs of the sampled tokens,
then takes the gradient of the real objectives (``objectives.build_objective(...).loss``) with respect to the
student's log-prob of each sampled token at ``lp_old = lp_s`` (the first mini-batch of a step).
Per token, ``-dLoss/dlp_s`` is the weight the update gives that token: GRPO gives ``A / (n
tokens)``; TRRD multiplies it by ``r = exp((1 - alpha) clamp(lp_s - lp_t))`` times ``alpha +
(1 - alpha) [|lp_s - lp_t| < c]`` (the clamp's sensitivity), or 0 where the token starts outside
the clip: ``A > 0`` and ``lp_s - lp_t > ln(1 + eps_high) / (1 - alpha)``, or ``A < 0`` and
``lp_s - lp_t < ln(1 - eps_low) / (1 - alpha)``.

Prints (and writes with ``--out``) a markdown table over the tokens of responses with a non-zero
advantage, split by the advantage's sign and by whether the teacher rates the token above the
student. Because ``d lp / d logits = onehot - softmax`` scales with ``1 - p_s``, a column also
weights each token by ``1 - p_s``: how much of the update's push on the logits RLAD keeps. Runs
in one process at TP=1; extra ``--section.key=value`` arguments are config overrides (e.g.
``--distill.alpha=0.8``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def token_weights(*, lp_s, lp_t, adv_B, mask, cfg):
    """-dLoss/dlp_s per token of ``cfg``'s objective at lp_old = lp_s."""
    from rlad_megatron.objectives import LossInputs, build_objective

    lp = lp_s.detach().clone().requires_grad_(True)
    loss, _ = build_objective(cfg).loss(LossInputs(lp_s=lp, lp_old=lp_s.detach(), lp_t=lp_t, advantages=adv_B,
                                                   mask=mask))
    (grad,) = torch.autograd.grad(loss, lp)
    return -grad


def rows_for(*, name, sel, w_rlad, w_grpo, d, p_s, cfg) -> dict:
    n = int(sel.sum())
    if n == 0:
        return {"tokens": name, "n": 0}
    alpha = cfg.alpha
    g, r = w_grpo[sel].abs(), w_rlad[sel].abs()
    # d lp / d logits = onehot - softmax: its size scales with 1 - p, so a token's weight moves the
    # logits in proportion to w * (1 - p). Rarely sampled tokens carry most of GRPO's learning signal.
    scale = 1 - p_s[sel]
    return {"tokens": name, "n": n,
            "share_clamped": float((d[sel].abs() > cfg.teacher_clamp).float().mean()),
            "share_zero_grad": float((r == 0).float().mean()),
            "weight_ratio": float(r.sum() / g.sum()),
            "logit_ratio": float((r * scale).sum() / (g * scale).sum()),
            "grpo_logit_share": float((g * scale).sum()),
            "clip_edge": (math.log(1 + cfg.eps_high) if "A > 0" in name else math.log(1 - cfg.eps_low)) / (1 - alpha)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "launch" / "configs" / "tiny_cpu.yaml"))
    p.add_argument("--prompts", type=int, default=256, help="fresh RL prompts (each sampled rl.group_size times)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    args, overrides = p.parse_known_args(argv)
    sys.path.insert(0, str(ROOT))
    from rlad_megatron.config import ParallelConfig, load_config_or_exit

    cfg = load_config_or_exit(args.config, overrides)
    from rlad_megatron.data import build_prompt_dataset, build_tokenizer
    from rlad_megatron.distributed import init_distributed, initialize_model_parallel
    from rlad_megatron.losses import vocab_parallel_logprobs
    from rlad_megatron.models.forward import position_ids_like
    from rlad_megatron.models.weights import build_model
    from rlad_megatron.rl.advantages import grpo_advantages
    from rlad_megatron.rl.rewards import reward_batch
    from rlad_megatron.rl.rollout import generate, repeat_prompts

    world = init_distributed("cpu")
    groups = initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=args.seed)
    tok = build_tokenizer(cfg.data)
    models = {}
    for name in ("student", "teacher"):
        section = dataclasses.replace(getattr(cfg, name), parallel=ParallelConfig())
        models[name] = build_model(section, groups, device=world.device).eval()
    vocab = cfg.student.model.vocab_size
    examples = build_prompt_dataset(cfg.data, split="train", tokenizer=tok).examples[:args.prompts]
    G = cfg.rl.group_size
    with torch.no_grad():
        roll = generate(model=models["student"], groups=groups, prompts=repeat_prompts(
            [list(e.prompt_ids) for e in examples], group_size=G), max_new_tokens=cfg.rl.max_new_tokens,
            temperature=cfg.rl.temperature, eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=vocab,
            generator=torch.Generator().manual_seed(args.seed))
        rewards = reward_batch(completions=[tok.decode(r) for r in roll.responses()],
                               golds=[e.gold for e in examples for _ in range(G)])
        tokens = roll.tokens_BL
        lps = {}
        for name, model in models.items():
            logits = model(tokens, position_ids_like(tokens), None)
            lp = vocab_parallel_logprobs(logits[:, :-1], tokens[:, 1:], tp_group=groups.tp, vocab_size=vocab)
            lps[name] = torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1).float()  # aligned with the token scored
    mask = roll.response_mask_BL
    adv_B = grpo_advantages(rewards_N=rewards, group_size=G).advantages_N
    rlad_cfg = dataclasses.replace(cfg.distill, objective="rlad")
    w_rlad = token_weights(lp_s=lps["student"], lp_t=lps["teacher"], adv_B=adv_B, mask=mask, cfg=rlad_cfg)
    w_grpo = token_weights(lp_s=lps["student"], lp_t=lps["teacher"], adv_B=adv_B, mask=mask,
                           cfg=dataclasses.replace(cfg.distill, objective="grpo"))
    d = lps["student"] - lps["teacher"]
    A = adv_B[:, None].expand_as(d)
    sig = mask & (A != 0)
    c = rlad_cfg.teacher_clamp
    p_s = lps["student"].exp()
    table = [rows_for(name=name, sel=sel, w_rlad=w_rlad, w_grpo=w_grpo, d=d, p_s=p_s, cfg=rlad_cfg) for name, sel in [
        ("A > 0, all", sig & (A > 0)), ("A > 0, teacher above student", sig & (A > 0) & (d < 0)),
        ("A > 0, teacher above student by > c", sig & (A > 0) & (d < -c)),
        ("A > 0, student above teacher", sig & (A > 0) & (d >= 0)),
        ("A < 0, all", sig & (A < 0)), ("A < 0, teacher above student", sig & (A < 0) & (d < 0)),
        ("A < 0, student above teacher", sig & (A < 0) & (d >= 0)),
        ("A < 0, student above teacher by > c", sig & (A < 0) & (d > c))]]
    for side in ("A > 0", "A < 0"):
        total = next(r["grpo_logit_share"] for r in table if r["tokens"] == f"{side}, all")
        for r in table:
            if r["tokens"].startswith(side) and r["n"]:
                r["grpo_logit_share"] /= total
    head = (f"{len(examples)} prompts x {G} samples from {cfg.student.load}; reward mean "
            f"{sum(rewards) / len(rewards):.3f}; {int(sig.sum())} of {int(mask.sum())} response tokens carry a "
            f"non-zero advantage; alpha={rlad_cfg.alpha}, c={rlad_cfg.teacher_clamp}, eps=({rlad_cfg.eps_low}, "
            f"{rlad_cfg.eps_high}); mean |lp_s - lp_t| on them {float(d[sig].abs().mean()):.2f} nats\n\n")
    lines = ["| tokens | n | abs(lp_s - lp_t) > c | start outside the clip (no gradient) "
             "| RLAD weight / GRPO's | the same, weighted by 1 - p_s | share of GRPO's logit signal on this side "
             "| clip edge on lp_s - lp_t |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        if r["n"] == 0:
            lines.append(f"| {r['tokens']} | 0 | | | | | | |")
            continue
        lines.append(f"| {r['tokens']} | {r['n']} | {r['share_clamped']:.1%} | {r['share_zero_grad']:.1%} "
                     f"| {r['weight_ratio']:.2f} | {r['logit_ratio']:.2f} | {r['grpo_logit_share']:.1%} "
                     f"| {r['clip_edge']:+.3f} |")
    text = head + "\n".join(lines) + "\n"
    if world.rank == 0:
        print(text)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
