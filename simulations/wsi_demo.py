"""The whole pipeline on slides generated here: synthetic WSIs -> prepare -> federation.

    python -m simulations.wsi_demo --out runs/wsi-demo [--sites 3] [--slides 24] [--no-dp]
    python -m simulations.wsi_demo --out runs/wsi-models --mpp 1.0,4.0 --models all

1. Writes ``--slides`` synthetic pyramidal TIFFs per hospital (half of them with a small
   tumour focus of dense nuclei, with its annotation mask) and ``labels.csv``;
2. ``pathfed prepare`` (tissue detection, tiling at 1 um/px, the color-texture encoder);
3. a federation of gated attention-MIL on the prepared features, with DP and SecAgg+
   (``--models``: each model in turn on the same features, and a table of them;
   ``--mpp 1.0,4.0`` prepares two scales, for the multi-scale model and its ablations).

Needs nothing but this package: no download, no ../shared.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.progress import track


def make_slides(folder: Path, sites: int, per_site: int, size: tuple[int, int] = (1024, 768),
                seed: int = 0) -> Path:
    """Synthetic slides of ``sites`` hospitals with labels.csv (and annotation masks)."""
    from PIL import Image

    from common.wsi.synthetic import synthetic_tumour_slide, write_pyramid_tiff

    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rows = ["slide,label,tma_group,mask"]

    def write(n: int) -> str:
        site, tumour = n // per_site, n % 2
        image, mask = synthetic_tumour_slide(*size, seed=seed * 100_000 + n, tumour=bool(tumour))
        write_pyramid_tiff(folder / f"h{site}-{n:03d}.tif", image, mpp=0.5)
        Image.fromarray(mask).save(folder / "masks" / f"h{site}-{n:03d}.png")
        return f"h{site}-{n:03d}.tif,{tumour},hospital-{site},masks/h{site}-{n:03d}.png"

    # each slide is seeded by its number alone; NumPy and zlib release the GIL
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        rows += track(pool.map(write, range(sites * per_site)), total=sites * per_site,
                      description="writing synthetic slides")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


ABLATIONS = {"multiscale-mil": ("scales=high", "scales=low")}
"""Single-scale ablations run beside a multi-scale model (``--models``)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.wsi_demo")
    parser.add_argument("--out", required=True)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--slides", type=int, default=64, help="slides per hospital")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-dp", action="store_true")
    parser.add_argument("--mpp", default="1.0", metavar="MPP[,MPP]",
                        help="scales of prepare (default 1.0); e.g. 1.0,4.0 for multi-scale "
                        "features, which a multi-scale model needs")
    parser.add_argument("--models", nargs="+", default=["gated-attention-mil"],
                        metavar="NAME", help="bag models to train one after the other on the "
                        "same features, or all (every bag model, the multi-scale one with its "
                        "single-scale ablations; needs two scales in --mpp)")
    args = parser.parse_args(argv)
    from common.logs import setup_logging

    setup_logging(verbose=False)
    from common.config import FederationConfig
    from common.models import model_spec, models_of_kind
    from common.models.base import BAG_KINDS
    from common.wsi.extract import prepare
    from simulations.simulate import simulate

    scales = [float(x) for x in args.mpp.split(",")]
    models = models_of_kind(*BAG_KINDS) if args.models == ["all"] else args.models
    runs = [(name, "") for name in models]
    if args.models == ["all"]:
        runs += [(name, option) for name in models for option in ABLATIONS.get(name, ())]
    multiscale = [n for n in models if model_spec(n).kind == "multiscale"]
    if multiscale and len(scales) < 2:
        parser.error(f"--models {', '.join(multiscale)}: needs two scales, e.g. --mpp 1.0,4.0")
    out = Path(args.out)
    slides = make_slides(out / "slides", args.sites, args.slides, size=(768, 512))
    extract_log = logging.getLogger("common.wsi.extract")
    extract_log.setLevel(logging.WARNING)  # one line for the folder, not one per slide
    summary = prepare(slides, out / "features", mpp=scales[0], context_mpp=tuple(scales[1:]),
                      patch_size=32, encoder="color-texture", progress=False)
    extract_log.setLevel(logging.NOTSET)
    logging.getLogger("simulations").info(
        "prepared %d slides: %d patches in %.1f s (%s)", len(summary.results),
        summary.n_patches, summary.seconds, summary.manifest)
    status = [r.status for r in summary.results]
    keys = ("auc", "auc_last3_mean", "auc_last3_sd", "accuracy", "threshold",
            "balanced_accuracy_calibrated", "epsilon")
    results = {}
    for name, options in runs:
        label = f"{name} ({options})" if options else name
        folder = name + (f"-{options.replace('=', '-')}" if options else "")
        cfg = FederationConfig(sites=args.sites, rounds=args.rounds,
                               data=str(out / "features"), batch_size=8, local_epochs=2,
                               optimizer="adam", lr=0.01, dp=not args.no_dp, model=name,
                               model_options=options,
                               out=str(out / "run" if len(runs) == 1 else out / "runs" / folder))
        start = time.perf_counter()
        result = simulate(cfg)
        results[label] = {**{k: result.get(k) for k in keys},
                          "wall_s": round(time.perf_counter() - start, 1)}
    if len(runs) == 1:
        print(json.dumps({"slides": {s: status.count(s) for s in set(status)},
                          **next(iter(results.values()))}, indent=2))
        return 0
    (out / "models.json").write_text(json.dumps(results, indent=1))
    print("| model | AUC | last 3 rounds | balanced accuracy | wall |\n|---|---|---|---|---|")
    for label, r in sorted(results.items(), key=lambda item: -(item[1]["auc"] or 0)):
        print(f"| `{label}` | {r['auc']:.3f} | {r['auc_last3_mean']:.3f} ± "
              f"{r['auc_last3_sd']:.3f} | {r['balanced_accuracy_calibrated']:.3f} | "
              f"{r['wall_s']:.0f} s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
