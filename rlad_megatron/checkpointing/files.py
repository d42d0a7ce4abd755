"""Checkpoint directory layout and the atomic publish protocol (no torch.distributed here).

    save_dir/
      tmp.step_0000012/     being written (ignored by loaders; removed by the next save)
      step_0000008/         complete: renamed from tmp.step_0000008 after every rank finished
      step_0000010/
      latest                "step_0000010", replaced atomically after the rename

A directory is complete when its name is ``step_<7 digits>`` and it holds ``meta.json``
(written into the tmp dir before the rename), so a crash at any point leaves either the old
or the new checkpoint visible, never a half-written one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from rlad_megatron.atomic import fsync_dir, write_text_atomic

STEP_PREFIX = "step_"
TMP_PREFIX = "tmp."
LATEST = "latest"
META = "meta.json"
RUN_CONFIG = "config.yaml"  # the resolved run config, written by save_config
_STEP_DIR = re.compile(r"^step_(\d{7,})$")


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step: expected >= 0, got {step}")
    return f"{STEP_PREFIX}{step:07d}"


def step_of(path: str | Path) -> int | None:
    """The step encoded in a complete-checkpoint directory name, else None."""
    m = _STEP_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def write_json_atomic(path: str | Path, obj) -> None:
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=True)
    except TypeError as e:
        raise ValueError(f"{path}: expected JSON-serialisable data ({e})") from None
    write_text_atomic(path, text + "\n")


def read_json(path: str | Path):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; the checkpoint is incomplete") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: corrupt checkpoint file ({e})") from None


def saved_student_model(step_dir: str | Path):
    """The ``student.model`` mapping of the run config saved in ``step_dir``.

    None when the step dir has no config.yaml or the config has no such mapping.
    """
    import yaml

    path = Path(step_dir) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid UTF-8 YAML ({str(e).splitlines()[0]})") from None
    student = saved.get("student") if isinstance(saved, dict) else None
    model = student.get("model") if isinstance(student, dict) else None
    return model if isinstance(model, dict) else None


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return step_of(path) is not None and (path / META).is_file()


def complete_checkpoints(save_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``save_dir``, oldest step first."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [p for p in save_dir.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: step_of(p))


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``save_dir`` (None if there is none).

    The ``latest`` marker is written last, so after a crash between the rename and the marker
    update the directory scan is ahead of the marker; the scan is what counts.
    """
    found = complete_checkpoints(save_dir)
    return found[-1] if found else None


def prepare_tmp_dir(save_dir: str | Path, step: int) -> Path:
    """Create an empty ``save_dir/tmp.step_XXXXXXX`` (called on one rank only)."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    tmp = save_dir / f"{TMP_PREFIX}{step_dir_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from a save that crashed
    tmp.mkdir()
    return tmp


def publish(tmp: str | Path, *, keep_last: int) -> Path:
    """Rename a fully written tmp dir to its final name, update ``latest``, prune old ones.

    Called on one rank after every rank finished writing into ``tmp``.
    """
    tmp = Path(tmp)
    if not tmp.name.startswith(TMP_PREFIX) or not (tmp / META).is_file():
        raise ValueError(f"{tmp}: expected a tmp.step_* directory containing {META}")
    final = tmp.with_name(tmp.name[len(TMP_PREFIX):])
    if final.exists():
        # Saving the same step again (e.g. after a resume): the new one replaces it.
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    write_text_atomic(final.parent / LATEST, final.name + "\n")
    prune(final.parent, keep_last=keep_last)
    return final


def prune(save_dir: str | Path, *, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints and stale tmp dirs.

    ``keep_last <= 0`` keeps every checkpoint. Returns the deleted paths.
    """
    save_dir = Path(save_dir)
    removed = []
    for p in save_dir.iterdir():
        if p.is_dir() and p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    if keep_last > 0:
        for p in complete_checkpoints(save_dir)[:-keep_last]:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` is a complete checkpoint dir, or a save dir whose newest one is used."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint directory does not exist")
    if (path / META).is_file():
        return path
    if path.name.startswith(TMP_PREFIX) or step_of(path) is not None:
        raise FileNotFoundError(f"{path}: incomplete checkpoint (no {META}); it was never published")
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: no complete step_* checkpoint in this directory")
    return latest
