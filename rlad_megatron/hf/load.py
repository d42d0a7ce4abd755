"""Initialise one megatron model stage from a converted directory, its dist checkpoint, or an HF directory.

Each rank reads only its pipeline stage's layers (plus the embedding / final norm / output layer),
re-pads the vocabulary rows to the model's padded size (so a directory converted for one TP
loads at any TP), slices its TP shard and copies it in. A dist checkpoint (``dist/``) is
resharded by megatron-core's dist_checkpointing instead (see rlad_megatron/hf/dist.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlad_megatron.config import ModelConfig
from rlad_megatron.hf import io
from rlad_megatron.hf import keymaps as km
from rlad_megatron.hf.checkpoint import (
    MEGATRON_CONFIG,
    read_hf_checkpoint,
    read_megatron_checkpoint,
    read_megatron_config,
)
from rlad_megatron.hf.config_map import architecture, head_dim
from rlad_megatron.hf.convert import hf_to_megatron_state, pad_vocab
from rlad_megatron.hf.dist import DIST_DIR, dist_checkpoint_config, is_dist_checkpoint, load_dist_weights
from rlad_megatron.models.sharding import load_shard, shard_state_dict

_MEG_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_RANK_DIR = re.compile(r"^mp_rank_\d{2}_\d{3}$")

if TYPE_CHECKING:
    from rlad_megatron.distributed.groups import ParallelGroups


def checkpoint_kind(path: str | Path) -> str:
    """'megatron' (a converted directory), 'hf' (config.json + safetensors) or 'dist' (a dist checkpoint)."""
    path = Path(path)
    if (path / MEGATRON_CONFIG).is_file():
        return "megatron"
    if (path / "config.json").is_file():
        return "hf"
    if is_dist_checkpoint(path):
        return "dist"
    raise FileNotFoundError(f"{path}: neither a converted megatron directory ({MEGATRON_CONFIG}) "
                            "nor an HF directory (config.json) nor a dist checkpoint (step_*/meta.json)")


def _has_full_layout(path: Path) -> bool:
    return ((path / io.SINGLE).is_file() or (path / io.INDEX).is_file()
            or any(_RANK_DIR.match(p.name) for p in path.iterdir()))


def dist_checkpoint_path(path: str | Path) -> Path | None:
    """The dist checkpoint ``path`` loads from, or None when it loads from safetensors.

    A converted directory with both prefers its safetensors (reading them runs no pickle).
    """
    path = Path(path)
    kind = checkpoint_kind(path)
    if kind == "dist":
        return path
    if kind == "megatron" and not _has_full_layout(path) and is_dist_checkpoint(path / DIST_DIR):
        return path / DIST_DIR
    return None


def read_checkpoint_config(path: str | Path) -> ModelConfig:
    """The ModelConfig a checkpoint directory (any kind) describes."""
    kind = checkpoint_kind(path)
    if kind == "dist":
        return dist_checkpoint_config(path)
    if kind == "megatron":
        return read_megatron_config(path)[0]
    from rlad_megatron.hf.config_map import model_config_from_hf

    return model_config_from_hf(io.read_json(Path(path) / "config.json"), source=str(Path(path) / "config.json"))


def _stage_tensors(path: Path, layers: range) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    if checkpoint_kind(path) == "hf":
        hf, cfg, hf_config = read_hf_checkpoint(path, layers=layers)
        sub = _with_layers(cfg, layers)
        renamed = _renumber_hf(hf, -layers.start)
        meg = hf_to_megatron_state(renamed, sub, architecture(hf_config), padded_vocab=cfg.vocab_size)
        return _renumber_meg(meg, layers.start), cfg
    cfg, _ = read_megatron_config(path)
    if (path / io.SINGLE).is_file() or (path / io.INDEX).is_file():
        index = io.tensor_index(path)
        names = [n for n in index
                 if not (m := _MEG_LAYER.match(n)) or int(m.group(1)) in layers]
        return io.read_tensors(index, names), cfg
    tensors, cfg, _ = read_megatron_checkpoint(path)  # per-rank layout only: unshard everything
    return tensors, cfg


def _with_layers(cfg: ModelConfig, layers: range) -> ModelConfig:
    import dataclasses

    return dataclasses.replace(cfg, num_layers=len(layers))


def _renumber_hf(tensors: dict[str, torch.Tensor], shift: int) -> dict[str, torch.Tensor]:
    def rename(n: str) -> str:
        m = re.match(r"^model\.layers\.(\d+)\.(.+)$", n)
        return f"model.layers.{int(m.group(1)) + shift}.{m.group(2)}" if m else n
    return {rename(n): t for n, t in tensors.items()}


def _renumber_meg(tensors: dict[str, torch.Tensor], shift: int) -> dict[str, torch.Tensor]:
    def rename(n: str) -> str:
        m = re.match(r"^decoder\.layers\.(\d+)\.(.+)$", n)
        return f"decoder.layers.{int(m.group(1)) + shift}.{m.group(2)}" if m else n
    return {rename(n): t for n, t in tensors.items()}


def _check_model_matches(model: torch.nn.Module, cfg: ModelConfig, path: Path) -> None:
    tc = model.config
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    pairs = {
        "num_layers": (tc.num_layers, cfg.num_layers),
        "hidden_size": (tc.hidden_size, cfg.hidden_size),
        "num_attention_heads": (tc.num_attention_heads, cfg.num_attention_heads),
        "num_query_groups": (tc.num_query_groups, cfg.num_query_groups),
        "ffn_hidden_size": (tc.ffn_hidden_size, cfg.ffn_hidden_size),
        "kv_channels": (tc.kv_channels, head_dim(cfg)),
        "add_qkv_bias": (bool(tc.add_qkv_bias), cfg.add_qkv_bias),
        "qk_layernorm": (bool(tc.qk_layernorm), cfg.qk_layernorm),
        "untie_embeddings_and_output_weights": (not tied, cfg.untie_embeddings_and_output_weights),
    }
    for key, (model_value, ckpt_value) in pairs.items():
        if model_value != ckpt_value:
            raise ValueError(f"{path}: {key}: the model was built with {model_value}, the checkpoint has "
                             f"{ckpt_value}")


def load_megatron_weights(model: torch.nn.Module, path: str | Path, groups: ParallelGroups) -> ModelConfig:
    """Copy this rank's shard of the checkpoint at ``path`` into ``model`` (one GPTModel stage).

    ``path`` is a directory written by ``checkpoints_convert/hf_to_megatron.py``, its ``dist/``
    dist checkpoint (``--dist-checkpoint``; used for a converted directory only when it has no
    safetensors), or an HF directory (config.json + safetensors). Returns the checkpoint's ModelConfig.
    """
    path = Path(path)
    cfg = read_checkpoint_config(path)
    _check_model_matches(model, cfg, path)
    dist_path = dist_checkpoint_path(path)
    if dist_path is not None:
        load_dist_weights(model, dist_path, groups, cfg=cfg)
        return cfg
    per_stage = cfg.num_layers // groups.pp_size
    layers = range(groups.pp_rank * per_stage, (groups.pp_rank + 1) * per_stage)
    full, cfg = _stage_tensors(path, layers)
    own = model.state_dict()
    local_rows = next((own[n].shape[0] for n in (km.EMBED, km.OUTPUT) if n in own), None)
    if local_rows is not None:
        padded = local_rows * groups.tp_size
        if padded < cfg.vocab_size:
            raise ValueError(f"{path}: the model's vocabulary ({padded} rows) is smaller than the checkpoint's "
                             f"vocab_size={cfg.vocab_size}")
        for name in (km.EMBED, km.OUTPUT):
            if name in full:
                full[name] = pad_vocab(full[name][:cfg.vocab_size], padded)
    shard = shard_state_dict(full, tp_rank=groups.tp_rank, tp_size=groups.tp_size, pp_rank=groups.pp_rank,
                             pp_size=groups.pp_size, num_layers=cfg.num_layers,
                             tied_embeddings=not cfg.untie_embeddings_and_output_weights)
    if any(n.endswith(".linear_qkv.layer_norm_weight") for n in own):
        shard = {km.local_to_te_name(n): t for n, t in shard.items()}
    load_shard(model, shard)
    return cfg
