"""Token-budget micro-batches (rl.max_tokens_per_micro_batch) give the padded path's mini-batch loss,
gradients of every parameter and teacher/reference log-probs, at TP=2 and at PP=2 (fp32, 1e-5); so do
token-budget micro-batches with chunked output-layer log-probs (rl.logprob_chunk_size), tied and untied.

Rows of very different lengths, one with an empty response and one longer than the budget.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.harness import run_distributed

ROOT = Path(__file__).resolve().parents[2]
N, S, BUDGET = 8, 48, 40
PROMPTS = [4, 5, 6, 4, 5, 6, 4, 5]
_RUNS: dict = {}
RESPONSES = [0, 2, 5, 43, 10, 1, 30, 3]  # an empty response; 4 + 43 = 47 > BUDGET


def _experience(vocab: int):
    from rlad_megatron.rl.experience import Experience

    gen = torch.Generator().manual_seed(3)
    tokens = torch.zeros((N, S), dtype=torch.int64)  # pad id 0
    mask = torch.zeros((N, S), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        tokens[i, :p + r] = torch.randint(3, vocab, (p + r,), generator=gen)
        mask[i, p - 1:p + r - 1] = True  # the logits at t predict token t + 1
    targets = torch.zeros_like(tokens)
    targets[:, :-1] = tokens[:, 1:]
    lp_old = -torch.rand((N, S), generator=gen) * 3
    adv = torch.randn(N, generator=gen)
    return Experience(tokens_NS=tokens, targets_NS=targets, mask_NS=mask, lp_old_NS=lp_old, advantages_N=adv)


def _run(rank, world_size, tp, pp, loss_agg, tied):
    from rlad_megatron.config import load_config
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.objectives import build_objective
    from rlad_megatron.rl.scorer import Scorer
    from rlad_megatron.rl.train_module import StudentTrainModule

    cfg = load_config(ROOT / "launch" / "configs" / "tiny_cpu.yaml", [
        f"--student.parallel.tensor_model_parallel_size={tp}", f"--teacher.parallel.tensor_model_parallel_size={tp}",
        f"--student.parallel.pipeline_model_parallel_size={pp}",
        f"--teacher.parallel.pipeline_model_parallel_size={pp}",
        "--student.load=null", "--teacher.load=null", "--distill.beta=0.1", f"--distill.loss_agg={loss_agg}",
        "--rl.prompts_per_step=2", "--rl.group_size=4", f"--rl.mini_batch_size={N}", "--rl.micro_batch_size=2",
        f"--student.model.untie_embeddings_and_output_weights={'false' if tied else 'true'}",
        f"--teacher.model.untie_embeddings_and_output_weights={'false' if tied else 'true'}",
        "--optimizer.lr=0.0", "--optimizer.warmup_steps=0", "--optimizer.clip_grad=0.0"])
    groups = initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=5)
    vocab = cfg.student.model.vocab_size
    objective = build_objective(cfg.distill, tp_group=groups.tp, vocab_size=vocab)
    device = torch.device("cpu")
    student = StudentTrainModule.build(cfg, groups, objective=objective, device=device)
    teacher = Scorer.build(cfg.teacher, groups, vocab_size=vocab, micro_batch_size=2, device=device)
    reference = Scorer.build(cfg.student, groups, vocab_size=vocab, micro_batch_size=2, device=device)
    exp = _experience(vocab)
    out = {}
    for mode, budget, chunk in (("padded", 0, 0), ("budget", BUDGET, 0), ("chunked", BUDGET, 5)):
        teacher.max_tokens_per_micro_batch = reference.max_tokens_per_micro_batch = budget
        teacher.logprob_chunk_size = reference.logprob_chunk_size = chunk
        student.configure(max_tokens_per_micro_batch=budget, logprob_chunk_size=chunk)
        exp.lp_t_NS, _ = teacher.logprobs(exp)
        exp.lp_ref_NS, _ = reference.logprobs(exp)
        metrics = student.train_mini_batch(exp, torch.arange(N))
        grads = {k: p.main_grad.detach().clone() for k, p in student.policy.named_parameters()}
        out[mode] = dict(metrics=metrics, grads=grads, lp_t=exp.lp_t_NS, lp_ref=exp.lp_ref_NS, stats=teacher.last_stats)
    return {"out": out, "last": groups.is_last_stage, "mask": exp.mask_NS}


@pytest.mark.parametrize("tp,pp,loss_agg,tied", [(2, 1, "seq_mean_token_mean", False),
                                                 (1, 2, "seq_mean_token_mean", True),
                                                 (1, 2, "token_mean", False), (2, 1, "token_mean", True)])
@pytest.mark.parametrize("mode", ["budget", "chunked"])
def test_token_budget_matches_padded(tp, pp, loss_agg, tied, mode):
    key = (tp, pp, loss_agg, tied)
    if key not in _RUNS:  # one distributed run serves both modes
        _RUNS[key] = run_distributed(_run, world_size=tp * pp, args=(tp, pp, loss_agg, tied))
    for r in _RUNS[key]:
        padded, budget = r["out"]["padded"], r["out"][mode]
        for k, g in padded["grads"].items():
            torch.testing.assert_close(budget["grads"][k], g, rtol=1e-5, atol=1e-5, msg=k)
        assert any(g.abs().sum() > 0 for g in padded["grads"].values())
        if not r["last"]:
            continue
        mask = r["mask"]
        for key in ("lp_t", "lp_ref"):
            torch.testing.assert_close(budget[key][mask], padded[key][mask], rtol=1e-5, atol=1e-5)
        assert abs(budget["metrics"]["loss"] - padded["metrics"]["loss"]) < 1e-5
        assert budget["metrics"]["oversized_rows"] == 1.0
        assert budget["stats"]["oversized_rows"] == 1.0
        assert budget["metrics"]["padding_frac"] < 1.0 - mask.any(1).sum() / mask.numel()
