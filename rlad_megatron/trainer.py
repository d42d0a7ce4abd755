"""The RLAD loop (DESIGN.md section 3): rollout -> reward -> GRPO advantages -> teacher (and reference)
log-probs -> student mini-batch updates with the configured objective -> metrics -> checkpoint.

The pieces are components built once: the objective (what the step must compute and the loss),
the student train module (model, optimizer, schedule), frozen scorers for the teacher and the
reference, and a generator over the student. Every rank runs the same loop. Within a DP replica
all TP/PP ranks sample the same tokens (the sampling generator is seeded from (seed, step,
dp_rank)); DP replicas take disjoint prompt slices. Nothing random is left to global RNG state, so
resuming from a checkpoint replays the remaining steps exactly.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from rlad_megatron.checkpointing import files, latest_checkpoint
from rlad_megatron.config import Config, check_world, same_layout, save_config
from rlad_megatron.data import PromptSampler, build_prompt_dataset, build_tokenizer, check_vocab_fits, shard_for_rank
from rlad_megatron.distributed import WorldInfo, initialize_model_parallel
from rlad_megatron.evaluation import answer_and_score, summarize
from rlad_megatron.metrics import (
    UPDATE_METRICS,
    MetricsWriter,
    format_log_line,
    mean_over_ranks,
    reduce_last_stage_metrics,
)
from rlad_megatron.models.builder import kernels_line
from rlad_megatron.objectives import build_objective
from rlad_megatron.rl.advantages import grpo_advantages
from rlad_megatron.rl.dp_balance import DPBalancer
from rlad_megatron.rl.experience import build_experience
from rlad_megatron.rl.generator import Generator
from rlad_megatron.rl.rewards import reward_batch
from rlad_megatron.rl.rollout import repeat_prompts, rollout_row_seeds
from rlad_megatron.rl.rollout_metrics import MAX_KEY, MEAN_KEY, logprob_mismatch
from rlad_megatron.rl.scorer import Scorer
from rlad_megatron.rl.teacher_layout import LayoutScorer, teacher_groups
from rlad_megatron.rl.train_module import StudentTrainModule

MISMATCH_KEYS = (MEAN_KEY, MAX_KEY)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class Trainer:
    def __init__(self, cfg: Config, world: WorldInfo):
        self.cfg, self.world, self.device = cfg, world, world.device
        sp, rl = cfg.student.parallel, cfg.rl
        check_world(cfg, world.world_size)
        # megatron's global grid is the student's; a teacher on the same layout shares it (and its EP).
        shared = (cfg.student, cfg.teacher) if same_layout(cfg.student, cfg.teacher) else (cfg.student,)
        ep = next((s.parallel.expert_model_parallel_size for s in shared if s.model.num_experts), 1)
        self.groups = g = initialize_model_parallel(tensor_model_parallel_size=sp.tensor_model_parallel_size,
                                                    pipeline_model_parallel_size=sp.pipeline_model_parallel_size,
                                                    expert_model_parallel_size=ep, seed=cfg.train.seed)
        for what, total in (("rl.prompts_per_step", rl.prompts_per_step), ("rl.mini_batch_size", rl.mini_batch_size)):
            if total % g.dp_size:
                raise ValueError(f"{what}: expected a multiple of the data-parallel size {g.dp_size}, got {total}")
        if (rl.mini_batch_size // g.dp_size) % rl.micro_batch_size:
            raise ValueError(f"rl.micro_batch_size: expected a divisor of the per-replica mini-batch "
                             f"{rl.mini_batch_size // g.dp_size}, got {rl.micro_batch_size}")
        self.is_logger = world.rank == 0
        if self.is_logger:
            print(kernels_line(world.device), flush=True)
        self.tokenizer = build_tokenizer(cfg.data)
        vocab = cfg.student.model.vocab_size
        check_vocab_fits(self.tokenizer, model_vocab_size=vocab)
        self.train_data = build_prompt_dataset(cfg.data, split="train", tokenizer=self.tokenizer)
        self.eval_data = (build_prompt_dataset(cfg.data, split="eval", tokenizer=self.tokenizer)
                          if cfg.data.eval_path and cfg.train.eval_interval > 0 else None)
        self.sampler = PromptSampler(num_examples=len(self.train_data), seed=cfg.train.seed,
                                     shuffle=cfg.data.shuffle)

        self.objective = build_objective(cfg.distill, tp_group=g.tp, vocab_size=vocab)
        # Build order (student, reference, teacher) fixes which random init each model gets.
        self.student = StudentTrainModule.build(cfg, g, objective=self.objective, device=self.device)
        scoring = dict(vocab_size=vocab, micro_batch_size=rl.micro_batch_size, device=self.device,
                       max_tokens_per_micro_batch=rl.max_tokens_per_micro_batch,
                       logprob_chunk_size=rl.logprob_chunk_size)
        # The reference is the student as it started (student.load).
        self.reference = (Scorer.build(cfg.student, g, **scoring, offload=cfg.distill.reference_offload)
                          if self.objective.needs_reference else None)
        self.teacher = None
        if self.objective.needs_teacher:
            # The teacher's own grid (teacher.parallel), or the student's when the layouts agree.
            tg = teacher_groups(cfg, g)
            self.teacher = Scorer.build(cfg.teacher, tg, **scoring, offload=cfg.teacher.offload)
            if tg is not g:
                self.teacher = LayoutScorer(self.teacher, student_groups=g, pad_id=self.tokenizer.pad_id,
                                            device=self.device)
        self.generator = Generator(model=self.student.policy, groups=g, vocab_size=vocab,
                                   eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
                                   max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_p=rl.top_p,
                                   max_rows=rl.max_rollout_rows, cuda_graphs=rl.cuda_graphs)
        # The student's own forward over its rollout, before any update: the sampler/trainer mismatch.
        self.policy_scorer = Scorer(model=self.student.policy, groups=g, **scoring)
        self.balancer = None
        if rl.balance_dp_tokens and g.dp_size > 1:
            if self.objective.keeps_teacher_logits:
                raise ValueError("rl.balance_dp_tokens: expected false with the teacher's full logits "
                                 "(distill.teacher_topk: 0), got true")
            self.balancer = DPBalancer(g, self.device, teacher=self.objective.needs_teacher,
                                       reference=self.objective.needs_reference, topk=self.objective.teacher_topk)
            self.student.global_loss = True
        self.step = 0
        self.nonfinite_streak = 0
        self.writer = MetricsWriter(cfg.logging.run_dir, enabled=self.is_logger, tensorboard=cfg.logging.tensorboard,
                                    wandb=cfg.logging.wandb, config=cfg)
        if self.is_logger:
            save_config(cfg, cfg.logging.run_dir)
        if cfg.checkpoint.resume:
            self._resume()

    # ------------------------------------------------------------------ checkpoint

    def _resume(self) -> None:
        save_dir = self.cfg.checkpoint.save_dir
        path = latest_checkpoint(save_dir) if save_dir else None
        if path is None:
            if self.is_logger:
                print(f"checkpoint.resume: no complete checkpoint under {save_dir}; starting from step 0", flush=True)
            return
        self._check_same_student(path)
        extra = self.student.load(path)
        self.step = int(extra["step"])
        self.sampler.load_state_dict(extra["sampler"])
        if self.is_logger:
            print(f"resumed from {path} at step {self.step}", flush=True)

    def _check_same_student(self, path: Path) -> None:
        # megatron-core loads embedding rows with allow_shape_mismatch (vocab padding), so a
        # checkpoint of another vocabulary would load silently; the saved config tells.
        saved = files.saved_student_model(path)
        if saved is None:
            return
        saved_file = Path(path) / files.RUN_CONFIG
        for key, value in dataclasses.asdict(self.cfg.student.model).items():
            if key in saved and saved[key] != value:
                raise ValueError(f"{saved_file}: checkpoint was saved with student.model.{key}={saved[key]!r}, "
                                 f"this run has {value!r}")

    def save(self) -> None:
        if not self.cfg.checkpoint.save_dir:
            return
        self.student.save(self.cfg.checkpoint.save_dir, step=self.step, config=self.cfg,
                          extra_state={"step": self.step, "sampler": self.sampler.state_dict()},
                          keep_last=self.cfg.checkpoint.keep_last)

    # ------------------------------------------------------------------ one step

    def next_prompts(self) -> tuple[list[int], list[list[int]], list[str]]:
        """This DP replica's slice of the step's prompts: dataset indices, token ids, gold answers."""
        g = self.groups
        index = shard_for_rank(self.sampler.next_batch(self.cfg.rl.prompts_per_step), rank=g.dp_rank,
                               world_size=g.dp_size)
        examples = [self.train_data.examples[i] for i in index]
        return list(index), [list(e.prompt_ids) for e in examples], [e.gold for e in examples]

    def row_seeds(self, step: int, prompt_indices: list[int]) -> list[int]:
        """Each rollout row's random stream: (seed, step, prompt, sample), whatever the batching."""
        return rollout_row_seeds(seed=self.cfg.train.seed, step=step, prompt_indices=prompt_indices,
                                 group_size=self.cfg.rl.group_size)

    def mini_batches(self, rows: int) -> list[torch.Tensor]:
        """Row indices of each mini-batch of the step's experience, over all epochs."""
        rl, per_replica = self.cfg.rl, self.cfg.rl.mini_batch_size // self.groups.dp_size
        out = []
        for epoch in range(rl.epochs_per_rollout):
            order = torch.randperm(rows, generator=torch.Generator().manual_seed(
                self.cfg.train.seed + 104729 * self.step + epoch)) if rl.epochs_per_rollout > 1 else torch.arange(rows)
            out += [order[start:start + per_replica] for start in range(0, rows, per_replica)]
        return out

    def train_step(self) -> dict[str, float]:
        g, G = self.groups, self.cfg.rl.group_size
        t0 = time.perf_counter()
        # 1. Rollout: the student samples G responses per prompt.
        index, prompts, golds = self.next_prompts()
        rollout = self.generator.generate(repeat_prompts(prompts, group_size=G),
                                          row_seeds=self.row_seeds(self.step, index))
        # 2. Verifiable reward and GRPO advantages.
        rewards = reward_batch(completions=[self.tokenizer.decode(r) for r in rollout.responses()],
                               golds=[gold for gold in golds for _ in range(G)])
        adv = grpo_advantages(rewards_N=rewards, group_size=G)
        exp = build_experience(rollout, adv.advantages_N, pad_id=self.tokenizer.pad_id)
        t1 = time.perf_counter()
        # 3. Teacher (and reference) log-probs of the sampled tokens.
        copy_s = self._copy_s()
        if self.teacher is not None:
            signal = self.teacher.teacher_signal(exp, topk=self.objective.teacher_topk,
                                                 keep_logits=self.objective.keeps_teacher_logits)
            exp.lp_t_NS, exp.teacher_logits = signal.lp_NS, signal.logits
            exp.teacher_topk_ids_NSK, exp.teacher_topk_lp_NSK = signal.topk_ids_NSK, signal.topk_lp_NSK
        if self.reference is not None:
            exp.lp_ref_NS, _ = self.reference.logprobs(exp)
        lp_NS, _ = self.policy_scorer.logprobs(exp)
        mismatch = (logprob_mismatch(exp.lp_old_NS, lp_NS, exp.mask_NS, dp_group=g.dp) if g.is_last_stage
                    else dict.fromkeys(MISMATCH_KEYS, 0.0))
        t2 = time.perf_counter()
        # 4. Student updates, one optimizer step per mini-batch.
        updates, balance = [], []
        for rows in self.mini_batches(len(exp)):
            if self.balancer is not None:
                part, stats = self.balancer.mini_batch(exp, rows)
                updates.append(self.student.train_mini_batch(part, torch.arange(len(part))))
                balance.append(stats)
            else:
                updates.append(self.student.train_mini_batch(exp, rows))
        t3 = time.perf_counter()
        # 5. Metrics.
        local = {k: sum(m[k] for m in updates) / len(updates) for k in UPDATE_METRICS}
        metrics = reduce_last_stage_metrics(local, UPDATE_METRICS, is_last_stage=g.is_last_stage, device=self.device)
        metrics["skipped_step"] = sum(m["skipped_step"] for m in updates)
        for key in (balance[0] if balance else ()):  # the same on every rank: computed from the plan
            metrics[key] = sum(b[key] for b in balance) / len(balance)
        rollout_stats = {
            "reward_mean": float(sum(rewards) / len(rewards)),
            "accuracy": float(sum(r >= 1.0 for r in rewards) / len(rewards)),
            "response_length": float(rollout.response_lengths_B.float().mean()),
            "zero_variance_groups": adv.zero_variance_fraction,
            "eos_fraction": float(rollout.stopped_at_eos_B.float().mean()),
        }
        metrics.update(mean_over_ranks(rollout_stats, device=self.device, group=g.dp))
        # Already reduced over DP; the last stage's values, visible on every stage.
        metrics.update(reduce_last_stage_metrics(mismatch, MISMATCH_KEYS, is_last_stage=g.is_last_stage,
                                                 device=self.device))
        tokens = float(rollout.lengths_B.sum()) * g.dp_size
        metrics.update({"time/rollout_s": t1 - t0, "time/teacher_s": t2 - t1, "time/train_s": t3 - t2,
                        "time/offload_s": self._copy_s() - copy_s,
                        "time/step_s": t3 - t0, "tokens_per_s": tokens / max(t3 - t0, 1e-9), "lr": self.student.lr})
        self._guard(metrics)
        return metrics

    def _copy_s(self) -> float:
        """Seconds spent moving offloaded teacher / reference parameters so far (part of time/teacher_s)."""
        return sum(m.copy_s for m in (self.teacher, self.reference) if m is not None)

    def _guard(self, metrics: dict[str, float]) -> None:
        if metrics["skipped_step"] > 0 or not math.isfinite(metrics["loss"]):
            self.nonfinite_streak += 1
            if self.nonfinite_streak > self.cfg.train.max_nonfinite_steps:
                raise NonFiniteError(
                    f"train.max_nonfinite_steps: {self.nonfinite_streak} consecutive steps had a non-finite loss or "
                    f"gradient norm (limit {self.cfg.train.max_nonfinite_steps}); lower optimizer.lr or check the data")
        else:
            self.nonfinite_streak = 0

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model: torch.nn.Module, *, limit: int, groups=None) -> float:
        """Greedy accuracy of ``model`` (on ``groups``, default the student's) on the first ``limit`` eval
        prompts (split over its DP replicas)."""
        g = groups or self.groups
        examples = shard_for_rank(list(self.eval_data.examples[:limit]), rank=g.dp_rank, world_size=g.dp_size)
        greedy = dataclasses.replace(self.generator, model=model, groups=g, temperature=0.0)
        records = answer_and_score(generator=greedy, tokenizer=self.tokenizer, examples=examples)
        return mean_over_ranks({"acc": summarize(records)["accuracy"]}, device=self.device, group=g.dp)["acc"]

    def _maybe_eval(self, metrics: dict[str, float], *, first: bool) -> None:
        interval = self.cfg.train.eval_interval
        if self.eval_data is None or not (first or self.step % interval == 0 or self.step == self.cfg.train.steps):
            return
        limit = self.cfg.train.eval_samples
        metrics["eval/student_accuracy"] = self.evaluate(self.student.policy, limit=limit)
        if first and self.teacher is not None:
            with self.teacher.resident():
                metrics["eval/teacher_accuracy"] = self.evaluate(self.teacher.model, limit=limit,
                                                                 groups=self.teacher.groups)

    # ------------------------------------------------------------------ loop

    def train(self) -> dict[str, float]:
        cfg = self.cfg
        last: dict[str, float] = {}
        if self.step == 0:
            first: dict[str, float] = {}
            self._maybe_eval(first, first=True)
            if first:
                self.writer.write(0, first)
                if self.is_logger:
                    print("eval before training: " + format_log_line(first), flush=True)
        # A bar redraws itself with \r: only on a terminal; a log file gets the step lines alone.
        show_bar = self.is_logger and cfg.logging.progress_bar and sys.stderr.isatty()
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="rlad", dynamic_ncols=True, disable=not show_bar)
        while self.step < cfg.train.steps:
            metrics = self.train_step()
            self.step += 1
            self._maybe_eval(metrics, first=False)
            if self.step % cfg.logging.log_interval == 0 or self.step == cfg.train.steps:
                self.writer.write(self.step, metrics)
                if self.is_logger:
                    bar.write(f"step {self.step}: " + format_log_line(metrics))
            bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", loss=f"{metrics['loss']:.4f}")
            bar.update(1)
            interval = cfg.checkpoint.save_interval
            if interval > 0 and (self.step % interval == 0 or self.step == cfg.train.steps):
                self.save()
            last = metrics
        bar.close()
        self.writer.close()
        if dist.is_initialized():
            dist.barrier()
        return last


def run(cfg: Config, world: WorldInfo) -> dict[str, float]:
    Path(cfg.logging.run_dir).mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, world).train()
