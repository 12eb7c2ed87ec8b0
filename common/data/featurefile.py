"""The per-slide feature file (``<slide-stem>.h5``): one schema for its writer and readers.

Written by ``pathfed prepare`` (:func:`common.wsi.extract.prepare`), read by
:mod:`common.data.h5` for training. Datasets (one row per patch):

- ``coords`` ``int64[n, 2]``: baseline ``(x, y)`` of each patch's top-left corner;
- ``features`` ``float32[n, D]``: the encoder's features;
- ``tissue_fraction``, ``qc_blur``, ``qc_pen``, ``laplacian_var``, ``pen_fraction``: per
  patch quality (stored, not used to drop patches).

Attributes: :data:`ATTRS`. A file is written under a temporary name and renamed when
complete, so a reader never sees half a file.

A slide prepared at more than one scale (``pathfed prepare --mpp 0.5,2.0``) keeps the
finest scale in the datasets above, so every single-scale reader reads it unchanged, and
one group per coarser scale, ``scale_<mpp>`` (e.g. ``scale_2``; the root attribute
``context_mpp`` lists them), holding ``coords``, ``features`` and ``tissue_fraction`` of
its patches, ``parent`` (``int64[n]``: for each finest-scale patch, the row of the coarse
patch its centre lies in) and the attribute ``children`` (the most finest-scale patches a
coarse patch can hold, the same for every slide prepared with the same settings).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataError

MANIFEST = "manifest.csv"
"""The per-slide status table of a folder written by ``pathfed prepare``."""
FEATURES = "features"
COORDS = "coords"
TISSUE = "tissue_fraction"
QC = {"qc_blur": bool, "qc_pen": bool, "laplacian_var": np.float32, "pen_fraction": np.float32}
"""Per-patch quality datasets and their types."""
ATTRS = ("mpp", "patch_size", "level", "downsample", "size_baseline", "encoder",
         "weights_hash", "slide_path", "slide_mpp", "slide_mpp_source", "slide_dimensions",
         "tissue_threshold", "overlap", "settings")
"""Every attribute a feature file carries."""
def settings_fields(key: str) -> dict[str, str]:
    """The ``name=value`` fields of a ``pathfed prepare`` settings key (the ``settings``
    attribute, :class:`common.wsi.manifest.PrepareSettings`); ``stain`` is ``none`` when
    the key does not name one."""
    fields = {"stain": "none"}
    for part in key.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            fields[name] = value
    return fields


CONTEXT_MPP = "context_mpp"
PARENT = "parent"
CHILDREN = "children"


def scale_group(mpp: float) -> str:
    """The group of a coarser scale's datasets."""
    return f"scale_{mpp:g}"


class FeatureFileWriter:
    """Datasets of one slide's feature file, filled batch by batch (see :func:`writing`)."""

    def __init__(self, h5: Any, coords: np.ndarray, tissue: np.ndarray, dim: int,
                 chunk: int) -> None:
        n = len(coords)
        h5.create_dataset(COORDS, data=coords.astype(np.int64))
        h5.create_dataset(TISSUE, data=tissue)
        self.features = h5.create_dataset(FEATURES, shape=(n, dim), dtype=np.float32,
                                          chunks=(max(1, min(n, chunk)), dim))
        self.qc = {name: h5.create_dataset(name, shape=(n,), dtype=dtype)
                   for name, dtype in QC.items()}
        self.h5 = h5
        self.start = 0

    def add(self, features: np.ndarray, flags: Mapping[str, np.ndarray]) -> None:
        """The next batch of patches' features and quality flags."""
        stop = self.start + len(features)
        self.features[self.start:stop] = features
        for name, ds in self.qc.items():
            ds[self.start:stop] = flags[name]
        self.start = stop

    def add_scale(self, mpp: float, coords: np.ndarray, tissue: np.ndarray,
                  features: np.ndarray, parent: np.ndarray, children: int,
                  attrs: Mapping[str, Any]) -> None:
        """A coarser scale: its patches, their features and each finest patch's parent."""
        group = self.h5.create_group(scale_group(mpp))
        group.create_dataset(COORDS, data=coords.astype(np.int64))
        group.create_dataset(TISSUE, data=tissue.astype(np.float32))
        group.create_dataset(FEATURES, data=features.astype(np.float32))
        group.create_dataset(PARENT, data=parent.astype(np.int64))
        group.attrs.update({"mpp": mpp, CHILDREN: children, **attrs})
        scales = [float(x) for x in self.h5.attrs.get(CONTEXT_MPP, [])]
        self.h5.attrs[CONTEXT_MPP] = np.array(sorted({*scales, mpp}), dtype=np.float64)

    def finish(self, attrs: Mapping[str, Any]) -> None:
        missing = set(ATTRS) - set(attrs)
        if missing:
            raise ValueError(f"feature file attributes missing: {sorted(missing)}")
        self.h5.attrs.update(dict(attrs))


@contextmanager
def writing(path: Path, coords: np.ndarray, tissue: np.ndarray, dim: int,
            chunk: int) -> Iterator[FeatureFileWriter]:
    """Write ``path`` atomically: a temporary file renamed into place when complete."""
    import h5py

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with h5py.File(tmp, "w") as h5:
            yield FeatureFileWriter(h5, coords, tissue, dim, chunk)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def opened(path: Path) -> Iterator[Any]:
    """A feature file open for reading; a missing, truncated or foreign file (or one
    lacking what the reader looks up) is a :class:`DataError` naming it."""
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            yield h5
    except DataError as err:
        if str(err).startswith(str(path)):
            raise
        raise DataError(f"{path}: {err}; re-run `pathfed prepare` on its slide") from None
    except (OSError, KeyError, ValueError, IndexError) as err:
        raise DataError(f"{path}: not a PathFed feature file or damaged ({err}); re-run "
                        "`pathfed prepare` on its slide") from None


def read_features(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    """``features`` (``float32[n, D]``) and the attributes of a feature file."""
    with opened(path) as h5:
        return np.asarray(h5[FEATURES], dtype=np.float32), {k: h5.attrs[k] for k in h5.attrs}


def feature_dim(path: Path) -> int:
    """The feature size of a feature file, without reading its features."""
    with opened(path) as h5:
        return int(h5[FEATURES].shape[1])


def read_regions(path: Path) -> tuple[np.ndarray, int, dict[str, Any]]:
    """A multi-scale file's bag of regions (:func:`common.data.multiscale.pack_regions`):
    the finest scale's patches under the next coarser scale's; ``(rows, children, attrs)``.
    A file prepared at one scale is a :class:`DataError` saying how to prepare two."""
    from common.data.multiscale import pack_regions

    with opened(path) as h5:
        attrs = {k: h5.attrs[k] for k in h5.attrs}
        context = [float(x) for x in attrs.get(CONTEXT_MPP, [])]
        if not context:
            mpp = float(attrs.get("mpp", 0.5))
            raise DataError(f"{path}: prepared at one scale ({mpp:g} um/px); a multi-scale "
                            f"model needs two, e.g. `pathfed prepare SLIDES --mpp {mpp:g},"
                            f"{4 * mpp:g}`")
        group = h5[scale_group(context[0])]
        children = int(group.attrs[CHILDREN])
        rows = pack_regions(np.asarray(group[FEATURES], dtype=np.float32),
                            np.asarray(h5[FEATURES], dtype=np.float32),
                            np.asarray(group[PARENT], dtype=np.int64), children)
        return rows, children, attrs


def region_children(path: Path) -> int:
    """Children per region of a multi-scale file (0 for a single-scale one)."""
    with opened(path) as h5:
        context = [float(x) for x in h5.attrs.get(CONTEXT_MPP, [])]
        return int(h5[scale_group(context[0])].attrs[CHILDREN]) if context else 0
