"""The KV-memory-bounded row pool gives the same tokens as one big batch, at TP=2 and at PP=2.

Per layout (one distributed call): 4 prompts x 4 samples = 16 rows, with EOS chosen so rows
stop at different lengths. The pool holds at most 4 rows (1/4) in its KV caches and admits the
others as rows finish; its greedy and sampled tokens, masks and log-probs must equal the one-batch
rollout's, for explicit row seeds and for seeds drawn from a generator; so must the fixed-shape
decode step of ``cuda_graphs=True`` (run eagerly on CPU; at PP=2 it falls back to megatron's
step). Reversing the row order reverses the tokens (a row's stream is its own). At TP=2 the
sampler's log-probs are compared with a training forward of the same tokens (vocab-parallel
log-probs of the TP-sharded logits): the ``rollout/logprob_mismatch`` metric must be ~0 in float32.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.harness import run_distributed
from tests.helpers import rollout_model_section, spreading_eos

VOCAB, PAD, NEW, GROUP = 250, 0, 12, 4
NUM_LAYERS = 2


def _section(tp: int, pp: int):
    return rollout_model_section(tp, pp, vocab_size=VOCAB, num_layers=NUM_LAYERS)


def _same(a, b, *, lp_tol: float) -> None:
    torch.testing.assert_close(a.tokens_BL, b.tokens_BL, rtol=0, atol=0)
    torch.testing.assert_close(a.response_mask_BL, b.response_mask_BL, rtol=0, atol=0)
    torch.testing.assert_close(a.logprobs_BL, b.logprobs_BL, rtol=lp_tol, atol=lp_tol)


def _training_forward_logprobs(model, batch, tp_group) -> torch.Tensor:
    """lp_BL[i, t] = log p(tokens[i, t] | tokens[i, :t]) from one full forward (TP-sharded logits)."""
    from rlad_megatron.losses import vocab_parallel_logprobs_no_grad

    tokens_BL = batch.tokens_BL
    positions_BL = torch.arange(tokens_BL.shape[1]).expand_as(tokens_BL)
    logits_BLv = model(tokens_BL, positions_BL, None)
    lp_BL = torch.zeros(tokens_BL.shape, dtype=torch.float32)
    lp_BL[:, 1:] = vocab_parallel_logprobs_no_grad(logits_BLv[:, :-1], tokens_BL[:, 1:], tp_group=tp_group,
                                                   vocab_size=VOCAB)
    return lp_BL


def _run(rank, world_size, tp, pp, prompts, seed):
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.models.builder import build_gpt_model
    from rlad_megatron.rl.rollout import generate, repeat_prompts, rollout_row_seeds
    from rlad_megatron.rl.rollout_metrics import MAX_KEY, MEAN_KEY, logprob_mismatch

    groups = initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=seed)
    model = build_gpt_model(_section(tp, pp), groups, device=torch.device("cpu"))
    rows = repeat_prompts(prompts, group_size=GROUP)
    seeds = rollout_row_seeds(seed=seed, step=3, prompt_indices=range(len(prompts)), group_size=GROUP)
    budget = len(rows) // 4

    def gen(**kw):
        args = dict(model=model, groups=groups, prompts=rows, max_new_tokens=NEW, temperature=0.0, top_p=1.0,
                    eos_id=None, pad_id=PAD, vocab_size=VOCAB, generator=None, row_seeds=seeds)
        return generate(**(args | kw))

    out = {}
    sampling = dict(temperature=1.0, top_p=0.95)
    for name, kw in (("greedy", {}), ("sampled", sampling)):
        # An EOS the model emits often, so rows stop at different lengths and the pool refills.
        eos_id = spreading_eos(gen(**kw))
        one = gen(eos_id=eos_id, **kw)
        pool = gen(eos_id=eos_id, max_rows=budget, **kw)
        _same(pool, one, lp_tol=1e-5)
        assert one.stats.cohorts == 1 and one.stats.max_cached_rows == len(rows)
        assert pool.stats.max_cached_rows <= budget and pool.stats.cohorts > 1
        assert len(set(one.response_lengths_B.tolist())) > 1, "EOS did not spread the response lengths"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "runs eagerly" on CPU, "ignored" at PP=2
            fixed = gen(eos_id=eos_id, max_rows=budget, cuda_graphs=True, **kw)
        _same(fixed, one, lp_tol=1e-5)
        assert (fixed.stats.fixed_shape_steps > 0) == (pp == 1)
        out[name] = one
    # Seeds drawn from a generator: the schedule still does not matter.
    drawn = [gen(row_seeds=None, generator=torch.Generator().manual_seed(seed), max_rows=m, **sampling)
             for m in (None, budget)]
    _same(drawn[1], drawn[0], lp_tol=1e-5)
    # Reversed rows with their seeds: each row draws the same tokens from its own stream.
    flipped = gen(prompts=rows[::-1], row_seeds=seeds[::-1], max_rows=budget, **sampling)
    no_eos = gen(**sampling)
    for i in range(len(rows)):
        assert flipped.responses()[len(rows) - 1 - i] == no_eos.responses()[i], f"row {i}"
    if pp == 1:
        with torch.no_grad():
            model.eval()
            sampled = out["sampled"]
            metric = logprob_mismatch(sampled.logprobs_BL, _training_forward_logprobs(model, sampled, groups.tp),
                                      sampled.response_mask_BL)
        assert metric[MAX_KEY] < 1e-4 and metric[MEAN_KEY] < 1e-5, metric
        out["mismatch"] = metric
    return {k: (v.tokens_BL, v.logprobs_BL) if k != "mismatch" else v for k, v in out.items()}


def _prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (4,), generator=gen).tolist()
    lengths[0], lengths[1] = 2, 6  # mix the shortest and the longest
    return [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_pool_matches_one_batch(tp, pp):
    seed = int(torch.randint(0, 2**31 - 1, ()))
    results = run_distributed(_run, tp * pp, args=(tp, pp, _prompts(seed), seed))
    for r in results:  # every rank returns the same rollouts
        for key in ("greedy", "sampled"):
            torch.testing.assert_close(r[key][0], results[0][key][0], rtol=0, atol=0)
            torch.testing.assert_close(r[key][1], results[0][key][1], rtol=0, atol=0)


def _run_rotations(rank, world_size, prompts, seed):
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.models.builder import build_gpt_model
    from rlad_megatron.rl import graphed_decode
    from rlad_megatron.rl.rollout import generate, repeat_prompts

    groups = initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=seed)
    model = build_gpt_model(_section(1, 1), groups, device=torch.device("cpu"))
    rows = repeat_prompts(prompts, group_size=GROUP)
    rotated_slots = []
    rotate = graphed_decode.apply_rotary_pos_emb

    def counting(t, freqs, **kw):
        rotated_slots.append(t.shape[0])
        return rotate(t, freqs, **kw)

    kw = dict(model=model, groups=groups, prompts=rows, max_new_tokens=NEW, temperature=0.0, top_p=1.0,
              eos_id=None, pad_id=PAD, vocab_size=VOCAB, generator=None)
    eager = generate(**kw)
    out = {}
    graphed_decode.apply_rotary_pos_emb = counting
    try:
        for max_rows in (None, len(rows) // 4):
            rotated_slots.clear()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fixed = generate(cuda_graphs=True, max_rows=max_rows, **kw)
            _same(fixed, eager, lp_tol=1e-5)
            out[max_rows] = (list(rotated_slots), fixed.stats.cohorts, fixed.stats.fixed_shape_steps)
    finally:
        graphed_decode.apply_rotary_pos_emb = rotate
    return out


def test_fixed_shape_step_rotates_each_key_once():
    """The fixed-shape step caches rotated keys: per step it rotates only the new key and query (one
    slot, in one call), and each cohort's prefill keys are rotated once per layer when it enters decode, so
    a step reads the cache instead of re-rotating the whole prefix as megatron's step does."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    for max_rows, (slots, cohorts, steps) in run_distributed(_run_rotations, 1, args=(_prompts(seed), seed))[0].items():
        prefill = [s for s in slots if s > 1]
        assert len(prefill) == NUM_LAYERS * cohorts, (max_rows, prefill, cohorts)
        assert slots.count(1) == NUM_LAYERS * steps, (max_rows, len(slots), steps)  # query and key together
