"""Shared test fixtures: paths into ../shared and tiny checkpoints generated with transformers."""

from __future__ import annotations

from pathlib import Path

import pytest

from paths import FIXTURES


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"shared fixtures not found at {FIXTURES} (set QVL_SHARED)")
    return FIXTURES
