"""Shared fixtures: real data paths, small federations, quiet Flower."""

from __future__ import annotations

import os
from dataclasses import dataclass
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


@dataclass
class CliResult:
    """What a ``pathfed`` command printed and returned."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path | None = None) -> CliResult:
    """Run the real ``pathfed`` entry point in this process (no interpreter start-up, so
    the quick tier stays quick); ``--help`` and argparse errors exit as they would."""
    import contextlib
    import io

    from cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            if cwd is not None:
                os.chdir(cwd)
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            os.chdir(here)
    return CliResult(int(code), out.getvalue(), err.getvalue())
