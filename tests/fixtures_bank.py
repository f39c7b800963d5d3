"""Fixtures around the shipped demo bank (import them into a test module)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_BANK = REPO / "banks" / "demo"


@pytest.fixture(scope="session")
def demo_bank_path() -> Path:
    assert (DEMO_BANK / "manifest.json").is_file(), "the shipped demo bank is missing"
    return DEMO_BANK
