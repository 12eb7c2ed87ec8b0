"""Distributed DP: each site adds a share of integer Skellam noise to its quantised update,
SecAgg+ sums the shares, and only the sum (which carries the whole noise) is ever unmasked.

The mechanism, in the integer domain SecAgg+ works in (``docs/privacy.md``, "Distributed
DP"):

1. A site takes **one** DP step per round over **all** its training slides (sampling
   rate 1): each slide's gradient is clipped to ``max-grad-norm`` (Opacus' per-sample
   clipping), and the site's update is ``-lr * sum(clipped) / n``. No noise is added in
   floating point. One step, because the noise that protects the step is only complete
   in the sum: a second local step would start from a model that only the site's own
   (small) share protects.
2. Flower's SecAgg+ client weights the update by ``n / max-weight`` and rounds it
   stochastically onto the integer grid ``s = T / (2 c)`` (``T`` the quantisation range,
   ``c`` the clipping range). PathFed's quantiser seam then adds the site's Skellam share
   ``Poisson(v/2) - Poisson(v/2)`` per coordinate, with ``v = mu / m``: ``mu`` the total
   variance the plan needs and ``m`` the fewest sites whose vectors a round may sum
   (``secagg-dropout`` below the sampled sites). The shares of any ``m`` or more
   surviving sites sum to a Skellam of variance at least ``mu`` (Skellam is closed under
   sums); the server refuses to unmask a round with fewer.
3. The sum is taken modulo ``2**32``. Wrap-around can only hurt utility: the released
   value is a function of the noisy sum (post-processing).

**Sensitivity.** Adding or removing one slide changes the site's weighted float vector
by at most ``lr * C * (1/W + 2/T)`` in L2 (``W = max-weight``; the weight's own rounding is
in the ``2/T``), so by ``s`` times that on the grid; stochastic rounding, coupled on the
same uniforms (``floor(y + u)``), moves each changed coordinate by less than one more
step, so the integer vectors differ by at most ``Delta_2 = s lr C (1/W + 2/T) + sqrt(d)``
in L2 and ``Delta_1 = Delta_2 min(sqrt(d), Delta_2)`` in L1 (``d`` the trainable
coordinates). For every fixed rounding draw this is a shift of a Skellam mechanism; the
draws are independent of the data, and Renyi divergence is jointly quasi-convex, so the
mixture keeps the bound.

**Accounting.** The multi-dimensional Skellam mechanism of variance ``mu`` per coordinate
is ``(alpha, eps(alpha))``-RDP with (Agarwal, Kairouz and Liu 2021; the form of
google-research/federated ``distributed_dp/accounting_utils.py``)::

    eps(alpha) = alpha Delta_2^2 / (2 mu)
                 + min(((2 alpha - 1) Delta_2^2 + 6 Delta_1) / (4 mu^2), 3 Delta_1 / (2 mu))

at integer orders ``alpha >= 2``; rounds compose by adding RDP, and Opacus'
``get_privacy_spent`` turns the curve into epsilon at ``delta``. There is no subsampling
to amplify (rate 1), so no subsampled-RDP bound for a non-Gaussian mechanism is needed.

**Trust.** The sum is private against a server that follows SecAgg+ (semi-honest) and
sees no site's vector alone: fewer than SecAgg+'s reconstruction threshold of colluding
parties. A site colluding with the server removes its own share from the noise: the
shares are sized for ``m`` sites, so such collusion must be counted in
``secagg-dropout``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

INT_ALPHAS: list[int] = list(range(2, 64)) + [80, 96, 128, 192, 256, 384, 512]
"""RDP orders of every Skellam epsilon (the bound holds at integer orders)."""

ROUNDING_SLACK = 1e-6
"""Relative slack on the sensitivities, for floating-point rounding of the weighted update."""


def skellam_rdp(alpha: float, l2: float, l1: float, variance: float) -> float:
    """RDP at order ``alpha`` of adding Skellam noise of ``variance`` per coordinate to an
    integer vector of L2 / L1 sensitivity ``l2`` / ``l1`` (Agarwal et al. 2021)."""
    if alpha <= 1:
        raise ValueError(f"Skellam RDP needs an order above 1, got {alpha}")
    base = alpha * l2**2 / (2 * variance)
    return float(base + min(((2 * alpha - 1) * l2**2 + 6 * l1) / (4 * variance**2),
                            3 * l1 / (2 * variance)))


def skellam_entry_rdp(entry: tuple[float, ...]) -> np.ndarray:
    """The RDP curve (at :data:`INT_ALPHAS`) of one accountant entry
    ``(noise_multiplier, 1.0, steps, l2, l1)``: variance ``(noise_multiplier l2)^2``."""
    sigma, _rate, steps, l2, l1 = (float(x) for x in entry)
    variance = (sigma * l2) ** 2
    return np.array([skellam_rdp(a, l2, l1, variance) for a in INT_ALPHAS]) * steps


def integer_sensitivity(dim: int, *, lr: float, max_grad_norm: float, max_weight: float,
                        quantization_range: int, clipping_range: float) -> tuple[float, float]:
    """``(Delta_2, Delta_1)`` of one slide on a site's quantised vector (module docstring)."""
    scale = quantization_range / (2 * clipping_range)
    weighted = scale * lr * max_grad_norm * (1 / max_weight + 2 / quantization_range)
    l2 = (weighted + math.sqrt(dim)) * (1 + ROUNDING_SLACK)
    return l2, l2 * min(math.sqrt(dim), l2)


def skellam_epsilon(sigma: float, rounds: int, delta: float, l2: float, l1: float) -> float:
    """Epsilon at ``delta`` of ``rounds`` Skellam steps of noise multiplier ``sigma``."""
    from common.privacy import spent

    if rounds <= 0:
        return 0.0
    return spent(INT_ALPHAS, skellam_entry_rdp((sigma, 1.0, rounds, l2, l1)), delta)


@functools.lru_cache(maxsize=64)
def calibrate_sigma(epsilon: float, delta: float, rounds: int, l2: float, l1: float,
                    max_noise_multiplier: float) -> float:
    """The smallest noise multiplier (to 0.1 %) whose ``rounds`` Skellam steps spend at
    most ``epsilon``; ``max_noise_multiplier`` when even that overspends."""
    from common.privacy import within_budget

    if not within_budget(skellam_epsilon(max_noise_multiplier, rounds, delta, l2, l1),
                         epsilon):
        return max_noise_multiplier
    low, high = 0.0, max_noise_multiplier
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        if mid > 0 and within_budget(skellam_epsilon(mid, rounds, delta, l2, l1), epsilon):
            high = mid
        else:
            low = mid
    return high


def min_sites(sampled: int, dropout: float) -> int:
    """The fewest of ``sampled`` sites a round may sum when ``dropout`` of them may drop
    (the count every site's noise share is sized for)."""
    return max(1, sampled - math.floor(dropout * sampled))


NOISE_SIGMAS = 8.0
"""How far (in standard deviations of its noise) a distributed-DP aggregate may lie
beyond the honest-update bound before the server rejects it: the chance that honest noise
does, over a million coordinates, is below 1e-8."""


def aggregate_noise_std(replies: list[tuple[int, float]], *, max_weight: float,
                        quantization_range: int, clipping_range: float) -> float:
    """The standard deviation, per coordinate, of the noise in the mean SecAgg+ unmasks
    from ``(n_samples, share_variance)`` replies: the shares' summed variance, over the
    grid's scale and the summed weights (as :func:`common.crypto.quantize.secure_sum`)."""
    total = sum(v for _, v in replies)
    weights = sum(round(n / max_weight * quantization_range) / quantization_range
                  for n, _ in replies)
    scale = quantization_range / (2 * clipping_range)
    return math.sqrt(total) / (scale * weights) if weights > 0 else math.inf


def describe(plan: Any, dim: int) -> dict[str, Any]:
    """The numbers of a distributed plan an auditor reads (ledger, summary, planner)."""
    ideal = plan.l2_sensitivity - math.sqrt(dim) * (1 + ROUNDING_SLACK)
    return {
        "dp_mode": "distributed", "noise_multiplier": plan.noise_multiplier,
        "l2_sensitivity": plan.l2_sensitivity, "l1_sensitivity": plan.l1_sensitivity,
        "noise_variance": (plan.noise_multiplier * plan.l2_sensitivity) ** 2,
        "rounding_inflation": plan.l2_sensitivity / ideal if ideal > 0 else math.inf,
    }


__all__ = ["INT_ALPHAS", "NOISE_SIGMAS", "aggregate_noise_std", "calibrate_sigma", "describe",
           "integer_sensitivity", "min_sites", "skellam_entry_rdp", "skellam_epsilon",
           "skellam_rdp"]
