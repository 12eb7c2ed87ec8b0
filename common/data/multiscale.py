"""Multi-scale bags: each low-power patch (a *region*) with its high-power children.

A multi-scale bag is a bag of regions, so it travels through everything a bag does
(padding, site files, DP per-slide sampling, SecAgg+) unchanged: one row per region,

    [ low-power features (D) | child 1 (D) | ... | child K (D) | child present (K) ]

where the children are the region's high-power patches (``K`` at most: a region of side
``s`` over high-power patches of stride ``t`` holds ``ceil(s / t) ** 2``; absent children
are zero, with a 0 in the *present* column). :func:`pack_regions` builds the rows from
the two scales and each high-power patch's parent; :func:`unpack` splits them again (numpy
arrays and torch tensors alike). A model of kind ``multiscale``
(:mod:`common.models.multiscale_mil`) reads them; every other bag model is given the
high-power patches alone, the single-scale bag the same slide would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from common.errors import DataError

T = TypeVar("T")


@dataclass(frozen=True)
class Layout:
    """The shape of a bag's rows: per-patch feature size and children per region."""

    dim: int
    """``D``: the encoder's feature size (the same at every scale)."""
    children: int = 0
    """``K``: high-power patches per region; 0 for a single-scale bag."""

    @property
    def multiscale(self) -> bool:
        return self.children > 0

    @property
    def width(self) -> int:
        """Columns of one row."""
        return self.dim * (1 + self.children) + self.children if self.children else self.dim

    @classmethod
    def of_width(cls, width: int, children: int) -> Layout:
        """The layout whose rows are ``width`` wide with ``children`` per region."""
        if children == 0:
            return cls(width)
        dim, rest = divmod(width - children, 1 + children)
        if rest or dim < 1:
            raise DataError(f"rows of {width} columns are not multi-scale rows with "
                            f"{children} children per region")
        return cls(dim, children)


def children_per_region(region_size: float, stride: float) -> int:
    """Most high-power patches (of ``stride`` baseline px) whose centres fall in one
    region of side ``region_size`` baseline px."""
    return math.ceil(region_size / stride - 1e-9) ** 2


def pack_regions(low: np.ndarray, high: np.ndarray, parent: np.ndarray,
                 children: int) -> np.ndarray:
    """Rows ``float32[M, width]`` of a bag from ``low[M, D]``, ``high[N, D]`` and the
    region index of each high-power patch ``parent[N]`` (in ``[0, M)``).

    Raises :class:`DataError` when a region has more than ``children`` children or a
    parent index is out of range (a damaged or foreign file).
    """
    m, d = low.shape
    if high.shape[1:] != (d,) or parent.shape != (len(high),):
        raise DataError(f"multi-scale bag: {high.shape} high-power features and "
                        f"{parent.shape} parents for {low.shape} low-power features")
    if len(parent) and (parent.min() < 0 or parent.max() >= m):
        raise DataError(f"multi-scale bag: parent indices outside [0, {m})")
    layout = Layout(d, children)
    rows = np.zeros((m, layout.width), dtype=np.float32)
    rows[:, :d] = low
    rank = child_slots(parent)
    if len(rank) and rank.max() >= children:
        raise DataError(f"multi-scale bag: a region has {int(rank.max()) + 1} children, more "
                        f"than the {children} its layout holds")
    slots = rows[:, d: d * (1 + children)].reshape(m, children, d)
    slots[parent, rank] = high
    rows[:, d: d * (1 + children)] = slots.reshape(m, children * d)
    rows[parent, d * (1 + children) + rank] = 1.0
    return rows


def child_slots(parent: np.ndarray) -> np.ndarray:
    """Each high-power patch's slot in its region's row (its rank among the region's
    children, in file order): patch ``i`` is child ``slot[i]`` of region ``parent[i]``."""
    order = np.argsort(parent, kind="stable")
    slot = np.empty(len(parent), dtype=np.int64)
    sorted_parent = parent[order]
    starts = np.searchsorted(sorted_parent, sorted_parent)  # first index of each region
    slot[order] = np.arange(len(order)) - starts
    return slot


def unpack(rows: T, layout: Layout) -> tuple[Any, Any, Any]:
    """``(low[..., D], high[..., K, D], present[..., K] bool)`` of rows ``[..., width]``
    (numpy or torch)."""
    d, k = layout.dim, layout.children
    r: Any = rows
    low = r[..., :d]
    high = r[..., d: d * (1 + k)].reshape(*r.shape[:-1], k, d)
    present = r[..., d * (1 + k):] > 0.5
    return low, high, present


def high_power(rows: np.ndarray, layout: Layout) -> np.ndarray:
    """The bag's high-power patches ``[N, D]``: its single-scale bag."""
    _, high, present = unpack(rows, layout)
    return np.asarray(high[present], dtype=np.float32)


__all__ = ["Layout", "child_slots", "children_per_region", "high_power", "pack_regions",
           "unpack"]
