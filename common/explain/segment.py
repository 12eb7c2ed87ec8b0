"""Weakly supervised segmentation: a tumour mask at patch resolution from slide labels.

A MIL model trained on slide labels alone spreads its attention over the patches that
made the slide positive. :func:`relative_scores` puts a slide's scores on one scale (a
patch's share of the attention against a uniform share: 1 is average), so one threshold
serves slides of any size; :func:`tumour_patches` keeps the patches above it in the
slides predicted positive. :func:`patch_truth` reads an annotation mask (an image of the
slide, nonzero on tumour) at the same patches, and :func:`dice_iou` compares the two.

A segmentation model (``seg-cnn``) says it per pixel: :func:`mask_image` draws its pixel
masks and :func:`pixel_dice` compares any mask picture with the annotation pixel by pixel
(the measure that puts both kinds of mask on one scale).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SEGMENT_THRESHOLD = 2.0
"""Default: a patch is tumour when it holds twice its uniform share of the attention."""


RANK_FLOOR = 1e-3
"""Scores below this share of an even share rank together at the bottom."""


def rank_normalise(scores: np.ndarray, floor: float = RANK_FLOOR) -> np.ndarray:
    """Ranks of ``scores`` scaled to [0, 1], for colour maps. Patches with less than
    ``floor`` times an even share of the total tie at 0: attention that is all but zero
    has no meaningful order, and ranking it would paint noise across the slide."""
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) < 2:
        return np.ones_like(scores)
    relative = np.maximum(relative_scores(scores), floor)
    return (rankdata(relative, method="min") - 1) / (len(scores) - 1)


def relative_scores(scores: np.ndarray) -> np.ndarray:
    """Each patch's score against an equal share: ``score * N / sum(scores)``."""
    scores = np.clip(np.asarray(scores, dtype=np.float64), 0.0, None)
    total = scores.sum()
    return scores * len(scores) / total if total > 0 else np.zeros_like(scores)


def tumour_patches(scores: np.ndarray, positive: bool,
                   threshold: float = SEGMENT_THRESHOLD) -> np.ndarray:
    """``bool[N]``: the patches of a slide predicted ``positive`` whose relative score
    reaches ``threshold``; none for a slide predicted negative."""
    if not positive:
        return np.zeros(len(scores), dtype=bool)
    return relative_scores(scores) >= threshold


def patch_truth(mask_path: Path, coords: np.ndarray, size_baseline: float,
                dimensions: tuple[int, int]) -> np.ndarray:
    """``bool[N]``: patches at least half covered by the annotation mask (any resolution
    of the whole slide, nonzero on tumour)."""
    from PIL import Image

    from common.wsi.tiling import box_fraction

    with Image.open(mask_path) as im:
        mask = np.asarray(im.convert("L")) > 0
    w0, h0 = dimensions
    return box_fraction(mask, coords, size_baseline, w0 / mask.shape[1],
                        h0 / mask.shape[0]) >= 0.5


def dice_iou(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two patch masks; both 1.0 when both are empty."""
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    inter = float((predicted & truth).sum())
    union = float((predicted | truth).sum())
    total = float(predicted.sum() + truth.sum())
    if total == 0:
        return 1.0, 1.0
    return 2 * inter / total, inter / union


def mask_image(coords: np.ndarray, size_baseline: float, dimensions: tuple[int, int],
               tumour: np.ndarray, max_size: int = 2048,
               pixels: np.ndarray | None = None) -> np.ndarray:
    """``uint8[h, w]`` picture of the tumour patches (255) over the slide, at most
    ``max_size`` px on its longer side. With ``pixels`` (``bool[N, p, p]``, a segmentation
    model's mask of each patch), the tumour pixels of the ``tumour`` patches instead of
    whole squares."""
    from PIL import Image

    w0, h0 = dimensions
    scale = min(1.0, max_size / max(w0, h0))
    out = np.zeros((max(1, round(h0 * scale)), max(1, round(w0 * scale))), dtype=np.uint8)
    side = max(1, round(size_baseline * scale))
    for i in np.flatnonzero(np.asarray(tumour, bool)):
        x0, y0 = int(coords[i][0] * scale), int(coords[i][1] * scale)
        block = out[y0:y0 + side, x0:x0 + side]
        if pixels is None:
            block[:] = 255
            continue
        piece = np.asarray(pixels[i], np.uint8) * 255
        if piece.shape != (side, side):
            piece = np.asarray(Image.fromarray(piece).resize((side, side),
                                                             Image.Resampling.NEAREST))
        block[:] = np.maximum(block, piece[:block.shape[0], :block.shape[1]])
    return out


def pixel_dice(predicted: np.ndarray, mask_path: Path) -> tuple[float, float]:
    """Dice and IoU of a predicted mask picture (:func:`mask_image`, nonzero on tumour)
    against an annotation mask image of the whole slide, pixel by pixel at the
    annotation's resolution (the prediction resized to it, nearest neighbour)."""
    from PIL import Image

    with Image.open(mask_path) as im:
        truth = np.asarray(im.convert("L")) > 0
    if predicted.shape != truth.shape:
        predicted = np.asarray(Image.fromarray(np.asarray(predicted, np.uint8)).resize(
            (truth.shape[1], truth.shape[0]), Image.Resampling.NEAREST))
    return dice_iou(predicted > 0, truth)


__all__ = ["RANK_FLOOR", "SEGMENT_THRESHOLD", "dice_iou", "mask_image", "patch_truth",
           "pixel_dice", "rank_normalise", "relative_scores", "tumour_patches"]
