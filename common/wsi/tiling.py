"""Patch grids over tissue, with per-patch quality flags.

A grid of square patches is laid over the whole slide at a target resolution (µm/px);
patches whose tissue fraction (measured on the thumbnail's tissue mask) reaches a
threshold are kept. Coordinates are baseline pixels of the patch's top-left corner.
Quality flags (blur, pen marks) are computed on the patch pixels and stored, not used to
drop patches: the user decides.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from common.wsi.reader import SlideReader
from common.wsi.tissue import rgb_to_hsv, tissue_mask

log = logging.getLogger(__name__)

BLUR_THRESHOLD = 15.0
"""Variance of the Laplacian (grey levels 0-255) below which a patch is flagged blurred."""
PEN_FRACTION = 0.05
"""Fraction of pen-coloured pixels above which a patch is flagged as marked."""


@dataclass(frozen=True)
class PatchGrid:
    """Patches of one slide kept by the tissue filter."""

    coords: np.ndarray
    """``int64[n, 2]`` baseline ``(x, y)`` of each patch's top-left corner."""
    tissue_fraction: np.ndarray
    """``float32[n]`` fraction of each patch covered by the tissue mask."""
    mpp: float
    """Target µm/px of the patches."""
    patch_size: int
    """Patch side in pixels at ``mpp``."""
    size_baseline: float
    """Patch side in baseline pixels."""
    level: int
    """Slide level the patches are read from."""
    downsample: float
    """Downsample of ``level`` relative to baseline."""
    mask: np.ndarray
    """The thumbnail tissue mask used (``bool[h, w]``)."""
    mask_scale: float
    """Baseline pixels per mask pixel."""

    def __len__(self) -> int:
        return len(self.coords)


def tile_tissue(
    reader: SlideReader,
    mpp: float = 0.5,
    patch_size: int = 256,
    *,
    overlap: int = 0,
    tissue_threshold: float = 0.5,
    thumbnail_size: int = 1024,
    mask: np.ndarray | None = None,
) -> PatchGrid:
    """Grid of patches of ``patch_size`` px at ``mpp`` µm/px over the slide's tissue.

    Args:
        overlap: pixels (at ``mpp``) shared by neighbouring patches.
        tissue_threshold: minimum tissue fraction of a kept patch (0 keeps every patch).
        thumbnail_size: longer side of the thumbnail the tissue mask is computed on.
        mask: a precomputed tissue mask over the whole slide (any resolution).
    """
    if patch_size < 1 or not 0 <= overlap < patch_size:
        raise ValueError(f"need patch_size >= 1 and 0 <= overlap < patch_size, got "
                         f"{patch_size}, {overlap}")
    if not 0.0 <= tissue_threshold <= 1.0:
        raise ValueError(f"tissue_threshold must be in [0, 1], got {tissue_threshold}")
    if mask is None:
        mask = tissue_mask(reader.thumbnail(thumbnail_size))
    w0, h0 = reader.dimensions
    downsample = mpp / reader.mpp
    size = patch_size * downsample
    stride = (patch_size - overlap) * downsample
    level = reader.best_level_for_downsample(downsample)
    nx = int(math.floor((w0 - size) / stride)) + 1 if w0 >= size else 0
    ny = int(math.floor((h0 - size) / stride)) + 1 if h0 >= size else 0
    xs = np.floor(np.arange(nx) * stride).astype(np.int64)
    ys = np.floor(np.arange(ny) * stride).astype(np.int64)
    gx, gy = np.meshgrid(xs, ys)
    coords = np.stack([gx.ravel(), gy.ravel()], axis=1)
    scale = w0 / mask.shape[1]
    fraction = box_fraction(mask, coords, size, scale, (h0 / mask.shape[0]))
    keep = fraction >= tissue_threshold if tissue_threshold > 0 else np.ones(len(coords), bool)
    log.debug("%s: %d of %d grid patches have >= %.0f %% tissue", reader.path, keep.sum(),
              len(coords), 100 * tissue_threshold)
    return PatchGrid(coords=coords[keep], tissue_fraction=fraction[keep].astype(np.float32),
                     mpp=mpp, patch_size=patch_size, size_baseline=size, level=level,
                     downsample=reader.level_downsamples[level], mask=mask, mask_scale=scale)


def box_fraction(mask: np.ndarray, coords: np.ndarray, size: float, scale_x: float,
                 scale_y: float) -> np.ndarray:
    """Mean of ``mask`` over each baseline box ``(x, y, size, size)`` (via an integral image)."""
    if len(coords) == 0:
        return np.zeros(0, dtype=np.float64)
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    integral[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    h, w = mask.shape
    x0 = np.clip(np.floor(coords[:, 0] / scale_x).astype(np.int64), 0, w - 1)
    y0 = np.clip(np.floor(coords[:, 1] / scale_y).astype(np.int64), 0, h - 1)
    x1 = np.clip(np.ceil((coords[:, 0] + size) / scale_x).astype(np.int64), x0 + 1, w)
    y1 = np.clip(np.ceil((coords[:, 1] + size) / scale_y).astype(np.int64), y0 + 1, h)
    total = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return total / ((x1 - x0) * (y1 - y0))


def laplacian_variance(patches: np.ndarray) -> np.ndarray:
    """``float32[n]`` variance of the Laplacian of each patch's grey levels (sharpness)."""
    grey = patches.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if len(patches) == 0:
        return np.zeros(0, dtype=np.float32)
    # ndimage.laplace of each patch, for the whole stack at once: the same second
    # differences along y then x, added in the same order (bitwise equal)
    lap = ndimage.correlate1d(grey, [1.0, -2.0, 1.0], axis=1, mode="reflect")
    lap += ndimage.correlate1d(grey, [1.0, -2.0, 1.0], axis=2, mode="reflect")
    return lap.reshape(len(patches), -1).var(axis=1).astype(np.float32)


def pen_fraction(patches: np.ndarray) -> np.ndarray:
    """``float32[n]`` fraction of pixels in pen-ink colours: blue, green or black ink.

    H&E is pink to purple (hue ~ 270-360° and 0-20°); blue (190-260°) or green (70-170°)
    pixels that are strongly saturated, or near-black pixels, are marker ink.
    """
    hsv = rgb_to_hsv(patches[:, ::2, ::2])  # every other pixel estimates a fraction well
    h, s, v = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    blue = (h >= 190) & (h <= 260) & (s > 0.4) & (v > 0.15)
    green = (h >= 70) & (h <= 170) & (s > 0.3) & (v > 0.15)
    black = v < 0.15
    return (blue | green | black).reshape(len(patches), -1).mean(axis=1).astype(np.float32)


def quality_flags(patches: np.ndarray, blur_threshold: float = BLUR_THRESHOLD,
                  pen_threshold: float = PEN_FRACTION) -> dict[str, np.ndarray]:
    """Per-patch QC of ``uint8[n, P, P, 3]`` patches: scores and boolean flags."""
    lap = laplacian_variance(patches)
    pen = pen_fraction(patches)
    return {"qc_blur": lap < blur_threshold, "qc_pen": pen > pen_threshold,
            "laplacian_var": lap, "pen_fraction": pen}


@dataclass(frozen=True)
class ContextGrid:
    """Coarser-scale patches over a grid's patches: each finest patch's parent."""

    coords: np.ndarray
    """``int64[m, 2]`` baseline top-left of each coarse patch."""
    tissue_fraction: np.ndarray
    parent: np.ndarray
    """``int64[n]``: the coarse patch (row) each patch of the fine grid lies in (its centre)."""
    children: int
    """The most fine patches one coarse patch can hold (from the geometry alone)."""
    mpp: float
    size_baseline: float

    def __len__(self) -> int:
        return len(self.coords)


def context_grid(reader: SlideReader, grid: PatchGrid, mpp: float,
                 overlap: int = 0) -> ContextGrid:
    """The coarse patches (``grid.patch_size`` px at ``mpp``, on a grid from the origin) that
    hold the centres of ``grid``'s patches: exactly the parents those patches need, whatever
    their own tissue fraction, so that no fine patch loses its context."""
    from common.data.multiscale import children_per_region

    if mpp <= grid.mpp:
        raise ValueError(f"a context scale must be coarser than {grid.mpp:g} um/px, got {mpp:g}")
    size = grid.patch_size * mpp / reader.mpp
    centres = grid.coords + grid.size_baseline / 2
    cells, parent = np.unique(np.floor(centres / size).astype(np.int64), axis=0,
                              return_inverse=True)
    coords = np.floor(cells * size).astype(np.int64)
    h0 = reader.dimensions[1]
    tissue = box_fraction(grid.mask, coords, size, grid.mask_scale, h0 / grid.mask.shape[0])
    fine_stride = (grid.patch_size - overlap) * grid.mpp / reader.mpp
    return ContextGrid(coords=coords, tissue_fraction=tissue.astype(np.float32),
                       parent=parent.reshape(-1).astype(np.int64),
                       children=children_per_region(size, fine_stride), mpp=mpp,
                       size_baseline=size)
