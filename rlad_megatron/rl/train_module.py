"""The student being trained: model, optimizer, schedule, process groups, vocabulary layout, objective.

    student = StudentTrainModule.build(cfg, groups, objective=objective, device=device)
    metrics = student.train_mini_batch(exp, rows)      # forward-backward + one guarded optimizer step
    student.save(save_dir, step=..., extra_state=..., config=cfg); student.load(path)

Loss normalisation: the schedule runs with ``calculate_per_token_loss``; each micro-batch returns
the *sum* of its per-sequence token means (``seq_mean_token_mean``) or of its token losses
(``token_mean``) together with its count of sequences or tokens, and megatron's
``finalize_model_grads`` divides the gradients by the count summed over micro-batches and DP
replicas. So the update equals the full-batch objective of DESIGN.md at any micro-batch size and
DP degree. The same holds for token-budget micro-batches (``rl.max_tokens_per_micro_batch``,
:mod:`rlad_megatron.rl.micro_batches`): rows regrouped and trimmed to each micro-batch's longest
row give the same summed loss, count and gradients.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from rlad_megatron.checkpointing import load_checkpoint, save_checkpoint
from rlad_megatron.config import Config
from rlad_megatron.distributed.groups import ParallelGroups
from rlad_megatron.losses import chunked_linear_logprobs, vocab_parallel_logprobs
from rlad_megatron.metrics import LOSS_METRICS, mean_of_dicts
from rlad_megatron.models.builder import te_available
from rlad_megatron.models.forward import run_schedule, split_micro_batches
from rlad_megatron.models.logprobs import check_chunkable, output_weight
from rlad_megatron.models.weights import build_model
from rlad_megatron.objectives import LossInputs, Objective
from rlad_megatron.optim import build_optimizer, wrap_ddp
from rlad_megatron.rl.experience import Experience
from rlad_megatron.rl.micro_batches import (
    layout_line,
    plan_micro_batches,
    plan_stats,
    row_lengths,
    trimmed_micro_batches,
)


def make_loss_fn(objective: Objective, *, logprob_chunk_size: int = 0, model: torch.nn.Module | None = None):
    """The megatron ``loss_func`` body: ``(logits [B, S, V/TP], micro-batch) -> (sum loss, count, metrics)``.

    With ``logprob_chunk_size`` (and the student ``model``, for its output weight) the schedule must run
    with ``hidden_states=True``: the body gets the final hidden states ``[S, B, H]`` and takes the
    log-probs by chunks of positions (:func:`rlad_megatron.losses.chunked_linear_logprobs`).
    """

    def token_logprobs(out: torch.Tensor, targets_BS: torch.Tensor):
        if logprob_chunk_size:
            lp_SB, ent_SB = chunked_linear_logprobs(out, output_weight(model), targets_BS.t(),
                                                    tp_group=objective.tp_group, vocab_size=objective.vocab_size,
                                                    chunk_size=logprob_chunk_size, with_entropy=True)
            return lp_SB.t(), ent_SB.t(), None
        lp, ent = vocab_parallel_logprobs(out, targets_BS, tp_group=objective.tp_group,
                                          vocab_size=objective.vocab_size, with_entropy=True)
        return lp, ent, out

    def loss_fn(out: torch.Tensor, mb: dict):
        lp_s, entropy, logits_BSV = token_logprobs(out, mb["targets_BS"])
        mask = mb["mask_BS"]
        inputs = LossInputs(lp_s=lp_s, lp_old=mb["lp_old_BS"], advantages=mb["adv_B"], mask=mask,
                            lp_t=mb.get("lp_t_BS"), lp_ref=mb.get("lp_ref_BS"), entropy=entropy,
                            student_logits=logits_BSV, teacher_logits=mb.get("teacher_logits_BSV"),
                            teacher_topk_ids=mb.get("teacher_topk_ids_BSK"),
                            teacher_topk_lp=mb.get("teacher_topk_lp_BSK"))
        loss, metrics = objective.loss(inputs, num_sequences=1.0, num_tokens=1.0)
        count = mask.shape[0] if objective.cfg.loss_agg == "seq_mean_token_mean" else int(mask.sum())
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["count"] = float(count)
        return loss, torch.tensor(count, dtype=torch.int), metrics

    return loss_fn


def guarded_optimizer_step(optimizer, *, clip_grad: float) -> tuple[bool, float]:
    """Step unless the gradient norm is non-finite; returns (stepped, grad_norm).

    megatron's FP32 optimizer would clip and step with NaN gradients; checking the norm first lets
    the trainer skip the step and count it instead.
    """
    found_inf = optimizer.prepare_grads()
    grad_norm = float(optimizer.get_grad_norm())
    if found_inf or not math.isfinite(grad_norm):
        return False, grad_norm
    if clip_grad > 0:
        for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
            params = opt.get_parameters()
            if params:
                clip_grad_by_total_norm_fp32(params, clip_grad, grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm


class StudentTrainModule:
    """One stateful object for the student's update (OLMo-core's TrainModule, megatron-core inside)."""

    def __init__(self, *, model, optimizer, scheduler, groups: ParallelGroups, objective: Objective,
                 micro_batch_size: int, clip_grad: float, device: torch.device,
                 max_tokens_per_micro_batch: int = 0, logprob_chunk_size: int = 0):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.groups, self.objective, self.device = groups, objective, device
        self.micro_batch_size, self.clip_grad = micro_batch_size, clip_grad
        # rl.balance_dp_tokens: replicas hold different shares of a mini-batch, so its loss is the sum over
        # replicas over their summed count (else each replica's loss, averaged by the trainer).
        self.global_loss = False
        self.configure(max_tokens_per_micro_batch=max_tokens_per_micro_batch, logprob_chunk_size=logprob_chunk_size)

    def configure(self, *, max_tokens_per_micro_batch: int, logprob_chunk_size: int) -> None:
        """Set the long-sequence modes (``rl.max_tokens_per_micro_batch``, ``rl.logprob_chunk_size``; 0 = off).

        Objectives that keep the teacher's logits keep fixed micro-batches (warned); those that use the
        teacher's distribution need the student's materialised logits (warned).
        """
        name = self.objective.name
        if max_tokens_per_micro_batch and self.objective.keeps_teacher_logits:
            warnings.warn(f"rl.max_tokens_per_micro_batch={max_tokens_per_micro_batch} is ignored: objective "
                          f"{name!r} keeps the teacher's logits per fixed micro-batch", stacklevel=2)
            max_tokens_per_micro_batch = 0
        if logprob_chunk_size and self.objective.uses_teacher_logits:
            warnings.warn(f"rl.logprob_chunk_size={logprob_chunk_size} is ignored: objective {name!r} "
                          f"needs the student's whole logits", stacklevel=2)
            logprob_chunk_size = 0
        if logprob_chunk_size:
            check_chunkable(self.model)
        self.max_tokens_per_micro_batch, self.logprob_chunk_size = max_tokens_per_micro_batch, logprob_chunk_size
        self.loss_fn = make_loss_fn(self.objective, logprob_chunk_size=logprob_chunk_size, model=self.model)

    @classmethod
    def build(cls, cfg: Config, groups: ParallelGroups, *, objective: Objective,
              device: torch.device) -> StudentTrainModule:
        """The student of ``cfg`` (``student.load``'s weights), DDP-wrapped, with its optimizer and schedule."""
        sp, rl = cfg.student.parallel, cfg.rl
        student = build_model(cfg.student, groups, device=device)
        # Losses return sums with their counts; finalize_model_grads (run by the schedule after the
        # last backward) reduces grads over DP and divides them by the global count.
        student.config.calculate_per_token_loss = True
        student.config.finalize_model_grads_func = finalize_model_grads
        model = wrap_ddp(student, use_distributed_optimizer=sp.use_distributed_optimizer,
                         pg_collection=groups.collection)
        rollout_rows = rl.prompts_per_step * rl.group_size
        updates = cfg.train.steps * rl.epochs_per_rollout * rollout_rows // rl.mini_batch_size
        optimizer, scheduler = build_optimizer([model], cfg.optimizer,
                                               use_distributed_optimizer=sp.use_distributed_optimizer,
                                               total_steps=updates, pg_collection=groups.collection)
        if rl.max_tokens_per_micro_batch and torch.distributed.get_rank() == 0:
            print(layout_line(max_tokens=rl.max_tokens_per_micro_batch,
                              transformer_engine=device.type == "cuda" and te_available()), flush=True)
        return cls(model=model, optimizer=optimizer, scheduler=scheduler, groups=groups, objective=objective,
                   micro_batch_size=rl.micro_batch_size, clip_grad=cfg.optimizer.clip_grad, device=device,
                   max_tokens_per_micro_batch=rl.max_tokens_per_micro_batch,
                   logprob_chunk_size=rl.logprob_chunk_size)

    @property
    def policy(self) -> torch.nn.Module:
        """This rank's GPTModel stage (what the generator samples from)."""
        return self.model.module

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_mini_batch(self, exp: Experience, index: torch.Tensor) -> dict:
        """Forward-backward over the rows ``index`` of ``exp`` and one guarded optimizer step."""
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        micro, layout = self.micro_batches(exp, index)
        if exp.teacher_logits:
            # Teacher logits were kept per scoring micro-batch; rows of this mini-batch are re-sliced.
            full = torch.cat(exp.teacher_logits, dim=0)[index]
            for i, mb in enumerate(micro):
                mb["teacher_logits_BSV"] = full[i * self.micro_batch_size:(i + 1) * self.micro_batch_size]
        out = run_schedule(model=self.model, micro_batches=micro, loss_fn=self.loss_fn, forward_only=False,
                           device=self.device, hidden_states=bool(self.logprob_chunk_size))
        stepped, grad_norm = guarded_optimizer_step(self.optimizer, clip_grad=self.clip_grad)
        if stepped:
            self.scheduler.step(increment=1)
        metrics = mean_of_dicts(out, LOSS_METRICS)
        if out:
            # The loss reported is the mini-batch objective: summed losses over the total count.
            total, count = sum(d["loss"] for d in out), sum(d["count"] for d in out)
            if self.global_loss and self.groups.dp_size > 1:
                both = torch.tensor([total, count], dtype=torch.float64, device=self.device)
                torch.distributed.all_reduce(both, group=self.groups.dp)
                total, count = both.tolist()
            metrics["loss"] = total / max(count, 1.0)
        metrics["grad_norm"] = grad_norm
        metrics["skipped_step"] = 0.0 if stepped else 1.0
        metrics.update(layout)
        return metrics

    def micro_batches(self, exp: Experience, index: torch.Tensor) -> tuple[list[dict], dict[str, float]]:
        """The micro-batches of rows ``index``: ``micro_batch_size`` rows at the rollout's width, or
        token-budget micro-batches trimmed to their longest rows; and the plan's metrics (token-budget
        mode: ``padding_frac``, ``micro_batches``, ``oversized_rows``)."""
        rows = exp.rows(index)
        if not self.max_tokens_per_micro_batch:
            # A remainder micro-batch only with rl.balance_dp_tokens (a replica's share of a mini-batch varies).
            return split_micro_batches(rows, self.micro_batch_size, allow_remainder=True), {}
        lengths = row_lengths(rows["mask_BS"])
        plan = plan_micro_batches(lengths, max_tokens=self.max_tokens_per_micro_batch)
        stats = plan_stats(lengths, plan, max_tokens=self.max_tokens_per_micro_batch)
        return trimmed_micro_batches(rows, plan, lengths), stats.as_metrics()

    def save(self, directory: str | Path, *, step: int, extra_state: dict, config: Config,
             keep_last: int) -> Path:
        return save_checkpoint(directory=directory, step=step, model_chunks=[self.model], optimizer=self.optimizer,
                               scheduler=self.scheduler, extra_state=extra_state, config=config, keep_last=keep_last)

    def load(self, path: str | Path) -> dict:
        """Model, optimizer, schedule and RNG from the checkpoint at ``path``; returns its extra state."""
        return load_checkpoint(directory=path, model_chunks=[self.model], optimizer=self.optimizer,
                               scheduler=self.scheduler)
