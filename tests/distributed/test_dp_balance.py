"""rl.balance_dp_tokens: a mini-batch's rows spread over the DP replicas by tokens give the same loss and
gradients for every parameter as each replica training its own rows (fp32, 1e-5), at DP=2 and at
PP=2 x DP=2, with fixed and token-budget micro-batches; the token imbalance falls.

Replica 0 holds long responses, replica 1 short ones (one of them empty).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.harness import run_distributed

ROOT = Path(__file__).resolve().parents[2]
N, S, K = 6, 40, 3
VOCAB = 32  # the tiny config's


def _experience(replica: int, vocab: int, *, last_stage: bool):
    from rlad_megatron.rl.experience import Experience

    gen = torch.Generator().manual_seed(11 + replica)
    responses = [30, 35, 28, 33, 31, 36] if replica == 0 else [2, 0, 3, 1, 4, 2]
    tokens = torch.zeros((N, S), dtype=torch.int64)
    mask = torch.zeros((N, S), dtype=torch.bool)
    for i, r in enumerate(responses):
        p = 3 + i % 2
        tokens[i, :p + r] = torch.randint(3, vocab, (p + r,), generator=gen)
        mask[i, p - 1:p + r - 1] = True
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    exp = Experience(tokens_NS=tokens, targets_NS=targets, mask_NS=mask, lp_old_NS=-torch.rand((N, S), generator=gen),
                     advantages_N=torch.randn(N, generator=gen))
    lp_t, lp_ref = -torch.rand((N, S), generator=gen) * 2, -torch.rand((N, S), generator=gen) * 2
    ids = torch.randint(0, vocab, (N, S, K), generator=gen, dtype=torch.int64).to(torch.int32)
    topk_lp = -torch.rand((N, S, K), generator=gen)
    if last_stage:
        exp.lp_t_NS, exp.lp_ref_NS = lp_t, lp_ref
        exp.teacher_topk_ids_NSK, exp.teacher_topk_lp_NSK = ids, topk_lp
    return exp


def _run(rank, world_size, pp, budget):
    from rlad_megatron.config import load_config
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.objectives import build_objective
    from rlad_megatron.rl.dp_balance import DPBalancer
    from rlad_megatron.rl.train_module import StudentTrainModule

    cfg = load_config(ROOT / "launch" / "configs" / "tiny_cpu.yaml", [
        "--student.parallel.tensor_model_parallel_size=1", f"--student.parallel.pipeline_model_parallel_size={pp}",
        "--teacher.parallel.tensor_model_parallel_size=1", f"--teacher.parallel.pipeline_model_parallel_size={pp}",
        "--student.load=null", "--teacher.load=null", "--distill.beta=0.1", "--rl.prompts_per_step=2",
        "--rl.group_size=6", "--rl.mini_batch_size=12", "--rl.micro_batch_size=2",
        f"--rl.max_tokens_per_micro_batch={budget}", "--optimizer.lr=0.0", "--optimizer.warmup_steps=0",
        "--optimizer.clip_grad=0.0"])
    g = initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=pp, seed=5)
    vocab = cfg.student.model.vocab_size
    objective = build_objective(cfg.distill, tp_group=g.tp, vocab_size=vocab)
    student = StudentTrainModule.build(cfg, g, objective=objective, device=torch.device("cpu"))
    exp = _experience(g.dp_rank, vocab, last_stage=g.is_last_stage)
    out = {}
    student.global_loss = True  # what the trainer sets with rl.balance_dp_tokens
    own = student.train_mini_batch(exp, torch.arange(N))
    out["own"] = (own, {k: p.main_grad.detach().clone() for k, p in student.policy.named_parameters()})
    balancer = DPBalancer(g, torch.device("cpu"), teacher=True, reference=True, topk=K)
    part, stats = balancer.mini_batch(exp, torch.arange(N))
    spread = student.train_mini_batch(part, torch.arange(len(part)))
    out["spread"] = (spread, {k: p.main_grad.detach().clone() for k, p in student.policy.named_parameters()})
    fields = ("tokens_NS", "mask_NS", "lp_old_NS", "advantages_N", "lp_t_NS", "lp_ref_NS", "teacher_topk_ids_NSK",
              "teacher_topk_lp_NSK")
    return {"out": out, "stats": stats, "rows": len(part), "last": g.is_last_stage,
            "part": {k: getattr(part, k) for k in fields},
            "tokens": int(part.mask_NS.sum()), "has_lp_t": part.lp_t_NS is not None}


@pytest.mark.parametrize("pp,budget", [(1, 0), (2, 0), (2, 48)])
def test_balanced_mini_batch_matches_own_rows(pp, budget):
    results = run_distributed(_run, world_size=2 * pp, args=(pp, budget))
    for r in results:
        (own, g_own), (spread, g_spread) = r["out"]["own"], r["out"]["spread"]
        for k, g in g_own.items():
            torch.testing.assert_close(g_spread[k], g, rtol=1e-5, atol=1e-6, msg=k)
        assert any(g.abs().sum() > 0 for g in g_own.values())
        assert r["has_lp_t"] == r["last"]
        if r["last"]:
            assert abs(spread["loss"] - own["loss"]) < 1e-5
        stats = r["stats"]
        assert stats["dp_token_imbalance"] < stats["dp_token_imbalance_before"]
        assert r["rows"] >= 1
    # The long replica gave rows away; every counted token is still trained exactly once.
    assert sorted({r["rows"] for r in results}) != [N]
    own_tokens = sum(int(_experience(rep, VOCAB, last_stage=False).mask_NS.sum()) for rep in (0, 1))
    assert sum(r["tokens"] for r in results if r["last"]) == own_tokens
    # Every row arrived whole on a last stage: each field equal to the original row over the positions
    # its loss reads (the rows are told apart by their random tokens).
    originals = [_experience(rep, VOCAB, last_stage=True) for rep in (0, 1)]
    seen = 0
    for r in results:
        if not r["last"]:
            continue
        part = r["part"]
        for i in range(len(part["tokens_NS"])):
            w = int(part["mask_NS"][i].nonzero().max()) + 1 if part["mask_NS"][i].any() else 1
            matches = [(o, j) for o in originals for j in range(N)
                       if torch.equal(o.tokens_NS[j, :w], part["tokens_NS"][i, :w])]
            assert len(matches) == 1
            o, j = matches[0]
            for k, v in part.items():
                want = getattr(o, k)[j]
                assert torch.equal(v[i] if v.dim() == 1 else v[i, :w], want if want.dim() == 0 else want[:w]), k
            seen += 1
    assert seen == 2 * N
