"""Chunked output-layer log-probs (losses/chunked.py) equal the materialised path: values, entropy and
gradients w.r.t. the hidden states and the output weight shard, at TP 1/2/4 against a float64
single-process reference, with a padded vocabulary and a chunk size that does not divide S."""

from __future__ import annotations

import pytest
import torch

from tests.harness import run_distributed

S, B, H, VOCAB, PADDED, CHUNK = 7, 3, 16, 37, 40, 3


def _inputs():
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(S, B, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(PADDED, H, generator=gen, dtype=torch.float64) * 0.5
    target = torch.randint(0, VOCAB, (S, B), generator=gen)
    target[0, 0] = VOCAB + 1  # an id outside the vocabulary: lp = -inf, masked below
    g = torch.randn(S, B, generator=gen, dtype=torch.float64)
    g[0, 0] = 0.0
    return hidden, weight, target, g


def _reference():
    hidden, weight, target, g = _inputs()
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logits = (hidden @ weight.t())[..., :VOCAB]
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, target.clamp(max=VOCAB - 1).unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    (g * lp).sum().backward()
    return lp.detach(), entropy.detach(), hidden.grad, weight.grad


def _run(rank, world_size):
    import torch.distributed as dist

    from rlad_megatron.losses import chunked_linear_logprobs

    hidden, weight, target, g = _inputs()
    shard = PADDED // world_size
    h = hidden.float().requires_grad_(True)
    w = weight[rank * shard:(rank + 1) * shard].float().clone().requires_grad_(True)
    group = dist.new_group(list(range(world_size)))
    lp, ent = chunked_linear_logprobs(h, w, target, tp_group=group, vocab_size=VOCAB, chunk_size=CHUNK,
                                      with_entropy=True)
    assert torch.isinf(lp[0, 0])
    (torch.where(g != 0, lp, torch.zeros_like(lp)) * g.float()).sum().backward()
    with torch.no_grad():
        lp_ng = chunked_linear_logprobs(h, w, target, tp_group=group, vocab_size=VOCAB, chunk_size=CHUNK)
    return {"lp": lp.detach(), "lp_no_grad": lp_ng, "entropy": ent, "grad_h": h.grad, "grad_w": w.grad}


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_chunked_logprobs_match_float64_reference(tp):
    lp, entropy, grad_h, grad_w = _reference()
    keep = torch.ones(S, B, dtype=torch.bool)
    keep[0, 0] = False
    shard = PADDED // tp
    for rank, r in enumerate(run_distributed(_run, world_size=tp)):
        for key in ("lp", "lp_no_grad"):
            torch.testing.assert_close(r[key][keep].double(), lp[keep], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["entropy"].double(), entropy, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["grad_h"].double(), grad_h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(r["grad_w"].double(), grad_w[rank * shard:(rank + 1) * shard], rtol=1e-5,
                                   atol=1e-5)
