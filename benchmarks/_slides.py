"""Shared helper of the slide benchmarks: the benchmark slide."""

from __future__ import annotations

import shutil
from pathlib import Path

CMU = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def slide_folder(slide: str | None, workdir: Path, synthetic: str | None = None) -> Path:
    """A folder holding one slide: ``slide``, a ``synthetic`` ``WxH`` one, else the real CMU
    slide (else a synthetic 4096x3072 one)."""
    folder = workdir / "slides"
    folder.mkdir(parents=True, exist_ok=True)
    if synthetic:
        from common.wsi.synthetic import synthetic_slide

        w, h = (int(v) for v in synthetic.lower().split("x"))
        synthetic_slide(folder / "synthetic.tif", w, h, seed=0)
    elif slide:
        shutil.copy(slide, folder / Path(slide).name)
    elif CMU.is_file():
        shutil.copy(CMU, folder / CMU.name)
    else:
        from common.wsi.synthetic import synthetic_slide

        synthetic_slide(folder / "synthetic.tif", 4096, 3072, seed=0)
    return folder
