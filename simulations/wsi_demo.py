"""The whole pipeline on slides generated here: synthetic WSIs -> prepare -> federation.

    python -m simulations.wsi_demo --out runs/wsi-demo [--sites 3] [--slides 24] [--no-dp]

1. Writes ``--slides`` synthetic pyramidal TIFFs per hospital (half of them with a small
   tumour focus of dense nuclei, with its annotation mask) and ``labels.csv``;
2. ``pathfed prepare`` (tissue detection, tiling at 1 um/px, the color-texture encoder);
3. a federation of gated attention-MIL on the prepared features, with DP and SecAgg+.

Needs nothing but this package: no download, no ../shared.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from rich.progress import track


def make_slides(folder: Path, sites: int, per_site: int, size: tuple[int, int] = (1024, 768),
                seed: int = 0) -> Path:
    """Synthetic slides of ``sites`` hospitals with labels.csv (and annotation masks)."""
    from PIL import Image

    from common.wsi.synthetic import synthetic_tumour_slide, write_pyramid_tiff

    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rows = ["slide,label,tma_group,mask"]
    for n in track(range(sites * per_site), description="writing synthetic slides"):
        site, tumour = n // per_site, n % 2
        image, mask = synthetic_tumour_slide(*size, seed=seed * 100_000 + n, tumour=bool(tumour))
        write_pyramid_tiff(folder / f"h{site}-{n:03d}.tif", image, mpp=0.5)
        Image.fromarray(mask).save(folder / "masks" / f"h{site}-{n:03d}.png")
        rows.append(f"h{site}-{n:03d}.tif,{tumour},hospital-{site},masks/h{site}-{n:03d}.png")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.wsi_demo")
    parser.add_argument("--out", required=True)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--slides", type=int, default=64, help="slides per hospital")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-dp", action="store_true")
    args = parser.parse_args(argv)
    from common.logs import setup_logging

    setup_logging(verbose=False)
    from common.config import FederationConfig
    from common.wsi.extract import prepare
    from simulations.simulate import simulate

    out = Path(args.out)
    slides = make_slides(out / "slides", args.sites, args.slides, size=(768, 512))
    extract_log = logging.getLogger("common.wsi.extract")
    extract_log.setLevel(logging.WARNING)  # one line for the folder, not one per slide
    summary = prepare(slides, out / "features", mpp=1.0, patch_size=32,
                      encoder="color-texture", progress=False)
    extract_log.setLevel(logging.NOTSET)
    logging.getLogger("simulations").info(
        "prepared %d slides: %d patches in %.1f s (%s)", len(summary.results),
        summary.n_patches, summary.seconds, summary.manifest)
    cfg = FederationConfig(sites=args.sites, rounds=args.rounds, data=str(out / "features"),
                           batch_size=8, local_epochs=2, optimizer="adam", lr=0.01,
                           dp=not args.no_dp, out=str(out / "run"))
    result = simulate(cfg)
    status = [r.status for r in summary.results]
    keys = ("auc", "auc_last3_mean", "auc_last3_sd", "accuracy", "threshold",
            "balanced_accuracy_calibrated", "epsilon")
    print(json.dumps({"slides": {s: status.count(s) for s in set(status)},
                      **{k: result.get(k) for k in keys}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
