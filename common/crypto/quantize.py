"""SecAgg+'s arithmetic without its masks: Flower's stochastic quantiser, and the modular
sum the server unmasks, computed in one process.

:func:`quantize` is the quantiser PathFed's client seam (``client/secagg.py``) runs inside
Flower's SecAgg+ mod. :func:`secure_sum` is what the SecAgg+ workflow's unmasked result
is, value for value: each site's update weighted by ``n / max-weight`` (rounded as Flower
rounds it), quantised, plus its distributed-DP noise share, summed modulo ``2**32`` and
dequantised. The masks cancel in that sum, so the in-process runner
(:func:`common.fedavg.run_inprocess`) aggregates distributed-DP rounds with it, and the
tests compare it with Flower's own functions.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MODULUS = 2**32
"""SecAgg+'s modulus (Flower's largest; PathFed's masked vectors are ``uint32``)."""

SKELLAM_SOURCE = "ChaCha20 (randomgen.ChaCha, keyed from os.urandom): Poisson - Poisson"


@dataclass(frozen=True)
class NoiseShare:
    """What one site adds to its quantised vector in one round."""

    variance: float
    """Per-coordinate variance of this site's share (the plan's total over ``sites``)."""
    sites: int
    """The fewest sites whose shares the round's sum holds."""
    seed: int | None
    """Seeded draws (reproducible simulations); None draws from ChaCha20 keyed by the OS."""

    def draw(self, shapes: list[tuple[int, ...]]) -> list[np.ndarray]:
        """Skellam shares ``Poisson(v/2) - Poisson(v/2)`` of ``shapes``, as ``int64``."""
        rng = noise_rng(self.seed)
        lam = self.variance / 2
        return [(rng.poisson(lam, size=shape) - rng.poisson(lam, size=shape)).astype(np.int64)
                for shape in shapes]


def noise_rng(seed: int | None) -> np.random.Generator:
    """The generator of Skellam shares: ChaCha20 keyed from ``os.urandom`` (a CSPRNG), or
    NumPy's default generator from ``seed`` in reproducible simulations."""
    if seed is not None:
        return np.random.default_rng(seed)
    from randomgen import ChaCha

    return np.random.Generator(ChaCha(key=int.from_bytes(os.urandom(32), "little"),
                                      rounds=20))


pending_share: contextvars.ContextVar[NoiseShare | None] = contextvars.ContextVar(
    "pathfed_pending_noise_share", default=None)
"""The share the site's training of this message asks the SecAgg+ quantiser to add."""


def add_share(quantized: list[np.ndarray], share: NoiseShare) -> list[np.ndarray]:
    """``quantized + share`` modulo :data:`MODULUS`, as ``uint32`` (the masked vector's type)."""
    noise = share.draw([q.shape for q in quantized])
    return [((q.astype(np.int64) + n) % MODULUS).astype(np.uint32)
            for q, n in zip(quantized, noise)]


def quantize(parameters: list[np.ndarray], clipping_range: float,
             target_range: int) -> list[np.ndarray]:
    """Flower's stochastic quantiser, value for value, as ``uint32``.

    Flower's ``quantize`` maps ``clip(x, -c, c)`` onto ``[0, target_range]`` and rounds up
    or down with probability given by one ``np.random.rand`` draw per value (NumPy's
    global generator, which :func:`secaggplus_mod` seeds in deterministic simulations).
    This computes the same float32 expression and the same float64 comparison with the
    same draws, in place, and returns ``uint32`` (every value lies in
    ``[0, target_range]``, ``target_range <= 2**28``) instead of ``int32``: numbers equal,
    about half the time and memory for a 10M-parameter update.
    """
    quantizer = target_range / (2 * clipping_range)
    out = []
    for arr in parameters:
        # Flower: (np.clip(arr, -c, c) + c) * quantizer, in the array's own float type
        pre = np.clip(arr, -clipping_range, clipping_range)
        pre += clipping_range
        pre *= quantizer
        up = np.ceil(pre)
        ret = up.astype(np.uint32)
        rand = np.random.rand(*ret.shape)
        # Flower: ret[rand < ret - pre] -= 1, with ret - pre computed in float64; pre >= 0
        # and ret == 0 only where pre == 0, so nothing wraps below zero
        gap = np.subtract(up, pre, dtype=np.float64)
        ret -= np.less(rand, gap, out=np.empty(ret.shape, bool))
        out.append(ret)
    return out


def secure_sum(replies: Sequence[tuple[Sequence[np.ndarray], int, Any]], *,
               clipping_range: float, quantization_range: int,
               max_weight: float) -> list[np.ndarray]:
    """The weighted mean SecAgg+ unmasks from ``(update, n_samples, noise_share)`` replies
    (``noise_share`` None for none): Flower 1.42's client weighting and quantisation and
    its server's modular sum, dequantisation and division by the total weight."""
    total: list[np.ndarray] | None = None
    q_total = 0
    for update, n, share in replies:
        q_ratio = round(n / max_weight * quantization_range)  # Flower's weight, quantised
        q_total += q_ratio
        weighted = [np.asarray(u, np.float64) * (q_ratio / quantization_range) for u in update]
        vector = quantize(weighted, clipping_range, quantization_range)
        if share is not None:
            vector = add_share(vector, share)
        total = vector if total is None else [
            ((t.astype(np.int64) + v) % MODULUS).astype(np.uint32) for t, v in zip(total, vector)]
    if total is None:
        raise ValueError("secure_sum of no replies")
    step = 2 * clipping_range / quantization_range
    offset = -(len(replies) - 1) * clipping_range
    inverse = quantization_range / q_total
    return [(t.astype(np.float64) * step - clipping_range + offset) * inverse for t in total]


__all__ = ["MODULUS", "SKELLAM_SOURCE", "NoiseShare", "add_share", "noise_rng",
           "pending_share", "quantize", "secure_sum"]
