"""A teacher on its own layout (teacher.parallel): rows reach it and come back exactly once, and its
log-probs (and top-k) equal the same teacher's at TP=1 on one rank (fp32, 1e-5).

One 4-rank spawn covers the student at TP=1 x DP=4 and at TP=2 x DP=2 against the teacher at
TP=2 x PP=2, at TP=4 and at TP=1 x DP=4. Every student replica holds a different, shuffled number
of rows of random lengths, some with an empty response. A Mixtral teacher at EP 2/4 (with TP=2 or
PP=2) against the same teacher at TP=1 x EP=1.
"""

from __future__ import annotations

import torch

from tests.harness import run_distributed
from tests.unit.hf_fixtures import save_tiny_hf

STUDENT_LAYOUTS = [(1, 1), (2, 1)]
TEACHER_LAYOUTS = [(2, 2), (4, 1), (1, 1)]
TOPK = 5


def _replica_rows(replica: int, replicas: int, vocab: int, pad: int):
    """This student replica's rows: a count and lengths that differ per replica, fixed by (replica, replicas)."""
    gen = torch.Generator().manual_seed(100 * replicas + replica)
    n = [3, 6, 1, 5][replica] if replicas == 4 else [7, 2][replica]
    s = 24
    tokens = torch.full((n, s), pad, dtype=torch.int64)
    mask = torch.zeros((n, s), dtype=torch.bool)
    for i in torch.randperm(n, generator=gen).tolist():
        prompt = int(torch.randint(2, 6, (1,), generator=gen))
        response = int(torch.randint(0, s - prompt + 1, (1,), generator=gen)) if i % 3 else 0
        tokens[i, :prompt + response] = torch.randint(1, vocab, (prompt + response,), generator=gen)
        mask[i, prompt - 1:prompt + response - 1] = True
    return tokens, mask


def _run(rank, world_size, hf_dir):
    from rlad_megatron.config import ModelSection, ParallelConfig
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.distributed.groups import build_layout_groups
    from rlad_megatron.distributed.row_exchange import RowExchange, layout_ranks
    from rlad_megatron.hf.checkpoint import read_checkpoint_config
    from rlad_megatron.models.forward import shift_left
    from rlad_megatron.rl.scorer import Scorer
    from rlad_megatron.rl.teacher_layout import LayoutScorer, _Rows

    device = torch.device("cpu")
    model_cfg = read_checkpoint_config(hf_dir)
    vocab, pad = model_cfg.vocab_size, 0

    def section(tp, pp):
        return ModelSection(model=model_cfg, parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                                                     pipeline_model_parallel_size=pp),
                            load=str(hf_dir))

    out = {"exchange": [], "scores": []}
    for s_tp, s_pp in STUDENT_LAYOUTS:
        g = initialize_model_parallel(tensor_model_parallel_size=s_tp, pipeline_model_parallel_size=s_pp, seed=1)
        tokens, mask = _replica_rows(g.dp_rank, g.dp_size, vocab, pad)
        rows = _Rows(tokens_NS=tokens, targets_NS=shift_left(tokens, pad), mask_NS=mask)
        # The reference: the teacher at TP=1 on this rank alone, on this replica's rows.
        one = build_layout_groups(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
        ref = Scorer.build(section(1, 1), one, vocab_size=vocab, micro_batch_size=2, device=device)
        ref_signal = ref.teacher_signal(rows, topk=TOPK)
        for t_tp, t_pp in TEACHER_LAYOUTS:
            tg = build_layout_groups(tensor_model_parallel_size=t_tp, pipeline_model_parallel_size=t_pp)
            # Rows tagged with (replica, row) to check where each one lands.
            exchange = RowExchange(src=layout_ranks(g, device), dst=layout_ranks(tg, device), device=device)
            widths = torch.randint(1, 9, (len(tokens),), generator=torch.Generator().manual_seed(g.dp_rank))
            tag = torch.stack([torch.full((len(tokens),), g.dp_rank), torch.arange(len(tokens))], 1)
            tagged = tag.unsqueeze(1).expand(-1, 9, -1).contiguous()  # [N, 9, 2]
            plan = exchange.plan(widths)
            got = exchange.to_dst(plan, {"tag": tagged})["tag"]
            results = got * (1 + tg.dp_rank) if tg.is_last_stage else torch.zeros((0, 0, 2), dtype=torch.int64)
            back = exchange.to_src(plan, {"tag": results})
            back = None if back is None else back["tag"]
            out["exchange"].append(dict(student=(s_tp, s_pp), teacher=(t_tp, t_pp), rank=rank,
                                        teacher_replica=tg.dp_rank, teacher_first=tg.tp_rank == 0 and tg.pp_rank == 0,
                                        got=got, plan_widths=plan.all_widths, cuts=plan.cuts,
                                        back=back, widths=widths, student_replica=g.dp_rank))

            teacher = LayoutScorer(Scorer.build(section(t_tp, t_pp), tg, vocab_size=vocab, micro_batch_size=2,
                                                device=device),
                                   student_groups=g, pad_id=pad, device=device)
            signal = teacher.teacher_signal(rows, topk=TOPK)
            # The long-sequence modes on the teacher's side: token-budget micro-batches and chunked logits.
            teacher.scorer.max_tokens_per_micro_batch, teacher.scorer.logprob_chunk_size = 40, 5
            budget = teacher.teacher_signal(rows, topk=TOPK)
            if g.is_last_stage:
                for got, want in ((budget.lp_NS, signal.lp_NS), (budget.topk_lp_NSK, signal.topk_lp_NSK)):
                    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5)
                assert torch.equal(budget.topk_ids_NSK[mask], signal.topk_ids_NSK[mask])
                out["scores"].append(dict(student=(s_tp, s_pp), teacher=(t_tp, t_pp), mask=mask, lp=signal.lp_NS,
                                          ref_lp=ref_signal.lp_NS, ids=signal.topk_ids_NSK,
                                          ref_ids=ref_signal.topk_ids_NSK, topk_lp=signal.topk_lp_NSK,
                                          ref_topk_lp=ref_signal.topk_lp_NSK))
            else:
                assert signal.lp_NS is None
    return out


def test_teacher_on_its_own_layout(tmp_path):
    hf_dir = save_tiny_hf(tmp_path / "teacher", "llama", config={"num_key_value_heads": 4})
    results = run_distributed(_run, world_size=4, args=(hf_dir,))
    # Scores: every student last-stage rank gets the reference log-probs of its own rows.
    scores = [s for r in results for s in r["scores"]]
    assert len(scores) == 4 * len(TEACHER_LAYOUTS) * len(STUDENT_LAYOUTS)  # PP=1: every rank is a last stage
    assert sum(int(s["mask"].sum()) for s in scores) > 100
    for s in scores:
        m = s["mask"]
        torch.testing.assert_close(s["lp"][m], s["ref_lp"][m], rtol=1e-5, atol=1e-5, msg=str(s["teacher"]))
        torch.testing.assert_close(s["topk_lp"][m], s["ref_topk_lp"][m], rtol=1e-5, atol=1e-5)
        assert torch.equal(s["ids"][m], s["ref_ids"][m])
        assert s["ids"].shape == (*m.shape, TOPK) and s["ids"].dtype == torch.int32
    # Exchange: each row lands on exactly one teacher replica (on every rank of it), cut to its width,
    # and comes back to its own replica unchanged but for the scoring replica's mark.
    by_case: dict = {}
    for r in results:
        for e in r["exchange"]:
            by_case.setdefault((e["student"], e["teacher"]), []).append(e)
    for case, entries in by_case.items():
        counts: dict[int, int] = {}
        for e in entries:
            counts[e["student_replica"]] = len(e["widths"])
        offsets = {rep: sum(counts[q] for q in counts if q < rep) for rep in counts}
        cuts = entries[0]["cuts"]
        owner = [j for j in range(len(cuts) - 1) for _ in range(cuts[j], cuts[j + 1])]
        order = sorted(((rep, i) for rep in counts for i in range(counts[rep])), key=lambda k: offsets[k[0]] + k[1])
        for e in entries:
            # Every rank of teacher replica j holds global rows cuts[j]:cuts[j + 1], in order, cut to width.
            expected = order[cuts[e["teacher_replica"]]:cuts[e["teacher_replica"] + 1]]
            assert [(int(row[0, 0]), int(row[0, 1])) for row in e["got"]] == expected, case
            for row, (rep, i) in zip(e["got"], expected):
                w = e["plan_widths"][offsets[rep] + i]
                assert bool((row[:w] == row[0]).all()) and bool((row[w:] == 0).all())
            if e["back"] is None:
                continue
            # Back on the owner's last stage: its own rows, marked by the replica that scored them.
            for i, row in enumerate(e["back"]):
                rep, w = e["student_replica"], int(e["widths"][i])
                mark = 1 + owner[offsets[rep] + i]
                assert bool((row[:w] == torch.tensor([rep, i]) * mark).all()), case
                assert bool((row[w:] == 0).all())


MOE_LAYOUTS = [(1, 1, 2), (2, 1, 2), (1, 2, 2), (1, 1, 4)]  # (TP, PP, EP) of a Mixtral teacher


def _run_moe(rank, world_size, hf_dir):
    from rlad_megatron.config import ModelSection, ParallelConfig
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.distributed.groups import build_layout_groups
    from rlad_megatron.hf.checkpoint import read_checkpoint_config
    from rlad_megatron.models.forward import shift_left
    from rlad_megatron.rl.scorer import Scorer
    from rlad_megatron.rl.teacher_layout import LayoutScorer, _Rows

    device = torch.device("cpu")
    model_cfg = read_checkpoint_config(hf_dir)

    def section(tp, pp, ep):
        return ModelSection(model=model_cfg, load=str(hf_dir), parallel=ParallelConfig(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep))

    g = initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=1)
    tokens, mask = _replica_rows(g.dp_rank, g.dp_size, model_cfg.vocab_size, 0)
    rows = _Rows(tokens_NS=tokens, targets_NS=shift_left(tokens, 0), mask_NS=mask)
    one = build_layout_groups(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    ref = Scorer.build(section(1, 1, 1), one, vocab_size=model_cfg.vocab_size, micro_batch_size=2, device=device)
    out = {"mask": mask, "ref": ref.teacher_signal(rows).lp_NS}
    for tp, pp, ep in MOE_LAYOUTS:
        tg = build_layout_groups(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 expert_model_parallel_size=ep)
        teacher = LayoutScorer(Scorer.build(section(tp, pp, ep), tg, vocab_size=model_cfg.vocab_size,
                                            micro_batch_size=2, device=device), student_groups=g, pad_id=0,
                               device=device)
        out[(tp, pp, ep)] = teacher.teacher_signal(rows).lp_NS
    return out


def test_moe_teacher_on_its_own_expert_layout(tmp_path):
    """Expert-parallel teacher replicas score slices of different sizes: they are padded to one shape."""
    hf_dir = save_tiny_hf(tmp_path / "teacher", "mixtral", config={"num_key_value_heads": 4})
    for r in run_distributed(_run_moe, world_size=4, args=(hf_dir,)):
        m = r["mask"]
        for layout in MOE_LAYOUTS:
            torch.testing.assert_close(r[layout][m], r["ref"][m], rtol=1e-5, atol=1e-5, msg=str(layout))
