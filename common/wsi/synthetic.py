"""Synthetic pyramidal slides: tiled, multi-resolution TIFFs that OpenSlide opens.

Pink, eosin-like tissue blobs with purple, haematoxylin-like nuclei on a white background,
deterministic from a seed. Written with tifffile as deflate-compressed 256-px tiles, one
page per pyramid level (OpenSlide's ``generic-tiff``), with resolution tags so that OpenSlide
reports the microns per pixel. ``vendor="aperio"`` writes an Aperio-style description
instead (objective power and, optionally, MPP), to exercise the objective-power fallback.
Used by tests, benchmarks and the demo; the project never needs downloaded slides.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from scipy import ndimage

BACKGROUND = np.array([242, 240, 244], dtype=np.float32)
EOSIN = np.array([232, 150, 190], dtype=np.float32)
HAEMATOXYLIN = np.array([95, 60, 150], dtype=np.float32)


def synthetic_tissue(width: int, height: int, seed: int = 0, tissue_fraction: float = 0.4,
                     nuclei_per_mpx: int = 4000) -> np.ndarray:
    """RGB ``uint8[height, width, 3]`` tissue-like image, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((max(2, height // 64), max(2, width // 64)))
    coarse = ndimage.gaussian_filter(coarse, sigma=1.5, mode="wrap")
    field = np.asarray(
        Image.fromarray(coarse.astype(np.float32)).resize((width, height),
                                                          Image.Resampling.BILINEAR)
    )
    tissue = field > np.quantile(field, 1.0 - tissue_fraction)
    texture = ndimage.gaussian_filter(
        rng.standard_normal((height, width), dtype=np.float32), 2.0
    )
    strength = np.clip(0.75 + 3.0 * texture, 0.3, 1.0)[..., None]
    img = np.where(tissue[..., None], BACKGROUND + (EOSIN - BACKGROUND) * strength, BACKGROUND)
    n_nuclei = int(nuclei_per_mpx * width * height / 1e6)
    ys, xs = rng.integers(0, height, n_nuclei), rng.integers(0, width, n_nuclei)
    inside = tissue[ys, xs]
    ys, xs = ys[inside], xs[inside]
    nuclei = np.zeros((height, width), dtype=bool)
    for dy in range(-4, 5):  # stamp a disk of radius 4 around every centre
        for dx in range(-4, 5):
            if dx * dx + dy * dy <= 16:
                nuclei[np.clip(ys + dy, 0, height - 1), np.clip(xs + dx, 0, width - 1)] = True
    shade = rng.standard_normal((height, width, 1), dtype=np.float32) * 8
    img = np.where(nuclei[..., None], HAEMATOXYLIN + shade, img).astype(np.float32)
    img = ndimage.gaussian_filter(img, sigma=(0.7, 0.7, 0))
    img += rng.standard_normal(img.shape, dtype=np.float32) * 3
    return np.clip(img, 0, 255).astype(np.uint8)


def pyramid(image: np.ndarray, min_size: int = 256) -> list[np.ndarray]:
    """Levels of ``image`` halved (area-averaged) until the longer side is below ``min_size``*2."""
    levels = [image]
    while max(levels[-1].shape[:2]) // 2 >= min_size:
        h, w = levels[-1].shape[:2]
        levels.append(np.asarray(
            Image.fromarray(levels[-1]).resize((w // 2, h // 2), Image.Resampling.BOX)
        ))
    return levels


def write_pyramid_tiff(
    path: str | Path,
    image: np.ndarray,
    mpp: float | None = 0.5,
    *,
    vendor: Literal["generic", "aperio"] = "generic",
    objective: float | None = None,
    tile: int = 256,
    min_level_size: int = 256,
) -> Path:
    """Write ``image`` as a tiled pyramidal TIFF (atomically) and return its path.

    ``vendor="generic"`` stores ``mpp`` in the resolution tags (none when ``mpp`` is None);
    ``vendor="aperio"`` stores ``AppMag`` (``objective``) and ``MPP`` in an Aperio
    ImageDescription, as scanners do.
    """
    import tifffile

    path = Path(path)
    levels = pyramid(image, min_level_size)
    h0, w0 = image.shape[:2]
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tif.tmp")
    os.close(fd)
    try:
        with tifffile.TiffWriter(tmp) as tw:
            for i, level in enumerate(levels):
                h, w = level.shape[:2]
                opts: dict[str, object] = dict(tile=(tile, tile), compression="zlib",
                                               compressionargs={"level": 1},
                                               photometric="rgb", metadata=None)
                if vendor == "aperio":
                    fields = [f"AppMag = {objective:g}"] if objective else []
                    fields += [f"MPP = {mpp:.4f}"] if mpp else []
                    head = f"Aperio Image Library v10.0.0\r\n{w0}x{h0} "
                    opts["description"] = (
                        head + f"[0,0 {w0}x{h0}] ({tile}x{tile}) -|" + "|".join(fields)
                        if i == 0 else head + f"-> {w}x{h}"
                    )
                else:
                    opts["subfiletype"] = 1 if i else 0
                    if mpp:
                        res = 1e4 / (mpp * (w0 / w))
                        opts["resolution"] = (res, res)
                        opts["resolutionunit"] = "CENTIMETER"
                tw.write(level, **opts)  # type: ignore[arg-type]
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def synthetic_slide(path: str | Path, width: int = 2048, height: int = 1536, seed: int = 0,
                    mpp: float | None = 0.5, **kwargs: object) -> Path:
    """A synthetic tissue slide written to ``path`` (see :func:`write_pyramid_tiff`)."""
    image = synthetic_tissue(width, height, seed)
    return write_pyramid_tiff(path, image, mpp, **kwargs)  # type: ignore[arg-type]


def synthetic_tumour_slide(width: int, height: int, seed: int,
                           tumour: bool) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic slide and its annotation mask; with ``tumour``, a focus of densely
    packed nuclei (about 5 % of the slide) inside the tissue, a small positive region
    among negatives, as a MIL task needs."""
    image = synthetic_tissue(width, height, seed)
    mask = np.zeros((height, width), dtype=np.uint8)
    if tumour:
        rng = np.random.default_rng([seed, 7])
        dense = synthetic_tissue(width, height, seed + 10_000, tissue_fraction=1.0,
                                 nuclei_per_mpx=40_000)
        tissue = (image.astype(np.int16).sum(-1) < 3 * 225)
        ys, xs = np.nonzero(tissue)
        i = rng.integers(len(ys)) if len(ys) else 0
        cy, cx = (ys[i], xs[i]) if len(ys) else (height // 2, width // 2)
        r = int(np.sqrt(0.05 * width * height / np.pi))
        yy, xx = np.ogrid[:height, :width]
        focus = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)
        image = np.where(focus[..., None], dense, image)
        mask[focus] = 255
    return image, mask
