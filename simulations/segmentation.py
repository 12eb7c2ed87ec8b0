"""Segmentation on generated slides with known tumour foci: the MIL models' attention
masks (slide labels only) against a segmentation CNN trained on the annotations.

    python -m simulations.segmentation --out results/segmentation [--models all] [--dp]
        [--sites 3] [--slides 24] [--rounds 10] [--seg-rounds 20]

Slides are those of ``simulations.wsi_demo`` (a focus of dense nuclei in half of them,
with its annotation mask). Each bag model is trained in federation on slide labels alone
(``--sites`` hospitals x ``--slides``, 1 um/px patches, DP at epsilon 8 with ``--dp``),
released, and applied with ``pathfed predict`` (:func:`common.predict.predict`) to
fresh validation slides, where the segmentation threshold (a patch's share of the
attention against an even share) is chosen to maximise the mean Dice of the tumour
slides, and then to fresh test slides. The segmentation CNN (``seg-cnn``, a small
U-Net) is trained in federation on the same slides read at 1 um/px into an image folder
with their annotation masks (``--seg-rounds``), and predicts pixel masks of the same test
slides; its threshold (the probability from which a pixel is tumour) is chosen on the
validation slides in the same way. On the tumour
slides of the test set, Dice against the annotations is measured per patch (a patch is
tumour when half its pixels are) and per pixel (the mask pictures ``pathfed predict``
writes: squares of patches for the MIL models, pixels for the CNN), and the slide AUC on
all. Writes ``OUT/segmentation.json`` and prints the table.
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
PIXEL_THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
"""The segmentation CNN's pixel probabilities tried on validation (DP training leaves the
rare tumour pixels' probabilities low: a fixed 0.5 would find none)."""
SEGMENTER_MPP = 1.0
"""The image folders of the segmentation CNN: the slides read at the MIL features' scale."""


def slides_as_images(slides: Path, out: Path, mpp: float = SEGMENTER_MPP) -> Path:
    """The slides of ``slides`` (with labels.csv naming their masks) as an image folder at
    ``mpp`` um/px, each with its annotation mask at the same size: what a patch model
    trains on (``image,label,tma_group,mask``)."""
    from PIL import Image

    from common.data.labels import LABELS, read_label_rows
    from common.wsi.reader import open_slide

    if (out / LABELS).is_file():
        return out
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = ["image,label,tma_group,mask"]
    for row in read_label_rows(slides / LABELS, ("slide",)):
        stem = Path(row.name).stem
        with open_slide(slides / row.name) as reader:
            w0, h0 = reader.dimensions
            size = (round(w0 * reader.mpp / mpp), round(h0 * reader.mpp / mpp))
            Image.fromarray(reader.read_at_mpp((0, 0), size, mpp)).save(out / f"{stem}.png")
        if row.mask is None:
            raise ValueError(f"{slides / LABELS}: {row.name} has no mask")
        with Image.open(slides / row.mask) as mask:
            mask.convert("L").resize(size, Image.Resampling.NEAREST).save(
                out / "masks" / f"{stem}.png")
        rows.append(f"{stem}.png,{row.label},{row.group},masks/{stem}.png")
    (out / LABELS).write_text("\n".join(rows) + "\n")
    return out


def _scores(out: Path, data: Path) -> list[dict[str, Any]]:
    """Each predicted slide's label, patch scores, tumour flags, mask and annotation
    (``data``: the folder whose labels.csv names the slides and their masks)."""
    import h5py

    from common.data.labels import LABELS, read_label_rows
    from common.explain.segment import patch_truth

    rows_by_name = {r.name: r for r in read_label_rows(data / LABELS, ("slide", "image"))}
    with (out / "predictions.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "done"]
    got = []
    for row in rows:
        stem = Path(row["slide"]).stem
        with h5py.File(out / f"{stem}_scores.h5") as h5:
            scores, coords, tumour = h5["scores"][:], h5["coords"][:], h5["tumour"][:]
            size, dims = float(h5.attrs["size_baseline"]), tuple(h5.attrs["slide_dimensions"])
        label = rows_by_name[row["slide"]]
        assert label.mask is not None
        mask = data / label.mask
        got.append({"slide": row["slide"], "label": label.label,
                    "predicted": int(row["label"]), "logit": float(row["logit"]),
                    "scores": scores, "tumour": tumour, "coords": coords, "size": size,
                    "dims": dims, "mask": mask, "picture": out / "masks" / f"{stem}.png",
                    "truth": patch_truth(mask, coords, size, dims)})
    return got


def _dice(slides: list[dict[str, Any]], threshold: float | None,
          pixels: bool = False) -> tuple[float, float]:
    """Mean Dice and IoU over the tumour slides: per patch, or per pixel (``pixels``).
    ``threshold``: the attention threshold of a MIL model's mask; None takes the mask
    ``pathfed predict`` wrote (a segmenter's)."""
    from PIL import Image

    from common.explain.segment import dice_iou, mask_image, pixel_dice, tumour_patches

    pairs = []
    for s in (s for s in slides if s["label"] == 1):
        tumour = (s["tumour"].astype(bool) if threshold is None else
                  tumour_patches(s["scores"], bool(s["predicted"]), threshold))
        if not pixels:
            pairs.append(dice_iou(tumour, s["truth"]))
        elif threshold is None:
            with Image.open(s["picture"]) as im:
                pairs.append(pixel_dice(np.asarray(im), s["mask"]))
        else:
            pairs.append(pixel_dice(mask_image(s["coords"], s["size"], s["dims"], tumour),
                                    s["mask"]))
    return float(np.mean([d for d, _ in pairs])), float(np.mean([i for _, i in pairs]))


def mask_figure(root: Path, models: list[str], path: Path) -> Path | None:
    """The first tumour slide of the test set (read at 1 um/px), its annotation and each of
    ``models``' predicted masks over it, with their pixel Dice; None without the images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from common.data.labels import LABELS, read_label_rows
    from common.explain.segment import pixel_dice
    from common.models import model_spec

    images = root / "test" / "images"
    if not (images / LABELS).is_file():
        return None
    row = next(r for r in read_label_rows(images / LABELS) if r.label == 1 and r.mask)
    assert row.mask is not None
    image = np.asarray(Image.open(images / row.name).convert("RGB"))

    def read(mask: Path) -> np.ndarray:
        with Image.open(mask) as im:  # any resolution, onto the image's pixels
            return np.asarray(im.convert("L").resize((image.shape[1], image.shape[0]),
                                                     Image.Resampling.NEAREST)) > 0

    def over(mask: np.ndarray) -> np.ndarray:
        out = image.astype(float)
        out[mask] = 0.5 * out[mask] + 0.5 * np.array([255.0, 0.0, 0.0])
        return out.astype(np.uint8)

    stem = Path(row.name).stem
    panels = [(image, f"test slide {stem} (1 um/px)"),
              (over(read(images / row.mask)), "annotation")]
    for key in models:
        name, _, folder = _model(key)
        picture = root / "predict" / folder / "test" / "masks" / f"{stem}.png"
        truth = images / row.mask if model_spec(name).trains == "segmenter" else \
            root / "test" / "slides" / "masks" / f"{stem}.png"
        dice = pixel_dice(np.asarray(Image.open(picture)), truth)[0]
        panels.append((over(read(picture)), f"{key} (pixel Dice {dice:.2f})"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.5 * len(panels), 3.0))
    for ax, (picture_, title) in zip(np.atleast_1d(axes), panels):
        ax.imshow(picture_)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _model(key: str) -> tuple[str, str, str]:
    """``NAME[:OPTIONS]`` as the model's name, its options and its results' folder name."""
    name, _, options = key.partition(":")
    return name, options, key.replace(":", "-").replace("=", "-").replace(",", "+")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.segmentation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["all"], metavar="NAME[:OPTIONS]",
                        help="bag models and/or seg-cnn, each with its model options if "
                        "any (seg-cnn:width=4); all: every bag model and seg-cnn")
    parser.add_argument("--dp", action="store_true", help="DP-SGD at epsilon 8 per site")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--slides", type=int, default=24, help="training slides per site")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seg-rounds", type=int, default=20,
                        help="rounds of the segmentation CNN")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from common.config import FederationConfig
    from common.fedavg import run_inprocess
    from common.metrics import roc_auc
    from common.models import model_spec, models_of_kind
    from common.models.base import BAG_KINDS
    from common.predict import predict
    from common.wsi.extract import prepare
    from simulations.wsi_demo import make_slides

    models = (models_of_kind(*BAG_KINDS) + ["seg-cnn"] if args.models == ["all"]
              else args.models)
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
    for key in models:
        start = time.perf_counter()
        name, options, folder = _model(key)
        run = args.out / "runs" / folder
        segmenter = model_spec(name).trains == "segmenter"
        data = {split: (slides_as_images(slides, args.out / split / "images")
                        if segmenter else features)
                for split, (slides, features) in folders.items()}
        truth = {split: data[split] if segmenter else slides
                 for split, (slides, _) in folders.items()}
        cfg = FederationConfig(sites=args.sites, rounds=args.seg_rounds if segmenter
                               else args.rounds, model=name, data=str(data["train"]),
                               batch_size=8, local_epochs=2, optimizer="adam", lr=0.01,
                               dp=args.dp, secagg=False, epsilon=8.0, patch_size=32,
                               patches_per_slide=32, model_options=options)
        if not (run / "model.npz").is_file():
            run_inprocess(cfg, run_dir=run)
        chosen: dict[str, Any] = {}
        if segmenter:  # the pixel probability that makes a pixel tumour, on validation
            dice = {}
            for t in PIXEL_THRESHOLDS:
                out = args.out / "predict" / folder / "val" / f"{t:g}"
                predict(data["val"], run, out, progress=False, heatmaps=False, top_k=0,
                        pixel_threshold=t, passes=1)  # no test-time augmentation
                dice[t] = _dice(_scores(out, truth["val"]), None, pixels=True)[0]
            pixel = max(dice, key=lambda t: dice[t])
            chosen.update(threshold=None, pixel_threshold=pixel, val_dice=dice[pixel])
        else:  # the attention share that makes a patch tumour, on validation
            out = args.out / "predict" / folder / "val"
            predict(data["val"], run, out, progress=False, heatmaps=False, top_k=0)
            slides = _scores(out, truth["val"])
            dice = {t: _dice(slides, t)[0] for t in THRESHOLDS}
            chosen["threshold"] = max(dice, key=lambda t: dice[t])
            chosen["val_dice"] = dice[chosen["threshold"]]
        out = args.out / "predict" / folder / "test"
        predict(data["test"], run, out, progress=False,
                pixel_threshold=chosen.get("pixel_threshold", 0.5))
        slides = _scores(out, truth["test"])
        chosen["dice"], chosen["iou"] = _dice(slides, chosen["threshold"])
        chosen["pixel_dice"], chosen["pixel_iou"] = _dice(slides, chosen["threshold"],
                                                          pixels=True)
        chosen["auc"] = roc_auc(np.array([s["logit"] for s in slides]),
                                np.array([s["label"] for s in slides]))
        chosen["n_tumour_slides"] = sum(s["label"] for s in slides)
        chosen["wall_s"] = round(time.perf_counter() - start, 1)
        results[key] = chosen
        how = (f"pixel probability {chosen['pixel_threshold']:g}" if segmenter else
               f"threshold {chosen['threshold']:g}") + f" (validation Dice {chosen['val_dice']:.3f})"
        print(f"{key}: Dice {chosen['dice']:.3f} per patch, {chosen['pixel_dice']:.3f} per "
              f"pixel (IoU {chosen['pixel_iou']:.3f}) at {how}; slide AUC {chosen['auc']:.3f} "
              f"({chosen['wall_s']:.0f} s)", flush=True)
    settings = {"dp": args.dp, "sites": args.sites, "slides_per_site": args.slides,
                "rounds": args.rounds, "seg_rounds": args.seg_rounds}
    saved = args.out / "segmentation.json"
    if saved.is_file():  # models measured before in this folder, with the same settings
        before = json.loads(saved.read_text())
        if {k: before.get(k) for k in settings} == settings:
            results = {**before["models"], **results}
    saved.write_text(json.dumps({**settings, "models": results}, indent=1))
    segmenters = [k for k in results if model_spec(_model(k)[0]).trains == "segmenter"]
    best_mil = [k for k in sorted(results, key=lambda k: -results[k]["pixel_dice"])
                if k not in segmenters][:1]
    figure = mask_figure(args.out, segmenters + best_mil, args.out / "masks.png")
    if figure is not None:
        print(f"masks of one test slide: {figure}")
    print("| model | Dice per patch | Dice per pixel | IoU per pixel | threshold (validation) "
          "| slide AUC |\n|---|---|---|---|---|---|")
    for name, r in sorted(results.items(), key=lambda item: -item[1]["pixel_dice"]):
        threshold = (f"pixel p {r['pixel_threshold']:g}" if r["threshold"] is None
                     else f"{r['threshold']:g}")
        print(f"| `{name}` | {r['dice']:.3f} | {r['pixel_dice']:.3f} | {r['pixel_iou']:.3f} | "
              f"{threshold} | {r['auc']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
