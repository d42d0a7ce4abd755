"""GPU checks (NCCL, CUDA kernels, Transformer Engine when installed); skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_vocab_parallel_logprobs_on_cuda_match_float64():
    from rlad_megatron.losses import vocab_parallel_logprobs

    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    logits = torch.randn(64, 4, 1000, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, 900, (64, 4), generator=gen)
    ref = torch.log_softmax(logits[..., :900], -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    x = logits.to("cuda", torch.bfloat16).requires_grad_()
    lp = vocab_parallel_logprobs(x, target.cuda(), tp_group=None, vocab_size=900)
    torch.testing.assert_close(lp.double().cpu(), ref, rtol=1e-2, atol=2e-2)
    lp.sum().backward()
    ref_grad = torch.nn.functional.one_hot(target, 1000).double() - torch.cat(
        [torch.softmax(logits[..., :900], -1), torch.zeros(64, 4, 100, dtype=torch.float64)], -1)
    torch.testing.assert_close(x.grad.double().cpu(), ref_grad, rtol=2e-2, atol=2e-2)


def test_gpt_model_builds_and_runs_on_cuda(tmp_path):
    import os

    import torch.distributed as dist

    from rlad_megatron.config import ModelSection
    from rlad_megatron.distributed import destroy_model_parallel, init_distributed, initialize_model_parallel
    from rlad_megatron.distributed.init import free_port
    from rlad_megatron.models.builder import build_gpt_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    world = init_distributed("cuda")
    try:
        groups = initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=0)
        model = build_gpt_model(ModelSection(), groups, device=world.device)
        tokens = torch.randint(0, 250, (2, 16), device=world.device)
        positions = torch.arange(16, device=world.device).unsqueeze(0).expand(2, -1)
        logits = model(tokens, positions, None)
        assert logits.shape == (2, 16, ModelSection().padded_vocab_size) and torch.isfinite(logits).all()
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()


def test_trainer_checkpoint_resumes_on_cuda_with_nccl(tmp_path):
    """Save and resume go through NCCL collectives (which take only CUDA tensors)."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "TORCHELASTIC_"))}
    base = [sys.executable, "-m", "rlad_megatron.train", "--config", str(root / "launch" / "configs" / "tiny_cpu.yaml"),
            "--train.device=cuda", "--student.parallel.tensor_model_parallel_size=1",
            "--teacher.parallel.tensor_model_parallel_size=1", "--student.load=null",
            "--teacher.load=null", "--train.steps=4", "--checkpoint.save_interval=2", "--train.eval_interval=0",
            "--logging.progress_bar=false", f"--checkpoint.save_dir={tmp_path / 'ckpt'}"]

    def losses(run: str, *extra: str) -> dict[int, float]:
        proc = subprocess.run(base + [f"--logging.run_dir={tmp_path / run}", *extra], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    full = losses("full")
    shutil.rmtree(tmp_path / "ckpt" / "step_0000004")
    resumed = losses("resumed", "--resume")
    assert sorted(resumed) == [3, 4] and all(resumed[s] == pytest.approx(full[s], abs=1e-6) for s in (3, 4))
