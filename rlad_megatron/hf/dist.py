"""Converted weights as a megatron-core ``dist_checkpointing`` checkpoint (``hf_to_megatron.py --dist-checkpoint``),
and the reading side shared with training checkpoints (``checkpoint.save_dir`` step dirs).

    <out>/dist/step_0000000/   a rlad_megatron.checkpointing step dir (model only, no optimizer/RNG),
                               extra_state.json carries the ModelConfig
    <out>/dist/latest

It is written from a TP=1/PP=1 model built in the converting process (a world of one gloo rank)
and loaded at any TP/PP by dist_checkpointing's resharding. The vocabulary rows may be padded
differently at load time: megatron-core marks the embedding and output layer
``allow_shape_mismatch``, so rows the checkpoint lacks read as zeros and extra saved (zero)
padding rows are dropped.

The DCP ``.metadata`` file and megatron's ``common.pt`` are pickles: load only dist checkpoints
you wrote yourself; share the safetensors layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlad_megatron.config import ModelConfig, ModelSection
from rlad_megatron.hf import keymaps as km

if TYPE_CHECKING:
    from rlad_megatron.distributed.groups import ParallelGroups

DIST_DIR = "dist"
MODEL_CONFIG_KEY = "model_config"


# ---------------------------------------------------------------- writing


@contextlib.contextmanager
def _single_process_world() -> Iterator[None]:
    """A world-size-1 gloo group with TP=1/PP=1 model parallel state, torn down afterwards.

    An already initialised one-rank world is reused (its model parallel state is replaced).
    """
    import torch.distributed as dist

    from rlad_megatron.distributed import destroy_model_parallel, init_distributed, initialize_model_parallel
    from rlad_megatron.distributed.init import world_from_env

    created = not dist.is_initialized()
    world = dist.get_world_size() if not created else world_from_env()[1]
    if world != 1:
        raise ValueError(f"--dist-checkpoint: the converter runs as one process, got world size {world} "
                         "(run hf_to_megatron.py without torchrun)")
    saved_env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    if created:
        init_distributed("cpu")
    try:
        initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=0)
        yield
    finally:
        destroy_model_parallel()
        if created:
            dist.destroy_process_group()
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)


def write_dist_checkpoint(tensors: dict[str, torch.Tensor], cfg: ModelConfig, out: Path) -> list[str]:
    """``out/dist``: the full-layout ``tensors`` saved as a dist checkpoint; returns the files written."""
    from rlad_megatron.checkpointing import save_checkpoint
    from rlad_megatron.distributed.groups import current_groups
    from rlad_megatron.models.builder import build_gpt_model
    from rlad_megatron.models.sharding import load_shard, shard_state_dict

    # The tensors are padded for the conversion's --tp; a TP=1 model pads to a multiple of
    # make_vocab_size_divisible_by, so use the padded row count itself to get the same rows.
    padded = tensors[km.EMBED].shape[0]
    build_cfg = dataclasses.replace(cfg, make_vocab_size_divisible_by=padded, load=None)
    target = out / DIST_DIR
    with _single_process_world():
        groups = current_groups()
        model = build_gpt_model(ModelSection(model=build_cfg), groups, device=torch.device("cpu"))
        load_shard(model, shard_state_dict(tensors, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1,
                                           num_layers=cfg.num_layers,
                                           tied_embeddings=not cfg.untie_embeddings_and_output_weights))
        extra = {MODEL_CONFIG_KEY: dataclasses.asdict(cfg), "padded_vocab_size": padded}
        save_checkpoint(directory=target, step=0, model_chunks=[model], optimizer=None, scheduler=None,
                        extra_state=extra, config=None, rng=False)
        del model
    return sorted(str(p.relative_to(out)) for p in target.rglob("*") if p.is_file())


# ---------------------------------------------------------------- reading


def is_dist_checkpoint(path: str | Path) -> bool:
    """A checkpointing step dir (``meta.json`` or a ``step_*`` name) or a save dir holding step dirs."""
    from rlad_megatron.checkpointing import files

    path = Path(path)
    if not path.is_dir():
        return False
    if (path / files.META).is_file() or files.step_of(path) is not None:
        return True
    return (path / files.LATEST).is_file() or any(
        p.is_dir() and (files.step_of(p) is not None or p.name.startswith(files.TMP_PREFIX + files.STEP_PREFIX))
        for p in path.iterdir())


def dist_checkpoint_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of the (newest complete) step dir at ``path``.

    A converter-written checkpoint carries it in ``extra_state.json``; a training checkpoint
    (``checkpoint.save_dir``) in its saved run config, ``config.yaml`` -> ``student.model``.
    """
    from rlad_megatron.checkpointing import files
    from rlad_megatron.hf.checkpoint import model_config_from_dict

    step_dir = files.resolve_checkpoint(path)
    extra_path = step_dir / "extra_state.json"
    extra = files.read_json(extra_path)
    data = extra.get(MODEL_CONFIG_KEY) if isinstance(extra, dict) else None
    if isinstance(data, dict):
        return model_config_from_dict(data, source=f"{extra_path}:{MODEL_CONFIG_KEY}")
    run_config = step_dir / files.RUN_CONFIG
    if not run_config.is_file():
        raise ValueError(f"{extra_path}: no '{MODEL_CONFIG_KEY}' mapping and no {run_config.name} beside it: "
                         "neither a converted (hf_to_megatron.py --dist-checkpoint) nor a training checkpoint")
    data = files.saved_student_model(step_dir)
    if data is not None:
        # Where the run's weights started from says nothing about these weights.
        data = {k: v for k, v in data.items() if k != "load"}
    return model_config_from_dict(data, source=f"{run_config}:student.model")


def read_dist_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Full-layout (TP=1, PP=1) tensors and ModelConfig of the dist checkpoint at ``path``.

    Loaded through a TP=1 model in a one-process world, so a checkpoint saved at any TP/PP works;
    the vocabulary comes back padded to ``make_vocab_size_divisible_by``.
    """
    from rlad_megatron.distributed.groups import current_groups
    from rlad_megatron.models.builder import build_gpt_model
    from rlad_megatron.models.sharding import model_state_dict

    cfg = dist_checkpoint_config(path)
    with _single_process_world():
        groups = current_groups()
        model = build_gpt_model(ModelSection(model=dataclasses.replace(cfg, load=None)), groups,
                                device=torch.device("cpu"))
        load_dist_weights(model, path, groups, cfg=cfg)
        tensors = model_state_dict(model)
        del model
    return tensors, cfg


def load_dist_weights(model: torch.nn.Module, path: str | Path, groups: ParallelGroups, *,
                      cfg: ModelConfig) -> None:
    """Copy this rank's part of the dist checkpoint at ``path`` into ``model`` (all ranks call this)."""
    from rlad_megatron.checkpointing import load_checkpoint

    own = model.state_dict()
    local_rows = next((own[n].shape[0] for n in (km.EMBED, km.OUTPUT) if n in own), None)
    if local_rows is not None and local_rows * groups.tp_size < cfg.vocab_size:
        raise ValueError(f"{path}: the model's vocabulary ({local_rows * groups.tp_size} rows) is smaller than "
                         f"the checkpoint's vocab_size={cfg.vocab_size}")
    load_checkpoint(directory=path, model_chunks=[model], optimizer=None, scheduler=None, rng=False)
