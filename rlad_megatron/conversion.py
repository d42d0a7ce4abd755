"""Directory-level conversion: HF directory <-> rlad-megatron converted directory (layout: hf/checkpoint.py).

    convert_hf_to_megatron(hf_dir=..., out_dir=..., tp=2, writer="full+dist")
    convert_megatron_to_hf(megatron_dir=..., out_dir=...)   # also a dist or training checkpoint

Any TP/PP loads the output (:func:`rlad_megatron.models.weights.load_weights`). Outputs are
written to a temporary directory beside the target and renamed at the end; everything that can
fail on the input is checked before the output directory exists.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from rlad_megatron.config import ConfigError, ModelConfig, ModelSection, ParallelConfig, padded_vocab_size
from rlad_megatron.hf import io
from rlad_megatron.hf import keymaps as km
from rlad_megatron.hf.checkpoint import (
    CONVERSION,
    DIST_DIR,
    FORMAT,
    HF_CONFIG_COPY,
    dist_checkpoint_path,
    read_full_layout,
    read_hf_checkpoint,
    read_megatron_config,
    write_full_layout,
    write_rank_layout,
)
from rlad_megatron.hf.config_map import architecture, hf_config_from_model, model_config_from_hf
from rlad_megatron.hf.convert import hf_to_megatron_state, megatron_to_hf_state
from rlad_megatron.models.weights import read_dist_weights, write_dist_weights

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")


def read_megatron_checkpoint(megatron_dir: str | Path, *,
                             progress: bool = False) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """Full-layout tensors, config and conversion metadata of any megatron-side directory.

    Read from model.safetensors, by unsharding mp_rank_* dirs, or from a dist checkpoint: a
    training checkpoint (a ``checkpoint.save_dir`` or one of its step dirs) or the ``dist/`` of a
    converted directory that has no safetensors.
    """
    megatron_dir = Path(megatron_dir)
    dist_path = dist_checkpoint_path(megatron_dir)
    if dist_path is None:
        return read_full_layout(megatron_dir, progress=progress)
    tensors, cfg = read_dist_weights(dist_path)
    if dist_path == megatron_dir:
        return tensors, cfg, {}
    cfg, meta = read_megatron_config(megatron_dir)
    return tensors, cfg, meta


def write_dist_layout(tensors: dict[str, torch.Tensor], cfg: ModelConfig, out: Path) -> list[str]:
    """``dist/``: a megatron-core dist checkpoint of the same weights (the DCP metadata is a pickle:
    load only dist checkpoints you wrote yourself; share the safetensors)."""
    write_dist_weights(tensors, cfg, out / DIST_DIR)
    return sorted(str(p.relative_to(out)) for p in (out / DIST_DIR).rglob("*") if p.is_file())
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
        written = WRITERS[writer](meg, cfg, tmp, tp=tp, pp=pp, progress=progress)
        (tmp / HF_CONFIG_COPY).write_text(json.dumps(hf_config, indent=2))
        meta = {"format": FORMAT, "model_type": arch.model_type, "padded_vocab_size": padded,
                "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "source": str(hf_dir),
                "layouts": writer.split("+")}
        (tmp / CONVERSION).write_text(json.dumps(meta, indent=2))
    return _summary(arch.model_type, cfg, meg, out_dir, written + [HF_CONFIG_COPY, CONVERSION],
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
