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
