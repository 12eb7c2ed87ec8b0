"""``pathfed prepare``: a folder of slides to per-slide HDF5 feature files (resumable)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

log = logging.getLogger("pathfed")


def add_parser(sub: Any) -> None:
    """Register the ``prepare`` command on the CLI's sub-parsers."""
    p = sub.add_parser(
        "prepare",
        help="slides to tissue patches to features (one HDF5 file per slide)",
        description="Find tissue in every slide of SLIDES_DIR, tile it at --mpp, embed the "
        "patches with --encoder and write OUT_DIR/<slide>.h5 plus OUT_DIR/manifest.csv. "
        "Re-running skips slides already done with the same settings; a bad slide is "
        "recorded as failed and the others proceed.",
    )
    p.add_argument("slides_dir", metavar="SLIDES_DIR", help="folder of slides or images")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output folder")
    p.add_argument("--mpp", type=_scales, default=(0.5,), metavar="MPP[,MPP...]",
                   help="microns per pixel of the patches (default 0.5, i.e. 20x); two or "
                   "three scales, finest first (e.g. 0.5,2.0), write multi-scale features: "
                   "each coarser patch embedded too, each finest patch linked to it")
    p.add_argument("--patch-size", type=int, default=256, metavar="PX",
                   help="patch side in pixels (default 256)")
    p.add_argument("--encoder", default="color-texture", metavar="NAME",
                   help="feature encoder: color-texture (default), resnet-tiny, patch-cnn, "
                   "timm:ARCH (`pathfed models` lists them)")
    p.add_argument("--weights", metavar="FILE", help="local weights file of the encoder")
    p.add_argument("--stain-normalize", choices=["none", "macenko", "reinhard"],
                   default="none", help="normalise every patch's stain before the encoder "
                   "(default none); recorded in the settings, so a mixed folder is refused")
    p.add_argument("--stain-target", metavar="IMAGE",
                   help="the image to normalise to (default: PathFed's reference tile, "
                   "rendered from Macenko's published reference stains)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help=f"processes reading patches (default 1: this process, with two "
                   f"reading threads; this machine has {os.cpu_count()} cores). More only "
                   "pay off with many cores; measure with `python -m benchmarks tiling`")
    p.add_argument("--tissue-threshold", type=float, default=0.5, metavar="F",
                   help="minimum tissue fraction of a kept patch (default 0.5)")
    p.add_argument("--overlap", type=int, default=0, metavar="PX",
                   help="pixels shared by neighbouring patches (default 0)")
    p.add_argument("--slide-mpp", type=float, metavar="MPP",
                   help="baseline microns per pixel of slides that record none (plain images)")
    p.add_argument("--device", default="cpu", metavar="DEV",
                   help="where a torch encoder runs: cpu (default), cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug log")
    p.set_defaults(func=_cmd_prepare)


def _scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give microns per pixel, e.g. 0.5 or "
                                         "0.5,2.0") from None
    if not scales:
        raise argparse.ArgumentTypeError("give at least one scale, e.g. 0.5")
    return scales


def _cmd_prepare(args: argparse.Namespace) -> int:
    from common.logs import setup_logging

    setup_logging(args.verbose)
    if args.verbose:
        logging.getLogger("common").setLevel(logging.DEBUG)
    from common.wsi.extract import prepare

    summary = prepare(
        args.slides_dir, args.out, mpp=args.mpp[0], context_mpp=args.mpp[1:],
        patch_size=args.patch_size,
        encoder=args.encoder, weights=args.weights, workers=args.workers,
        tissue_threshold=args.tissue_threshold, overlap=args.overlap,
        stain_normalize=args.stain_normalize, stain_target=args.stain_target,
        slide_mpp=args.slide_mpp, progress=not args.no_progress, device=args.device,
    )
    c = summary.counts
    print(f"{len(summary.results)} slides in {summary.seconds:.1f} s: {c['done']} done "
          f"({summary.n_patches} patches), {c['skipped']} skipped, {c['failed']} failed; "
          f"manifest: {summary.manifest}")
    if c["failed"]:
        log.error("%d of %d slides failed (reasons in %s); the others are done: fix them and "
                  "re-run, only the failed slides are processed again", c["failed"],
                  len(summary.results), summary.manifest)
        return 1
    return 0
