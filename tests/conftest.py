"""Shared fixtures: real data paths, small federations, quiet Flower."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.crypto.signing import SigningKey
from simulations.simulate import FLOWER_ENV

os.environ.update(FLOWER_ENV)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
UCSB = SHARED_DATA / "ucsb-breast"
CMU_SLIDE = SHARED_DATA / "slides" / "CMU-1-Small-Region.svs"


@pytest.fixture
def ucsb() -> Path:
    if not (UCSB / "labels.csv").is_file():
        pytest.skip(f"real UCSB data not found at {UCSB}")
    return UCSB


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    """Ledger signing keys of a server and two sites."""
    return {name: SigningKey.generate() for name in ("server", "site-0", "site-1")}
