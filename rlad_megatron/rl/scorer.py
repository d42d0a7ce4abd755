"""A frozen model (teacher or reference) that scores rollouts: log-probs of the sampled tokens.

    teacher = Scorer.build(cfg.teacher, groups, vocab_size=V, micro_batch_size=4, device=device,
                           max_tokens_per_micro_batch=cfg.rl.max_tokens_per_micro_batch)
    lp_ref_NS, _ = reference.logprobs(exp)
    signal = teacher.teacher_signal(exp, topk=objective.teacher_topk, keep_logits=objective.keeps_teacher_logits)

Legend: N rollout rows, S row width, B micro-batch rows, V/TP local vocab shard. Log-probs are
vocab-parallel (no gather), aligned with the logits like everything in :mod:`rlad_megatron.rl.experience`.

With ``max_tokens_per_micro_batch`` the rows are scored in token-budget micro-batches trimmed to
their longest rows (:mod:`rlad_megatron.rl.micro_batches`); positions past a row's last counted
target are then 0 in ``lp_NS`` (the losses mask them). ``keep_logits`` keeps the fixed micro-batches
(the train module slices the kept logits by them). With ``logprob_chunk_size`` the log-probs are
taken from the final hidden states by chunks of positions (never the whole ``[B, S, V/TP]`` logits).

The teacher's distribution, for objectives that match it (forward_kl), is its top-k log-probs per
position (``topk``: ids ``[N, S, k]`` int32 and log-probs ``[N, S, k]`` float32, vocab-parallel:
:func:`rlad_megatron.losses.vocab_parallel_topk_logprobs`), so the rollout's teacher signal takes
O(N x S x k) memory; ``keep_logits`` keeps the whole logits shards instead (small vocabularies).
With ``offload`` the model's parameters live in host memory except inside :meth:`Scorer.resident`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rlad_megatron.config import ModelSection
from rlad_megatron.distributed.groups import ParallelGroups
from rlad_megatron.losses import (
    chunked_linear_logprobs,
    vocab_parallel_logprobs_no_grad,
    vocab_parallel_topk_logprobs,
)
from rlad_megatron.models.builder import freeze
from rlad_megatron.models.forward import run_schedule
from rlad_megatron.models.logprobs import check_chunkable, output_weight
from rlad_megatron.models.offload import ParameterOffload
from rlad_megatron.models.weights import build_model
from rlad_megatron.rl.micro_batches import plan_micro_batches, plan_stats, row_lengths, trimmed_micro_batches


@dataclass
class TeacherSignal:
    """What scoring gives the loss, on the last pipeline stage (None / empty elsewhere)."""

    lp_NS: torch.Tensor | None = None  # float32 log-probs of the targets
    topk_ids_NSK: torch.Tensor | None = None  # int32 global ids of the top-k tokens per position
    topk_lp_NSK: torch.Tensor | None = None  # float32 their log-probs
    logits: list[torch.Tensor] = field(default_factory=list)  # keep_logits: each micro-batch's shard


class Scorer:
    def __init__(self, *, model: torch.nn.Module, groups: ParallelGroups, vocab_size: int, micro_batch_size: int,
                 device: torch.device, max_tokens_per_micro_batch: int = 0, logprob_chunk_size: int = 0,
                 offload: bool = False):
        self.model, self.groups, self.vocab_size = model, groups, vocab_size
        self.micro_batch_size, self.device = micro_batch_size, device
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        if logprob_chunk_size:
            check_chunkable(model)
        self.logprob_chunk_size = logprob_chunk_size
        self.offload = ParameterOffload(model, device) if offload else None
        # The last call's plan metrics (token-budget mode): padding_frac, micro_batches, oversized_rows.
        self.last_stats: dict[str, float] = {}

    @classmethod
    def build(cls, section: ModelSection, groups: ParallelGroups, *, vocab_size: int, micro_batch_size: int,
              device: torch.device, max_tokens_per_micro_batch: int = 0, logprob_chunk_size: int = 0,
              offload: bool = False) -> Scorer:
        """``section``'s model with ``section.load``'s weights, frozen (no grads, no optimizer state)."""
        model = freeze(build_model(section, groups, device=device))
        return cls(model=model, groups=groups, vocab_size=vocab_size, micro_batch_size=micro_batch_size,
                   device=device, max_tokens_per_micro_batch=max_tokens_per_micro_batch,
                   logprob_chunk_size=logprob_chunk_size, offload=offload)

    @property
    def copy_s(self) -> float:
        """Seconds spent moving offloaded parameters so far (0 without offload)."""
        return self.offload.copy_s if self.offload is not None else 0.0

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        """The parameters on the device for the duration (a no-op without offload)."""
        with self.offload.resident() if self.offload is not None else contextlib.nullcontext():
            yield

    def logprobs(self, exp, *, keep_logits: bool = False) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Log-probs ``[N, S]`` of ``exp``'s targets under this model (see :meth:`teacher_signal`)."""
        signal = self.teacher_signal(exp, keep_logits=keep_logits)
        return signal.lp_NS, signal.logits

    def teacher_signal(self, exp, *, topk: int = 0, keep_logits: bool = False) -> TeacherSignal:
        """Log-probs of ``exp``'s targets (``tokens_NS``, ``targets_NS``, ``mask_NS``), and the top-k
        distribution per position when ``topk`` or the logits shards when ``keep_logits``.

        Filled on the last pipeline stage, empty elsewhere.
        """
        with self.resident():
            return self._score(exp, topk=topk, keep_logits=keep_logits)

    def _score(self, exp, *, topk: int, keep_logits: bool) -> TeacherSignal:
        batch = {"tokens_BS": exp.tokens_NS, "targets_BS": exp.targets_NS}
        kept: list[torch.Tensor] = []
        tp_group, vocab_size = self.groups.tp, self.vocab_size
        # Chunked log-probs from the hidden states, unless the caller keeps the logits.
        chunk = 0 if keep_logits else self.logprob_chunk_size

        def scores(logits: torch.Tensor, targets: torch.Tensor) -> dict:
            out = {"lp": vocab_parallel_logprobs_no_grad(logits, targets, tp_group=tp_group, vocab_size=vocab_size)}
            if topk:
                ids, lp = vocab_parallel_topk_logprobs(logits, topk, tp_group=tp_group, vocab_size=vocab_size)
                out["ids"], out["topk_lp"] = ids.to(torch.int32), lp
            return out

        def loss_fn(out: torch.Tensor, mb: dict):
            if chunk and not topk:
                lp = chunked_linear_logprobs(out, output_weight(self.model), mb["targets_BS"].t(), tp_group=tp_group,
                                             vocab_size=vocab_size, chunk_size=chunk).t()
                got = {"lp": lp}
            elif chunk:
                # [S, B, H] hidden states -> logits of ``chunk`` positions at a time, never all of them.
                weight, targets_SB = output_weight(self.model), mb["targets_BS"].t()
                parts = [scores(F.linear(out[i:i + chunk], weight), targets_SB[i:i + chunk])
                         for i in range(0, out.shape[0], chunk)]
                got = {k: torch.cat([p[k] for p in parts], dim=0).transpose(0, 1) for k in parts[0]}
            else:
                got = scores(out, mb["targets_BS"])
            if keep_logits:
                kept.append(out.detach())
            return torch.zeros((), device=out.device), torch.tensor(1, dtype=torch.int), {
                k: v.cpu() for k, v in got.items()}

        n, s = exp.targets_NS.shape
        # The rows of each micro-batch: a token-budget plan, or consecutive micro_batch_size rows at full width
        # (the last one smaller when a teacher replica's slice does not divide).
        if self.max_tokens_per_micro_batch and not keep_logits:
            lengths = row_lengths(exp.mask_NS)
            plan = plan_micro_batches(lengths, max_tokens=self.max_tokens_per_micro_batch)
            self.last_stats = plan_stats(lengths, plan, max_tokens=self.max_tokens_per_micro_batch).as_metrics()
            micro = trimmed_micro_batches(batch, plan, lengths)
        else:
            plan = [torch.arange(i, min(i + self.micro_batch_size, n)) for i in range(0, n, self.micro_batch_size)]
            micro = [{k: v[rows] for k, v in batch.items()} for rows in plan]
        was_training = self.model.training
        self.model.eval()
        try:
            out = run_schedule(model=self.model, micro_batches=micro, loss_fn=loss_fn, forward_only=True,
                               device=self.device, hidden_states=bool(chunk), groups=self.groups)
        finally:
            self.model.train(was_training)
        if not self.groups.is_last_stage:
            return TeacherSignal()
        full = {"lp": torch.zeros((n, s), dtype=torch.float32)}
        if topk:
            full["ids"] = torch.zeros((n, s, topk), dtype=torch.int32)
            full["topk_lp"] = torch.zeros((n, s, topk), dtype=torch.float32)
        for rows, d in zip(plan, out):
            for key, value in full.items():
                value[rows, :d[key].shape[1]] = d[key]
        return TeacherSignal(lp_NS=full["lp"], topk_ids_NSK=full.get("ids"), topk_lp_NSK=full.get("topk_lp"),
                             logits=kept)
