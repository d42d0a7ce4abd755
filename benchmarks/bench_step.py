"""One RLAD step vs one GRPO step on the same rollout batch, side by side in one run.

    torchrun --standalone --nproc-per-node 2 benchmarks/bench_step.py --config launch/configs/tiny_cpu.yaml \
        --student.load=null --teacher.load=null

Times, per repetition and interleaved: the teacher's forward (vocab-parallel log-probs of the
sampled tokens), the student update with the grpo objective, and the student update with rlad
(which needs the teacher's log-probs). Target: rlad update - grpo update <= 5% of the grpo update,
i.e. a whole RLAD step costs no more than a GRPO step + the teacher forward + 5%. It uses the
trainer's own components (generator, teacher scorer, student train module). Reports medians on
rank 0.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    reps = 5
    if "--reps" in argv:
        i = argv.index("--reps")
        reps = int(argv[i + 1])
        del argv[i:i + 2]
    from rlad_megatron.config import load_config
    from rlad_megatron.distributed import init_distributed
    from rlad_megatron.objectives import build_objective
    from rlad_megatron.rl.advantages import grpo_advantages
    from rlad_megatron.rl.experience import build_experience
    from rlad_megatron.rl.rewards import reward_batch
    from rlad_megatron.rl.rollout import repeat_prompts
    from rlad_megatron.rl.train_module import make_loss_fn
    from rlad_megatron.trainer import Trainer

    cfg_path = argv[argv.index("--config") + 1]
    overrides = [a for i, a in enumerate(argv) if a != "--config" and (i == 0 or argv[i - 1] != "--config")]
    cfg = load_config(cfg_path, overrides + ["--logging.progress_bar=false", "--train.eval_interval=0",
                                             "--logging.tensorboard=false", "--logging.run_dir=runs/bench_step",
                                             "--distill.objective=rlad"])
    world = init_distributed(cfg.train.device)
    trainer = Trainer(cfg, world)
    g, rl, student = trainer.groups, cfg.rl, trainer.student
    index, prompts, golds = trainer.next_prompts()
    rollout = trainer.generator.generate(repeat_prompts(prompts, group_size=rl.group_size),
                                         row_seeds=trainer.row_seeds(0, index))
    rewards = reward_batch(completions=[trainer.tokenizer.decode(r) for r in rollout.responses()],
                           golds=[gold for gold in golds for _ in range(rl.group_size)])
    # Random rewards if the policy scores nothing: the update must carry a real gradient.
    if len(set(rewards)) == 1:
        rewards = torch.randint(0, 2, (len(rewards),), generator=torch.Generator().manual_seed(0)).float().tolist()
    exp = build_experience(rollout, grpo_advantages(rewards_N=rewards, group_size=rl.group_size).advantages_N,
                           pad_id=trainer.tokenizer.pad_id)
    index = torch.arange(len(exp))[:rl.mini_batch_size // g.dp_size]
    loss_fns = {name: make_loss_fn(build_objective(dataclasses.replace(cfg.distill, objective=name), tp_group=g.tp,
                                                   vocab_size=trainer.objective.vocab_size))
                for name in ("grpo", "rlad")}

    def update(objective: str) -> None:
        student.loss_fn = loss_fns[objective]
        student.train_mini_batch(exp, index)

    def teacher() -> None:
        exp.lp_t_NS, _ = trainer.teacher.logprobs(exp)

    times: dict[str, list[float]] = {"teacher_forward": [], "grpo_update": [], "rlad_update": []}
    teacher()
    update("grpo")  # warm-up
    for _ in range(reps):
        for name, fn in (("teacher_forward", teacher), ("grpo_update", lambda: update("grpo")),
                         ("rlad_update", lambda: update("rlad"))):
            _sync()
            t0 = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - t0)
    if world.rank == 0:
        med = {k: statistics.median(v) for k, v in times.items()}
        grpo_step = med["grpo_update"]
        rlad_step = med["teacher_forward"] + med["rlad_update"]
        rows, width = exp.tokens_NS.shape
        print(f"batch: {rows} rows x {width} tokens, mini-batch {len(index)} rows, TP={g.tp_size} PP={g.pp_size} "
              f"DP={g.dp_size}, reps={reps}")
        print("| phase | median s |\n|---|---|")
        for k, v in med.items():
            print(f"| {k} | {v:.4f} |")
        print(f"| GRPO step (update) | {grpo_step:.4f} |")
        print(f"| RLAD step (teacher forward + update) | {rlad_step:.4f} |")
        overhead = med["rlad_update"] - med["grpo_update"]
        print(f"RLAD update overhead over GRPO update: {overhead:+.4f} s ({100 * overhead / grpo_step:+.1f}% of the "
              f"GRPO update); RLAD step / (GRPO step + teacher forward) = "
              f"{rlad_step / (grpo_step + med['teacher_forward']):.3f}")
    return 0


def _sync() -> None:
    # Kernels are asynchronous on CUDA: time finished work on every rank.
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    torch.distributed.barrier()


if __name__ == "__main__":
    sys.exit(main())
