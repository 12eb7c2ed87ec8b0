"""MixPatch (Park et al. 2022) for the patch CNN, with the DP unit still the slide.

A *mixed patch* is a ``grid x grid`` mosaic of cells, each cut from the same place of a
patch drawn from one of several slides; its soft label is the share of its cells that come
from positive patches (the slide's label, or the patch's own where annotations give one).
Training on mixed patches beside plain ones teaches the CNN to answer "partly" where a
patch is partly tumour, against the over-confidence of hard labels.

**Privacy.** A mixed patch draws from several slides, so its gradient is no longer one
slide's. The site's units (slides, or patients where the data names them) are therefore
placed in *mixing groups*: unit ``u`` goes to bucket ``H(seed, name(u)) mod G`` with ``G =
ceil(n / group)`` fixed by the plan, and every mixed patch mixes units of one group only.
One DP sample is one group (its ``k`` plain and mixed patches, clipped together to
``max-grad-norm``). Adding or removing a unit changes exactly the one group it hashes to:
for the accountant that is the *substitution* of one sample (or its addition or removal,
which costs less), accounted by :func:`common.privacy.substitution_rdp` (Renyi's weak
triangle inequality over Opacus' sampled-Gaussian RDP; about twice the noise of plain
DP-SGD for the same epsilon). The epsilon a site reports therefore still protects one
slide (or patient), as without MixPatch. Groups of one unit mix only its own patches.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch.utils.data import TensorDataset

    from common.data.bags import BagSet


@dataclass(frozen=True)
class MixPatchOptions:
    """How mixed patches are made (``mixpatch-*`` settings)."""

    grid: int = 2
    """Cells per side of a mixed patch (``grid ** 2`` cells; the patch side must divide)."""
    ratio: float = 0.5
    """Share of each sample's ``k`` patches that are mixed (the rest are plain patches)."""
    group: int = 2
    """Units (slides or patients) per mixing group, on average."""


def group_count(units: int, group: int) -> int:
    """``G``, the number of mixing buckets a plan over ``units`` units fixes."""
    return max(1, math.ceil(units / group))


def mixing_groups(names: tuple[str, ...] | list[str], count: int, seed: int
                  ) -> list[list[int]]:
    """The units' indices in their mixing groups (non-empty buckets, in bucket order): unit
    ``u`` in bucket ``sha256(seed, name) mod count``, so that adding or removing one unit
    changes only its own group. ``count`` is fixed by the plan (:func:`group_count` of
    the site's declared number of units, public as its sampling rate is)."""
    buckets: list[list[int]] = [[] for _ in range(count)]
    for i, name in enumerate(names):
        digest = hashlib.sha256(f"pathfed-mixpatch:{seed}:{name}".encode()).digest()
        buckets[int.from_bytes(digest[:8], "big") % count].append(i)
    return [b for b in buckets if b]


def mixpatch_dataset(bags: BagSet, groups: list[list[int]], k: int, seed: int,
                     options: MixPatchOptions, stain_augment: float = 0.0) -> TensorDataset:
    """``(patches[G, k, 3, P, P], soft_labels[G, k])``, one row per mixing group: ``k -
    round(ratio k)`` plain patches and ``round(ratio k)`` mixed ones, each cell and each
    plain patch drawn from a uniformly chosen unit of the group."""
    from common.data.bags import patch_tensor

    rng = np.random.default_rng(seed)
    if not bags.bags:
        return patch_tensor(np.zeros((0, k, 1, 1, 3), np.uint8), np.zeros((0, k)), rng, 0.0)
    size = bags.bags[0].shape[1]
    if size % options.grid:
        raise ValueError(f"mixpatch-grid: {options.grid} does not divide the patch size "
                         f"{size}")
    cell = size // options.grid
    mixed = int(round(options.ratio * k))
    out = np.empty((len(groups), k, size, size, 3), np.uint8)
    labels = np.empty((len(groups), k), np.float64)

    def draw(members: list[int]) -> tuple[np.ndarray, float]:
        unit = members[int(rng.integers(len(members)))]
        j = int(rng.integers(len(bags.bags[unit])))
        label = (bags.instance_labels[unit][j] if bags.instance_labels is not None
                 else bags.labels[unit])
        return bags.bags[unit][j], float(label > 0)

    for row, members in enumerate(groups):
        for col in range(k):
            if col >= k - mixed:
                cells = []
                for gy in range(options.grid):
                    for gx in range(options.grid):
                        patch, label = draw(members)
                        ys, xs = slice(gy * cell, (gy + 1) * cell), slice(gx * cell,
                                                                          (gx + 1) * cell)
                        out[row, col, ys, xs] = patch[ys, xs]
                        cells.append(label)
                labels[row, col] = float(np.mean(cells))
            else:
                out[row, col], labels[row, col] = draw(members)
    return patch_tensor(out, labels, rng, stain_augment)


__all__ = ["MixPatchOptions", "group_count", "mixing_groups", "mixpatch_dataset"]
