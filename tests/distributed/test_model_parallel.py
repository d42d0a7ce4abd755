"""A tiny GPTModel gives the same logits and gradients at TP=2, PP=2 and TP=2 x PP=2 as at TP=1.

The PP runs go through megatron-core's ``get_forward_backward_func()`` schedule.
"""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed

SEQ, BATCH, MICRO = 12, 2, 2


def _section(tp: int, pp: int, tied: bool):
    from rlad_megatron.config import ModelConfig, ModelSection, ParallelConfig

    return ModelSection(
        model=ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=128, vocab_size=250, make_vocab_size_divisible_by=8,
                          untie_embeddings_and_output_weights=not tied),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))


def _run(rank, world_size, tp, pp, tied, full_sd, tokens, weights):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.models.builder import build_gpt_model
    from rlad_megatron.models.weights import load_state, model_state_dict

    section = _section(tp, pp, tied)
    groups = initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=7)
    model = build_gpt_model(section, groups, device=torch.device("cpu"))
    if full_sd is not None:
        load_state(model, full_sd)
    vocab_local = section.padded_vocab_size // tp
    lo = groups.tp_rank * vocab_local
    logits_out = []
    positions = torch.arange(SEQ).unsqueeze(0)

    def forward_step(data_iterator, model):
        ids, w = next(data_iterator)
        out = model(ids, positions.expand(ids.shape[0], -1), None)

        def loss_func(logits_BSV):
            logits_out.append(logits_BSV.detach().clone())
            loss = (logits_BSV.float() * w[..., lo:lo + vocab_local]).sum()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    micro = [(tokens[i:i + MICRO], weights[i:i + MICRO]) for i in range(0, BATCH, MICRO)]
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro), model=[model],
                                num_microbatches=len(micro), seq_length=SEQ, micro_batch_size=MICRO,
                                forward_only=False)
    grads = {k: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for k, p in model.named_parameters()}
    logits = torch.cat(logits_out, dim=0) if logits_out else None
    return dict(tp_rank=groups.tp_rank, pp_rank=groups.pp_rank, logits=logits, grads=grads,
                state=model_state_dict(model) if full_sd is None else None)


def _gather(results, tp, pp, key, tied):
    from rlad_megatron.hf.rank_layout import unshard_state_dicts

    shards = {(r["tp_rank"], r["pp_rank"]): r[key] for r in results}
    return unshard_state_dicts(shards, tp_size=tp, pp_size=pp, num_layers=2, tied_embeddings=tied)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_layouts_match_single_rank(tp, pp, tied):
    gen = torch.Generator().manual_seed(1000 * tp + pp)
    tokens = torch.randint(0, 250, (BATCH, SEQ), generator=gen)
    vocab = _section(1, 1, tied).padded_vocab_size
    weights = torch.randn(BATCH, SEQ, vocab, generator=gen)

    (ref,) = run_distributed(_run, 1, args=(1, 1, tied, None, tokens, weights))
    results = run_distributed(_run, tp * pp, args=(tp, pp, tied, ref["state"], tokens, weights))

    last = [r for r in results if r["pp_rank"] == pp - 1]
    last.sort(key=lambda r: r["tp_rank"])
    logits = torch.cat([r["logits"] for r in last], dim=-1)
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-4, atol=1e-4)

    grads = _gather(results, tp, pp, "grads", tied)
    ref_grads = ref["grads"]
    if tied and pp > 1:
        # The last stage's copy of the tied embedding carries the output-layer gradient.
        emb = "embedding.word_embeddings.weight"
        last_copy = torch.cat([r["grads"]["output_layer.weight"] for r in last], dim=0)
        grads[emb] = grads[emb] + last_copy
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
