"""The JSONL loader: every problem is a one-line DataError naming file, line, field, expected, actual."""

import json
from pathlib import Path

import pytest

from rlad_megatron.data.jsonl import DataError, DataFileNotFoundError, load_jsonl, scan_jsonl, write_jsonl

REPO = Path(__file__).resolve().parents[2]
FIELDS = ("question", "answer")
GOOD = json.dumps({"question": "What is 1+1?", "answer": "1+1=2\n#### 2"})


def _write(tmp_path, lines: list, name="d.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def _only_error(path, **kw) -> DataError:
    with pytest.raises(DataError) as info:
        load_jsonl(path, fields=FIELDS, **kw)
    err = info.value
    assert "\n" not in str(err), "errors must be one line"
    assert str(path) in str(err)
    return err


@pytest.mark.parametrize("bad, field, words", [
    (b"\xff\xfe not utf8", None, ["expected UTF-8", "0xff"]),
    ('{"question": "q", "answer": ', None, ["expected a JSON object", "invalid JSON"]),
    ('["a list"]', None, ["expected a JSON object", "list"]),
    ('{"question": "q"}', "answer", ["expected a string", "missing"]),
    ('{"question": 42, "answer": "#### 1"}', "question", ["expected a string", "int (42)"]),
    ('{"question": "q", "answer": null}', "answer", ["expected a string", "NoneType"]),
    ('{"question": "  ", "answer": "#### 1"}', "question", ["expected a non-empty string"]),
])
def test_bad_line_names_line_field_expected_actual(tmp_path, bad, field, words):
    path = _write(tmp_path, [GOOD, GOOD, bad, GOOD])
    err = _only_error(path)
    assert err.line == 3 and f"{path}:3:" in str(err)
    assert err.field == field
    if field:
        assert repr(field) in str(err)
    for w in words:
        assert w in str(err), (w, str(err))


def test_over_long_line(tmp_path):
    long = json.dumps({"question": "x" * 500, "answer": "#### 1"})
    path = _write(tmp_path, [GOOD, long])
    err = _only_error(path, max_line_bytes=200)
    assert err.line == 2 and "at most 200 bytes" in str(err) and f"got {len(long.encode())} bytes" in str(err)


def test_missing_empty_and_directory(tmp_path):
    with pytest.raises(DataFileNotFoundError) as info:
        load_jsonl(tmp_path / "nope.jsonl", fields=FIELDS)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    assert "nope.jsonl" in str(info.value)
    for content in (b"", b"\n  \n"):
        path = tmp_path / "empty.jsonl"
        path.write_bytes(content)
        assert "empty file" in str(_only_error(path))
    with pytest.raises(DataError, match="directory"):
        load_jsonl(tmp_path, fields=FIELDS)


def test_scan_reports_every_bad_line_and_load_counts_them(tmp_path):
    path = _write(tmp_path, [GOOD, "{", GOOD, "", '{"question": 1, "answer": "a"}', b"\xc3\x28", GOOD])
    records, errors = scan_jsonl(path, fields=FIELDS)
    assert [r.line for r in records] == [1, 3, 7]
    assert [e.line for e in errors] == [2, 5, 6]
    err = _only_error(path)
    assert err.line == 2 and "and 2 more bad lines" in str(err)


def test_write_then_read_round_trip(tmp_path):
    rows = [{"question": f"q{i} ünïcode", "answer": f"#### {i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "sub" / "x.jsonl", rows)
    assert [r.fields for r in load_jsonl(path, fields=FIELDS)] == rows


@pytest.mark.parametrize("split", ["train", "test"])
def test_repo_gsm8k_files_are_clean(split):
    path = REPO / "data" / "gsm8k" / f"{split}.jsonl"
    records, errors = scan_jsonl(path, fields=FIELDS)
    assert errors == []
    assert len(records) == sum(1 for line in path.open() if line.strip())
