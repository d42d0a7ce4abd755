"""RLAD steps with the student at TP=1 x DP=4 and the teacher on its own layout (TP=2 x PP=2): they train,
checkpoint and resume with identical losses; teacher.offload gives bitwise identical losses and keeps
the teacher's parameters off the device during the student's update; forward_kl trains with the
teacher's top-k distribution crossing layouts, its signal O(N x S x k).
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.harness import run_distributed
from tests.helpers import ROOT, drop_checkpoints_after, read_losses

STEPS = 4
TEACHER = ["--teacher.parallel.tensor_model_parallel_size=2", "--teacher.parallel.pipeline_model_parallel_size=2"]


def _train(rank, world_size, overrides, resume):
    """Train to the end; record what the teacher holds on the device during each update."""
    from rlad_megatron.config import load_config
    from rlad_megatron.distributed.init import init_distributed
    from rlad_megatron.rl.teacher_layout import LayoutScorer
    from rlad_megatron.trainer import Trainer

    cfg = load_config(ROOT / "launch" / "configs" / "tiny_cpu.yaml",
                      overrides + [f"--checkpoint.resume={'true' if resume else 'false'}"])
    trainer = Trainer(cfg, init_distributed("cpu"))
    assert isinstance(trainer.teacher, LayoutScorer)
    assert trainer.teacher.groups.tp_size == 2 and trainer.teacher.groups.pp_size == 2
    offload = trainer.teacher.scorer.offload
    ref_offload = trainer.reference.offload if trainer.reference is not None else None
    seen = {"device_bytes": [], "host_bytes": 0, "signal": []}
    module, update = trainer.student, trainer.student.train_mini_batch

    def watched(exp, index):
        for o in (offload, ref_offload):
            if o is not None:
                seen["device_bytes"].append(o.device_bytes())
                seen["host_bytes"] += sum(h.numel() * h.element_size() for h in o.host)
        if exp.teacher_topk_ids_NSK is not None:
            seen["signal"].append(dict(shape=tuple(exp.teacher_topk_ids_NSK.shape), rows=len(exp),
                                       width=exp.tokens_NS.shape[1],
                                       bytes=exp.teacher_topk_ids_NSK.nbytes + exp.teacher_topk_lp_NSK.nbytes,
                                       logits=len(exp.teacher_logits)))
        return update(exp, index)

    module.train_mini_batch = watched
    start = trainer.step
    last = trainer.train()
    return {"start": start, "seen": seen, "offload_s": last.get("time/offload_s")}


def _overrides(rl_overrides, tmp: Path, run: str, objective: str = "rlad", *extra: str) -> list[str]:
    return rl_overrides(tmp, 1, 1, run, objective, steps=STEPS) + TEACHER + ["--logging.tensorboard=false", *extra]


def test_separate_layout_trains_resumes_and_offloads(tmp_path, rl_overrides):
    # beta > 0: the reference model too (offloaded with distill.reference_offload below).
    beta = "--distill.beta=0.05"
    full = _overrides(rl_overrides, tmp_path, "full", "rlad", beta)
    run_distributed(_train, 4, args=(full, False))
    losses = read_losses(tmp_path / "full")
    assert sorted(losses) == list(range(1, STEPS + 1))

    drop_checkpoints_after(tmp_path / "ckpt", 2)
    results = run_distributed(_train, 4, args=(_overrides(rl_overrides, tmp_path, "resumed", "rlad", beta), True))
    assert {r["start"] for r in results} == {2}
    resumed = read_losses(tmp_path / "resumed")
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == losses[step], (step, resumed[step], losses[step])

    off_tmp = tmp_path / "offload"
    off_tmp.mkdir()
    results = run_distributed(_train, 4, args=(_overrides(rl_overrides, off_tmp, "run", "rlad", beta,
                                                           "--teacher.offload=true",
                                                           "--distill.reference_offload=true"), False))
    assert read_losses(off_tmp / "run") == losses
    for r in results:
        seen = r["seen"]
        # Nothing of the teacher or the reference on the device during any update.
        assert len(seen["device_bytes"]) == 2 * 2 * STEPS and set(seen["device_bytes"]) == {0}  # 2 updates a step
        assert seen["host_bytes"] > 0
        assert r["offload_s"] > 0


def test_forward_kl_topk_crosses_layouts(tmp_path, rl_overrides):
    """Also evaluates both models before training (the teacher generates on its own layout) and spreads
    each mini-batch over the DP replicas by tokens (rl.balance_dp_tokens: the top-k travels too)."""
    k = 8
    evals = [f"--data.eval_path={tmp_path / 'easy.jsonl'}", "--train.eval_interval=4", "--train.eval_samples=8"]
    results = run_distributed(_train, 4, args=(_overrides(rl_overrides, tmp_path, "fkl", "forward_kl",
                                                          f"--distill.teacher_topk={k}", *evals,
                                                          "--rl.balance_dp_tokens=true"), False))
    rows = [json.loads(line) for line in (tmp_path / "fkl" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["step"] == 0)
    assert 0.0 <= first["eval/teacher_accuracy"] <= 1.0 and "eval/student_accuracy" in first
    losses = read_losses(tmp_path / "fkl")
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(v > 0 for v in losses.values())
    assert all(r["dp_token_imbalance"] <= r["dp_token_imbalance_before"] for r in rows if r["step"] > 0)
    for r in results:  # PP=1 student: every rank is a last stage and holds its rows' signal
        for s in r["seen"]["signal"]:
            assert s["shape"] == (s["rows"], s["width"], k) and s["logits"] == 0
            assert s["bytes"] == s["rows"] * s["width"] * k * (4 + 4)  # int32 ids + float32 log-probs
