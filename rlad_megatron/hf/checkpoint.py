"""Directory-level conversion: HF directory <-> rlad-megatron "full layout" directory.

A converted megatron directory holds

    model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json)
                           the full TP=1/PP=1 megatron-core state dict, vocab padded for --tp
    megatron_config.yaml   the ModelConfig (rlad_megatron.config) that builds the model
    hf_config.json         the source HF config, so the way back restores fields megatron ignores
    conversion.json        format tag, model_type, the TP/PP it was padded for
    mp_rank_{tp:02d}_{pp:03d}/model.safetensors   (optional) the per-rank shards for --tp/--pp
    dist/step_0000000/     (optional) the same weights as a megatron-core dist checkpoint

Any TP/PP loads it: :func:`rlad_megatron.hf.load.load_megatron_weights` shards on the fly.
Outputs are written to a temporary directory beside the target and renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
import yaml

from rlad_megatron.config import ConfigError, ModelConfig, ModelSection, ParallelConfig, padded_vocab_size
from rlad_megatron.hf import io
from rlad_megatron.hf import keymaps as km
from rlad_megatron.hf.config_map import architecture, hf_config_from_model, model_config_from_hf
from rlad_megatron.hf.convert import (
    check_names_and_shapes,
    expected_hf_shapes,
    expected_megatron_shapes,
    hf_to_megatron_state,
    megatron_to_hf_state,
    select_hf_names,
)
from rlad_megatron.models.sharding import shard_state_dict, unshard_state_dicts

FORMAT = "rlad-megatron-full-v1"
MEGATRON_CONFIG = "megatron_config.yaml"
HF_CONFIG_COPY = "hf_config.json"
CONVERSION = "conversion.json"
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})_(\d{3})$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")


# ---------------------------------------------------------------- reading


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
        names = [n for n in names if _hf_layer(n) is None or _hf_layer(n) in layers]
    tensors = io.read_tensors(index, names, progress=progress, desc=f"reading {hf_dir.name}")
    return tensors, cfg, hf_config


def _hf_layer(name: str) -> Optional[int]:
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


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


def model_config_from_dict(data, *, source: str) -> ModelConfig:
    """A validated ModelConfig from its saved mapping (megatron_config.yaml, a dist checkpoint's extra state)."""
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of ModelConfig keys, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"{source}: unknown ModelConfig keys {unknown}")
    cfg = ModelConfig(**data)
    try:
        cfg.validate(source)
    except TypeError:  # e.g. num_layers: "two"
        bad = next((k for k, v in data.items() if isinstance(v, str) and k != "params_dtype" and k != "load"), "?")
        raise ValueError(f"{source}: {bad}: expected a number, got {data.get(bad)!r}") from None
    return cfg


def read_megatron_checkpoint(megatron_dir: str | Path, *,
                             progress: bool = False) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """Full-layout tensors, config and conversion metadata of ``megatron_dir``.

    Read from model.safetensors, by unsharding mp_rank_* dirs, or from a dist checkpoint: a
    training checkpoint (a ``checkpoint.save_dir`` or one of its step dirs) or the ``dist/`` of a
    converted directory that has no safetensors.
    """
    from rlad_megatron.hf.dist import read_dist_checkpoint
    from rlad_megatron.hf.load import dist_checkpoint_path  # load.py imports this module

    megatron_dir = Path(megatron_dir)
    dist_path = dist_checkpoint_path(megatron_dir)
    if dist_path is not None:
        tensors, cfg = read_dist_checkpoint(dist_path)
        if dist_path == megatron_dir:
            return tensors, cfg, {}
        cfg, meta = read_megatron_config(megatron_dir)
        return tensors, cfg, meta
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


# ---------------------------------------------------------------- writing


def write_full_layout(tensors: dict[str, torch.Tensor], cfg: ModelConfig, out: Path, *,
                      max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES, progress: bool = False) -> list[str]:
    """The default megatron-side writer: full-layout safetensors + megatron_config.yaml."""
    files = io.save_tensors(tensors, out, max_shard_bytes=max_shard_bytes, progress=progress)
    (out / MEGATRON_CONFIG).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    return files + [MEGATRON_CONFIG]


def write_rank_layout(tensors: dict[str, torch.Tensor], cfg: ModelConfig, out: Path, *, tp: int, pp: int,
                      progress: bool = False) -> list[str]:
    """Per-rank shards ``mp_rank_{tp:02d}_{pp:03d}/model.safetensors`` (megatron's legacy naming)."""
    files = []
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            shard = shard_state_dict(tensors, tp_rank=tp_rank, tp_size=tp, pp_rank=pp_rank, pp_size=pp,
                                     num_layers=cfg.num_layers,
                                     tied_embeddings=not cfg.untie_embeddings_and_output_weights)
            rank_dir = out / f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
            rank_dir.mkdir()
            files += [f"{rank_dir.name}/{f}" for f in io.save_tensors(shard, rank_dir, progress=progress)]
    return files


def write_dist_layout(tensors: dict[str, torch.Tensor], cfg: ModelConfig, out: Path) -> list[str]:
    """``dist/``: a megatron-core dist checkpoint of the same weights (see rlad_megatron.hf.dist)."""
    # Imported here: rlad_megatron.hf.dist reads configs through this module.
    from rlad_megatron.hf.dist import write_dist_checkpoint

    return write_dist_checkpoint(tensors, cfg, out)


# Switchable megatron-side writers: name -> fn(tensors, cfg, out_dir, tp=, pp=, progress=) -> files.
MegatronWriter = Callable[..., list[str]]
WRITERS: dict[str, MegatronWriter] = {
    "full": lambda t, c, o, *, tp, pp, progress: write_full_layout(t, c, o, progress=progress),
    "full+ranks": lambda t, c, o, *, tp, pp, progress: (write_full_layout(t, c, o, progress=progress)
                                                        + write_rank_layout(t, c, o, tp=tp, pp=pp,
                                                                            progress=progress)),
    "full+dist": lambda t, c, o, *, tp, pp, progress: (write_full_layout(t, c, o, progress=progress)
                                                       + write_dist_layout(t, c, o)),
    "full+ranks+dist": lambda t, c, o, *, tp, pp, progress: (write_full_layout(t, c, o, progress=progress)
                                                             + write_rank_layout(t, c, o, tp=tp, pp=pp,
                                                                                 progress=progress)
                                                             + write_dist_layout(t, c, o)),
}


def convert_hf_to_megatron(*, hf_dir: str | Path, out_dir: str | Path, tp: int = 1, pp: int = 1,
                           make_vocab_size_divisible_by: int = 128, writer: str = "full",
                           overwrite: bool = False, progress: bool = False) -> dict:
    """HF directory -> converted megatron directory; returns a summary (names, sizes, files)."""
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if writer not in WRITERS:
        raise ValueError(f"writer: expected one of {sorted(WRITERS)}, got {writer!r}")
    # Validate everything that can fail before the output directory exists.
    hf_config = io.read_json(hf_dir / "config.json")
    cfg = model_config_from_hf(hf_config, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                               source=str(hf_dir / "config.json"))
    try:
        ModelSection(model=cfg, parallel=ParallelConfig(tensor_model_parallel_size=tp,
                                                         pipeline_model_parallel_size=pp)).validate("checkpoint")
    except ConfigError as e:
        raise ValueError(f"--tp {tp} --pp {pp} do not fit {hf_dir / 'config.json'}: {e}") from None
    hf, cfg, hf_config = read_hf_checkpoint(hf_dir, make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                                            progress=progress)
    arch = architecture(hf_config)
    padded = padded_vocab_size(cfg.vocab_size, make_vocab_size_divisible_by, tp)
    meg = hf_to_megatron_state(hf, cfg, arch, padded_vocab=padded)
    with io.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        files = WRITERS[writer](meg, cfg, tmp, tp=tp, pp=pp, progress=progress)
        (tmp / HF_CONFIG_COPY).write_text(json.dumps(hf_config, indent=2))
        meta = {"format": FORMAT, "model_type": arch.model_type, "padded_vocab_size": padded,
                "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "source": str(hf_dir),
                "layouts": writer.split("+")}
        (tmp / CONVERSION).write_text(json.dumps(meta, indent=2))
    return _summary(arch.model_type, cfg, meg, out_dir, files + [HF_CONFIG_COPY, CONVERSION],
                    vocab=f"{cfg.vocab_size} -> {padded} (padded for TP={tp})")


def convert_megatron_to_hf(*, megatron_dir: str | Path, out_dir: str | Path,
                           tokenizer_dir: Optional[str | Path] = None, model_type: Optional[str] = None,
                           max_shard_bytes: int = io.DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                           progress: bool = False) -> dict:
    """Converted megatron directory -> HF directory loadable by ``AutoModelForCausalLM.from_pretrained``."""
    megatron_dir, out_dir = Path(megatron_dir), Path(out_dir)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"{tokenizer_dir}: tokenizer directory not found")
    meg, cfg, meta = read_megatron_checkpoint(megatron_dir, progress=progress)
    base_path = megatron_dir / HF_CONFIG_COPY
    base = io.read_json(base_path) if base_path.is_file() else None
    hf_config = hf_config_from_model(cfg, model_type=model_type or meta.get("model_type"), base=base)
    arch = architecture(hf_config)
    hf = megatron_to_hf_state(meg, cfg, arch)
    with io.atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        files = io.save_tensors(hf, tmp, max_shard_bytes=max_shard_bytes, progress=progress)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        files.append("config.json")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
                    files.append(name)
    return _summary(arch.model_type, cfg, hf, out_dir, files,
                    vocab=f"{meg[km.EMBED].shape[0]} -> {cfg.vocab_size} (padding stripped)")


def _summary(model_type: str, cfg: ModelConfig, tensors: dict[str, torch.Tensor], out: Path,
             files: list[str], *, vocab: str) -> dict:
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    return {"model_type": model_type, "layers": cfg.num_layers, "tensors": len(tensors),
            "parameters": sum(t.numel() for t in tensors.values()), "dtypes": dtypes, "vocab": vocab,
            "tied_embeddings": not cfg.untie_embeddings_and_output_weights, "out": str(out), "files": files}


def format_summary(summary: dict) -> str:
    files = summary["files"]
    shown = ", ".join(files[:6]) + (f", ... ({len(files)} files)" if len(files) > 6 else "")
    return (f"converted {summary['model_type']}: {summary['layers']} layers, {summary['tensors']} tensors, "
            f"{summary['parameters']:,} parameters ({'/'.join(summary['dtypes'])}), vocab {summary['vocab']}, "
            f"tied embeddings: {summary['tied_embeddings']}\n  -> {summary['out']}: {shown}")
