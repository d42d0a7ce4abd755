"""Strict JSONL reader for prompt datasets.

Every problem becomes a one-line :class:`DataError` naming the file, the line number, the field,
what was expected and what was found, e.g.::

    data/gsm8k/train.jsonl:17: field 'answer': expected a string, got int (42)

:func:`scan_jsonl` collects every bad line (for ``tools/prepare_data.py``); :func:`load_jsonl`
raises the first one (for training, where a bad dataset should stop the run before it starts).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# A GSM8K line is under 2 KB; anything near a megabyte is a broken file, not a prompt.
DEFAULT_MAX_LINE_BYTES = 1 << 20


class DataError(ValueError):
    """A dataset file or one of its lines is unusable; the message names file, line and field."""

    def __init__(self, message: str, *, path: str | Path, line: Optional[int] = None,
                 field: Optional[str] = None):
        where = f"{path}:{line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {message}")
        self.message = message
        self.path = str(path)
        self.line = line
        self.field = field


class DataFileNotFoundError(DataError, FileNotFoundError):
    """The dataset path does not exist (a :class:`DataError` and a :class:`FileNotFoundError`)."""


@dataclass(frozen=True)
class Record:
    """One valid line: its 1-based line number and the requested string fields."""

    line: int
    fields: dict[str, str]


def _describe(value: object) -> str:
    text = json.dumps(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} ({text})"


def _parse_line(raw: bytes, *, path: Path, line: int, fields: Sequence[str],
                max_line_bytes: int) -> Record:
    if len(raw) > max_line_bytes:
        raise DataError(f"expected a line of at most {max_line_bytes} bytes, got {len(raw)} bytes",
                        path=path, line=line)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"expected UTF-8 text, got byte 0x{raw[e.start]:02x} at byte offset {e.start}",
                        path=path, line=line) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"expected a JSON object, got invalid JSON ({e.msg} at column {e.colno})",
                        path=path, line=line) from None
    if not isinstance(obj, dict):
        raise DataError(f"expected a JSON object, got {_describe(obj)}", path=path, line=line)
    out: dict[str, str] = {}
    for name in fields:
        if name not in obj:
            raise DataError(f"field {name!r}: expected a string, got a missing field (keys: {sorted(obj)})",
                            path=path, line=line, field=name)
        value = obj[name]
        if not isinstance(value, str):
            raise DataError(f"field {name!r}: expected a string, got {_describe(value)}",
                            path=path, line=line, field=name)
        if not value.strip():
            raise DataError(f"field {name!r}: expected a non-empty string, got {value!r}",
                            path=path, line=line, field=name)
        out[name] = value
    return Record(line=line, fields=out)


def scan_jsonl(path: str | Path, *, fields: Sequence[str],
               max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> tuple[list[Record], list[DataError]]:
    """Read every line of ``path``; return the valid records and one error per bad line.

    Blank lines are skipped. File-level problems (missing, a directory, no records) raise.
    """
    path = Path(path)
    if not path.exists():
        raise DataFileNotFoundError("expected a JSONL file, got a path that does not exist", path=path)
    if not path.is_file():
        raise DataError("expected a JSONL file, got a directory or special file", path=path)
    records: list[Record] = []
    errors: list[DataError] = []
    with path.open("rb") as f:
        for line, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                records.append(_parse_line(raw, path=path, line=line, fields=fields,
                                           max_line_bytes=max_line_bytes))
            except DataError as e:
                errors.append(e)
    if not records and not errors:
        raise DataError("expected at least one JSON line, got an empty file", path=path)
    return records, errors


def load_jsonl(path: str | Path, *, fields: Sequence[str],
               max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> list[Record]:
    """All records of ``path``; raises the first :class:`DataError` (with a count of the others)."""
    records, errors = scan_jsonl(path, fields=fields, max_line_bytes=max_line_bytes)
    if errors:
        first = errors[0]
        if len(errors) > 1:
            msg = f"{first.message} (and {len(errors) - 1} more bad lines; tools/prepare_data.py lists them)"
            raise DataError(msg, path=first.path, line=first.line, field=first.field)
        raise first
    return records


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` one JSON object per line (UTF-8, no ASCII escaping), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
