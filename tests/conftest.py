"""Shared test fixtures: where the read-only public data lives (skipped cleanly when absent)."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_WEIGHTS = REPO.parent / "shared" / "weights"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data (public datasets) is not present on this machine")
    return SHARED_DATA
