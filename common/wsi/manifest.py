"""``manifest.csv`` of a folder written by ``pathfed prepare``: one row per slide.

``status`` is ``done``, ``skipped`` or ``failed`` (with the reason); ``settings`` is the
:class:`PrepareSettings` key the slide's feature file was made with, so a re-run with the
same settings skips the slide. The file is rewritten atomically after every slide.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

MANIFEST_COLUMNS = ("slide", "status", "reason", "n_patches", "seconds", "h5", "settings")
DONE, SKIPPED, FAILED = "done", "skipped", "failed"


@dataclass(frozen=True)
class PrepareSettings:
    """What determines a slide's feature file; a re-run with equal settings skips the slide."""

    mpp: float
    patch_size: int
    encoder: str
    weights_hash: str
    tissue_threshold: float
    overlap: int = 0
    context_mpp: tuple[float, ...] = ()
    """Coarser scales written beside ``mpp`` (multi-scale features)."""
    stain: str = "none"
    """Stain normalisation, ``method:target`` (:class:`common.wsi.stain.StainNormalizer`)."""

    def key(self) -> str:
        """A stable one-line form recorded in the manifest."""
        scales = ",".join(f"{m:g}" for m in (self.mpp, *self.context_mpp))
        stain = f";stain={self.stain}" if self.stain != "none" else ""
        return (f"mpp={scales};patch={self.patch_size};encoder={self.encoder};"
                f"weights={self.weights_hash};tissue={self.tissue_threshold:g};"
                f"overlap={self.overlap}{stain}")



@dataclass
class SlideResult:
    """One manifest row."""

    slide: str
    status: str
    reason: str = ""
    n_patches: int = 0
    seconds: float = 0.0
    h5: str = ""
    settings: str = ""

    def row(self) -> dict[str, str]:
        return {"slide": self.slide, "status": self.status, "reason": self.reason,
                "n_patches": str(self.n_patches), "seconds": f"{self.seconds:.2f}",
                "h5": self.h5, "settings": self.settings}


def read_manifest(path: str | Path) -> dict[str, dict[str, str]]:
    """Rows of a manifest by slide name (empty if there is none yet)."""
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as fh:
        return {row["slide"]: row for row in csv.DictReader(fh) if row.get("slide")}


def write_manifest(path: Path, rows: dict[str, dict[str, str]]) -> None:
    """Rewrite the manifest atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for name in sorted(rows):
            writer.writerow(rows[name])
    os.replace(tmp, path)


__all__ = ["DONE", "FAILED", "MANIFEST_COLUMNS", "SKIPPED", "PrepareSettings", "SlideResult",
           "read_manifest", "write_manifest"]
