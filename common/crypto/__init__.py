"""Cryptography PathFed adds around Flower: secure-aggregation mask expansion.

Everything here uses the ``cryptography`` package; nothing is hand-rolled.
"""

from common.crypto.masks import (
    MASK_GENERATOR,
    MASKS_ENV,
    expand_masks,
    install_generator,
    mask_round,
    use_stock_masks,
)

__all__ = ["MASKS_ENV", "MASK_GENERATOR", "expand_masks", "install_generator", "mask_round",
           "use_stock_masks"]
