"""Apply a released model to new slides and explain it: what ``pathfed predict`` runs.

:func:`predict` takes a released model (``RUN_DIR/model.npz``, see :mod:`common.release`)
and a folder of slides (prepared first, into ``OUT/features``, with the settings its card
records; an image folder is embedded as training embedded it) or a folder written by
``pathfed prepare`` (refused, with one line, when its features were made otherwise than
the model's). For every slide it writes, under ``OUT``:

- a row of ``predictions.csv`` (rewritten atomically after every slide): probability,
  logit, label at the threshold (the card's, calibrated on the run's validation data,
  unless ``threshold`` is given), the uncertainty (MC dropout when a MIL model has
  dropout; test-time rotations and flips for a patch model, whose scores are its
  per-patch probabilities),
  whether the model abstained, the top patches; a slide that cannot be read fails alone;
- ``<slide>_scores.h5``: the patches' coordinates, raw scores and tumour flags;
- ``heatmaps/<slide>.png`` (scores over the thumbnail, :mod:`common.explain.heatmap`)
  and ``heatmaps/<slide>_top/`` (the top patches as PNGs, when the slide is at hand);
- ``geojson/<slide>.geojson`` for QuPath (:mod:`common.explain.geojson`);
- ``masks/<slide>.png``: the tumour mask (:mod:`common.explain.segment`): weakly supervised
  (the patches a MIL model attends to, or a patch classifier calls tumour), or, for a
  segmentation model (``seg-cnn``), its pixels; with Dice and IoU in the row when the
  labels file has a ``mask`` column (per patch; per pixel for a segmentation model).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError, DataError, PathFedError
from common.explain.segment import SEGMENT_THRESHOLD
from common.release import ModelCard, load_model

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.csv"
COLUMNS = ("slide", "status", "probability", "logit", "label", "uncertainty", "abstained",
           "n_patches", "top_patches", "tumour_patches", "dice", "iou", "seconds", "reason")


@dataclass(frozen=True)
class PredictOptions:
    """How :func:`predict` works."""

    threshold: float | None = None
    """Logit threshold of the positive label; the model card's when None."""
    max_uncertainty: float | None = None
    """Abstain (say nothing) on a slide whose MC-dropout spread exceeds this."""
    passes: int = 20
    """MC-dropout passes (models built with dropout > 0)."""
    top_k: int = 8
    segment_threshold: float = SEGMENT_THRESHOLD
    """Relative patch score from which a patch of a positive slide is tumour."""
    pixel_threshold: float = 0.5
    """Probability from which a pixel of a positive slide is tumour (segmentation models)."""
    encoder: str | None = None
    """The encoder the caller expects; refused unless it is the model's."""
    weights: str | Path | None = None
    """Local weights of the encoder, for slides prepared on the fly."""
    slide_mpp: float | None = None
    stain_target: str | Path | None = None
    """The stain target image the model's features were normalised to, if not the default."""
    slides_dir: Path | None = None
    """Where the slides of a feature folder lie (for thumbnails and top patches)."""
    key: bytes | None = None
    """Key of a sealed model."""
    workers: int = 1
    progress: bool = True
    heatmaps: bool = True
    only: frozenset[str] | None = None
    """Predict on these slides (names as in the manifest) alone."""


@dataclass
class SlidePrediction:
    """One row of ``predictions.csv``."""

    slide: str
    status: str = "done"
    probability: float = math.nan
    logit: float = math.nan
    label: int | None = None
    uncertainty: float | None = None
    abstained: bool = False
    n_patches: int = 0
    top_patches: str = ""
    tumour_patches: int = 0
    dice: float | None = None
    iou: float | None = None
    seconds: float = 0.0
    reason: str = ""

    def row(self) -> dict[str, str]:
        def num(v: float | None) -> str:
            return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"

        return {"slide": self.slide, "status": self.status, "probability": num(self.probability),
                "logit": num(self.logit), "label": "" if self.label is None else str(self.label),
                "uncertainty": num(self.uncertainty), "abstained": str(self.abstained).lower(),
                "n_patches": str(self.n_patches), "top_patches": self.top_patches,
                "tumour_patches": str(self.tumour_patches), "dice": num(self.dice),
                "iou": num(self.iou), "seconds": f"{self.seconds:.2f}", "reason": self.reason}


@dataclass
class PredictSummary:
    rows: list[SlidePrediction]
    out: Path
    card: ModelCard
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for status in ("done", "failed"):
            self.counts[status] = sum(r.status == status for r in self.rows)

    @property
    def slides_per_minute(self) -> float:
        return 60 * self.counts["done"] / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class _Bag:
    """One slide's inputs and what is needed to draw them."""

    name: str
    stem: str
    features: np.ndarray
    """The model's input rows (patches, or regions of a multi-scale model)."""
    coords: np.ndarray
    """Baseline top-left of each (finest) patch."""
    size_baseline: float
    dimensions: tuple[int, int]
    parent: np.ndarray | None = None
    """Region of each patch (multi-scale)."""
    slide: Path | None = None
    mpp: float = 0.5
    patch_size: int = 32
    image: np.ndarray | None = None
    """The whole image, for image folders (their thumbnail)."""
    mask: Path | None = None


# --- The model ------------------------------------------------------------------------

def build_released(weights: dict[str, np.ndarray], card: ModelCard) -> Any:
    """The released model, in eval mode; a card that does not fit the weights is refused."""
    import torch

    from common.models import build_model, parse_model_options

    kwargs: dict[str, Any] = parse_model_options(card.model, card.model_options)
    if card.kind == "patches":
        kwargs["patch_size"] = int(card.setting("patch") or 32)
    else:
        kwargs["in_dim"] = card.in_dim
    if card.kind == "multiscale":
        kwargs["children"] = card.children
    model = build_model(card.model, **kwargs)
    own = model.state_dict()
    if list(own) != list(weights) or any(tuple(own[k].shape) != weights[k].shape for k in own):
        raise ConfigError(f"the model's weights do not fit a {card.model} of {card.in_dim} "
                          "input features: the file is damaged or not this model's")
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    return model.eval()


def _has_dropout(model: Any) -> bool:
    from torch import nn

    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0
               for m in model.modules())


def patch_scores(model: Any, bag: _Bag) -> np.ndarray:
    """Each finest patch's score: the pooling weight of a single-scale model; for a
    multi-scale one, its region's weight times its share of the cross-scale attention
    (the region's weight, shared, for the low-power ablation); for a patch model, its
    own probability of tumour (a segmentation model: its tumour fraction)."""
    import torch

    x = torch.from_numpy(bag.features[None])
    with torch.no_grad():
        if hasattr(model, "segment"):
            return np.asarray(torch.sigmoid(model.patch_logits(x)[0]).numpy(), np.float64)
        if getattr(model, "input_kind", "") == "patches":
            logits = model(x)[0]
            return np.asarray(torch.sigmoid(logits[:, 1] - logits[:, 0]).numpy(),
                              dtype=np.float64)
        if bag.parent is None:
            return np.asarray(model.instance_scores(x, None)[0].numpy(), dtype=np.float64)
        from common.data.multiscale import child_slots

        per_child = model.patch_scores(x, None)[0].numpy()  # [M, K]
        scores = per_child[bag.parent, child_slots(bag.parent)].astype(np.float64)
        if scores.sum() <= 0:
            region = model.instance_scores(x, None)[0].numpy()
            scores = region[bag.parent] / np.bincount(bag.parent)[bag.parent]
        return np.asarray(scores)


# --- The inputs -----------------------------------------------------------------------

def _check_features(folder: Path, card: ModelCard) -> None:
    """Refuse a folder whose features were made otherwise than the model's."""
    import h5py

    if card.features.startswith("images;"):
        raise ConfigError(f"{folder}: the model was trained on images embedded on the fly "
                          f"({card.features}); give the image folder itself")
    for path in sorted(folder.glob("*.h5")):
        try:
            with h5py.File(path, "r") as h5:
                key = str(h5.attrs.get("settings", ""))
        except OSError:
            continue  # damaged: that slide fails alone
        differ = card.mismatch(key)
        if differ:
            raise ConfigError(
                f"{path}: made with {differ[0]}, the model expects {differ[1]}; prepare the "
                "slides with the model's settings (or give the slides folder: predict "
                "prepares it)")


def _prepare_slides(slides: Path, out: Path, card: ModelCard, opts: PredictOptions) -> Path:
    from common.features import build_encoder
    from common.wsi.extract import PrepareOptions, prepare

    setting = card.setting
    encoder, weights_hash = setting("encoder") or "", setting("weights") or "none"
    enc = build_encoder(encoder, opts.weights)
    if enc.weights_hash != weights_hash:
        raise ConfigError(f"encoder {encoder!r}: the model was trained on features of weights "
                          f"{weights_hash[:12]}, these weights are {enc.weights_hash[:12]}; "
                          "give the encoder's weights file with --weights")
    scales = [float(m) for m in (setting("mpp") or "0.5").split(",")]
    method, _, target = (setting("stain") or "none").partition(":")
    if target not in ("", "default") and opts.stain_target is None:
        raise ConfigError(f"the model's features were stain-normalised to a target image "
                          f"(SHA-256 {target}...); give it with --stain-target")
    features = out / "features"
    prepare(slides, features, PrepareOptions(
        stain_normalize=method, stain_target=opts.stain_target if method != "none" else None,
        mpp=scales[0], context_mpp=tuple(scales[1:]), patch_size=int(setting("patch") or 256),
        encoder=encoder, weights=opts.weights, workers=opts.workers,
        tissue_threshold=float(setting("tissue") or 0.5),
        overlap=int(setting("overlap") or 0), slide_mpp=opts.slide_mpp,
        progress=opts.progress))
    _check_features(features, card)  # e.g. a --stain-target other than the model's
    return features


def _masks(folder: Path, slides_dir: Path | None) -> dict[str, Path]:
    """Annotation masks by slide stem, from a labels file's ``mask`` column."""
    from common.data.labels import LABELS, read_label_rows

    if not (folder / LABELS).is_file():
        return {}
    try:
        rows = read_label_rows(folder / LABELS, ("slide", "image"))
    except DataError as err:
        log.warning("%s; no Dice without it", err)
        return {}
    out = {}
    for row in rows:
        if row.mask:
            for base in (folder, slides_dir):
                if base is not None and (base / row.mask).is_file():
                    out[Path(row.name).stem] = base / row.mask
                    break
    return out


def _feature_bags(folder: Path, card: ModelCard, slides_dir: Path | None
                  ) -> Iterator[_Bag | tuple[str, str]]:
    """Each slide of a prepared folder (or ``(name, reason)`` for one that failed)."""
    import h5py

    from common.data.featurefile import read_features, read_regions
    from common.wsi.manifest import DONE, SKIPPED, read_manifest

    masks = _masks(folder, slides_dir)
    manifest = read_manifest(folder / "manifest.csv")
    names = manifest or {p.stem: {"status": DONE, "h5": p.name} for p in folder.glob("*.h5")}
    for name, row in sorted(names.items()):
        if row.get("status") not in (DONE, SKIPPED):
            yield name, f"not prepared: {row.get('reason') or row.get('status')}"
            continue
        path = folder / (row.get("h5") or f"{Path(name).stem}.h5")
        try:
            if card.kind == "multiscale":
                features, _, attrs = read_regions(path)
                with h5py.File(path, "r") as h5:
                    context = float(h5.attrs["context_mpp"][0])
                    parent = np.asarray(h5[f"scale_{context:g}/parent"], dtype=np.int64)
            else:
                features, attrs = read_features(path)
                parent = None
            with h5py.File(path, "r") as h5:
                coords = np.asarray(h5["coords"], dtype=np.int64)
        except (DataError, OSError, KeyError) as err:
            yield name, str(err)
            continue
        slide = (slides_dir / str(attrs.get("slide_path", name))) if slides_dir else None
        yield _Bag(name, path.stem, features, coords, float(attrs["size_baseline"]),
                   tuple(int(v) for v in attrs["slide_dimensions"]), parent,  # type: ignore[arg-type]
                   slide if slide is not None and slide.exists() else None,
                   float(attrs["mpp"]), int(attrs["patch_size"]), None,
                   masks.get(path.stem))


def _image_bags(folder: Path, card: ModelCard, only: frozenset[str] | None = None
                ) -> Iterator[_Bag | tuple[str, str]]:
    """Each image of a folder embedded as training embedded it (``images;...`` cards)."""
    from common.data.images import (
        CONTEXT_FACTOR,
        _stain_then,
        read_image,
        tissue_grid,
        tissue_regions,
    )
    from common.data.multiscale import pack_regions
    from common.features import get_encoder
    from common.wsi.reader import SLIDE_SUFFIXES

    patch = int(card.setting("patch") or 32)
    stain = (card.setting("stain") or "none").partition(":")[0]
    normalise = _stain_then(stain, lambda patches: patches)
    encoder = (_stain_then(stain, get_encoder(card.setting("encoder") or "color-texture"))
               if card.kind != "patches" else None)
    masks = _masks(folder, None)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in
                    SLIDE_SUFFIXES | {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
    annotations = {m.resolve() for m in masks.values()}
    for path in images:
        if (only is not None and path.name not in only) or path.resolve() in annotations:
            continue  # not asked for, or another image's annotation mask
        try:
            image = read_image(path)
        except DataError as err:
            yield path.name, str(err)
            continue
        tissue, coords = tissue_grid(image, patch)
        if not len(coords):
            yield path.name, f"no tissue patch of {patch} px"
            continue
        parent = None
        if card.kind == "multiscale":
            regions, patches, parent = tissue_regions(image, patch)
            assert encoder is not None
            features = pack_regions(encoder(regions), encoder(patches), parent,
                                    CONTEXT_FACTOR ** 2)
        elif card.kind == "patches":  # the pixels, scaled as training scaled them
            features = _normalised(normalise(tissue))
        else:
            assert encoder is not None
            features = encoder(tissue)
        yield _Bag(path.name, path.stem, features, coords, float(patch),
                   (image.shape[1], image.shape[0]), parent, None, 0.5, patch, image,
                   masks.get(path.stem))


def _normalised(patches: np.ndarray) -> np.ndarray:
    """``float32[N, 3, P, P]`` of ``uint8[N, P, P, 3]``, as :meth:`BagSet.to_patch_dataset`
    scales the patches a patch model trains on."""
    from common.features import IMAGENET_MEAN, IMAGENET_STD

    x = patches.astype(np.float32).transpose(0, 3, 1, 2) / 255.0
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


# --- One slide ------------------------------------------------------------------------

def _predict_slide(model: Any, bag: _Bag, card: ModelCard, opts: PredictOptions, out: Path,
                   dropout: bool) -> SlidePrediction:
    import torch

    from common.explain.geojson import slide_geojson, write_geojson
    from common.explain.heatmap import render_heatmap, top_indices
    from common.explain.segment import (
        dice_iou,
        mask_image,
        patch_truth,
        pixel_dice,
        tumour_patches,
    )
    from common.models import model_spec

    start = time.perf_counter()
    x = torch.from_numpy(bag.features[None])
    patches = card.kind == "patches"
    with torch.no_grad():
        logit = float(model.scores(x)[0] if patches else model.scores(x, None)[0])
    threshold = card.threshold if opts.threshold is None else opts.threshold
    result = SlidePrediction(bag.name, probability=1 / (1 + math.exp(-logit)), logit=logit,
                             label=int(logit > threshold), n_patches=len(bag.coords))
    if patches or dropout:
        from common.uncertainty import augmented, mc_dropout

        pred = (augmented(model, x, passes=opts.passes) if patches else  # rotations, flips
                mc_dropout(model, (x, torch.ones(1, x.shape[1], dtype=torch.bool)),
                           passes=opts.passes))
        result.uncertainty = float(pred.uncertainty[0])
        if opts.max_uncertainty is not None and result.uncertainty > opts.max_uncertainty:
            result.abstained = True
    scores = patch_scores(model, bag)
    top = top_indices(scores, opts.top_k)
    result.top_patches = ";".join(f"{bag.coords[i][0]}:{bag.coords[i][1]}" for i in top)
    positive = bool(result.label) and not result.abstained
    pixels = None
    if model_spec(card.model).trains == "segmenter":  # a mask per pixel, of positive slides
        from common.data.images import tumour_labels

        with torch.no_grad():
            pixels = model.segment(x[0]).numpy() >= opts.pixel_threshold
        tumour = positive & tumour_labels(pixels).astype(bool)
        pixels &= positive
    else:
        tumour = (positive & (scores >= 0.5) if patches  # a patch model says it per patch
                  else tumour_patches(scores, positive, opts.segment_threshold))
    result.tumour_patches = int(tumour.sum())
    picture = mask_image(bag.coords, bag.size_baseline, bag.dimensions,
                         tumour if pixels is None else np.ones(len(tumour), bool),
                         pixels=pixels)
    if bag.mask is not None and pixels is not None:
        result.dice, result.iou = pixel_dice(picture, bag.mask)
    elif bag.mask is not None:
        truth = patch_truth(bag.mask, bag.coords, bag.size_baseline, bag.dimensions)
        result.dice, result.iou = dice_iou(tumour, truth)
    _write_scores(out / f"{bag.stem}_scores.h5", bag, scores, tumour, result)
    write_geojson(out / "geojson" / f"{bag.stem}.geojson",
                  slide_geojson(bag.coords, bag.size_baseline, scores, tumour,
                                result.probability))
    from PIL import Image

    (out / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(out / "masks" / f"{bag.stem}.png")
    if opts.heatmaps:
        thumbnail, reader = _thumbnail(bag)
        try:
            render_heatmap(out / "heatmaps" / f"{bag.stem}.png", bag.coords, bag.size_baseline,
                           scores, bag.dimensions, thumbnail,
                           title=f"{bag.name}: p = {result.probability:.3f}")
            if reader is not None or bag.image is not None:
                _top_patches(out / "heatmaps" / f"{bag.stem}_top", bag, top, reader)
        finally:
            if reader is not None:
                reader.close()
    result.seconds = time.perf_counter() - start
    return result


def _thumbnail(bag: _Bag) -> tuple[np.ndarray | None, Any]:
    if bag.image is not None:
        from PIL import Image

        im = Image.fromarray(bag.image[..., :3])
        im.thumbnail((1024, 1024))
        return np.asarray(im), None
    if bag.slide is None:
        return None, None
    from common.wsi.reader import open_slide

    reader = open_slide(bag.slide)
    return reader.thumbnail(1024), reader


def _top_patches(folder: Path, bag: _Bag, top: np.ndarray, reader: Any) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for rank, i in enumerate(top):
        x, y = (int(v) for v in bag.coords[i])
        if bag.image is not None:
            side = int(bag.size_baseline)
            pixels = bag.image[y:y + side, x:x + side, :3]
        else:
            pixels = reader.read_at_mpp((x, y), (bag.patch_size, bag.patch_size), bag.mpp)
        Image.fromarray(np.ascontiguousarray(pixels)).save(
            folder / f"{rank + 1:02d}_x{x}_y{y}.png")


def _write_scores(path: Path, bag: _Bag, scores: np.ndarray, tumour: np.ndarray,
                  result: SlidePrediction) -> None:
    import h5py

    tmp = path.with_name(f".{path.name}.tmp")
    with h5py.File(tmp, "w") as h5:
        h5.create_dataset("coords", data=bag.coords)
        h5.create_dataset("scores", data=scores.astype(np.float32))
        h5.create_dataset("tumour", data=tumour)
        h5.attrs.update({"probability": result.probability, "logit": result.logit,
                         "size_baseline": bag.size_baseline,
                         "slide_dimensions": np.array(bag.dimensions, dtype=np.int64)})
    os.replace(tmp, path)


def _write_predictions(path: Path, rows: list[SlidePrediction]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row.row())
    os.replace(tmp, path)


# --- The folder -----------------------------------------------------------------------

def predict(inputs: str | Path, model_path: str | Path, out: str | Path,
            options: PredictOptions | None = None, **fields: Any) -> PredictSummary:
    """Apply the released model at ``model_path`` to every slide of ``inputs``; see the
    module docstring. Bad arguments raise before any slide is touched; a bad slide is
    recorded as failed and the others proceed."""
    from rich.progress import track

    opts = replace(options or PredictOptions(), **fields)
    inputs, out = Path(inputs), Path(out)
    if not inputs.is_dir():
        raise DataError(f"{inputs}: not a folder; give a folder of slides or one written by "
                        "`pathfed prepare`")
    weights, card, where = load_model(model_path, opts.key)
    if card is None:
        raise ConfigError(f"{where}: a round checkpoint carries no model card (model, "
                          "features, threshold); give the run folder or its model.npz")
    from common.models import model_spec

    if model_spec(card.model).trains == "adversarial":
        raise ConfigError(f"{where}: model {card.model!r} generates patches, it does not "
                          "classify slides; draw from it with `pathfed synthesize`")
    if card.features in ("synthetic", "site file", "unknown"):
        raise ConfigError(f"{where}: the model was trained on {card.features} data; nothing "
                          "records how its features were made, so no slide can be prepared "
                          "to match")
    expected = card.setting("encoder")
    if opts.encoder is not None and expected is not None and opts.encoder != expected:
        raise ConfigError(f"--encoder {opts.encoder}: the model was trained on features of "
                          f"encoder {expected!r}; drop --encoder or give {expected}")
    model = build_released(weights, card)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if (inputs / "manifest.csv").is_file():
        _check_features(inputs, card)
        bags = _feature_bags(inputs, card, opts.slides_dir)
    elif card.features.startswith("images;"):
        bags = _image_bags(inputs, card, opts.only)
    else:
        features = _prepare_slides(inputs, out, card, opts)
        bags = _feature_bags(features, card, inputs)
    dropout = _has_dropout(model)
    rows: list[SlidePrediction] = []
    for bag in track(bags, description="predicting", disable=not opts.progress,
                     transient=True):
        name = bag[0] if isinstance(bag, tuple) else bag.name
        if opts.only is not None and name not in opts.only:
            continue
        if isinstance(bag, tuple):
            rows.append(SlidePrediction(bag[0], status="failed", reason=bag[1]))
        else:
            try:
                rows.append(_predict_slide(model, bag, card, opts, out, dropout))
            except (PathFedError, OSError, ValueError) as err:
                rows.append(SlidePrediction(bag.name, status="failed", reason=str(err)))
        _write_predictions(out / PREDICTIONS, rows)
        last = rows[-1]
        if last.status == "done":
            log.info("%s: p = %.3f (label %s%s), %d patches, %d tumour", last.slide,
                     last.probability, last.label, ", abstained" if last.abstained else "",
                     last.n_patches, last.tumour_patches)
        else:
            log.warning("%s: failed: %s", last.slide, last.reason)
    if not rows:
        raise DataError(f"{inputs}: no slide to predict on")
    return PredictSummary(rows, out, card, time.perf_counter() - start)


__all__ = ["PREDICTIONS", "PredictOptions", "PredictSummary", "SlidePrediction",
           "build_released", "patch_scores", "predict"]
