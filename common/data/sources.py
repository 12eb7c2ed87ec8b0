"""Where a site's bags come from: the one place that tells the kinds of data apart.

:func:`detect_source` looks at ``data`` once and names its kind; everything else
(:func:`load_site`, :func:`feature_layout`, :func:`check_source`, the per-kind defaults of
:func:`common.config.data_defaults`) dispatches on that kind. Detecting needs no torch and
no reading of images, so a wrong path fails in well under a second.

===============  ==============================================================
kind             what ``data`` is
===============  ==============================================================
``synthetic``    empty: the embedded synthetic bags (:mod:`common.data.synthetic`)
``site-file``    one site file ``*.npz`` (:func:`common.data.bags.save_site_file`)
``site-folder``  a folder of site files ``site-0.npz``, ``site-1.npz``, ...
``features``     a folder written by ``pathfed prepare`` (``manifest.csv``, ``*.h5``)
``images``       a folder of labelled images (``labels.csv``), embedded on the fly
===============  ==============================================================
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from common.data.bags import SiteData, load_site_file
from common.data.featurefile import MANIFEST
from common.data.labels import LABELS
from common.data.multiscale import Layout
from common.errors import DataError

log = logging.getLogger(__name__)

SourceKind = Literal["synthetic", "site-file", "site-folder", "features", "images"]

SITE_FILE = "site-{index}.npz"

WHAT_DATA_IS = ("a folder of labelled images (labels.csv), a folder written by `pathfed "
                "prepare` (manifest.csv), a site file (.npz) or a folder of them (site-0.npz, "
                "...); leave --data out for the embedded synthetic bags")


@dataclass(frozen=True)
class DataSource:
    """The kind of a site's data and where it lies."""

    kind: SourceKind
    path: Path | None = None

    @property
    def small(self) -> bool:
        """Real slides, tens per site (it takes the small-data training defaults)."""
        return self.kind in ("features", "images")

    def describe(self) -> str:
        return {"synthetic": "the embedded synthetic bags",
                "site-file": f"site file {self.path}",
                "site-folder": f"site files in {self.path}",
                "features": f"prepared slide features in {self.path}",
                "images": f"labelled images in {self.path}"}[self.kind]


def detect_source(data: str | Path | None) -> DataSource:
    """The kind of ``data``; :class:`DataError` naming the path when it is none of them."""
    if not data:
        return DataSource("synthetic")
    path = Path(data)
    if path.suffix == ".npz":
        if not path.is_file():
            raise DataError(f"{path}: site data file not found")
        return DataSource("site-file", path)
    if not path.exists():
        raise DataError(f"{path}: data folder not found; give {WHAT_DATA_IS}")
    if not path.is_dir():
        raise DataError(f"{path}: not a data folder; give {WHAT_DATA_IS}")
    if (path / SITE_FILE.format(index=0)).is_file():
        return DataSource("site-folder", path)
    if (path / MANIFEST).is_file():
        return DataSource("features", path)
    if (path / LABELS).is_file():
        return DataSource("images", path)
    raise DataError(f"{path}: holds no {LABELS}, {MANIFEST} or site-0.npz; give {WHAT_DATA_IS}")


def site_folder_file(folder: Path, index: int, n_sites: int) -> Path:
    """Site ``index``'s file in a folder of site files, checking the folder has ``n_sites``."""
    present = sorted(folder.glob("site-*.npz"))
    if len(present) != n_sites:
        raise DataError(f"{folder}: holds {len(present)} site files (site-N.npz) but the "
                        f"federation has {n_sites} sites; set sites = {len(present)}")
    return folder / SITE_FILE.format(index=index)


def load_site(
    index: int, n_sites: int, data: str, seed: int, val_fraction: float,
    synthetic_bags: int = 300, patch_size: int = 32, encoder: str = "color-texture",
    multiscale: bool = False, stain: str = "none",
) -> SiteData:
    """Return site ``index`` of ``n_sites``: the one front door to a site's bags.

    A folder of site files gives site ``index`` its own file; image and feature folders
    are split into hospitals by whole ``tma_group`` values. An empty ``encoder`` keeps
    image patches themselves (for patch models). With ``multiscale`` the bags are
    multi-scale regions (:mod:`common.data.multiscale`), and data with one scale is a
    :class:`DataError` saying how to get two; without it, multi-scale data gives its
    high-power patches. Results are cached per process, so a simulated site embeds its
    images once; the cache knows each input file by its size and modification time, so a
    file rewritten in place (the folds of an experiment) is read again, never served
    from the cache.
    """
    return _load_site(index, n_sites, data, seed, val_fraction, synthetic_bags, patch_size,
                      encoder, multiscale, stain, _stamp(data))


def _stamp(data: str) -> tuple[tuple[str, int, int], ...]:
    """What identifies ``data``'s contents for the cache: size and modification time of
    the file, or of a folder's ``labels.csv``, manifest and site files."""
    if not data:
        return ()
    path = Path(data)
    files = ([path] if path.is_file() else
             [path / LABELS, path / MANIFEST, *sorted(path.glob("site-*.npz"))]
             if path.is_dir() else [])
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((f.name, st.st_size, st.st_mtime_ns))
    return tuple(out)


@lru_cache(maxsize=8)
def _load_site(
    index: int, n_sites: int, data: str, seed: int, val_fraction: float,
    synthetic_bags: int, patch_size: int, encoder: str, multiscale: bool, stain: str,
    stamp: tuple[tuple[str, int, int], ...],
) -> SiteData:
    source = detect_source(data)
    if source.kind == "synthetic":
        from common.data.synthetic import synthetic_multiscale_site, synthetic_site

        make = synthetic_multiscale_site if multiscale else synthetic_site
        return make(index, seed=seed, n_bags=synthetic_bags, val_fraction=val_fraction)
    assert source.path is not None
    if source.kind in ("site-file", "site-folder"):
        path = (source.path if source.kind == "site-file"
                else site_folder_file(source.path, index, n_sites))
        return _scales(load_site_file(path), multiscale, path)
    if source.kind == "features":
        from common.data.h5 import h5_folder_site

        return h5_folder_site(source.path, index, n_sites, seed=seed, val_fraction=val_fraction,
                              multiscale=multiscale)
    from common.data.images import image_folder_site

    return image_folder_site(source.path, index, n_sites, seed=seed, val_fraction=val_fraction,
                             patch_size=patch_size, encoder=encoder or None,
                             multiscale=multiscale, stain=stain)


_ONE_SCALE = ("{what} have one scale; a multi-scale model needs slides prepared at two "
              "(`pathfed prepare SLIDES --mpp 0.5,2.0`) or the synthetic default")


def _scales(site: SiteData, multiscale: bool, path: Path) -> SiteData:
    if multiscale and not site.train.children:
        raise DataError(_ONE_SCALE.format(what=f"{path}: the site file's bags"))
    return site if multiscale else site.high_power()


def feature_layout(data: str | None, patch_size: int, encoder: str,
                   multiscale: bool = False) -> Layout:
    """Feature size of ``data`` (to build a bag model), and with ``multiscale`` its
    children per region, without loading every bag."""
    source = detect_source(data)
    if source.kind == "synthetic":
        from common.data.synthetic import FEATURE_DIM, SYNTHETIC_CHILDREN

        return Layout(FEATURE_DIM, SYNTHETIC_CHILDREN if multiscale else 0)
    assert source.path is not None
    if source.kind in ("site-file", "site-folder"):
        path = (source.path if source.kind == "site-file"
                else source.path / SITE_FILE.format(index=0))
        return _scales(load_site_file(path), multiscale, path).train.layout
    if source.kind == "features":
        from common.data.h5 import h5_layout

        return h5_layout(source.path, multiscale)
    from common.data.images import CONTEXT_FACTOR
    from common.features import get_encoder

    probe = np.full((1, patch_size, patch_size, 3), 128, dtype=np.uint8)
    return Layout(int(get_encoder(encoder)(probe).shape[1]),
                  CONTEXT_FACTOR ** 2 if multiscale else 0)


def feature_provenance(data: str | None, patch_size: int, encoder: str,
                       stain: str = "none") -> str:
    """How ``data``'s features are made, as a model card records it: the ``pathfed
    prepare`` settings key of a prepared folder (from its first file), ``images;...`` for
    image folders embedded on the fly, ``synthetic`` for the embedded default, ``site
    file`` for site files (their features' origin is not recorded)."""
    source = detect_source(data)
    if source.kind == "features":
        import h5py

        assert source.path is not None
        for path in sorted(source.path.glob("*.h5")):
            try:
                with h5py.File(path, "r") as h5:
                    return str(h5.attrs["settings"])
            except (OSError, KeyError):
                continue
        return "features"
    if source.kind == "images":
        from common.features import get_encoder

        enc = get_encoder(encoder) if encoder else None
        made = (f"images;patch={patch_size};encoder={enc.name};weights={enc.weights_hash}"
                if enc else f"images;patch={patch_size};encoder=none;weights=none")
        return made + (f";stain={stain}:default" if stain != "none" else "")
    return {"synthetic": "synthetic"}.get(source.kind, "site file")


def check_source(data: str | None, n_sites: int, multiscale: bool = False) -> DataSource:
    """Fail before any work if ``data`` cannot give each of ``n_sites`` sites something
    (with ``multiscale``: multi-scale bags).

    Feature folders have every file read once; image folders every image opened. An
    unreadable image is a warning (the run goes on without it) unless it leaves a site
    with fewer than two.
    """
    source = detect_source(data)
    counts: list[int] = []
    if source.kind == "features":
        from common.data.h5 import load_h5_bags, site_slides

        assert source.path is not None
        groups = load_h5_bags(source.path, multiscale=multiscale).groups
        counts = [len(site) for site in site_slides(groups, n_sites)]
    elif multiscale and source.kind in ("site-file", "site-folder"):
        assert source.path is not None
        feature_layout(str(source.path), 0, "", multiscale=True)  # raises for one scale
    if source.kind == "images":
        from common.data.images import read_image, read_labels
        from common.data.labels import assign_sites

        assert source.path is not None
        unreadable = 0
        for index, items in enumerate(assign_sites(read_labels(source.path), n_sites)):
            readable = 0
            for item in items:
                try:
                    read_image(item.path)
                    readable += 1
                except DataError as err:
                    unreadable += 1
                    log.warning("%s; it will be skipped", err)
            if readable < 2:
                raise DataError(f"{source.path}: site-{index} has {readable} readable "
                                "image(s); it needs two at least (fix the images or use "
                                "fewer --sites)")
            counts.append(readable)
        if unreadable:
            log.warning("%d image(s) unreadable; the run goes on without them", unreadable)
    if source.kind == "site-folder":
        assert source.path is not None
        site_folder_file(source.path, 0, n_sites)
    unit = "images" if source.kind == "images" else "slides"
    per_site = (": " + ", ".join(f"site-{i} {n}" for i, n in enumerate(counts))
                + f" {unit}") if counts else ""
    log.info("data: %s, %d site%s%s", source.describe(), n_sites, "s" * (n_sites != 1),
             per_site)
    return source


__all__ = ["DataSource", "SourceKind", "check_source", "detect_source", "feature_layout",
           "feature_provenance",
           "load_site", "site_folder_file"]
