"""Tiling benchmark: patches/s of ``prepare`` (read, tissue filter, write coords; a null
encoder) against a bare loop of OpenSlide ``read_region`` over the same coordinates of the
same slide, with 1 worker and with every core.

``python -m benchmarks tiling [--slide FILE] [--patch-size 64] [--mpp 0.5] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks import best
from benchmarks._slides import slide_folder


def _null_encoder() -> None:
    from common.features import ENCODERS, FunctionEncoder, register_encoder

    if "null" not in ENCODERS:  # isolates the pipeline from feature computation
        register_encoder("null", lambda weights: FunctionEncoder(
            "null", lambda p: np.zeros((len(p), 1), np.float32), 1), "zeros (benchmark)",
            weights="none", dim=1, normalisation=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks tiling")
    parser.add_argument("--slide", help="slide file (default: the real CMU slide)")
    parser.add_argument("--synthetic", metavar="WxH", help="use a synthetic slide of this size")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import openslide

    from common.wsi import open_slide, tile_tissue
    from common.wsi.extract import prepare

    _null_encoder()
    with tempfile.TemporaryDirectory() as tmp:
        folder = slide_folder(args.slide, Path(tmp), args.synthetic)
        path = next(folder.iterdir())
        with open_slide(path) as reader:
            grid = tile_tissue(reader, args.mpp, args.patch_size)
        size = round(grid.size_baseline / grid.downsample)
        n = len(grid)

        def bare() -> None:
            slide = openslide.OpenSlide(str(path))
            for x, y in grid.coords:
                np.asarray(slide.read_region((int(x), int(y)), grid.level, (size, size)))
            slide.close()

        def mask_only() -> None:
            with open_slide(path) as reader:
                tile_tissue(reader, args.mpp, args.patch_size)

        rows = [("bare OpenSlide read_region loop", 1, best(bare, args.repeats)),
                ("thumbnail + tissue mask + grid only", 1, best(mask_only, args.repeats))]
        for workers in sorted({1, os.cpu_count() or 1}):
            run = iter(range(10**6))

            def full(workers: int = workers) -> None:
                out = Path(tmp) / f"out-{workers}-{next(run)}"  # fresh: no resume
                summary = prepare(folder, out, mpp=args.mpp, patch_size=args.patch_size,
                                  encoder="null", workers=workers, progress=False)
                assert summary.counts["done"] == 1

            rows.append((f"prepare (tissue, read, QC, h5), {workers} worker(s)", workers,
                         best(full, args.repeats)))

    table = Table(title=f"Tiling {path.name}: {n} patches of {args.patch_size} px at "
                  f"{args.mpp} µm/px (best of {args.repeats})")
    for col in ("pipeline", "workers", "seconds", "patches/s", "vs bare loop"):
        table.add_column(col, justify="right")
    base = rows[0][2]
    for name, workers, secs in rows:
        table.add_row(name, str(workers), f"{secs:.2f}", f"{n / secs:,.0f}",
                      f"{base / secs:.2f}x")
    Console().print(table)
    return 0
