"""Folders of per-slide HDF5 feature files (written by ``pathfed prepare``) as MIL bags.

The folder holds ``manifest.csv``, one ``<slide-stem>.h5`` per slide (dataset ``features``)
and a labels file with columns ``slide,label[,tma_group|site][,patient]`` (``image`` is
accepted for ``slide``; slides are matched by file stem, so ``a.svs`` matches ``a.h5``).
Hospitals are formed from whole ``tma_group``/``site`` values, as for image folders.
With ``multiscale``, each slide's bag is its regions (finest-scale patches under their
coarser-scale parents, :func:`common.data.featurefile.read_regions`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.bags import SiteData, split_bags
from common.data.featurefile import (
    MANIFEST,
    feature_dim,
    read_features,
    read_regions,
    region_children,
    settings_fields,
)
from common.data.labels import LABELS, assign_sites, read_label_rows
from common.data.multiscale import Layout
from common.errors import DataError

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class H5Bags:
    """Feature bags of the labelled slides of a folder, in labels-file order."""

    bags: list[np.ndarray]
    labels: np.ndarray
    names: list[str]
    groups: list[str]
    patients: list[str]
    paths: list[Path]
    children: int = 0
    """Children per region of multi-scale bags; 0 for single-scale ones."""


@dataclass(frozen=True)
class _Slide:
    index: int
    group: str


def site_slides(groups: list[str], n_sites: int) -> list[list[int]]:
    """The slides (indices into ``groups``) of each of ``n_sites`` hospitals, formed from
    whole groups (one hospital: all of them)."""
    if n_sites == 1:
        return [list(range(len(groups)))]
    items = [_Slide(i, group) for i, group in enumerate(groups)]
    return [[item.index for item in site] for site in assign_sites(items, n_sites)]


def load_h5_bags(folder: str | Path, labels_csv: str | Path | None = None,
                 warn_missing: bool = True, multiscale: bool = False) -> H5Bags:
    """Bags (``features`` of each slide's HDF5 file) and labels of a prepared folder.

    ``labels_csv`` defaults to ``folder/labels.csv``. Labelled slides without a feature
    file are skipped with a warning (see ``manifest.csv`` for why they failed); a site
    loading its bags says so at debug level only (``warn_missing=False``), since the data
    check before the run has said it once.

    Raises :class:`DataError` naming the file for a missing folder, a malformed labels
    file, an unreadable feature file, or when no labelled slide has features.
    """

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: feature folder not found (run `pathfed prepare` first)")
    labels_path = Path(labels_csv) if labels_csv else folder / LABELS
    rows = read_label_rows(labels_path, ("slide", "image"))
    out = H5Bags([], np.zeros(0, np.int64), [], [], [], [])
    labels: list[int] = []
    dims: set[int] = set()
    encoders: dict[tuple[str, str], str] = {}
    layouts: dict[int, str] = {}
    stains: dict[str, str] = {}
    missing = []
    for row in rows:
        name = row.name
        stem = Path(name).stem if Path(name).suffix else name
        h5_path = folder / f"{stem}.h5"
        if not h5_path.is_file():
            missing.append(name)
            continue
        if multiscale:
            features, children, attrs = read_regions(h5_path)
            layouts.setdefault(children, h5_path.name)
        else:
            features, attrs = read_features(h5_path)
        made_by = (str(attrs.get("encoder", "")), str(attrs.get("weights_hash", "")))
        if features.ndim != 2 or len(features) == 0:
            log.warning("%s: no patch features; skipped", h5_path)
            continue
        if not np.isfinite(features).all():
            bad = int((~np.isfinite(features)).any(axis=1).sum())
            raise DataError(f"{h5_path}: {bad} patch(es) with NaN or inf features; re-run "
                            "`pathfed prepare` on its slide (or remove it from labels.csv)")
        encoders.setdefault(made_by, h5_path.name)
        stains.setdefault(_stain(attrs), h5_path.name)
        dims.add(features.shape[1])
        out.bags.append(features)
        labels.append(row.label)
        out.names.append(name)
        out.groups.append(row.group)
        out.patients.append(row.patient or "")
        out.paths.append(h5_path)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5
                                          else "")
        log.log(logging.WARNING if warn_missing else logging.DEBUG,
                "%s: %d labelled slide(s) have no feature file (%s); skipped, see %s",
                folder, len(missing), shown, folder / MANIFEST)
    if len(encoders) > 1:
        (a, first), (b, second) = list(encoders.items())[:2]
        raise DataError(f"{folder}: feature files made by different encoders or weights "
                        f"({first}: {a[0]} {a[1][:12] or '-'}; {second}: {b[0]} "
                        f"{b[1][:12] or '-'}); prepare every slide with one encoder")
    if len(stains) > 1:
        (m1, file1), (m2, file2) = list(stains.items())[:2]
        raise DataError(f"{folder}: feature files made with different stain normalisation "
                        f"({file1}: {m1}; {file2}: {m2}); prepare every slide with one "
                        "--stain-normalize and --stain-target")
    if len(layouts) > 1:
        (k1, file1), (k2, file2) = list(layouts.items())[:2]
        raise DataError(f"{folder}: feature files prepared at different scales ({file1}: "
                        f"{k1} patches per region; {file2}: {k2}); prepare every slide with "
                        "one --mpp")
    if not out.bags:
        raise DataError(f"{folder}: none of the {len(rows)} slides in {labels_path} has a "
                        "feature file; run `pathfed prepare` on the slides")
    if len(dims) > 1:
        raise DataError(f"{folder}: feature files have different sizes {sorted(dims)}; "
                        "prepare them all with one encoder")
    return H5Bags(out.bags, np.array(labels, dtype=np.int64), out.names, out.groups,
                  out.patients, out.paths, next(iter(layouts), 0))


def _stain(attrs: dict[str, object]) -> str:
    return settings_fields(str(attrs.get("settings", "")))["stain"]


def h5_layout(folder: str | Path, multiscale: bool = False) -> Layout:
    """Feature size (and, with ``multiscale``, children per region) of a prepared folder,
    from its first feature file."""

    for path in sorted(Path(folder).glob("*.h5")):
        if not multiscale:
            return Layout(feature_dim(path))
        children = region_children(path)
        if not children:
            read_regions(path)  # raises, saying how to prepare two scales
        return Layout(feature_dim(path), children)
    raise DataError(f"{folder}: no feature file (*.h5); run `pathfed prepare` first")


def h5_folder_site(folder: str | Path, index: int, n_sites: int, seed: int = 0,
                   val_fraction: float = 0.3, multiscale: bool = False) -> SiteData:
    """Site ``index`` of a prepared folder split into ``n_sites`` hospitals by group."""
    data = load_h5_bags(folder, warn_missing=False, multiscale=multiscale)
    idx = site_slides(data.groups, n_sites)[index]
    if not idx:
        raise DataError(f"{folder}: site-{index} has no slide with features")
    patients = [data.patients[i] for i in idx]
    return split_bags(f"site-{index}", [data.bags[i] for i in idx], data.labels[idx],
                      [data.names[i] for i in idx], val_fraction, seed + index,
                      patients if all(patients) else None, children=data.children)
