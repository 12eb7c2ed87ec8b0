"""``pathfed predict``: a released model on new slides, with heatmaps, GeoJSON and masks."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``predict``."""
    p = sub.add_parser(
        "predict", help="apply a trained model to slides: predictions, heatmaps, QuPath GeoJSON",
        description="Apply the model a run released (RUN_DIR or RUN_DIR/model.npz) to every "
        "slide of SLIDES_OR_FEATURES: a folder of slides (prepared first with the settings "
        "the model records) or a folder written by `pathfed prepare` (refused when made "
        "otherwise). Writes OUT/predictions.csv, OUT/<slide>_scores.h5, OUT/heatmaps/, "
        "OUT/geojson/ (for QuPath) and OUT/masks/ (the tumour mask from the model's "
        "patch scores). A slide that cannot be read fails alone.")
    p.add_argument("inputs", metavar="SLIDES_OR_FEATURES")
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="a run folder or its model.npz (model.npz.enc with --key-file)")
    p.add_argument("--out", required=True, metavar="OUT")
    p.add_argument("--key-file", metavar="KEY", help="key of an encrypted model")
    p.add_argument("--encoder", metavar="NAME",
                   help="the encoder you expect (checked: it must be the model's)")
    p.add_argument("--weights", metavar="FILE",
                   help="the encoder's local weights, for slides prepared on the fly")
    p.add_argument("--threshold", type=float, metavar="LOGIT",
                   help="logit threshold of a positive slide (default: the model's, "
                   "calibrated on the run's validation data)")
    p.add_argument("--max-uncertainty", type=float, metavar="SD",
                   help="abstain on slides whose MC-dropout spread of the probability is "
                   "larger (models trained with dropout)")
    p.add_argument("--passes", type=int, default=20, metavar="N",
                   help="MC-dropout passes (default 20)")
    p.add_argument("--top-k", type=int, default=8, metavar="K",
                   help="top patches listed and saved per slide (default 8)")
    p.add_argument("--segment-threshold", type=float, metavar="R",
                   help="a patch of a positive slide is tumour from R times its even share "
                   "of the attention (default 2)")
    p.add_argument("--pixel-threshold", type=float, default=0.5, metavar="P",
                   help="a pixel of a positive slide is tumour from this probability "
                   "(segmentation models, e.g. seg-cnn; default 0.5)")
    p.add_argument("--slides", metavar="DIR",
                   help="the slides of a feature folder, for thumbnails and top patches")
    p.add_argument("--stain-target", metavar="IMAGE",
                   help="the stain target image the model's features were normalised to "
                   "(when it was not PathFed's default)")
    p.add_argument("--slide-mpp", type=float, metavar="MPP",
                   help="baseline microns per pixel of slides that record none")
    p.add_argument("--workers", type=int, default=1, metavar="N")
    p.add_argument("--no-heatmaps", action="store_true", help="skip the heatmap PNGs")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    import logging

    from common.errors import ConfigError
    from common.explain.segment import SEGMENT_THRESHOLD

    if args.top_k < 0 or args.passes < 1:
        raise ConfigError("--top-k must be >= 0 and --passes >= 1")
    if not 0 < args.pixel_threshold < 1:
        raise ConfigError(f"--pixel-threshold {args.pixel_threshold}: a probability "
                          "strictly between 0 and 1")
    from common.crypto.sealed import load_key
    from common.predict import PredictOptions, predict

    summary = predict(args.inputs, args.model, args.out, PredictOptions(
        threshold=args.threshold, max_uncertainty=args.max_uncertainty, passes=args.passes,
        top_k=args.top_k, segment_threshold=(SEGMENT_THRESHOLD if args.segment_threshold is None
                                             else args.segment_threshold),
        pixel_threshold=args.pixel_threshold,
        encoder=args.encoder, weights=args.weights, slide_mpp=args.slide_mpp,
        stain_target=args.stain_target,
        slides_dir=Path(args.slides) if args.slides else None,
        key=load_key(args.key_file) if args.key_file else None, workers=args.workers,
        progress=not args.no_progress, heatmaps=not args.no_heatmaps))
    c = summary.counts
    positive = sum(1 for r in summary.rows if r.label == 1 and not r.abstained)
    threshold = summary.card.threshold if args.threshold is None else args.threshold
    print(f"{len(summary.rows)} slides in {summary.seconds:.1f} s "
          f"({summary.slides_per_minute:.0f} slides/min): {c['done']} predicted ({positive} "
          f"positive at logit {threshold:.3g}), {c['failed']} failed; "
          f"{Path(args.out) / 'predictions.csv'}")
    if c["failed"]:
        logging.getLogger("pathfed").error("%d slide(s) failed (reasons in predictions.csv); "
                                           "the others are done", c["failed"])
        return 1
    return 0
