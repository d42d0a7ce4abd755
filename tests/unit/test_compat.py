"""The CPU compat shim: each patched megatron-core call still needs its patch.

Each check runs in a fresh interpreter WITHOUT the shim and expects the CUDA failure; when a
megatron-core release fixes the call, the check fails and the patch can be deleted.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim only applies without CUDA")

_PRELUDE = """
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(__import__("random").randint(20000, 60000)))
dist.init_process_group("gloo", rank=0, world_size=1)
from megatron.core import parallel_state as ps
ps.initialize_model_parallel(1, 1)
"""

_NEEDS = {
    # model_parallel_cuda_manual_seed drives the CUDA generator.
    "rng_tracker": """
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
model_parallel_cuda_manual_seed(1)
""",
    # RoPE moves inv_freq to torch.cuda.current_device().
    "rope_current_device": """
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
RotaryEmbedding(kv_channels=16, rotary_percent=1.0, use_cpu_initialization=True)(8)
""",
    # Every schedule allocates its token counter with device="cuda".
    "schedule_cuda_literal": """
from megatron.core.pipeline_parallel.schedules import forward_backward_no_pipelining
from megatron.core.transformer.transformer_config import TransformerConfig
m = torch.nn.Linear(2, 2)
m.config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
from megatron.core.enums import ModelType
m.model_type = ModelType.encoder_or_decoder
m.set_input_tensor = lambda tensor: None
def step(it, model):
    x = next(it)
    return model(x), lambda o: (o.sum(), {})
forward_backward_no_pipelining(forward_step_func=step, data_iterator=iter([torch.ones(1, 2)]), model=[m],
                               num_microbatches=1, seq_length=1, micro_batch_size=1, forward_only=True)
""",
}


def _run(body: str, with_shim: bool) -> subprocess.CompletedProcess:
    shim = "from rlad_megatron.distributed.compat import apply_cpu_compat; apply_cpu_compat()\n" if with_shim else ""
    code = shim + textwrap.dedent(_PRELUDE) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("name", sorted(_NEEDS))
def test_megatron_still_needs_the_patch(name):
    plain = _run(_NEEDS[name], with_shim=False)
    assert plain.returncode != 0, f"megatron-core no longer needs the '{name}' patch: remove it from compat.py"
    assert "CUDA" in plain.stderr or "cuda" in plain.stderr, plain.stderr[-2000:]
    patched = _run(_NEEDS[name], with_shim=True)
    assert patched.returncode == 0, patched.stderr[-2000:]


_MOE_ROUTER = """
from megatron.core.transformer.moe.moe_utils import router_gating_linear
router_gating_linear(torch.ones(3, 4), torch.ones(2, 4), None, torch.float32)
"""


def test_moe_router_still_needs_the_patch():
    import importlib.util

    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("the router patch applies only without Transformer Engine")
    plain = _run(_MOE_ROUTER, with_shim=False)
    assert plain.returncode != 0, "megatron-core no longer needs patch_moe_router_without_te: remove it"
    assert "te_general_gemm" in plain.stderr, plain.stderr[-2000:]
    patch = "from rlad_megatron.distributed.compat import patch_moe_router_without_te\npatch_moe_router_without_te()\n"
    patched = _run(patch + _MOE_ROUTER, with_shim=True)
    assert patched.returncode == 0, patched.stderr[-2000:]
