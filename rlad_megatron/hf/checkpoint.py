"""Checkpoint directories on disk: what kind a path is, the model config it describes, and its tensors.

Kinds (:func:`checkpoint_kind`):
    megatron   a converted directory (``hf_to_megatron.py``)
    hf         ``config.json`` + safetensors
    dist       a megatron-core dist checkpoint: a training checkpoint (``checkpoint.save_dir`` or one
               of its step dirs) or the ``dist/`` of a converted directory

A converted megatron directory holds

    model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
                           the full TP=1/PP=1 megatron-core state dict, vocab padded for --tp
    megatron_config.yaml   the ModelConfig (rlad_megatron.config) that builds the model
    hf_config.json         the source HF config, so the way back restores fields megatron ignores
    conversion.json        format tag, model_type, the TP/PP it was padded for
    mp_rank_{tp:02d}_{pp:03d}/model.safetensors   (optional) the per-rank shards for --tp/--pp
    dist/step_0000000/     (optional) the same weights as a megatron-core dist checkpoint

Nothing here builds a model: putting tensors into a live model is :mod:`rlad_megatron.models.weights`,
directory-to-directory conversion :mod:`rlad_megatron.conversion`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional

import torch
import yaml

from rlad_megatron.checkpointing import files
from rlad_megatron.config import ModelConfig
from rlad_megatron.hf import io
from rlad_megatron.hf import keymaps as km
from rlad_megatron.hf.config_map import architecture, model_config_from_hf
from rlad_megatron.hf.convert import (
    check_names_and_shapes,
    expected_hf_shapes,
    expected_megatron_shapes,
    hf_to_megatron_state,
    select_hf_names,
)
from rlad_megatron.hf.rank_layout import shard_state_dict, unshard_state_dicts

FORMAT = "rlad-megatron-full-v1"
MEGATRON_CONFIG = "megatron_config.yaml"
HF_CONFIG_COPY = "hf_config.json"
CONVERSION = "conversion.json"
DIST_DIR = "dist"
# Where a converter-written dist checkpoint keeps its ModelConfig (extra_state.json).
MODEL_CONFIG_KEY = "model_config"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})_(\d{3})$")
_MEG_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ---------------------------------------------------------------- kinds


def is_dist_checkpoint(path: str | Path) -> bool:
    """A checkpointing step dir (``meta.json`` or a ``step_*`` name) or a save dir holding step dirs."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / files.META).is_file() or files.step_of(path) is not None:
        return True
    return (path / files.LATEST).is_file() or any(
        p.is_dir() and (files.step_of(p) is not None or p.name.startswith(files.TMP_PREFIX + files.STEP_PREFIX))
        for p in path.iterdir())


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


def dist_checkpoint_path(path: str | Path, *, kind: Optional[str] = None) -> Optional[Path]:
    """The dist checkpoint ``path`` loads from, or None when it loads from safetensors.

    A converted directory with both prefers its safetensors (reading them runs no pickle).
    ``kind``: ``checkpoint_kind(path)`` when the caller has it.
    """
    path = Path(path)
    kind = kind or checkpoint_kind(path)
    if kind == "dist":
        return path
    if kind == "megatron" and not _has_full_layout(path) and is_dist_checkpoint(path / DIST_DIR):
        return path / DIST_DIR
    return None


# ---------------------------------------------------------------- model configs


def model_config_from_dict(data, *, source: str) -> ModelConfig:
    """A validated ModelConfig from its saved mapping (megatron_config.yaml, a dist checkpoint's extra state)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of ModelConfig keys, got {type(data).__name__}")
    # Saved before `load` moved from the model to its section (ModelSection.load): where those
    # weights started from says nothing about their shape.
    data = {k: v for k, v in data.items() if k != "load"}
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{source}: unknown ModelConfig keys {unknown}")
    cfg = ModelConfig(**data)
    try:
        cfg.validate(source)
    except TypeError:  # e.g. num_layers: "two"
        bad = next((k for k, v in data.items() if isinstance(v, str) and k != "params_dtype"), "?")
        raise ValueError(f"{source}: {bad}: expected a number, got {data.get(bad)!r}") from None
    return cfg


def read_megatron_config(megatron_dir: str | Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig and conversion metadata of a converted directory."""
    megatron_dir = Path(megatron_dir)
    path = megatron_dir / MEGATRON_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is {megatron_dir} a converted megatron directory?)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid UTF-8 YAML ({str(e).splitlines()[0]})") from None
    cfg = model_config_from_dict(data, source=str(path))
    meta_path = megatron_dir / CONVERSION
    meta = io.read_json(meta_path) if meta_path.is_file() else {}
    return cfg, meta


def dist_checkpoint_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of the (newest complete) step dir at ``path``.

    A converter-written checkpoint carries it in ``extra_state.json``; a training checkpoint
    (``checkpoint.save_dir``) in its saved run config, ``config.yaml`` -> ``student.model``.
    """
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
    return model_config_from_dict(files.saved_student_model(step_dir), source=f"{run_config}:student.model")


def read_checkpoint_config(path: str | Path, *, kind: Optional[str] = None) -> ModelConfig:
    """The ModelConfig a checkpoint directory (any kind) describes."""
    kind = kind or checkpoint_kind(path)
    if kind == "dist":
        return dist_checkpoint_config(path)
    if kind == "megatron":
        return read_megatron_config(path)[0]
    config_path = Path(path) / "config.json"
    return model_config_from_hf(io.read_json(config_path), source=str(config_path))


# ---------------------------------------------------------------- tensors


def read_hf_checkpoint(hf_dir: str | Path, *, make_vocab_size_divisible_by: int = 128,
                       layers: Optional[range] = None,
                       progress: bool = False) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """Validated HF tensors (all, or only ``layers`` plus the globals), their ModelConfig, config.json."""
    hf_dir = Path(hf_dir)
    config_path = hf_dir / "config.json"
    hf_config = io.read_json(config_path)
    cfg = model_config_from_hf(hf_config, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                               source=str(config_path))
    arch = architecture(hf_config)
    index = io.tensor_index(hf_dir)
    tied = not cfg.untie_embeddings_and_output_weights
    names = select_hf_names(list(index), tied=tied)
    check_names_and_shapes(io.tensor_shapes({n: index[n] for n in names}), expected_hf_shapes(arch, cfg),
                           where={n: str(p) for n, p in index.items()})
    if layers is not None:
        names = [n for n in names if not (m := _HF_LAYER.match(n)) or int(m.group(1)) in layers]
    tensors = io.read_tensors(index, names, progress=progress, desc=f"reading {hf_dir.name}")
    return tensors, cfg, hf_config


def read_full_layout(megatron_dir: str | Path, *,
                     progress: bool = False) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """Full-layout tensors, config and conversion metadata of a converted directory's safetensors.

    Read from model.safetensors (or its index), else by unsharding the mp_rank_* dirs.
    """
    megatron_dir = Path(megatron_dir)
    cfg, meta = read_megatron_config(megatron_dir)
    if (megatron_dir / io.SINGLE).is_file() or (megatron_dir / io.INDEX).is_file():
        index = io.tensor_index(megatron_dir)
        where = {n: str(p) for n, p in index.items()}
        tensors = io.read_tensors(index, list(index), progress=progress, desc=f"reading {megatron_dir.name}")
    else:
        tensors, where = _read_rank_dirs(megatron_dir, cfg, progress=progress)
    rows = tensors.get(km.EMBED, torch.empty(0)).shape[0]
    if rows < cfg.vocab_size:
        raise ValueError(f"{megatron_dir}: {km.EMBED} has {rows} rows, fewer than vocab_size={cfg.vocab_size}")
    check_names_and_shapes({n: tuple(t.shape) for n, t in tensors.items()},
                           expected_megatron_shapes(cfg, padded_vocab=rows), where=where)
    return tensors, cfg, meta


def _read_rank_dirs(megatron_dir: Path, cfg: ModelConfig, *, progress: bool):
    ranks = {}
    for p in megatron_dir.iterdir():
        m = _RANK_DIR.match(p.name)
        if m and p.is_dir():
            ranks[(int(m.group(1)), int(m.group(2)))] = p
    if not ranks:
        raise FileNotFoundError(f"{megatron_dir}: no {io.SINGLE}, {io.INDEX} or mp_rank_XX_YYY directories")
    tp, pp = max(t for t, _ in ranks) + 1, max(p for _, p in ranks) + 1
    absent = [(t, p) for t in range(tp) for p in range(pp) if (t, p) not in ranks]
    if absent:
        raise FileNotFoundError(f"{megatron_dir}: per-rank directories missing for (tp, pp) ranks {absent}")
    shards = {}
    for key, path in ranks.items():
        index = io.tensor_index(path)
        shards[key] = io.read_tensors(index, list(index), progress=progress, desc=path.name)
    where = str(megatron_dir / "mp_rank_*")
    try:
        full = unshard_state_dicts(shards, tp_size=tp, pp_size=pp, num_layers=cfg.num_layers,
                                   tied_embeddings=not cfg.untie_embeddings_and_output_weights)
    except KeyError as e:
        raise ValueError(f"{where}: tensor {e.args[0]!r} is missing from some ranks") from None
    return full, where


def stage_tensors(path: str | Path, layers: range, *,
                  kind: Optional[str] = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Full-layout tensors of an HF or converted directory: the globals and the decoder ``layers``.

    Layer names keep their global index; only a per-rank (mp_rank_*) layout is read whole.
    """
    path = Path(path)
    if (kind or checkpoint_kind(path)) == "hf":
        hf, cfg, hf_config = read_hf_checkpoint(path, layers=layers)
        # Convert as a model of len(layers) layers numbered from 0, then restore the global numbers.
        sub = dataclasses.replace(cfg, num_layers=len(layers))
        renamed = _renumber(hf, _HF_LAYER, "model.layers", -layers.start)
        meg = hf_to_megatron_state(renamed, sub, architecture(hf_config), padded_vocab=cfg.vocab_size)
        return _renumber(meg, _MEG_LAYER, "decoder.layers", layers.start), cfg
    cfg, _ = read_megatron_config(path)
    if (path / io.SINGLE).is_file() or (path / io.INDEX).is_file():
        index = io.tensor_index(path)
        names = [n for n in index if not (m := _MEG_LAYER.match(n)) or int(m.group(1)) in layers]
        return io.read_tensors(index, names), cfg
    tensors, cfg, _ = read_full_layout(path)
    return tensors, cfg


def _renumber(tensors: dict[str, torch.Tensor], pattern: re.Pattern, prefix: str,
              shift: int) -> dict[str, torch.Tensor]:
    def rename(n: str) -> str:
        m = pattern.match(n)
        return f"{prefix}.{int(m.group(1)) + shift}.{m.group(2)}" if m else n
    return {rename(n): t for n, t in tensors.items()}


# ---------------------------------------------------------------- writing


def write_full_layout(tensors: dict[str, torch.Tensor], cfg: ModelConfig, out: Path, *,
                      max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES, progress: bool = False) -> list[str]:
    """The default megatron-side writer: full-layout safetensors + megatron_config.yaml."""
    written = io.save_tensors(tensors, out, max_shard_bytes=max_shard_bytes, progress=progress)
    (out / MEGATRON_CONFIG).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return written + [MEGATRON_CONFIG]


def write_rank_layout(tensors: dict[str, torch.Tensor], cfg: ModelConfig, out: Path, *, tp: int, pp: int,
                      progress: bool = False) -> list[str]:
    """Per-rank shards ``mp_rank_{tp:02d}_{pp:03d}/model.safetensors`` (megatron's legacy naming)."""
    written = []
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            shard = shard_state_dict(tensors, tp_rank=tp_rank, tp_size=tp, pp_rank=pp_rank, pp_size=pp,
                                     num_layers=cfg.num_layers,
                                     tied_embeddings=not cfg.untie_embeddings_and_output_weights)
            rank_dir = out / f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
            rank_dir.mkdir()
            written += [f"{rank_dir.name}/{f}" for f in io.save_tensors(shard, rank_dir, progress=progress)]
    return written
