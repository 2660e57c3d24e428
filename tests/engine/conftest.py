"""Fixtures of the engine's run tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Where the tiny runs of one test module generate (once) and share the synthetic data."""
    return tmp_path_factory.mktemp("synthetic") / "data"
