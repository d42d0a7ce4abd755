"""Rollouts: autoregressive sampling from a megatron-core GPTModel stage with a static KV cache.

    batch = generate(model=model, groups=groups, prompts=repeat_prompts(prompts, group_size=G),
                     max_new_tokens=256, temperature=1.0, top_p=1.0, eos_id=eos, pad_id=pad,
                     vocab_size=tokenizer_vocab, generator=torch.Generator().manual_seed(seed))

Shape legend: B = rows (prompts x samples), L = row width <= P + N (P = longest prompt,
N = max_new_tokens), b = rows still held in the KV cache, a = rows sampling at this step,
S = tokens fed in one forward step, H = hidden size, V = megatron's padded vocabulary.

Layout (right padding): row i is ``prompt_i | response_i | pad``; the prompt starts at
position 0 and the response follows it directly. A training forward over ``tokens_BL`` with
plain causal attention therefore sees exactly the context the sampler saw, with no attention
mask and no position shift (pads only follow the real tokens).

KV cache: megatron-core's own ``StaticInferenceContext`` (the static batching path of
``megatron.core.inference``): attention layers keep K/V buffers ``[L, b, ...]`` and advance
``sequence_len_offset``. All rows share that offset, so prompts of different lengths are handled
the way megatron's static text-generation controller does it: prefill the shortest prompt's
length, then step one position at a time; a row whose prompt is not finished yet takes its
next prompt token instead of the sample. This keeps megatron's causal attention correct with
any attention backend (local or Transformer Engine) and needs no padding mask. Rows that
finish are dropped from the cache once a quarter of the cached rows are done.

TP: the last-position logits are all-gathered across TP (``runtime_gather_output=True``,
``[b, V]`` per step, small next to the KV cache) and every TP rank samples with its own,
identically seeded generator; TP rank 0's tokens are then broadcast so the ranks can never
diverge. PP: hidden states go stage to stage with send/recv over ``groups.pp``; the last stage
samples and broadcasts tokens and log-probs to every stage. Sequence parallelism is not
supported while sampling (megatron's static inference path does not support it either).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core.inference.contexts import StaticInferenceContext

from rlad_megatron.distributed.groups import ParallelGroups
from rlad_megatron.rl.sampling import sample_tokens, token_logprobs, validate_sampling_args

# Drop finished rows from the KV cache when at most this fraction of the cached rows is live.
_COMPACT_WHEN_LIVE_FRACTION = 0.75


@dataclass
class RolloutBatch:
    """Prompts with their sampled responses, right padded (see the module docstring).

    ``logprobs_BL[i, t]`` is log pi(tokens[i, t] | tokens[i, :t]) under the raw policy
    (temperature 1, no top-p, true vocabulary), set on response positions and 0 elsewhere:
    the ``lp_old`` of the RL objective, aligned with the token it scores.
    """

    tokens_BL: torch.Tensor  # int64
    response_mask_BL: torch.Tensor  # bool, True on response tokens (including a final EOS)
    logprobs_BL: torch.Tensor  # float32
    prompt_lengths_B: torch.Tensor  # int64
    response_lengths_B: torch.Tensor  # int64, tokens sampled per row (including a final EOS)
    stopped_at_eos_B: torch.Tensor  # bool, False where the row hit max_new_tokens instead

    @property
    def lengths_B(self) -> torch.Tensor:
        return self.prompt_lengths_B + self.response_lengths_B

    def responses(self) -> list[list[int]]:
        """The response token ids of each row (EOS included when sampled)."""
        return [self.tokens_BL[i, p:p + n].tolist()
                for i, (p, n) in enumerate(zip(self.prompt_lengths_B.tolist(), self.response_lengths_B.tolist()))]


def repeat_prompts(prompts: list[list[int]], *, group_size: int) -> list[list[int]]:
    """Each prompt ``group_size`` times in a row: row ``i`` belongs to prompt ``i // group_size``."""
    if group_size < 1:
        raise ValueError(f"group_size: expected >= 1, got {group_size}")
    return [list(p) for p in prompts for _ in range(group_size)]


@torch.no_grad()
def generate(*, model: torch.nn.Module, groups: ParallelGroups, prompts: list[list[int]], max_new_tokens: int,
             temperature: float, top_p: float = 1.0, eos_id: int | None, pad_id: int, vocab_size: int,
             generator: torch.Generator | None, use_kv_cache: bool = True) -> RolloutBatch:
    """Sample up to ``max_new_tokens`` tokens after each prompt; every rank returns the same batch.

    ``model`` is this rank's GPTModel stage (switched to eval mode for the call and restored).
    ``temperature == 0`` is greedy. ``vocab_size`` is the tokenizer's vocabulary: padded vocab
    ids are never sampled. ``generator`` (on the model's device) drives sampling on the last
    stage; seed it identically on every rank. A row stops after sampling ``eos_id``;
    the loop stops when every row is done. ``use_kv_cache=False`` recomputes the whole prefix
    each step (the benchmark baseline; same tokens up to float rounding).
    """
    _validate(model=model, prompts=prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
              vocab_size=vocab_size, pad_id=pad_id, eos_id=eos_id)
    device = next(model.parameters()).device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator: expected a torch.Generator on {device.type} (the model's device), "
                         f"got one on {generator.device.type}")
    was_training = model.training
    model.eval()
    try:
        return _Sampler(model=model, groups=groups, prompts=prompts, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, eos_id=eos_id, pad_id=pad_id,
                        vocab_size=vocab_size, generator=generator, use_kv_cache=use_kv_cache,
                        device=device).run()
    finally:
        if groups.pp_size > 1:
            model.set_input_tensor(None)
        model.train(was_training)


def _validate(*, model, prompts, max_new_tokens, temperature, top_p, vocab_size, pad_id, eos_id) -> None:
    validate_sampling_args(temperature=temperature, top_p=top_p)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    if not prompts:
        raise ValueError("prompts: expected at least one prompt, got an empty list")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{i}]: expected at least one token, got an empty prompt")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompts[{i}]: expected token ids in [0, {vocab_size}), got {bad[:5]}")
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id: expected an id in [0, {vocab_size}) or None, got {eos_id}")
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id: expected an id in [0, {vocab_size}), got {pad_id}")
    if getattr(model.config, "sequence_parallel", False):
        raise ValueError("sequence_parallel: generation needs a model built with sequence_parallel=False "
                         "(megatron-core's static inference path does not support it)")


class _Sampler:
    """One generate() call: the token buffers, the KV cache and the step loop."""

    def __init__(self, *, model, groups: ParallelGroups, prompts, max_new_tokens, temperature, top_p, eos_id,
                 pad_id, vocab_size, generator, use_kv_cache, device):
        self.model, self.groups, self.device = model, groups, device
        self.n_new, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.eos_id, self.vocab_size, self.generator = eos_id, vocab_size, generator
        rows = len(prompts)
        self.prompt_len_B = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
        width = int(self.prompt_len_B.max()) + max_new_tokens
        self.tokens_BL = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
        for i, prompt in enumerate(prompts):
            self.tokens_BL[i, :len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        self.logprobs_BL = torch.zeros((rows, width), dtype=torch.float32, device=device)
        self.response_len_B = torch.zeros(rows, dtype=torch.long, device=device)
        self.done_B = torch.zeros(rows, dtype=torch.bool, device=device)
        self.eos_B = torch.zeros(rows, dtype=torch.bool, device=device)
        self.context = StaticInferenceContext(rows, width) if use_kv_cache else None
        self.pipe = _PipelineStage(model, groups, device)

    def run(self) -> RolloutBatch:
        rows_b = torch.arange(self.tokens_BL.shape[0], device=self.device)  # cache order
        start, pos = 0, int(self.prompt_len_B.min())
        while True:
            # Feed positions [start, pos) of the cached rows; the last logits predict position `pos`.
            first = start if self.context is not None else 0
            ids_bS = self.tokens_BL[rows_b, first:pos]
            logits_bV = self.pipe.forward(ids_bS, first, self.context)
            sampling_b = (self.prompt_len_B[rows_b] <= pos) & ~self.done_B[rows_b]
            rows_a = rows_b[sampling_b]
            if rows_a.numel():
                self._sample(rows_a, pos, logits_bV[sampling_b] if logits_bV is not None else None)
            if bool(self.done_B.all()):
                break
            start, pos = pos, pos + 1
            if self.context is not None and bool((self.prompt_len_B <= pos).all()):
                self.context.enable_decode_mode()
            rows_b = self._maybe_compact(rows_b)
        return self._batch()

    def _sample(self, rows_a: torch.Tensor, pos: int, logits_aV: torch.Tensor | None) -> None:
        if logits_aV is not None:
            tokens_a = sample_tokens(logits_aV, vocab_size=self.vocab_size, temperature=self.temperature,
                                     top_p=self.top_p, generator=self.generator)
            lp_a = token_logprobs(logits_aV, tokens_a, vocab_size=self.vocab_size)
        else:
            tokens_a = lp_a = None
        tokens_a, lp_a = self.pipe.share(tokens_a, lp_a, rows_a.numel())
        self.tokens_BL[rows_a, pos] = tokens_a
        self.logprobs_BL[rows_a, pos] = lp_a
        self.response_len_B[rows_a] += 1
        hit_eos_a = tokens_a == self.eos_id if self.eos_id is not None else torch.zeros_like(tokens_a, dtype=torch.bool)
        self.eos_B[rows_a] = hit_eos_a
        self.done_B[rows_a] = hit_eos_a | (self.response_len_B[rows_a] >= self.n_new)

    def _maybe_compact(self, rows_b: torch.Tensor) -> torch.Tensor:
        live_b = ~self.done_B[rows_b]
        if live_b.sum() > _COMPACT_WHEN_LIVE_FRACTION * rows_b.numel():
            return rows_b
        keep_b = live_b.nonzero().squeeze(-1)
        if self.context is not None:
            memory = self.context.key_value_memory_dict
            for layer, (key_LbD, value_LbD) in memory.items():
                memory[layer] = (key_LbD.index_select(1, keep_b), value_LbD.index_select(1, keep_b))
        return rows_b[keep_b]

    def _batch(self) -> RolloutBatch:
        width = int((self.prompt_len_B + self.response_len_B).max())
        positions_L = torch.arange(width, device=self.device)
        response_mask_BL = ((positions_L >= self.prompt_len_B[:, None])
                            & (positions_L < (self.prompt_len_B + self.response_len_B)[:, None]))
        return RolloutBatch(tokens_BL=self.tokens_BL[:, :width].contiguous(), response_mask_BL=response_mask_BL,
                            logprobs_BL=self.logprobs_BL[:, :width].contiguous(),
                            prompt_lengths_B=self.prompt_len_B, response_lengths_B=self.response_len_B,
                            stopped_at_eos_B=self.eos_B)


class _PipelineStage:
    """This rank's forward for one step, and the token exchange between TP ranks and PP stages."""

    def __init__(self, model, groups: ParallelGroups, device: torch.device):
        self.model, self.groups, self.device = model, groups, device
        config = model.config
        self.hidden_size = config.hidden_size
        self.pipe_dtype = config.pipeline_dtype or config.params_dtype
        if groups.pp_size > 1:
            pp_ranks = dist.get_process_group_ranks(groups.pp)
            self.prev_rank = pp_ranks[groups.pp_rank - 1] if not groups.is_first_stage else None
            self.next_rank = pp_ranks[groups.pp_rank + 1] if not groups.is_last_stage else None
        self.tp_src = dist.get_process_group_ranks(groups.tp)[0] if groups.tp_size > 1 else None

    def forward(self, ids_bS: torch.Tensor, first_position: int,
                context: StaticInferenceContext | None) -> torch.Tensor | None:
        """Last-position logits ``[b, V]`` (full vocabulary) on the last stage, None elsewhere."""
        rows, seq = ids_bS.shape
        positions_bS = torch.arange(first_position, first_position + seq, device=self.device).expand(rows, -1)
        g = self.groups
        if g.pp_size > 1:
            hidden_in_Sbh = None
            if not g.is_first_stage:
                hidden_in_Sbh = torch.empty((seq, rows, self.hidden_size), dtype=self.pipe_dtype, device=self.device)
                dist.recv(hidden_in_Sbh, src=self.prev_rank, group=g.pp)
            self.model.set_input_tensor(hidden_in_Sbh)
        out = self.model(ids_bS, positions_bS, None, inference_context=context, runtime_gather_output=True)
        if g.pp_size > 1 and not g.is_last_stage:
            dist.send(out.to(self.pipe_dtype).contiguous(), dst=self.next_rank, group=g.pp)
        if context is not None:
            context.increment_sequence_len_offset(seq)
        # The last stage returns [b, S, V] logits (S = 1 with the cache: megatron keeps only the last position).
        return out[:, -1, :] if g.is_last_stage else None

    def share(self, tokens_a: torch.Tensor | None, lp_a: torch.Tensor | None,
              rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank gets TP rank 0 of the last stage's tokens and log-probs."""
        g = self.groups
        if g.tp_size == 1 and g.pp_size == 1:
            return tokens_a, lp_a
        # float64 holds token ids exactly, so one broadcast carries both.
        packed_2a = torch.empty((2, rows), dtype=torch.float64, device=self.device)
        if g.is_last_stage:
            packed_2a[0], packed_2a[1] = tokens_a, lp_a
            if self.tp_src is not None:
                dist.broadcast(packed_2a, src=self.tp_src, group=g.tp)
        if g.pp_size > 1:
            dist.broadcast(packed_2a, src=g.pp_last_rank, group=g.pp)
        return packed_2a[0].long(), packed_2a[1].float()
