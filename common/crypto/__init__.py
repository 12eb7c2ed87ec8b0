"""Cryptography PathFed adds around Flower: secure-aggregation mask expansion.

Everything here uses the ``cryptography`` package; nothing is hand-rolled.
"""

from common.crypto.masks import MASK_GENERATOR, expand_masks, mask_round

__all__ = ["MASK_GENERATOR", "expand_masks", "mask_round"]
