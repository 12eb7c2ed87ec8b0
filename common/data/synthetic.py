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


SYNTHETIC_CHILDREN = 4
"""High-power patches per region of the synthetic multi-scale bags (a 2x zoom)."""


def synthetic_multiscale_site(
    index: int, seed: int = 0, n_bags: int = 300, val_fraction: float = 0.3,
    dim: int = FEATURE_DIM, children: int = SYNTHETIC_CHILDREN,
) -> SiteData:
    """Deterministic multi-scale bags of site ``index`` (:mod:`common.data.multiscale`).

    Tumour is recognised at two scales at once, as a pathologist does: its architecture at
    low power (a region shifted along low-power signal directions) and its cells at high
    power (children shifted along other directions). A positive bag holds one to three
    such regions. Both scales alone are fooled by mimics: negative bags often hold
    low-power look-alike regions whose children are benign, and benign-looking regions
    with one atypical child, so that only the combination (the cross-scale view) tells
    the classes apart.
    """
    from common.data.multiscale import Layout, pack_regions

    rng = np.random.default_rng([seed, index, 0x5CA1E])
    site_offset = rng.normal(0.0, 0.3, size=dim).astype(np.float32)
    low_dims = slice(0, SIGNAL_DIMS)
    high_dims = slice(SIGNAL_DIMS, 2 * SIGNAL_DIMS)
    labels = (np.arange(n_bags) % 2).astype(np.int64)
    rng.shuffle(labels)
    bags, names = [], []
    for i, label in enumerate(labels):
        m = int(rng.integers(8, 21))
        low = rng.normal(0.0, 1.0, size=(m, dim)).astype(np.float32)
        n_kids = rng.integers(1, children + 1, size=m)  # tissue edges have fewer
        parent = np.repeat(np.arange(m), n_kids)
        high = rng.normal(0.0, 1.0, size=(len(parent), dim)).astype(np.float32)
        regions = rng.permutation(m)
        n_tumour = int(rng.integers(1, 4)) if label else 0
        tumour, rest = regions[:n_tumour], regions[n_tumour:]
        look_alike = rest[:int(rng.integers(0, 3))]  # low-power mimics, benign cells
        atypical = rest[len(look_alike):len(look_alike) + int(rng.integers(0, 3))]
        low[np.concatenate([tumour, look_alike]).astype(int), low_dims] += SIGNAL_SHIFT
        for r in tumour:
            kids = np.flatnonzero(parent == r)
            high[kids, high_dims] += SIGNAL_SHIFT
        for r in atypical:  # one atypical child in a benign region
            high[np.flatnonzero(parent == r)[0], high_dims] += SIGNAL_SHIFT
        bags.append(pack_regions(low + site_offset, high + site_offset, parent, children))
        names.append(f"site-{index}-bag-{i:04d}")
    assert bags[0].shape[1] == Layout(dim, children).width
    return split_bags(f"site-{index}", bags, labels, names, val_fraction, seed + index,
                      children=children)
