"""Cryptography PathFed adds around Flower: secure-aggregation mask expansion, and the
choice of SecAgg+ shares.

Everything here uses the ``cryptography`` package; nothing is hand-rolled.
"""

from common.crypto.masks import (
    MASK_GENERATOR,
    MASKS_ENV,
    add_masks,
    expand_masks,
    install_generator,
    mask_round,
    subtract_masks,
    use_stock_masks,
)
from common.crypto.shares import ShareChoice, choose_shares

__all__ = ["MASKS_ENV", "MASK_GENERATOR", "ShareChoice", "add_masks", "choose_shares",
           "expand_masks", "install_generator", "mask_round", "subtract_masks", "use_stock_masks"]
