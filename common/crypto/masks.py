"""Cryptographically secure expansion of SecAgg+ masks.

Flower 1.42's SecAgg+ expands every mask with ``numpy.random.RandomState`` seeded by the
256-bit key XOR-folded to 32 bits, so a pairwise mask can be found by trying 2**32 seeds,
and its ``randint(0, num_range - 1)`` never draws ``num_range - 1``. PathFed expands masks
with ChaCha20 instead: the key is HKDF-SHA256 of the *full* seed (a private mask seed or a
pairwise shared secret), the nonce binds the round and the array's position, and each
32-bit keystream word is reduced by a power-of-two modulus, so values are exactly uniform
over ``[0, num_range)``. Client and server call the same function, so masks still cancel.
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import struct
from collections.abc import Callable, Sequence
from types import ModuleType

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MASK_GENERATOR = "ChaCha20 (key: HKDF-SHA256 of the full shared secret; nonce: round, array index)"
_INFO = b"pathfed secagg+ mask v1"

MASKS_ENV = "PATHFED_SECAGG_MASKS"
"""Set to ``flower-stock`` to keep Flower's weak generator (benchmarks only)."""


def use_stock_masks() -> bool:
    """Whether this process was asked to keep Flower's stock generator (benchmarks)."""
    return os.environ.get(MASKS_ENV, "chacha20") == "flower-stock"


log = logging.getLogger(__name__)


def install_generator(module: ModuleType, stock: Callable[..., object],
                      check: Callable[[], None]) -> None:
    """Point ``module.pseudo_rand_gen`` (a Flower SecAgg+ module) at the chosen generator.

    ``check`` verifies Flower's internals first; ``stock`` is Flower's own function,
    kept only when :func:`use_stock_masks` (benchmarks).
    """
    if use_stock_masks():
        if getattr(module, "pseudo_rand_gen") is not stock:  # noqa: B009 (a module's attr)
            setattr(module, "pseudo_rand_gen", stock)  # noqa: B010
            log.warning("SecAgg+ masks: Flower's stock 32-bit-seeded generator (%s=flower-stock)"
                        " in %s; not for real data", MASKS_ENV, module.__name__)
        return
    if getattr(module, "pseudo_rand_gen") is not expand_masks:  # noqa: B009
        check()
        setattr(module, "pseudo_rand_gen", expand_masks)  # noqa: B010
        log.debug("SecAgg+ masks in %s: %s", module.__name__, MASK_GENERATOR)


mask_round: contextvars.ContextVar[int] = contextvars.ContextVar("pathfed_mask_round", default=0)
"""The federated round the masks belong to; set by the SecAgg+ seams around each stage."""


def _key(seed: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(seed)


def expand_masks(
    seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]],
    round_number: int | None = None,
) -> list[np.ndarray]:
    """Masks uniform over ``[0, num_range)`` (``uint32``), one per shape in ``dimensions_list``.

    Same signature as Flower's ``pseudo_rand_gen`` (plus the round, which defaults to
    :data:`mask_round`). Flower's are ``int64``; these are ``uint32``, which NumPy widens
    where Flower adds them to ``int64`` arrays, and which wrap modulo ``2**32`` when added
    to ``uint32`` ones: either way the masked values modulo ``num_range`` are Flower's.
    ``num_range`` must be a power of two, at most ``2**32`` (Flower's SecAgg+ already
    requires this of its modulus).
    """
    if num_range < 2 or num_range > 2**32 or num_range & (num_range - 1):
        raise ValueError(f"mask range must be a power of two in [2, 2**32], got {num_range}")
    rnd = mask_round.get() if round_number is None else round_number
    key = _key(bytes(seed))
    out = []
    for index, shape in enumerate(dimensions_list):
        count = math.prod(shape)
        # 16-byte ChaCha20 nonce: 32-bit block counter (0), then round and array index.
        nonce = struct.pack("<IQI", 0, rnd, index)
        encryptor = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
        words = np.zeros(count, dtype="<u4")
        if count:
            view = memoryview(words).cast("B")  # type: ignore[arg-type]
            encryptor.update_into(view, view)  # keystream XOR zeros, in place
        if num_range < 2**32:
            words &= np.uint32(num_range - 1)
        out.append(words.reshape(shape))
    return out


def add_masks(running: list[np.ndarray], masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``running + masks``, into ``running`` where it is ``uint32`` or ``int64``.

    Flower's ``parameters_addition`` allocates a new array per mask; SecAgg+ adds one mask
    per share holder to a running masked vector that nothing else holds, so the sum goes
    into it. ``uint32`` wraps modulo ``2**32`` and ``int64`` cannot overflow here (values
    below ``2**32``, at most a few thousand terms): either way the result modulo Flower's
    power-of-two modulus is Flower's. Other types get Flower's new arrays.
    """
    return [np.add(a, m, out=a, casting="unsafe") if _wraps(a) else a + m
            for a, m in zip(running, masks, strict=True)]


def subtract_masks(running: list[np.ndarray], masks: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``running - masks``, into ``running`` as :func:`add_masks` does."""
    return [np.subtract(a, m, out=a, casting="unsafe") if _wraps(a) else a - m
            for a, m in zip(running, masks, strict=True)]


def _wraps(array: np.ndarray) -> bool:
    return isinstance(array, np.ndarray) and array.flags.writeable and array.ndim > 0 and (
        array.dtype in (np.uint32, np.int64))
