"""World init from torchrun or Slurm environment variables: NCCL on GPUs, gloo on CPU."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from rlad_megatron.distributed.compat import apply_cpu_compat
from rlad_megatron.distributed.groups import ParallelGroups, destroy_model_parallel, initialize_model_parallel


@dataclass(frozen=True)
class WorldInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str


def _env_int(env: dict, *names: str, default: int | None = None) -> int | None:
    for name in names:
        if name in env and env[name] != "":
            try:
                return int(env[name])
            except ValueError:
                raise ValueError(f"environment variable {name}: expected an integer, got {env[name]!r}") from None
    return default


def world_from_env(env: dict | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun (RANK...) or Slurm (SLURM_PROCID...) variables."""
    env = dict(os.environ if env is None else env)
    rank = _env_int(env, "RANK", "SLURM_PROCID", default=0)
    world = _env_int(env, "WORLD_SIZE", "SLURM_NTASKS", default=1)
    local = _env_int(env, "LOCAL_RANK", "SLURM_LOCALID", default=0)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    return rank, world, local


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: expected 'cpu' or 'auto' on a machine without CUDA, got 'cuda'")
    return torch.device(device)


def free_port() -> int:
    """An unused TCP port on the loopback interface (single-process runs and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str = "auto", timeout_minutes: int = 30) -> WorldInfo:
    """Initialise the default process group (idempotent) and return where this rank runs."""
    dev = resolve_device(device)
    rank, world, local = world_from_env()
    if dev.type == "cuda":
        dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    else:
        apply_cpu_compat()
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world > 1:
                raise ValueError("MASTER_PORT is not set; launch with torchrun or launch/slurm.sbatch")
            os.environ["MASTER_PORT"] = str(free_port())
        store = None
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart != "0":
            # torchrun --max-restarts keeps the agent's store across attempts: a restarted gloo group
            # would read the dead workers' addresses from it and hang; each attempt gets its own keys.
            store = dist.PrefixStore(f"rlad/attempt_{restart}", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                timeout=timedelta(minutes=timeout_minutes)))
        dist.init_process_group(backend=backend, rank=rank, world_size=world,
                                timeout=timedelta(minutes=timeout_minutes), store=store)
    return WorldInfo(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


@contextlib.contextmanager
def single_process_world() -> Iterator[ParallelGroups]:
    """A world-size-1 gloo group with TP=1/PP=1 model parallel state, torn down afterwards.

    For tools that build a whole model in one process (the converters). An already initialised
    one-rank world is reused (its model parallel state is replaced).
    """
    created = not dist.is_initialized()
    world = dist.get_world_size() if not created else world_from_env()[1]
    if world != 1:
        raise ValueError(f"expected to run as one process (no torchrun), got world size {world}")
    saved_env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    if created:
        init_distributed("cpu")
    try:
        yield initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=0)
    finally:
        destroy_model_parallel()
        if created:
            dist.destroy_process_group()
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
