"""Patch encoders: image patches ``uint8[n, P, P, 3]`` to features ``float32[n, D]``.

A registry maps names to encoders. ``color-texture`` is a fixed, data-independent
hand-crafted encoder (colour, stain and texture statistics): it needs no weights, so the
project runs where nothing can be downloaded. Learned encoders join this registry later.
Encoders never normalise with statistics of the data: that would be an unaccounted
use of private data outside DP-SGD.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from common.errors import UnknownModelError

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, residual) in OD space.
_RGB_FROM_HED = np.array(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float32
)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True))

Encoder = Callable[[np.ndarray], np.ndarray]


def color_texture(patches: np.ndarray) -> np.ndarray:
    """21 colour, stain and texture statistics per patch."""
    x = patches.astype(np.float32) / 255.0
    n = x.shape[0]
    flat = x.reshape(n, -1, 3)
    od = -np.log(np.clip(flat, 1.0 / 255.0, 1.0))
    hed = od @ _HED_FROM_RGB
    h, e = hed[..., 0], hed[..., 1]
    gray = x.mean(axis=-1)
    gy, gx = np.gradient(gray, axis=(1, 2))
    grad = np.sqrt(gx**2 + gy**2).reshape(n, -1)
    feats = [
        flat.mean(1), flat.std(1),                       # 6: colour
        od.mean(1), od.std(1),                           # 6: optical density
        h.mean(1, keepdims=True), h.std(1, keepdims=True),
        np.percentile(h, 90, axis=1)[:, None],           # 3: haematoxylin (nuclei)
        e.mean(1, keepdims=True), e.std(1, keepdims=True),  # 2: eosin (stroma)
        grad.mean(1, keepdims=True) * 10, grad.std(1, keepdims=True) * 10,  # 2: texture
        (h > 0.5).mean(1, keepdims=True),                # 1: dense-nuclei fraction
        (gray.reshape(n, -1) < 0.5).mean(1, keepdims=True),             # 1: dark fraction
    ]
    return np.concatenate(feats, axis=1).astype(np.float32)


ENCODERS: dict[str, Encoder] = {"color-texture": color_texture}


def get_encoder(name: str) -> Encoder:
    """The registered encoder ``name``."""
    try:
        return ENCODERS[name]
    except KeyError:
        raise UnknownModelError(
            f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))}"
        ) from None
