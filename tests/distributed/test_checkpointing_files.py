"""The atomic publish protocol of checkpoint directories (single process, no torch.distributed)."""

from __future__ import annotations

import pytest

from rlad_megatron.checkpointing import files


def _write_tmp(save_dir, step: int):
    tmp = files.prepare_tmp_dir(save_dir, step)
    (tmp / "payload.bin").write_bytes(b"x" * 16)
    files.write_json_atomic(tmp / files.META, {"step": step})
    return tmp


def test_publish_renames_updates_latest_and_prunes(tmp_path):
    for step in (1, 2, 3):
        final = files.publish(_write_tmp(tmp_path, step), keep_last=2)
        assert final == tmp_path / files.step_dir_name(step) and final.is_dir()
        assert (tmp_path / files.LATEST).read_text().strip() == final.name
        assert not (tmp_path / f"{files.TMP_PREFIX}{final.name}").exists()
    assert [p.name for p in files.complete_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    assert files.latest_checkpoint(tmp_path) == tmp_path / "step_0000003"


def test_incomplete_dirs_are_ignored(tmp_path):
    files.publish(_write_tmp(tmp_path, 4), keep_last=0)
    # A crash mid-save leaves a tmp dir (even one that got its meta.json) and no rename.
    _write_tmp(tmp_path, 9)
    (tmp_path / files.step_dir_name(7)).mkdir()  # a step dir without meta.json: never published
    assert files.latest_checkpoint(tmp_path) == tmp_path / "step_0000004"
    assert files.resolve_checkpoint(tmp_path) == tmp_path / "step_0000004"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        files.resolve_checkpoint(tmp_path / files.step_dir_name(7))
    # The next publish clears the stale tmp dir.
    files.publish(_write_tmp(tmp_path, 5), keep_last=0)
    assert not (tmp_path / f"{files.TMP_PREFIX}{files.step_dir_name(9)}").exists()
    assert [files.step_of(p) for p in files.complete_checkpoints(tmp_path)] == [4, 5]


def test_latest_marker_lagging_behind_a_rename_still_finds_the_newest(tmp_path):
    files.publish(_write_tmp(tmp_path, 1), keep_last=0)
    # Crash between the rename and the marker update: the marker still names step 1.
    tmp = _write_tmp(tmp_path, 2)
    tmp.rename(tmp_path / files.step_dir_name(2))
    assert (tmp_path / files.LATEST).read_text().strip() == "step_0000001"
    assert files.latest_checkpoint(tmp_path) == tmp_path / "step_0000002"


def test_resave_of_a_step_replaces_it(tmp_path):
    files.publish(_write_tmp(tmp_path, 3), keep_last=2)
    tmp = _write_tmp(tmp_path, 3)
    (tmp / "payload.bin").write_bytes(b"new")
    final = files.publish(tmp, keep_last=2)
    assert (final / "payload.bin").read_bytes() == b"new"


def test_missing_and_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        files.resolve_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no complete"):
        files.resolve_checkpoint(tmp_path)
    bad = tmp_path / files.META
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        files.read_json(bad)
    with pytest.raises(ValueError, match="JSON"):
        files.write_json_atomic(tmp_path / "x.json", {"obj": object()})
    assert not (tmp_path / "x.json").exists()
