"""Resuming refuses a checkpoint saved for another student model (megatron loads vocab rows leniently)."""

from __future__ import annotations

import pytest

from rlad_megatron.config import load_config, save_config
from rlad_megatron.trainer import Trainer


def _trainer(overrides):
    trainer = Trainer.__new__(Trainer)
    trainer.cfg = load_config(None, overrides)
    return trainer


def test_resume_rejects_another_student(tmp_path):
    save_config(load_config(None, ["--student.model.vocab_size=200", "--teacher.model.vocab_size=200"]), tmp_path)
    _trainer(["--student.model.vocab_size=200", "--teacher.model.vocab_size=200",
              "--student.load=elsewhere"])._check_same_student(tmp_path)  # same model: fine
    with pytest.raises(ValueError, match=r"config\.yaml: checkpoint was saved with student\.model\.vocab_size=200, "
                                         r"this run has 250"):
        _trainer(["--student.model.vocab_size=250", "--teacher.model.vocab_size=250"])._check_same_student(tmp_path)
