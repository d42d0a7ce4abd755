"""Safetensors directories: validated reading (single file or sharded with an index), sharded
writing, and output directories that appear whole or not at all.

Pickled checkpoints (``*.bin``, ``*.pt``) are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def tensor_index(directory: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (``model.safetensors`` or an index's shards)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory")
    index_path, single = directory / INDEX, directory / SINGLE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: expected a non-empty 'weight_map' object")
        files = {f: directory / f for f in sorted(set(weight_map.values()))}
        for path in files.values():
            if not path.is_file():
                raise FileNotFoundError(f"{path}: listed in {index_path} but not found")
        for path in files.values():
            _check_header(path)
        return {name: files[f] for name, f in weight_map.items()}
    if single.is_file():
        return {name: single for name in _check_header(single)}
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise ValueError(f"{directory}: only safetensors checkpoints are read; found pickled {pickles}. "
                         "Convert them with transformers (save_pretrained(safe_serialization=True)) first.")
    raise FileNotFoundError(f"{directory}: no {SINGLE} or {INDEX}")


def _check_header(path: Path) -> list[str]:
    """Names in ``path``; a truncated or corrupt file fails here, naming the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None
    # safetensors checks the header against the file size lazily on some versions; compare it here.
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if os.path.getsize(path) < 8 + header_len + end:
        raise ValueError(f"{path}: truncated: the header needs {8 + header_len + end} bytes, "
                         f"the file has {os.path.getsize(path)}")
    return names


def read_tensors(index: dict[str, Path], names: Iterable[str], *, progress: bool = False,
                 desc: str = "reading") -> dict[str, torch.Tensor]:
    """Load ``names`` (each must be in ``index``), grouped by file so each file opens once."""
    names = list(names)
    missing = [n for n in names if n not in index]
    if missing:
        files = sorted({str(p) for p in index.values()})
        raise ValueError(f"missing tensor {missing[0]!r} (and {len(missing) - 1} more) in {files}")
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(index[n], []).append(n)
    out: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(names), desc=desc, unit="tensor", disable=not progress, leave=False)
    for path, file_names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for n in file_names:
                    try:
                        out[n] = f.get_tensor(n)
                    except (SafetensorError, OSError) as e:
                        raise ValueError(f"{path}: cannot read tensor {n!r} ({e})") from None
                    bar.update()
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    bar.close()
    return {n: out[n] for n in names}


def save_tensors(tensors: dict[str, torch.Tensor], directory: Path, *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = False) -> list[str]:
    """Write ``model.safetensors`` or HF-style shards plus an index; returns the file names."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE), metadata=meta)
        return [SINGLE]
    files, weight_map = [], {}
    for i, shard in enumerate(tqdm(shards, desc="writing", unit="shard", disable=not progress, leave=False)):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata=meta)
        files.append(fname)
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2))
    return files + [INDEX]


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; it becomes ``out`` only if the block succeeds."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: output exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"{out}: output directory exists and is not empty (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old: Optional[Path] = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def tensor_shapes(index: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers, without reading any data."""
    by_file: dict[Path, list[str]] = {}
    for n, p in index.items():
        by_file.setdefault(p, []).append(n)
    shapes: dict[str, tuple[int, ...]] = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            for n in names:
                if n not in present:
                    raise ValueError(f"{path}: tensor {n!r} is listed in the index but not in the file")
                shapes[n] = tuple(f.get_slice(n).get_shape())
    return shapes
