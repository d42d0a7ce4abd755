"""The RL update's gradient is the policy gradient: an end-to-end statistical check of the whole
path (KV-cached sampling and its log-probs, GRPO advantages, experience layout, TRRD loss with
alpha=1, megatron's forward-backward schedule over micro-batches, DDP gradient buffers) against the
exact gradient of the expected reward, at TP=1 and TP=2.

Set-up where the expectation is exact: responses are one token (no length weighting) and the
reward is 1 when that token is in a fixed set S, so for one prompt
``E[r] = sum_{s in S} p(s | prompt)``, one forward away. With G samples of that prompt, GRPO's
gradient estimates ``grad E[r] / std(r)``; its cosine with the exact gradient approaches 1 as G
grows (sampling noise only). Rewards shuffled against their samples (what a row misalignment
anywhere on the path would do) give a cosine near 0, so the check has teeth.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.harness import run_distributed

ROOT = Path(__file__).resolve().parents[2]
GROUP = 4096
MICRO = 512


def _cosines(rank, world_size, tmp: Path):
    from rlad_megatron.config import load_config
    from rlad_megatron.data import write_jsonl
    from rlad_megatron.distributed.init import init_distributed
    from rlad_megatron.losses import vocab_parallel_logprobs
    from rlad_megatron.models.forward import position_ids_like, run_schedule, split_micro_batches
    from rlad_megatron.rl.advantages import grpo_advantages
    from rlad_megatron.rl.experience import build_experience
    from rlad_megatron.rl.rollout import generate
    from rlad_megatron.rl.train_module import make_loss_fn
    from rlad_megatron.trainer import Trainer

    data = write_jsonl(tmp / f"one_{rank}.jsonl", [{"question": "3+4=", "answer": "#### 7"}])
    cfg = load_config(ROOT / "launch" / "configs" / "tiny_cpu.yaml", [
        f"--student.parallel.tensor_model_parallel_size={world_size}",
        f"--teacher.parallel.tensor_model_parallel_size={world_size}",
        "--student.load=null", "--teacher.load=null", f"--data.train_path={data}",
        "--data.eval_path=null", "--train.eval_interval=0", "--distill.objective=grpo",
        "--rl.prompts_per_step=1", f"--rl.group_size={GROUP}", f"--rl.mini_batch_size={GROUP}",
        f"--rl.micro_batch_size={MICRO}", "--rl.max_new_tokens=1", f"--logging.run_dir={tmp / f'run_{rank}'}",
        "--checkpoint.save_dir=null", "--logging.progress_bar=false"])
    trainer = Trainer(cfg, init_distributed("cpu"))
    ddp, model, tok = trainer.student.model, trainer.student.policy, trainer.tokenizer
    prompt = list(trainer.train_data.examples[0].prompt_ids)
    # Half of the real vocabulary, so a random model gets E[r] near 1/2 (most signal per sample).
    rewarded = torch.arange(0, tok.vocab_size, 2)
    params = [p for p in model.parameters() if p.requires_grad]

    def local_grad() -> torch.Tensor:
        # Each rank compares its own shard (TP-split and replicated parameters alike).
        return torch.cat([p.main_grad.flatten().double() for p in params])

    tokens = torch.tensor([prompt])
    model.eval()
    logits = model(tokens, position_ids_like(tokens), None)[:, -1:]
    p_s = torch.stack([vocab_parallel_logprobs(logits, torch.full((1, 1), int(s)), tp_group=trainer.groups.tp,
                                               vocab_size=trainer.objective.vocab_size).exp().sum() for s in rewarded])
    expected_reward = p_s.sum()
    ddp.zero_grad_buffer()
    (-expected_reward).backward()  # the loss gradient points away from the reward
    exact = local_grad()
    model.train()

    gen = torch.Generator().manual_seed(1234)
    rollout = generate(model=model, groups=trainer.groups, prompts=[prompt] * GROUP, max_new_tokens=1,
                       temperature=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id, vocab_size=trainer.objective.vocab_size,
                       generator=gen)
    first = rollout.tokens_BL[torch.arange(GROUP), rollout.prompt_lengths_B]
    hits = torch.isin(first, rewarded).double()
    out = {"expected_reward": expected_reward.item(), "sampled_reward": float(hits.mean())}
    shuffled = hits[torch.randperm(GROUP, generator=torch.Generator().manual_seed(7))]
    for name, rewards in (("cos", hits), ("cos_shuffled", shuffled)):
        adv = grpo_advantages(rewards_N=rewards, group_size=GROUP)
        exp = build_experience(rollout, adv.advantages_N, pad_id=tok.pad_id)
        ddp.zero_grad_buffer()
        run_schedule(model=ddp, micro_batches=split_micro_batches(exp.rows(torch.arange(GROUP)), MICRO),
                     loss_fn=make_loss_fn(trainer.objective),
                     forward_only=False, device=trainer.device)
        out[name] = float(torch.nn.functional.cosine_similarity(local_grad(), exact, dim=0))
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_rl_gradient_is_the_policy_gradient(tmp_path, tp):
    for rank, out in enumerate(run_distributed(_cosines, world_size=tp, args=(tmp_path,))):
        # The sampler draws from the policy: the sample mean sits within 4 standard errors of E[r].
        stderr = (out["expected_reward"] * (1 - out["expected_reward"]) / GROUP) ** 0.5
        assert abs(out["sampled_reward"] - out["expected_reward"]) < 4 * stderr, (rank, out)
        assert out["cos"] > 0.95, (rank, out)
        assert abs(out["cos_shuffled"]) < 0.5, (rank, out)
