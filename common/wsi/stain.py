"""Stain handling: Macenko normalisation and HED colour augmentation.

Macenko et al. (ISBI 2009): in optical density (OD) space, H&E pixels lie in the plane of
the two stain vectors. The plane is found by SVD of the tissue pixels' OD; the stain
vectors are the robust extreme angles (1st/99th percentiles) within it. Normalising an image
re-expresses its stain concentrations, scaled to the reference's 99th percentile, with the
reference's stain vectors.

HED augmentation (Tellez et al. 2018): scale and shift each channel of the
haematoxylin-eosin-DAB decomposition by random factors, a realistic model of stain
variation between hospitals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from common.errors import DataError

if TYPE_CHECKING:
    import torch

IO = 255.0
"""Transmitted light intensity (white)."""

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in OD space.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def to_od(image: np.ndarray) -> np.ndarray:
    """Optical density ``-log(I / I0)`` of a ``uint8[..., 3]`` image (float64)."""
    return -np.log((image.astype(np.float64) + 1.0) / IO)


def from_od(od: np.ndarray) -> np.ndarray:
    """``uint8`` image of an optical density array."""
    return np.clip(IO * np.exp(-od) - 1.0, 0, 255).round().astype(np.uint8)


class MacenkoNormalizer:
    """Macenko stain normalisation to a reference image.

    >>> norm = MacenkoNormalizer().fit(reference)      # doctest: +SKIP
    >>> out = norm.transform(image)                     # doctest: +SKIP

    Args:
        beta: OD below which a pixel is background and ignored.
        alpha: percentile of the angle distribution taken as the extreme stain direction.
        min_pixels: fewer tissue pixels than this and an image is left unchanged.
    """

    def __init__(self, beta: float = 0.15, alpha: float = 1.0, min_pixels: int = 100) -> None:
        self.beta, self.alpha, self.min_pixels = beta, alpha, min_pixels
        self.stain_matrix: np.ndarray | None = None
        """``float64[2, 3]`` reference stain vectors (rows: H, E) after :meth:`fit`."""
        self.max_concentrations: np.ndarray | None = None
        """``float64[2]`` reference 99th-percentile concentrations after :meth:`fit`."""

    def stains(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """``(stain_matrix[2, 3], concentrations[n, 2])``; None if too little tissue."""
        od = to_od(image[..., :3]).reshape(-1, 3)
        tissue = od[(od > self.beta).all(axis=1)]
        if len(tissue) < self.min_pixels:
            return None
        # The two main directions of tissue OD span the stain plane.
        _, eigvecs = np.linalg.eigh(np.cov(tissue.T))
        plane = eigvecs[:, 1:3]
        plane = plane * np.where(plane[0] < 0, -1.0, 1.0)  # OD is positive: orient the axes
        proj = tissue @ plane
        phi = np.arctan2(proj[:, 1], proj[:, 0])
        lo, hi = np.percentile(phi, [self.alpha, 100 - self.alpha])
        v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
        v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
        # Haematoxylin absorbs more red than eosin does: it comes first.
        he = np.array([v1, v2]) if v1[0] > v2[0] else np.array([v2, v1])
        he = he / np.linalg.norm(he, axis=1, keepdims=True)
        conc, *_ = np.linalg.lstsq(he.T, od.T, rcond=None)
        return he, conc.T

    def fit(self, reference: np.ndarray) -> MacenkoNormalizer:
        """Learn the reference stain vectors and maximum concentrations; returns ``self``."""
        found = self.stains(reference)
        if found is None:
            raise DataError(f"stain reference has fewer than {self.min_pixels} tissue pixels; "
                            "choose a reference image with more tissue")
        self.stain_matrix, conc = found
        self.max_concentrations = np.percentile(conc, 99, axis=0)
        return self

    def transform(self, image: np.ndarray) -> np.ndarray:
        """``image`` (``uint8[h, w, 3]``) with the reference's stain colours.

        Background-only images (too few tissue pixels) are returned unchanged.
        """
        if self.stain_matrix is None or self.max_concentrations is None:
            raise RuntimeError("MacenkoNormalizer.transform called before fit")
        found = self.stains(image)
        if found is None:
            return image[..., :3].copy()
        _, conc = found
        max_c = np.maximum(np.percentile(conc, 99, axis=0), 1e-6)
        conc = conc * (self.max_concentrations / max_c)
        od = conc @ self.stain_matrix
        return from_od(od).reshape(image.shape[:-1] + (3,))


def hed_augment(images: np.ndarray, rng: np.random.Generator, scale: float = 0.05,
                shift: float = 0.05) -> np.ndarray:
    """Random stain variation of ``uint8[..., H, W, 3]`` images (one draw per image).

    Each HED channel ``c`` becomes ``c * a + b`` with ``a ~ U(1 - scale, 1 + scale)`` and
    ``b ~ U(-shift, shift)``. Returns ``uint8`` of the same shape.
    """
    if images.dtype != np.uint8 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8[..., 3] images, got {images.dtype}{list(images.shape)}")
    batch = images.reshape((-1,) + images.shape[-3:])
    n = batch.shape[0]
    a = rng.uniform(1 - scale, 1 + scale, (n, 1, 1, 3))
    b = rng.uniform(-shift, shift, (n, 1, 1, 3))
    hed = to_od(batch) @ HED_FROM_RGB
    od = (hed * a + b) @ RGB_FROM_HED
    return from_od(od).reshape(images.shape)


def hed_augment_tensor(images: torch.Tensor, rng: np.random.Generator, scale: float = 0.05,
                       shift: float = 0.05) -> torch.Tensor:
    """:func:`hed_augment` for a float tensor ``[B, 3, H, W]`` in [0, 1] (same device)."""
    import torch

    x = images
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError("expected a torch tensor [B, 3, H, W] in [0, 1]")
    n = x.shape[0]
    a = torch.as_tensor(rng.uniform(1 - scale, 1 + scale, (n, 3, 1, 1)), dtype=x.dtype,
                        device=x.device)
    b = torch.as_tensor(rng.uniform(-shift, shift, (n, 3, 1, 1)), dtype=x.dtype, device=x.device)
    to_hed = torch.as_tensor(HED_FROM_RGB, dtype=x.dtype, device=x.device)
    to_rgb = torch.as_tensor(RGB_FROM_HED, dtype=x.dtype, device=x.device)
    od = -torch.log((x * 255.0 + 1.0) / IO)
    hed = torch.einsum("bchw,cd->bdhw", od, to_hed)
    od = torch.einsum("bchw,cd->bdhw", hed * a + b, to_rgb)
    return ((IO * torch.exp(-od) - 1.0) / 255.0).clamp(0.0, 1.0)


# --- Stain normalisation in prepare ------------------------------------------------------

MACENKO_REFERENCE = (np.array([[0.5626, 0.7201, 0.4062], [0.2159, 0.8012, 0.5581]]),
                     np.array([1.9705, 1.0308]))
"""Stain vectors (rows: H, E; optical density) and 99th-percentile concentrations of the
reference in Macenko et al.'s reference implementation: the default target of the common
Macenko normalisers (StainTools, torchstain: ``HERef``, ``maxCRef``)."""

METHODS = ("none", "macenko", "reinhard")


def reference_tile(size: int = 256, seed: int = 0) -> np.ndarray:
    """PathFed's default stain target, ``uint8[size, size, 3]``: tissue rendered from
    :data:`MACENKO_REFERENCE`'s stains (each pixel a random mix of haematoxylin and eosin up
    to the reference concentrations, a fifth of it background), so that both methods
    normalise towards the same published reference, and no image need ship."""
    rng = np.random.default_rng(seed)
    he, max_c = MACENKO_REFERENCE
    conc = rng.uniform(0.0, 1.0, (size * size, 2)) ** 2 * max_c
    conc[rng.random(size * size) < 0.2] = 0.01  # background
    return from_od(conc @ he).reshape(size, size, 3)


_LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782],
                 [0.0241, 0.1288, 0.8444]])
_LAB = (np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)])
        @ np.array([[1.0, 1.0, 1.0], [1.0, 1.0, -2.0], [1.0, -1.0, 0.0]]))


def _to_lab(image: np.ndarray) -> np.ndarray:
    """Reinhard et al.'s l-alpha-beta of ``uint8[..., 3]`` (log LMS, decorrelated)."""
    rgb = np.maximum(image[..., :3].astype(np.float64), 1.0)
    return np.log10(rgb @ _LMS.T) @ _LAB.T


def _from_lab(lab: np.ndarray) -> np.ndarray:
    rgb = (10.0 ** (lab @ np.linalg.inv(_LAB).T)) @ np.linalg.inv(_LMS).T
    return np.clip(rgb, 0, 255).round().astype(np.uint8)


class ReinhardNormalizer:
    """Reinhard et al. (2001) colour transfer: each l-alpha-beta channel's mean and sd
    matched to the target's."""

    def __init__(self) -> None:
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def fit(self, reference: np.ndarray) -> ReinhardNormalizer:
        lab = _to_lab(reference).reshape(-1, 3)
        self.mean, self.std = lab.mean(0), np.maximum(lab.std(0), 1e-6)
        return self

    def transform(self, image: np.ndarray) -> np.ndarray:
        if self.mean is None or self.std is None:
            raise RuntimeError("ReinhardNormalizer.transform called before fit")
        lab = _to_lab(image)
        flat = lab.reshape(-1, 3)
        mean, std = flat.mean(0), np.maximum(flat.std(0), 1e-6)
        return _from_lab((lab - mean) / std * self.std + self.mean)


class StainNormalizer:
    """A batch of patches to one stain target: ``normalizer(uint8[n, P, P, 3])``.

    Args:
        method: ``macenko``, ``reinhard`` or ``none``.
        target: an image file to normalise to; None for :func:`reference_tile`.
    """

    def __init__(self, method: str, target: str | None = None) -> None:
        if method not in METHODS:
            raise DataError(f"stain normalisation {method!r}: one of {', '.join(METHODS)}")
        self.method = method
        self.target = target
        self.key = "none"
        """What the settings record: ``method:target`` (``default`` or the target file's
        SHA-256, 12 digits)."""
        if method == "none":
            self._norm: MacenkoNormalizer | ReinhardNormalizer | None = None
            return
        if target is None:
            image, which = reference_tile(), "default"
        else:
            import hashlib

            from PIL import Image, UnidentifiedImageError

            try:
                data = open(target, "rb").read()
                with Image.open(target) as im:
                    image = np.asarray(im.convert("RGB"))
            except (OSError, UnidentifiedImageError) as err:
                raise DataError(f"--stain-target {target}: cannot read the image ({err})"
                                ) from None
            which = hashlib.sha256(data).hexdigest()[:12]
        norm = MacenkoNormalizer() if method == "macenko" else ReinhardNormalizer()
        self._norm = norm.fit(image)
        self.key = f"{method}:{which}"

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        if self._norm is None:
            return patches
        return np.stack([self._norm.transform(p) for p in patches]) if len(patches) else patches
