"""Weakly supervised segmentation on generated slides with known tumour foci, per model.

    python -m simulations.segmentation --out results/segmentation [--models all] [--dp]
        [--sites 3] [--slides 24] [--rounds 10]

Slides are those of ``simulations.wsi_demo`` (a focus of dense nuclei in half of them,
with its annotation mask). Each bag model is trained in federation on slide labels alone
(``--sites`` hospitals x ``--slides``, 1 um/px patches, DP at epsilon 8 with ``--dp``),
released, and applied with ``pathfed predict`` (:func:`common.predict.predict`) to
fresh validation slides, where the segmentation threshold (a patch's share of the
attention against an even share) is chosen to maximise the mean Dice of the tumour
slides, and then to fresh test slides, where Dice and IoU of the tumour masks (at patch
resolution, against the annotations) and the slide AUC are measured. Writes
``OUT/segmentation.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

THRESHOLDS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)


def _scores(out: Path, features: Path, slides: Path) -> list[dict[str, Any]]:
    """Each predicted slide's label, patch scores and annotated truth."""
    import h5py

    from common.explain.segment import patch_truth

    with (slides / "labels.csv").open() as fh:
        labels = {r["slide"]: r for r in csv.DictReader(fh)}
    with (out / "predictions.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "done"]
    got = []
    for row in rows:
        stem = Path(row["slide"]).stem
        with h5py.File(out / f"{stem}_scores.h5") as h5:
            scores, coords = h5["scores"][:], h5["coords"][:]
            size, dims = float(h5.attrs["size_baseline"]), tuple(h5.attrs["slide_dimensions"])
        truth = patch_truth(slides / labels[row["slide"]]["mask"], coords, size, dims)
        got.append({"slide": row["slide"], "label": int(labels[row["slide"]]["label"]),
                    "predicted": int(row["label"]), "logit": float(row["logit"]),
                    "scores": scores, "truth": truth})
    return got


def _dice(slides: list[dict[str, Any]], threshold: float) -> tuple[float, float]:
    from common.explain.segment import dice_iou, tumour_patches

    pairs = [dice_iou(tumour_patches(s["scores"], bool(s["predicted"]), threshold), s["truth"])
             for s in slides if s["label"] == 1]
    return float(np.mean([d for d, _ in pairs])), float(np.mean([i for _, i in pairs]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.segmentation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["all"])
    parser.add_argument("--dp", action="store_true", help="DP-SGD at epsilon 8 per site")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--slides", type=int, default=24, help="training slides per site")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from common.config import FederationConfig
    from common.fedavg import run_inprocess
    from common.metrics import roc_auc
    from common.models import models_of_kind
    from common.models.base import BAG_KINDS
    from common.predict import predict
    from common.wsi.extract import prepare
    from simulations.wsi_demo import make_slides

    models = models_of_kind(*BAG_KINDS) if args.models == ["all"] else args.models
    folders = {}
    for split, (sites, per_site, seed) in {"train": (args.sites, args.slides, 0),
                                           "val": (1, 16, 1), "test": (1, 32, 2)}.items():
        slides = args.out / split / "slides"
        if not (slides / "labels.csv").is_file():
            make_slides(slides, sites, per_site, size=(768, 512), seed=seed)
        features = args.out / split / "features"
        prepare(slides, features, mpp=1.0, context_mpp=(4.0,), patch_size=32, progress=False)
        folders[split] = (slides, features)
    results: dict[str, dict[str, Any]] = {}
    for name in models:
        start = time.perf_counter()
        run = args.out / "runs" / name
        cfg = FederationConfig(sites=args.sites, rounds=args.rounds, model=name,
                               data=str(folders["train"][1]), batch_size=8, local_epochs=2,
                               optimizer="adam", lr=0.01, dp=args.dp, secagg=False,
                               epsilon=8.0)
        if not (run / "model.npz").is_file():
            run_inprocess(cfg, run_dir=run)
        chosen: dict[str, Any] = {}
        for split in ("val", "test"):
            out = args.out / "predict" / name / split
            predict(folders[split][1], run, out, progress=False, heatmaps=split == "test",
                    top_k=0 if split == "val" else 8)
            slides = _scores(out, folders[split][1], folders[split][0])
            if split == "val":
                dice = {t: _dice(slides, t)[0] for t in THRESHOLDS}
                chosen["threshold"] = max(dice, key=lambda t: dice[t])
                chosen["val_dice"] = dice[chosen["threshold"]]
            else:
                chosen["dice"], chosen["iou"] = _dice(slides, chosen["threshold"])
                chosen["auc"] = roc_auc(np.array([s["logit"] for s in slides]),
                                        np.array([s["label"] for s in slides]))
                chosen["n_tumour_slides"] = sum(s["label"] for s in slides)
        chosen["wall_s"] = round(time.perf_counter() - start, 1)
        results[name] = chosen
        print(f"{name}: Dice {chosen['dice']:.3f}, IoU {chosen['iou']:.3f} at threshold "
              f"{chosen['threshold']:g} (validation Dice {chosen['val_dice']:.3f}); slide AUC "
              f"{chosen['auc']:.3f} ({chosen['wall_s']:.0f} s)", flush=True)
    (args.out / "segmentation.json").write_text(json.dumps(
        {"dp": args.dp, "sites": args.sites, "slides_per_site": args.slides,
         "rounds": args.rounds, "models": results}, indent=1))
    print("| model | Dice | IoU | threshold (validation) | slide AUC |\n|---|---|---|---|---|")
    for name, r in sorted(results.items(), key=lambda item: -item[1]["dice"]):
        print(f"| `{name}` | {r['dice']:.3f} | {r['iou']:.3f} | {r['threshold']:g} | "
              f"{r['auc']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
