"""Fixtures shared by the unit tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    """A tiny random Llama in Hugging Face format (one per test module that asks for it)."""
    from tests.unit.hf_fixtures import save_tiny_hf

    return save_tiny_hf(tmp_path_factory.mktemp("hf_base") / "llama", "llama")
