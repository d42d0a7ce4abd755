"""A frozen model (teacher or reference) that scores rollouts: log-probs of the sampled tokens.

    teacher = Scorer.build(cfg.teacher, groups, vocab_size=V, micro_batch_size=4, device=device,
                           max_tokens_per_micro_batch=cfg.rl.max_tokens_per_micro_batch)
    lp_t_NS, logits = teacher.logprobs(exp, keep_logits=objective.uses_teacher_logits)

Legend: N rollout rows, S row width, B micro-batch rows, V/TP local vocab shard. Log-probs are
vocab-parallel (no gather), aligned with the logits like everything in :mod:`rlad_megatron.rl.experience`.

With ``max_tokens_per_micro_batch`` the rows are scored in token-budget micro-batches trimmed to
their longest rows (:mod:`rlad_megatron.rl.micro_batches`); positions past a row's last counted
target are then 0 in ``lp_NS`` (the losses mask them). ``keep_logits`` keeps the fixed micro-batches
(the train module slices the kept logits by them). With ``logprob_chunk_size`` the log-probs are
taken from the final hidden states by chunks of positions (never the whole ``[B, S, V/TP]`` logits).
"""

from __future__ import annotations

import torch

from rlad_megatron.config import ModelSection
from rlad_megatron.distributed.groups import ParallelGroups
from rlad_megatron.losses import chunked_linear_logprobs, vocab_parallel_logprobs_no_grad
from rlad_megatron.models.builder import freeze
from rlad_megatron.models.forward import run_schedule, split_micro_batches
from rlad_megatron.models.logprobs import check_chunkable, output_weight
from rlad_megatron.models.weights import build_model
from rlad_megatron.rl.experience import Experience
from rlad_megatron.rl.micro_batches import plan_micro_batches, plan_stats, row_lengths, trimmed_micro_batches


class Scorer:
    def __init__(self, *, model: torch.nn.Module, groups: ParallelGroups, vocab_size: int, micro_batch_size: int,
                 device: torch.device, max_tokens_per_micro_batch: int = 0, logprob_chunk_size: int = 0):
        self.model, self.groups, self.vocab_size = model, groups, vocab_size
        self.micro_batch_size, self.device = micro_batch_size, device
        self.max_tokens_per_micro_batch = max_tokens_per_micro_batch
        if logprob_chunk_size:
            check_chunkable(model)
        self.logprob_chunk_size = logprob_chunk_size
        # The last call's plan metrics (token-budget mode): padding_frac, micro_batches, oversized_rows.
        self.last_stats: dict[str, float] = {}

    @classmethod
    def build(cls, section: ModelSection, groups: ParallelGroups, *, vocab_size: int, micro_batch_size: int,
              device: torch.device, max_tokens_per_micro_batch: int = 0, logprob_chunk_size: int = 0) -> Scorer:
        """``section``'s model with ``section.load``'s weights, frozen (no grads, no optimizer state)."""
        model = freeze(build_model(section, groups, device=device))
        return cls(model=model, groups=groups, vocab_size=vocab_size, micro_batch_size=micro_batch_size,
                   device=device, max_tokens_per_micro_batch=max_tokens_per_micro_batch,
                   logprob_chunk_size=logprob_chunk_size)

    def logprobs(self, exp: Experience, *,
                 keep_logits: bool = False) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Log-probs ``[N, S]`` of ``exp``'s targets under this model.

        Returns ``(lp_NS, logits)`` on the last pipeline stage and ``(None, [])`` elsewhere; ``logits``
        holds each micro-batch's vocab shard when ``keep_logits`` (objectives that match the
        teacher's distribution need it).
        """
        batch = {"tokens_BS": exp.tokens_NS, "targets_BS": exp.targets_NS}
        kept: list[torch.Tensor] = []
        tp_group, vocab_size = self.groups.tp, self.vocab_size
        # Chunked log-probs from the hidden states, unless the caller keeps the logits.
        chunk = 0 if keep_logits else self.logprob_chunk_size

        def loss_fn(out: torch.Tensor, mb: dict):
            if chunk:
                lp = chunked_linear_logprobs(out, output_weight(self.model), mb["targets_BS"].t(), tp_group=tp_group,
                                             vocab_size=vocab_size, chunk_size=chunk).t()
            else:
                lp = vocab_parallel_logprobs_no_grad(out, mb["targets_BS"], tp_group=tp_group, vocab_size=vocab_size)
            if keep_logits:
                kept.append(out.detach())
            return torch.zeros((), device=out.device), torch.tensor(1, dtype=torch.int), {"lp_BS": lp.cpu()}

        plan = None
        if self.max_tokens_per_micro_batch and not keep_logits:
            lengths = row_lengths(exp.mask_NS)
            plan = plan_micro_batches(lengths, max_tokens=self.max_tokens_per_micro_batch)
            self.last_stats = plan_stats(lengths, plan, max_tokens=self.max_tokens_per_micro_batch).as_metrics()
            micro = trimmed_micro_batches(batch, plan, lengths)
        else:
            micro = split_micro_batches(batch, self.micro_batch_size)
        was_training = self.model.training
        self.model.eval()
        try:
            out = run_schedule(model=self.model, micro_batches=micro, loss_fn=loss_fn, forward_only=True,
                               device=self.device, hidden_states=bool(chunk))
        finally:
            self.model.train(was_training)
        if not self.groups.is_last_stage:
            return None, []
        if plan is None:
            return torch.cat([d["lp_BS"] for d in out], dim=0), kept
        lp_NS = torch.zeros(exp.targets_NS.shape, dtype=torch.float32)
        for rows, d in zip(plan, out):
            lp_NS[rows, :d["lp_BS"].shape[1]] = d["lp_BS"]
        return lp_NS, kept
