"""Folders of labelled images (e.g. the UCSB breast set) as MIL bags.

A folder holds images and ``labels.csv`` with columns ``image,label[,tma_group]``. Each
image is cut into square patches; patches that are mostly background (>= 75 % white
pixels, as in Ilse et al. 2018) are dropped; each remaining patch is embedded by an
encoder from :mod:`common.features`. Hospitals are formed from whole ``tma_group`` values
(images of one group share staining and scanning), balanced by image count.

Multi-scale bags (for a model of kind ``multiscale``): each block of
:data:`CONTEXT_FACTOR` x :data:`CONTEXT_FACTOR` patches that holds a kept patch is also
seen whole at 1/:data:`CONTEXT_FACTOR` the resolution (a lower magnification), embedded
by the same encoder, and each kept patch is that region's child
(:mod:`common.data.multiscale`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.data.bags import SiteData, split_bags
from common.data.labels import LABELS as LABELS_FILE
from common.data.labels import assign_sites, read_label_rows
from common.data.multiscale import pack_regions
from common.errors import DataError, SlideReadError
from common.features import get_encoder

log = logging.getLogger(__name__)

__all__ = ["CONTEXT_FACTOR", "LabelledImage", "annotated_patches", "assign_sites",
           "embed_images",
           "image_folder_site", "read_image", "read_labels", "tissue_grid", "tissue_patches",
           "tissue_regions", "tumour_labels"]
WHITE_LEVEL = 200
MAX_WHITE_FRACTION = 0.75
CONTEXT_FACTOR = 4
"""Side of a multi-scale region in patches: regions are seen at a quarter of the image's
resolution (0.5 um/px patches under 2 um/px regions) and hold up to 16 patches."""


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: int
    group: str
    patient: str | None = None
    mask: Path | None = None
    """Annotation: an image of the same size, nonzero where there is tumour."""


def read_labels(folder: Path) -> list[LabelledImage]:
    """Read and check ``folder/labels.csv`` (``image,label[,tma_group][,patient][,mask]``,
    see :func:`common.data.labels.read_label_rows`); raise :class:`DataError` naming the
    problem. With a ``patient`` column the privacy unit becomes the patient."""
    if not folder.is_dir():
        raise DataError(f"{folder}: data folder not found (give a folder holding {LABELS_FILE})")
    rows = read_label_rows(folder / LABELS_FILE, ("image",))
    return [LabelledImage(folder / r.name, r.label, r.group, r.patient,
                          folder / r.mask if r.mask else None) for r in rows]


def read_image(path: Path) -> np.ndarray:
    """RGB ``uint8[H, W, 3]``; raise :class:`SlideReadError` naming the file."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise SlideReadError(f"{path}: image listed in {LABELS_FILE} not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise SlideReadError(f"{path}: cannot read image ({err})") from None


def _grid(image: np.ndarray, patch_size: int) -> np.ndarray:
    """Non-overlapping patches ``[n, P, P, ...]`` in row-major grid order."""
    h, w = image.shape[0] // patch_size, image.shape[1] // patch_size
    grid = image[: h * patch_size, : w * patch_size]
    grid = grid.reshape(h, patch_size, w, patch_size, *image.shape[2:])
    return grid.swapaxes(1, 2).reshape(h * w, patch_size, patch_size, *image.shape[2:])


def tissue_patches(image: np.ndarray, patch_size: int,
                   mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Non-overlapping patches ``uint8[n, P, P, 3]`` that are not mostly background, and,
    with an annotation ``mask``, each patch's label (tumour on half its pixels or more)."""
    patches, pixels = annotated_patches(image, patch_size, mask)
    return patches, None if pixels is None else tumour_labels(pixels)


def tumour_labels(pixels: np.ndarray) -> np.ndarray:
    """``int64[n]``: 1 for the patches (``pixels[n, P, P]`` in {0, 1}) that are tumour on
    half their pixels or more."""
    return (pixels.mean(axis=(1, 2)) >= 0.5).astype(np.int64)


def annotated_patches(image: np.ndarray, patch_size: int, mask: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray | None]:
    """The tissue patches of :func:`tissue_patches` and, with an annotation ``mask`` (an
    image of the same size, nonzero on tumour), each patch's own piece of it as
    ``uint8[n, P, P]`` in {0, 1} (a segmentation model's target)."""
    patches = _grid(image, patch_size)
    keep = _tissue_keep(patches)
    if mask is None:
        return patches[keep], None
    if mask.shape[:2] != image.shape[:2]:
        raise ValueError(f"mask is {mask.shape[1]}x{mask.shape[0]} px, image "
                         f"{image.shape[1]}x{image.shape[0]} px")
    return patches[keep], _grid((mask > 0).astype(np.uint8), patch_size)[keep]


def tissue_grid(image: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The tissue patches of :func:`tissue_patches` and each one's top-left pixel
    ``int64[n, 2]`` as ``(x, y)``."""
    patches = _grid(image, patch_size)
    keep = np.flatnonzero(_tissue_keep(patches))
    rows, cols = np.divmod(keep, image.shape[1] // patch_size)
    return patches[keep], np.stack([cols, rows], axis=1).astype(np.int64) * patch_size


def _tissue_keep(patches: np.ndarray) -> np.ndarray:
    return np.asarray((patches.min(axis=-1) > WHITE_LEVEL).mean(axis=(1, 2))
                      < MAX_WHITE_FRACTION)


def tissue_regions(image: np.ndarray, patch_size: int, factor: int = CONTEXT_FACTOR
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(regions uint8[m, P, P, 3], patches uint8[n, P, P, 3], parent int64[n])``: the
    tissue patches of :func:`tissue_patches`, and each block of ``factor`` x ``factor``
    patches holding one of them, downsampled to ``P`` px (white beyond the image)."""
    patches, coords = tissue_grid(image, patch_size)
    side = factor * patch_size
    cells, parent = np.unique(coords[:, ::-1] // side, axis=0, return_inverse=True)
    regions = np.empty((len(cells), patch_size, patch_size, 3), dtype=np.uint8)
    for i, (cy, cx) in enumerate(cells):
        block = np.full((side, side, 3), 255, dtype=np.uint8)
        crop = image[cy * side:(cy + 1) * side, cx * side:(cx + 1) * side, :3]
        block[:crop.shape[0], :crop.shape[1]] = crop
        regions[i] = np.asarray(Image.fromarray(block).resize((patch_size, patch_size),
                                                               Image.Resampling.BOX))
    return regions, patches, parent.reshape(-1).astype(np.int64)


def _stain_then(stain: str, encode: Callable[[np.ndarray], np.ndarray]
                ) -> Callable[[np.ndarray], np.ndarray]:
    if stain == "none":
        return encode
    from common.wsi.stain import StainNormalizer

    normalise = StainNormalizer(stain)
    return lambda patches: encode(normalise(patches))


def _read_mask(item: LabelledImage) -> np.ndarray | None:
    if item.mask is None:
        return None
    try:
        with Image.open(item.mask) as im:
            return np.asarray(im.convert("L"))
    except (FileNotFoundError, UnidentifiedImageError, OSError) as err:
        raise SlideReadError(f"{item.mask}: cannot read the annotation mask of "
                             f"{item.path.name} ({err})") from None


def embed_images(
    items: list[LabelledImage], patch_size: int, encoder: str | None,
    multiscale: bool = False, stain: str = "none",
) -> tuple[list[np.ndarray], list[LabelledImage], list[np.ndarray | None]]:
    """Bags of patch features (or of the patches themselves when ``encoder`` is None),
    with per-patch labels where the image has an annotation mask; unreadable or empty
    images are skipped with a warning. With ``multiscale``, bags of regions
    (:func:`tissue_regions`, :func:`common.data.multiscale.pack_regions`), unannotated.
    ``stain`` (``macenko``, ``reinhard``) normalises every patch first, to PathFed's
    reference tile (:class:`common.wsi.stain.StainNormalizer`). Without an encoder the
    annotations are each patch's piece of the mask (``uint8[n, P, P]``, for a segmentation
    model; :func:`tumour_labels` gives their labels), else the patch labels."""
    if multiscale and not encoder:
        raise ValueError("multi-scale bags are bags of features: give an encoder")
    encode = _stain_then(stain, get_encoder(encoder) if encoder else (lambda patches: patches))
    bags: list[np.ndarray] = []
    kept: list[LabelledImage] = []
    patch_labels: list[np.ndarray | None] = []
    for item in items:
        if multiscale:
            try:
                regions, patches, parent = tissue_regions(read_image(item.path), patch_size)
            except SlideReadError as err:
                log.warning("%s; skipped", err)
                continue
            if len(patches) == 0:
                log.warning("%s: no tissue patch of %d px; skipped", item.path, patch_size)
                continue
            bags.append(pack_regions(encode(regions), encode(patches), parent,
                                     CONTEXT_FACTOR ** 2))
            kept.append(item)
            patch_labels.append(None)
            continue
        try:
            patches, tumour = (tissue_patches if encoder else annotated_patches)(
                read_image(item.path), patch_size, _read_mask(item))
        except SlideReadError as err:
            log.warning("%s; skipped", err)
            continue
        except ValueError as err:
            log.warning("%s: %s; skipped", item.mask, err)
            continue
        if len(patches) == 0:
            log.warning("%s: no tissue patch of %d px; skipped", item.path, patch_size)
            continue
        bags.append(encode(patches))
        kept.append(item)
        patch_labels.append(tumour)
    return bags, kept, patch_labels


def image_folder_site(
    folder: Path, index: int, n_sites: int, seed: int = 0, val_fraction: float = 0.3,
    patch_size: int = 32, encoder: str | None = "color-texture", multiscale: bool = False,
    stain: str = "none",
) -> SiteData:
    """Site ``index`` of a folder split into ``n_sites`` hospitals by ``tma_group``.

    With ``encoder=None`` the bags hold the tissue patches themselves (``uint8[N, P, P, 3]``),
    for training a patch model; with ``multiscale``, regions (see :func:`embed_images`).
    """
    items = assign_sites(read_labels(folder), n_sites)[index]
    bags, kept, patch_labels = embed_images(items, patch_size, encoder, multiscale, stain)
    if not bags:
        raise DataError(f"{folder}: site-{index} has no readable image with tissue")
    labels = np.array([item.label for item in kept], dtype=np.int64)
    names = [item.path.name for item in kept]
    patients = ([str(item.patient) for item in kept]
                if all(item.patient for item in kept) else None)
    annotated = all(lab is not None for lab in patch_labels)
    if not annotated and any(lab is not None for lab in patch_labels):
        log.warning("%s: only some images of site-%d have an annotation mask; training on "
                    "slide labels for all", folder, index)
    pixels = [a for a in patch_labels if a is not None] if annotated and not encoder else None
    if pixels is not None:  # the patches themselves: their masks, and labels from them
        patch_labels = [tumour_labels(a) for a in pixels]
    return split_bags(f"site-{index}", bags, labels, names, val_fraction, seed + index,
                      patients, patch_labels if annotated else None,  # type: ignore[arg-type]
                      children=CONTEXT_FACTOR ** 2 if multiscale else 0,
                      instance_masks=pixels)
