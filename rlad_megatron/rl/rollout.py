"""Rollouts: autoregressive sampling from a megatron-core GPTModel stage with a static KV cache.

    batch = generate(model=model, groups=groups, prompts=repeat_prompts(prompts, group_size=G),
                     max_new_tokens=256, temperature=1.0, top_p=1.0, eos_id=eos, pad_id=pad,
                     vocab_size=tokenizer_vocab, generator=None,
                     row_seeds=rollout_row_seeds(seed=seed, step=step, prompt_indices=idx, group_size=G),
                     max_rows=256)

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

Row pool (rollout_pool.py): ``max_rows`` bounds the rows held in KV caches at once; rows wait and
are admitted in cohorts as others finish. Random streams (sampling.py): row ``i`` samples with
noise hashed from ``row_seeds[i]`` and the position, so the tokens of a row do not depend on the
batch it shares, its order or its admission time: the pool and one big batch give the same tokens.

TP / PP (rollout_stage.py): the last-position logits are all-gathered across TP
(``runtime_gather_output=True``, ``[b, V]`` per step, small next to the KV cache), every TP rank
samples with the same row seeds and TP rank 0's tokens are broadcast; PP stages pass hidden states
with send/recv and the last stage broadcasts tokens and log-probs. Sequence parallelism is not
supported while sampling (megatron's static inference path does not support it either).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlad_megatron.distributed.groups import ParallelGroups
from rlad_megatron.rl.graphed_decode import DecodeSteps, check_supported
from rlad_megatron.rl.rollout_pool import PoolStats, RowPool
from rlad_megatron.rl.sampling import Sampler, make_sampler, validate_sampling_args

_MASK64 = (1 << 64) - 1


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
    stats: PoolStats | None = None  # the step loop's counters (decode steps, cohorts); not policy data

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


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def rollout_row_seeds(*, seed: int, step: int, prompt_indices: Sequence[int], group_size: int) -> list[int]:
    """One sampling seed per row of ``repeat_prompts(prompts, group_size)``, in [0, 2**63).

    Row ``i`` gets a hash of (seed, step, prompt_indices[i // group_size], i % group_size): a
    prompt's samples differ, and a row's stream does not depend on the DP shard, the batch or the
    admission order. ``prompt_indices`` should identify the prompt globally (its dataset index).
    """
    for name, value in (("seed", seed), ("step", step)):
        if value < 0:
            raise ValueError(f"{name}: expected >= 0, got {value}")
    if group_size < 1:
        raise ValueError(f"group_size: expected >= 1, got {group_size}")
    base = _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))
    seeds = []
    for index in prompt_indices:
        if index < 0:
            raise ValueError(f"prompt_indices: expected ids >= 0, got {index}")
        prompt_key = _splitmix64(base ^ (index & _MASK64))
        seeds.extend(_splitmix64(prompt_key ^ sample) >> 1 for sample in range(group_size))
    return seeds


@torch.no_grad()
def generate(*, model: torch.nn.Module, groups: ParallelGroups, prompts: list[list[int]], max_new_tokens: int,
             temperature: float, top_p: float = 1.0, eos_id: int | None, pad_id: int, vocab_size: int,
             generator: torch.Generator | None, use_kv_cache: bool = True,
             row_seeds: Sequence[int] | torch.Tensor | None = None, max_rows: int | None = None,
             cuda_graphs: bool = False) -> RolloutBatch:
    """Sample up to ``max_new_tokens`` tokens after each prompt; every rank returns the same batch.

    ``model`` is this rank's GPTModel stage (switched to eval mode for the call and restored).
    ``temperature == 0`` is greedy. ``vocab_size`` is the tokenizer's vocabulary: padded vocab
    ids are never sampled. A row stops after sampling ``eos_id``; the loop stops when every row
    is done. ``use_kv_cache=False`` recomputes the whole prefix each step (the benchmark baseline;
    same tokens up to float rounding).

    Randomness: ``row_seeds`` (one int in [0, 2**63) per row, e.g. from ``rollout_row_seeds``)
    gives each row its own stream. Without it the row seeds are drawn from ``generator`` (on the
    model's device, seeded identically on every rank; None: torch's default generator), which
    makes the tokens depend on the whole call's seed but still not on ``max_rows``.
    ``max_rows`` (None or 0: all rows): at most this many rows in the KV caches at once.
    ``cuda_graphs``: decode steps run with fixed shapes (rl/graphed_decode.py), captured as CUDA
    graphs on a CUDA model; on CPU the same fixed-shape step runs eagerly (a warning says so).
    """
    _validate(model=model, prompts=prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
              vocab_size=vocab_size, pad_id=pad_id, eos_id=eos_id, max_rows=max_rows, row_seeds=row_seeds)
    device = next(model.parameters()).device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"generator: expected a torch.Generator on {device.type} (the model's device), "
                         f"got one on {generator.device.type}")
    seeds_B = _row_seeds_tensor(row_seeds, rows=len(prompts), generator=generator, device=device,
                                greedy=temperature == 0.0)
    sample = make_sampler(vocab_size=vocab_size, temperature=temperature, top_p=top_p)
    decode_steps = _decode_steps(model, groups, device, sample) if cuda_graphs and use_kv_cache else None
    was_training = model.training
    model.eval()
    try:
        pool = RowPool(model=model, groups=groups, prompts=prompts, max_new_tokens=max_new_tokens,
                       sample=sample, eos_id=eos_id, pad_id=pad_id, seeds_B=seeds_B, use_kv_cache=use_kv_cache,
                       max_rows=max_rows or len(prompts), device=device, decode_steps=decode_steps)
        stats = pool.run()
    finally:
        if groups.pp_size > 1:
            model.set_input_tensor(None)
        model.train(was_training)
    return _batch(pool, stats)


def _decode_steps(model, groups: ParallelGroups, device: torch.device, sample: Sampler) -> DecodeSteps | None:
    reason = check_supported(model, groups)
    if reason is not None:
        warnings.warn(f"cuda_graphs: ignored for this model ({reason}); decoding with megatron's step", stacklevel=3)
        return None
    if device.type != "cuda":
        warnings.warn(f"cuda_graphs: the model is on {device.type}, not CUDA; the fixed-shape decode step "
                      "runs eagerly", stacklevel=3)
    return DecodeSteps(model, capture=device.type == "cuda", sample=sample)


def _row_seeds_tensor(row_seeds, *, rows: int, generator: torch.Generator | None, device: torch.device,
                      greedy: bool) -> torch.Tensor:
    if row_seeds is None and greedy:  # unused: do not advance the caller's (or torch's default) generator
        return torch.zeros(rows, dtype=torch.int64, device=device)
    if row_seeds is None:
        return torch.randint(0, 2**62, (rows,), generator=generator, device=device, dtype=torch.int64)
    seeds_B = torch.as_tensor(row_seeds, dtype=torch.int64).to(device)
    if bool((seeds_B < 0).any()):
        raise ValueError(f"row_seeds: expected seeds in [0, 2**63), got {seeds_B[seeds_B < 0][:5].tolist()}")
    return seeds_B


def _batch(pool: RowPool, stats: PoolStats) -> RolloutBatch:
    width = int((pool.prompt_len_B + pool.response_len_B).max())
    positions_L = torch.arange(width, device=pool.device)
    response_mask_BL = ((positions_L >= pool.prompt_len_B[:, None])
                        & (positions_L < (pool.prompt_len_B + pool.response_len_B)[:, None]))
    return RolloutBatch(tokens_BL=pool.tokens_BL[:, :width].contiguous(), response_mask_BL=response_mask_BL,
                        logprobs_BL=pool.logprobs_BL[:, :width].contiguous(), prompt_lengths_B=pool.prompt_len_B,
                        response_lengths_B=pool.response_len_B, stopped_at_eos_B=pool.eos_B, stats=stats)


def _validate(*, model, prompts, max_new_tokens, temperature, top_p, vocab_size, pad_id, eos_id, max_rows=None,
              row_seeds=None) -> None:
    validate_sampling_args(temperature=temperature, top_p=top_p)
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows: expected >= 0 (0 or None: all rows), got {max_rows}")
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"row_seeds: expected one seed per row ({len(prompts)}), got {len(row_seeds)}")
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
