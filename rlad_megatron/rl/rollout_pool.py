"""The rollout step loop: a pool of rows bounded by KV memory, admitted in cohorts as rows finish.

Shape legend: B = rows (prompts x samples), L = row width (P + N), b = rows of one cohort held in
its KV cache, a = rows sampling at this step, V = megatron's padded vocabulary.

Why cohorts: megatron-core's ``StaticInferenceContext`` keeps one ``sequence_len_offset`` for all
of its rows, so a row cannot join a cache whose rows are at another position without an attention
mask that its decode path does not take. A cohort is a set of rows admitted together with its own
``StaticInferenceContext`` (K/V ``[L_c, b, ...]``, ``L_c`` = the cohort's longest prompt + N). Each
loop step runs one forward per live cohort. Rows that finish are dropped from their cohort's cache
(``index_select`` of K/V); the freed budget admits the next waiting rows as a new cohort once it
reaches ``min_cohort`` rows, so a few long responses hold only their own slots, not the whole batch.
At most ``max_rows`` rows are ever in the caches at once (plus the transient copy of a compaction).

With ``max_rows >= B`` there is one cohort: the static-batch decode, unchanged.

Tokens do not depend on the schedule: a row is prefilled and decoded at its true positions
0..L in whatever cohort it lands, and its samples come from its own seeded stream (sampling.py).
Every rank takes the same admission decisions, since they depend only on the broadcast tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from rlad_megatron.rl.graphed_decode import DecodeSteps
from rlad_megatron.rl.rollout_stage import PipelineStage
from rlad_megatron.rl.sampling import Sampler

# Without waiting rows, drop finished rows from a cohort's cache when at most this fraction is live.
_COMPACT_WHEN_LIVE_FRACTION = 0.75
# A new cohort is admitted once this fraction of the pool's budget is free (or every waiting row fits).
_MIN_COHORT_FRACTION = 0.5


@dataclass(eq=False)
class _Cohort:
    rows_b: torch.Tensor  # global row ids, in cache order
    context: StaticInferenceContext | None
    start: int  # first position fed at the next step (the cache holds [0, start))
    pos: int  # the position the next step's last logits predict


@dataclass
class PoolStats:
    """Counters of one generate() call (benchmarks and tests read them; not part of the policy)."""

    loop_steps: int = 0  # iterations of the step loop: each runs one forward per live cohort
    forward_calls: int = 0
    cohorts: int = 0
    max_cached_rows: int = 0
    cohort_sizes: list[int] = field(default_factory=list)
    # Sum over cached forwards of rows x positions attended: the K/V entries read (roofline bytes).
    kv_row_positions: int = 0
    fixed_shape_steps: int = 0  # decode steps run by graphed_decode.DecodeSteps
    graph_captures: int = 0  # CUDA graphs captured for them (0 on CPU: the steps run eagerly)
    graph_capture_s: float = 0.0  # wall time of the capturing steps (graphed_decode.DecodeSteps.capture_s)


class RowPool:
    """One generate() call: the token buffers, the cohorts and the step loop."""

    def __init__(self, *, model, groups, prompts, max_new_tokens, sample: Sampler, eos_id, pad_id,
                 seeds_B: torch.Tensor, use_kv_cache: bool, max_rows: int, device,
                 decode_steps: DecodeSteps | None = None):
        self.device, self.use_kv_cache = device, use_kv_cache
        self.n_new, self.sample, self.eos_id, self.seeds_B = max_new_tokens, sample, eos_id, seeds_B
        rows = len(prompts)
        self.max_rows = min(max_rows, rows)
        self.min_cohort = max(1, int(self.max_rows * _MIN_COHORT_FRACTION))
        self.prompt_len_B = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
        width = int(self.prompt_len_B.max()) + max_new_tokens
        self.tokens_BL = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
        for i, prompt in enumerate(prompts):
            self.tokens_BL[i, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.logprobs_BL = torch.zeros((rows, width), dtype=torch.float32, device=device)
        self.response_len_B = torch.zeros(rows, dtype=torch.long, device=device)
        self.done_B = torch.zeros(rows, dtype=torch.bool, device=device)
        self.eos_B = torch.zeros(rows, dtype=torch.bool, device=device)
        self.pipe = PipelineStage(model, groups, device)
        self.decode_steps = decode_steps if use_kv_cache else None
        self.stats = PoolStats()

    def run(self) -> PoolStats:
        waiting = deque(range(self.tokens_BL.shape[0]))
        cohorts: list[_Cohort] = []
        while waiting or cohorts:
            self._admit(waiting, cohorts)
            self.stats.max_cached_rows = max(self.stats.max_cached_rows, sum(c.rows_b.numel() for c in cohorts))
            self.stats.loop_steps += 1
            for cohort in cohorts:
                self._step(cohort)
            # One host sync per cohort and step decides finishing and compaction (each sync stalls the
            # CPU until the GPU has drained, so the loop keeps them few).
            live = [int((~self.done_B[c.rows_b]).sum()) for c in cohorts]
            for cohort, n_live in zip(cohorts, live):
                if n_live == 0:
                    if self.decode_steps is not None and cohort.context is not None:
                        self.decode_steps.release(cohort.context)
                elif waiting or n_live <= _COMPACT_WHEN_LIVE_FRACTION * cohort.rows_b.numel():
                    self._compact(cohort, n_live)
            cohorts = [c for c, n_live in zip(cohorts, live) if n_live]
        if self.decode_steps is not None:
            self.stats.graph_captures = self.decode_steps.captures
            self.stats.graph_capture_s = self.decode_steps.capture_s
        return self.stats

    def _admit(self, waiting: deque, cohorts: list[_Cohort]) -> None:
        free = self.max_rows - sum(c.rows_b.numel() for c in cohorts)
        if not waiting or free < min(self.min_cohort, len(waiting)):
            return
        rows_b = torch.tensor([waiting.popleft() for _ in range(min(free, len(waiting)))], device=self.device)
        prompt_len_b = self.prompt_len_B[rows_b]
        context = (StaticInferenceContext(rows_b.numel(), int(prompt_len_b.max()) + self.n_new)
                   if self.use_kv_cache else None)
        # Prefill the shortest prompt; longer prompts feed their next prompt token at each step after it.
        cohorts.append(_Cohort(rows_b=rows_b, context=context, start=0, pos=int(prompt_len_b.min())))
        self.stats.cohorts += 1
        self.stats.cohort_sizes.append(rows_b.numel())

    def _step(self, c: _Cohort) -> None:
        # Feed positions [start, pos) of the cohort's rows; the last logits predict position `pos`.
        first = c.start if c.context is not None else 0
        ids_bS = self.tokens_BL[c.rows_b, first:c.pos]
        sampling_b = (self.prompt_len_B[c.rows_b] <= c.pos) & ~self.done_B[c.rows_b]
        index_a = sampling_b.nonzero().squeeze(-1)  # the step's other host sync; int indexing below has none
        rows_a = c.rows_b[index_a]
        if self.decode_steps is not None and c.context.is_decode_only():
            # Samples every cohort row inside the step (its graph); only the sampling rows are kept.
            tokens_b, lp_b = self.decode_steps.step(c.context, ids_bS, first, self.seeds_B[c.rows_b])
            sampled = (tokens_b[index_a], lp_b[index_a])
            self.stats.fixed_shape_steps += 1
            # The fixed-shape step reads every slot of the cache, masked or not.
            self.stats.kv_row_positions += c.rows_b.numel() * c.context.max_sequence_length
        else:
            logits_bV = self.pipe.forward(ids_bS, first, c.context)
            sampled = (self.sample(logits_bV[index_a], self.seeds_B[rows_a], torch.full_like(rows_a, c.pos))
                       if logits_bV is not None and rows_a.numel() else (None, None))
            if c.context is not None:
                self.stats.kv_row_positions += c.rows_b.numel() * c.pos
        self.stats.forward_calls += 1
        if rows_a.numel():
            self._record(rows_a, c.pos, *sampled)
        c.start, c.pos = c.pos, c.pos + 1
        if (c.context is not None and not c.context.is_decode_only()
                and bool((self.prompt_len_B[c.rows_b] <= c.pos).all())):
            c.context.enable_decode_mode()

    def _record(self, rows_a: torch.Tensor, pos: int, tokens_a: torch.Tensor | None,
                lp_a: torch.Tensor | None) -> None:
        """Store the sampled tokens (None off the last pipeline stage: received from it) and stop rows."""
        tokens_a, lp_a = self.pipe.share(tokens_a, lp_a, rows_a.numel())
        self.tokens_BL[rows_a, pos] = tokens_a
        self.logprobs_BL[rows_a, pos] = lp_a
        self.response_len_B[rows_a] += 1
        hit_eos_a = tokens_a == self.eos_id if self.eos_id is not None else torch.zeros_like(tokens_a, dtype=torch.bool)
        self.eos_B[rows_a] = hit_eos_a
        self.done_B[rows_a] = hit_eos_a | (self.response_len_B[rows_a] >= self.n_new)

    def _compact(self, c: _Cohort, n_live: int) -> None:
        if n_live == c.rows_b.numel():
            return
        live_b = ~self.done_B[c.rows_b]
        if self.decode_steps is not None:
            # Graphs are captured per batch size: shrink only to power-of-two buckets, padding with
            # finished rows (computed, never sampled), so a cohort is captured at most log2(b) + 1 times.
            bucket = 1 << (n_live - 1).bit_length()
            if bucket >= c.rows_b.numel():
                return
            live_b[(~live_b).nonzero().squeeze(-1)[:bucket - n_live]] = True
        keep_b = live_b.nonzero().squeeze(-1)
        if c.context is not None:
            memory = c.context.key_value_memory_dict
            for layer, (key_LbD, value_LbD) in memory.items():
                memory[layer] = (key_LbD.index_select(1, keep_b), value_LbD.index_select(1, keep_b))
        c.rows_b = c.rows_b[keep_b]
