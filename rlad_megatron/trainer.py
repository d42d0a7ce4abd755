"""The RLAD loop: rollout -> reward -> GRPO advantages -> teacher (and reference) log-probs ->
student mini-batch updates with the configured objective -> metrics -> checkpoint.

Every rank runs the same loop. Within a DP replica all TP/PP ranks sample the same tokens (the
sampling generator is seeded from (seed, step, dp_rank)); DP replicas take disjoint prompt slices.
Nothing random is left to global RNG state, so resuming from a checkpoint replays the remaining
steps exactly.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from tqdm import tqdm

from rlad_megatron.checkpointing import files, latest_checkpoint, load_checkpoint, save_checkpoint
from rlad_megatron.config import Config, save_config
from rlad_megatron.data import PromptSampler, build_prompt_dataset, build_tokenizer, check_vocab_fits, shard_for_rank
from rlad_megatron.distributed import WorldInfo, initialize_model_parallel
from rlad_megatron.evaluation import answer_and_score, summarize
from rlad_megatron.hf.load import load_megatron_weights
from rlad_megatron.metrics import MetricsWriter, mean_over_ranks, reduce_last_stage_metrics
from rlad_megatron.models.builder import build_gpt_model, freeze
from rlad_megatron.optim import build_optimizer, wrap_ddp
from rlad_megatron.rl.advantages import grpo_advantages
from rlad_megatron.rl.experience import build_experience, frozen_logprobs
from rlad_megatron.rl.rewards import reward_batch
from rlad_megatron.rl.rollout import generate, repeat_prompts
from rlad_megatron.rl.update import LOSS_METRICS, train_mini_batch

_STEP_METRICS = LOSS_METRICS + ["grad_norm", "skipped_step"]


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient norm."""


class Trainer:
    def __init__(self, cfg: Config, world: WorldInfo):
        self.cfg, self.world, self.device = cfg, world, world.device
        sp = cfg.student.parallel
        self.groups = initialize_model_parallel(tensor_model_parallel_size=sp.tensor_model_parallel_size,
                                                pipeline_model_parallel_size=sp.pipeline_model_parallel_size,
                                                seed=cfg.train.seed)
        g, rl = self.groups, cfg.rl
        for what, total in (("rl.prompts_per_step", rl.prompts_per_step), ("rl.mini_batch_size", rl.mini_batch_size)):
            if total % g.dp_size:
                raise ValueError(f"{what}: expected a multiple of the data-parallel size {g.dp_size}, got {total}")
        if (rl.mini_batch_size // g.dp_size) % rl.micro_batch_size:
            raise ValueError(f"rl.micro_batch_size: expected a divisor of the per-replica mini-batch "
                             f"{rl.mini_batch_size // g.dp_size}, got {rl.micro_batch_size}")
        self.tokenizer = build_tokenizer(cfg.data)
        check_vocab_fits(self.tokenizer, model_vocab_size=cfg.student.model.vocab_size)
        self.vocab_size = cfg.student.model.vocab_size
        self.train_data = build_prompt_dataset(cfg.data, split="train", tokenizer=self.tokenizer)
        self.eval_data = (build_prompt_dataset(cfg.data, split="eval", tokenizer=self.tokenizer)
                          if cfg.data.eval_path and cfg.train.eval_interval > 0 else None)
        self.sampler = PromptSampler(num_examples=len(self.train_data), seed=cfg.train.seed,
                                     shuffle=cfg.data.shuffle)

        student = self._build(cfg.student)
        self.reference = None
        if cfg.distill.beta > 0:
            self.reference = freeze(self._build(cfg.student))
        self.teacher = None
        if cfg.distill.objective != "grpo":
            self.teacher = freeze(self._build(cfg.teacher))
        # Losses return sums with their counts; finalize_model_grads (run by the schedule after the
        # last backward) reduces grads over DP and divides them by the global count.
        student.config.calculate_per_token_loss = True
        student.config.finalize_model_grads_func = finalize_model_grads
        self.model = wrap_ddp(student, use_distributed_optimizer=sp.use_distributed_optimizer,
                              pg_collection=self.groups.collection)
        rollout_rows = rl.prompts_per_step * rl.group_size
        updates = cfg.train.steps * rl.epochs_per_rollout * rollout_rows // rl.mini_batch_size
        self.optimizer, self.scheduler = build_optimizer([self.model], cfg.optimizer,
                                                         use_distributed_optimizer=sp.use_distributed_optimizer,
                                                         total_steps=updates, pg_collection=self.groups.collection)
        self.step = 0
        self.nonfinite_streak = 0
        self.is_logger = world.rank == 0
        self.writer = MetricsWriter(cfg.logging.run_dir, enabled=self.is_logger, tensorboard=cfg.logging.tensorboard,
                                    wandb=cfg.logging.wandb, config=cfg)
        if self.is_logger:
            save_config(cfg, cfg.logging.run_dir)
        if cfg.checkpoint.resume:
            self._resume()

    # ------------------------------------------------------------------ build / checkpoint

    def _build(self, section):
        model = build_gpt_model(section, self.groups, device=self.device)
        if section.model.load:
            load_megatron_weights(model, section.model.load, self.groups)
        return model

    def _resume(self) -> None:
        save_dir = self.cfg.checkpoint.save_dir
        path = latest_checkpoint(save_dir) if save_dir else None
        if path is None:
            if self.is_logger:
                print(f"checkpoint.resume: no complete checkpoint under {save_dir}; starting from step 0", flush=True)
            return
        self._check_same_student(path)
        extra = load_checkpoint(directory=path, model_chunks=[self.model], optimizer=self.optimizer,
                                scheduler=self.scheduler)
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
        ours = dataclasses.asdict(self.cfg.student.model)
        for key, value in ours.items():
            if key != "load" and key in saved and saved[key] != value:
                raise ValueError(f"{saved_file}: checkpoint was saved with student.model.{key}={saved[key]!r}, "
                                 f"this run has {value!r}")

    def save(self) -> None:
        if not self.cfg.checkpoint.save_dir:
            return
        save_checkpoint(directory=self.cfg.checkpoint.save_dir, step=self.step, model_chunks=[self.model],
                        optimizer=self.optimizer, scheduler=self.scheduler,
                        extra_state={"step": self.step, "sampler": self.sampler.state_dict()}, config=self.cfg,
                        keep_last=self.cfg.checkpoint.keep_last)

    # ------------------------------------------------------------------ one step

    def _prompts(self) -> tuple[list[list[int]], list[str]]:
        g = self.groups
        index = shard_for_rank(self.sampler.next_batch(self.cfg.rl.prompts_per_step), rank=g.dp_rank,
                               world_size=g.dp_size)
        examples = [self.train_data.examples[i] for i in index]
        return [list(e.prompt_ids) for e in examples], [e.gold for e in examples]

    def _rollout(self, model, prompts: list[list[int]], *, temperature: float, seed_offset: int):
        gen = torch.Generator(device=self.device).manual_seed(
            self.cfg.train.seed * 1_000_003 + seed_offset * 7919 + self.groups.dp_rank)
        return generate(model=model, groups=self.groups, prompts=prompts, max_new_tokens=self.cfg.rl.max_new_tokens,
                        temperature=temperature, top_p=self.cfg.rl.top_p, eos_id=self.tokenizer.eos_id,
                        pad_id=self.tokenizer.pad_id, vocab_size=self.vocab_size, generator=gen)

    def train_step(self) -> dict[str, float]:
        cfg, g, rl = self.cfg, self.groups, self.cfg.rl
        t0 = time.perf_counter()
        prompts, golds = self._prompts()
        rows = repeat_prompts(prompts, group_size=rl.group_size)
        rollout = self._rollout(self.model.module, rows, temperature=rl.temperature, seed_offset=self.step)
        completions = [self.tokenizer.decode(r) for r in rollout.responses()]
        rewards = reward_batch(completions=completions, golds=[gold for gold in golds for _ in range(rl.group_size)])
        adv = grpo_advantages(rewards_N=rewards, group_size=rl.group_size)
        exp = build_experience(rollout, adv.advantages_N, pad_id=self.tokenizer.pad_id)
        t1 = time.perf_counter()

        score = dict(micro_batch_size=rl.micro_batch_size, tp_group=g.tp, vocab_size=self.vocab_size,
                     is_last_stage=g.is_last_stage, device=self.device)
        if self.teacher is not None:
            exp.lp_t_NS, exp.teacher_logits = frozen_logprobs(model=self.teacher, exp=exp,
                                                              keep_logits=cfg.distill.objective == "forward_kl",
                                                              **score)
        if self.reference is not None:
            exp.lp_ref_NS, _ = frozen_logprobs(model=self.reference, exp=exp, **score)
        t2 = time.perf_counter()

        per_replica = rl.mini_batch_size // g.dp_size
        step_metrics: list[dict] = []
        for epoch in range(rl.epochs_per_rollout):
            order = torch.randperm(len(exp), generator=torch.Generator().manual_seed(
                cfg.train.seed + 104729 * self.step + epoch)) if rl.epochs_per_rollout > 1 else torch.arange(len(exp))
            for start in range(0, len(exp), per_replica):
                step_metrics.append(train_mini_batch(
                    model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, exp=exp,
                    index=order[start:start + per_replica], micro_batch_size=rl.micro_batch_size, cfg=cfg.distill,
                    clip_grad=cfg.optimizer.clip_grad, tp_group=g.tp, vocab_size=self.vocab_size,
                    device=self.device))
        t3 = time.perf_counter()

        local = {k: sum(m[k] for m in step_metrics) / len(step_metrics) for k in _STEP_METRICS}
        metrics = reduce_last_stage_metrics(local, _STEP_METRICS, is_last_stage=g.is_last_stage, device=self.device)
        metrics["skipped_step"] = sum(m["skipped_step"] for m in step_metrics)
        resp_len = rollout.response_lengths_B.float()
        rollout_stats = {
            "reward_mean": float(sum(rewards) / len(rewards)),
            "accuracy": float(sum(r >= 1.0 for r in rewards) / len(rewards)),
            "response_length": float(resp_len.mean()),
            "zero_variance_groups": adv.zero_variance_fraction,
            "eos_fraction": float(rollout.stopped_at_eos_B.float().mean()),
        }
        metrics.update(mean_over_ranks(rollout_stats, device=self.device, group=g.dp))
        tokens = float(rollout.lengths_B.sum()) * g.dp_size
        metrics.update({"time/rollout_s": t1 - t0, "time/teacher_s": t2 - t1, "time/train_s": t3 - t2,
                        "time/step_s": t3 - t0, "tokens_per_s": tokens / max(t3 - t0, 1e-9),
                        "lr": self.optimizer.param_groups[0]["lr"]})
        self._guard(metrics)
        return metrics

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

    def evaluate(self, model, *, limit: int) -> float:
        """Greedy accuracy on the first ``limit`` eval prompts (split over DP replicas)."""
        g = self.groups
        examples = shard_for_rank(list(self.eval_data.examples[:limit]), rank=g.dp_rank, world_size=g.dp_size)
        records = answer_and_score(model=model, groups=g, tokenizer=self.tokenizer, examples=examples,
                                   max_new_tokens=self.cfg.rl.max_new_tokens, vocab_size=self.vocab_size,
                                   top_p=self.cfg.rl.top_p)
        acc = mean_over_ranks({"acc": summarize(records)["accuracy"]}, device=self.device, group=g.dp)
        return acc["acc"]

    def _maybe_eval(self, metrics: dict[str, float], *, first: bool) -> None:
        interval = self.cfg.train.eval_interval
        if self.eval_data is None or not (first or self.step % interval == 0 or self.step == self.cfg.train.steps):
            return
        limit = self.cfg.train.eval_samples
        metrics["eval/student_accuracy"] = self.evaluate(self.model.module, limit=limit)
        if first and self.teacher is not None:
            metrics["eval/teacher_accuracy"] = self.evaluate(self.teacher, limit=limit)

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
                    print("eval before training: " + _fmt(first), flush=True)
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="rlad", dynamic_ncols=True,
                   disable=not (self.is_logger and cfg.logging.progress_bar))
        while self.step < cfg.train.steps:
            metrics = self.train_step()
            self.step += 1
            self._maybe_eval(metrics, first=False)
            if self.step % cfg.logging.log_interval == 0 or self.step == cfg.train.steps:
                self.writer.write(self.step, metrics)
                if self.is_logger:
                    bar.write(f"step {self.step}: " + _fmt(metrics))
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


_SHOWN = ("reward_mean", "accuracy", "loss", "ratio_mean", "clip_frac_low", "clip_frac_high", "gated_frac",
          "teacher_logratio_mean", "kl_teacher_k3", "entropy", "grad_norm", "response_length", "tokens_per_s",
          "eval/student_accuracy", "eval/teacher_accuracy")


def _fmt(metrics: dict[str, float]) -> str:
    return " ".join(f"{k}={metrics[k]:.4g}" for k in _SHOWN if k in metrics and not math.isnan(metrics[k]))


def run(cfg: Config, world: WorldInfo) -> dict[str, float]:
    Path(cfg.logging.run_dir).mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, world).train()
