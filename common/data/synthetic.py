"""The embedded default data: deterministic synthetic MIL bags.

Negative bags hold only negative instances. Positive bags hold a minority (5-15 %) of
positive instances, shifted along a few feature directions, among many negatives, so a
model must find the few instances that matter, as in a slide with a small tumour focus.
Each site adds its own offset to every instance, a stand-in for staining differences.
"""

from __future__ import annotations

import numpy as np

from common.data.bags import SiteData, split_bags

FEATURE_DIM = 32
SIGNAL_DIMS = 4
SIGNAL_SHIFT = 1.6


def synthetic_site(
    index: int, seed: int = 0, n_bags: int = 300, val_fraction: float = 0.3,
    dim: int = FEATURE_DIM,
) -> SiteData:
    """Deterministic bags of site ``index`` (same arguments, same arrays)."""
    rng = np.random.default_rng([seed, index, 0x5EED])
    site_offset = rng.normal(0.0, 0.3, size=dim).astype(np.float32)
    labels = (np.arange(n_bags) % 2).astype(np.int64)
    rng.shuffle(labels)
    bags, names = [], []
    for i, label in enumerate(labels):
        n = int(rng.integers(20, 61))
        x = rng.normal(0.0, 1.0, size=(n, dim)).astype(np.float32)
        if label:
            k = max(1, int(round(n * rng.uniform(0.05, 0.15))))
            x[rng.choice(n, size=k, replace=False), :SIGNAL_DIMS] += SIGNAL_SHIFT
        bags.append(x + site_offset)
        names.append(f"site-{index}-bag-{i:04d}")
    return split_bags(f"site-{index}", bags, labels, names, val_fraction, seed + index)
