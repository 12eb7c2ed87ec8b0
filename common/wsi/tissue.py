"""Tissue detection on a slide thumbnail: Otsu on HSV saturation, then morphology.

Background glass is bright and grey (low saturation); stained tissue is pink or purple
(high saturation). Otsu's threshold separates the two, with a floor so that a blank slide
yields no tissue; closing fills gaps between nuclei, opening removes dust, and connected
components smaller than a fraction of the thumbnail are dropped.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_SATURATION = 20
"""Saturation (0-255) below which nothing is tissue, whatever Otsu says (blank slides)."""


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """HSV of a ``uint8[..., 3]`` RGB image, as float32 in [0, 1] (hue in turns)."""
    r, g, b = (image[..., i].astype(np.float32) / 255.0 for i in range(3))
    v = np.maximum(np.maximum(r, g), b)  # as rgb.max(axis=-1), without a size-3 reduction
    c = v - np.minimum(np.minimum(r, g), b)
    s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
    safe_c = np.maximum(c, 1e-12)
    h = np.where(v == r, ((g - b) / safe_c) % 6.0,
                 np.where(v == g, (b - r) / safe_c + 2.0, (r - g) / safe_c + 4.0))
    h = np.where(c > 0, h / 6.0, 0.0)
    return np.stack([h, s, v], axis=-1).astype(np.float32)


def saturation(image: np.ndarray) -> np.ndarray:
    """HSV saturation of a ``uint8[..., 3]`` RGB image, float32 in [0, 1]: the channel of
    :func:`rgb_to_hsv` by the same float32 operations (bitwise equal), without its hue."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    # x / 255 is monotonic in float32, so the max (min) of the scaled channels is the
    # scaled max (min) of the uint8 channels: the same floats, from one channel each
    v = np.maximum(np.maximum(r, g), b).astype(np.float32)
    v /= 255.0
    low = np.minimum(np.minimum(r, g), b).astype(np.float32)
    low /= 255.0
    c = v - low
    return np.where(v > 0, c / np.maximum(v, 1e-12), 0.0).astype(np.float32)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any shape): maximises between-class variance.

    Returns the value ``t`` such that ``values > t`` is the upper class.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        return 0.0
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centers)
    mu0 = m / np.maximum(w0, 1)
    mu1 = (m[-1] - m) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centers[int(np.argmax(between[:-1]))])


def disk(radius: int) -> np.ndarray:
    """Boolean disk structuring element of ``radius`` pixels."""
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return (x * x + y * y) <= radius * radius


def remove_small_objects(mask: np.ndarray, min_size: int) -> np.ndarray:
    """``mask`` without 8-connected components of fewer than ``min_size`` pixels."""
    if min_size <= 1 or not mask.any():
        return mask
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def tissue_mask(
    thumbnail: np.ndarray,
    *,
    min_saturation: float = MIN_SATURATION,
    close_radius: int = 2,
    open_radius: int = 2,
    min_object_fraction: float = 1e-3,
    fill_holes: bool = True,
) -> np.ndarray:
    """Boolean tissue mask ``bool[h, w]`` of an RGB ``uint8[h, w, 3]`` thumbnail.

    Args:
        min_saturation: floor (0-255) on the Otsu threshold of the saturation.
        close_radius, open_radius: disk radii (thumbnail pixels) of the closing and opening.
        min_object_fraction: components smaller than this fraction of the thumbnail's area
            are removed (dust, debris).
        fill_holes: fill holes enclosed by tissue (fat, lumens) so they are tiled too.
    """
    if thumbnail.ndim != 3 or thumbnail.shape[2] < 3:
        raise ValueError(f"expected an RGB image [h, w, 3], got shape {thumbnail.shape}")
    sat = saturation(thumbnail[..., :3]) * 255.0
    threshold = max(otsu_threshold(sat), float(min_saturation))
    mask = sat > threshold
    if close_radius > 0:
        mask = ndimage.binary_closing(mask, structure=disk(close_radius), border_value=0)
    if open_radius > 0:
        mask = ndimage.binary_opening(mask, structure=disk(open_radius))
    if fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    min_size = int(min_object_fraction * mask.size)
    return remove_small_objects(mask, min_size)
