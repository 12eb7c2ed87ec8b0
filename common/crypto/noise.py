"""Gaussian noise for DP-SGD from a cryptographically secure generator.

Opacus' ``secure_mode`` needs ``torchcsprng``, which no longer builds for current torch.
:class:`SecureGaussian` is its equivalent: the random bits are a ChaCha20 keystream
(``cryptography``) under a 256-bit key from ``os.urandom`` (a fresh key per generator, a
64-bit block counter per draw), turned into normals by Box-Muller over 53-bit uniforms,
and, as Opacus' ``secure_mode`` does against floating-point attacks (Holohan et al. 2021),
each value is the sum of four normals scaled by 1/2.
"""

from __future__ import annotations

import math
import os
import struct

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

NOISE_SOURCE = "csprng: ChaCha20 keyed from os.urandom, Box-Muller, sum of 4 normals / 2"


class SecureGaussian:
    """Independent ``N(0, std^2)`` draws from a ChaCha20 keystream keyed by the OS."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else os.urandom(32)
        if len(self._key) != 32:
            raise ValueError("SecureGaussian needs a 32-byte key")
        self._draw = 0

    def _uint64(self, count: int) -> np.ndarray:
        nonce = struct.pack("<IQI", 0, self._draw, 0)  # 32-bit block counter, draw number
        self._draw += 1
        encryptor = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        words = np.zeros(count, dtype="<u8")
        if count:
            view = memoryview(words).cast("B")  # type: ignore[arg-type]
            encryptor.update_into(view, view)
        return words

    def _standard_normal(self, count: int) -> np.ndarray:
        pairs = (count + 1) // 2
        bits = self._uint64(2 * pairs) >> np.uint64(11)  # 53 random bits each
        u = (bits.astype(np.float64) + 0.5) * 2.0**-53  # in (0, 1), never 0
        u1, u2 = u[:pairs], u[pairs:]
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * math.pi * u2
        return np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:count]

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        """``float64`` noise of ``shape`` with standard deviation ``std``."""
        count = math.prod(shape)
        total = np.zeros(count)
        for _ in range(4):
            total += self._standard_normal(count)
        return (0.5 * std * total).reshape(shape)
