"""Shared fixtures: real data paths, small federations, quiet Flower."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
