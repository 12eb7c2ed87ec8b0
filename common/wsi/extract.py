"""Slides to features: tissue, tiling and batched feature extraction, resumable.

:func:`prepare` turns every slide of a folder into ``OUT_DIR/<slide-stem>.h5`` (its schema,
shared with the readers, is :mod:`common.data.featurefile`), written under a temporary
name and renamed when complete, and
``OUT_DIR/manifest.csv`` (one row per slide: ``status`` is ``done``, ``skipped`` or
``failed``, with the reason) is rewritten atomically after every slide. A re-run skips the
slides done with the same settings (``mpp``, patch size, encoder, weights hash, tissue
threshold, overlap) and does no work for them. A corrupt, truncated or unsupported slide is
recorded as failed; the others proceed.

Patches are read by ``workers`` processes (each with its own slide handle; 1 reads in this
process) and embedded here in batches.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.data.featurefile import MANIFEST
from common.data.labels import LABELS
from common.errors import DataError, PathFedError
from common.features import Encoder, build_encoder
from common.wsi.reader import SLIDE_SUFFIXES, SlideReader, open_slide
from common.wsi.tiling import PatchGrid, quality_flags, tile_tissue

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("slide", "status", "reason", "n_patches", "seconds", "h5", "settings")
DONE, SKIPPED, FAILED = "done", "skipped", "failed"


@dataclass(frozen=True)
class PrepareSettings:
    """What determines a slide's feature file; a re-run with equal settings skips the slide."""

    mpp: float
    patch_size: int
    encoder: str
    weights_hash: str
    tissue_threshold: float
    overlap: int = 0

    def key(self) -> str:
        """A stable one-line form recorded in the manifest."""
        return (f"mpp={self.mpp:g};patch={self.patch_size};encoder={self.encoder};"
                f"weights={self.weights_hash};tissue={self.tissue_threshold:g};"
                f"overlap={self.overlap}")


@dataclass
class SlideResult:
    """One manifest row."""

    slide: str
    status: str
    reason: str = ""
    n_patches: int = 0
    seconds: float = 0.0
    h5: str = ""
    settings: str = ""

    def row(self) -> dict[str, str]:
        return {"slide": self.slide, "status": self.status, "reason": self.reason,
                "n_patches": str(self.n_patches), "seconds": f"{self.seconds:.2f}",
                "h5": self.h5, "settings": self.settings}


@dataclass
class PrepareSummary:
    """What :func:`prepare` did: one result per slide of the folder, and the manifest."""

    results: list[SlideResult]
    manifest: Path
    seconds: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for status in (DONE, SKIPPED, FAILED):
            self.counts[status] = sum(r.status == status for r in self.results)

    @property
    def n_patches(self) -> int:
        return sum(r.n_patches for r in self.results if r.status == DONE)


def find_slides(slides_dir: str | Path) -> list[Path]:
    """Slide files of ``slides_dir``, sorted; a sub-folder of ``.dcm`` files is one slide.

    Raises :class:`DataError` if the folder is missing or holds no slide.
    """
    folder = Path(slides_dir)
    if not folder.is_dir():
        raise DataError(f"{folder}: slide folder not found")
    slides = []
    mrxs_dirs = {p.with_suffix("") for p in folder.glob("*.mrxs")}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix.lower() in SLIDE_SUFFIXES:
            slides.append(entry)
        elif entry.is_dir() and entry not in mrxs_dirs:
            dicom = sorted(entry.glob("*.dcm"))
            if dicom:
                slides.append(dicom[0])
    if not slides:
        raise DataError(f"{folder}: no slide files found (looked for "
                        f"{', '.join(sorted(SLIDE_SUFFIXES))})")
    return slides


def slide_name(path: Path, slides_dir: Path) -> str:
    """The manifest name of a slide: its path relative to the slide folder."""
    return path.relative_to(slides_dir).as_posix()


def slide_stem(path: Path) -> str:
    """The feature file's stem: the file's stem (a DICOM slide's folder name)."""
    return path.parent.name if path.suffix.lower() == ".dcm" else path.stem


def read_manifest(path: str | Path) -> dict[str, dict[str, str]]:
    """Rows of a manifest by slide name (empty if there is none yet)."""
    path = Path(path)
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as fh:
        return {row["slide"]: row for row in csv.DictReader(fh) if row.get("slide")}


def write_manifest(path: Path, rows: dict[str, dict[str, str]]) -> None:
    """Rewrite the manifest atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for name in sorted(rows):
            writer.writerow(rows[name])
    os.replace(tmp, path)


# --- Patch reading (in this process or in worker processes) -------------------------------

_OPEN: dict[str, Any] = {"key": None, "reader": None}


def _reader_for(path: str, default_mpp: float | None) -> SlideReader:
    """This process's reader of ``path`` (one open slide at a time per process)."""
    key = (path, default_mpp)
    if _OPEN["key"] != key:
        _close_reader()
        _OPEN["reader"] = open_slide(path, default_mpp=default_mpp)
        _OPEN["key"] = key
    return _OPEN["reader"]


def _close_reader() -> None:
    if _OPEN["reader"] is not None:
        _OPEN["reader"].close()
    _OPEN["key"] = _OPEN["reader"] = None


def read_patches(path: str, default_mpp: float | None, coords: np.ndarray, mpp: float,
                 patch_size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Patches ``uint8[n, P, P, 3]`` at ``coords`` and their quality flags."""
    reader = _reader_for(path, default_mpp)
    patches = np.empty((len(coords), patch_size, patch_size, 3), dtype=np.uint8)
    for i, (x, y) in enumerate(coords):
        patches[i] = reader.read_at_mpp((int(x), int(y)), (patch_size, patch_size), mpp)
    return patches, quality_flags(patches)


class PatchReader:
    """Reads batches of patches in order, in this process or in ``workers`` processes.

    Worker processes are started on first use (so a run with nothing to do starts none)
    and at most ``2 * workers`` batches are in flight, which bounds memory.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def batches(self, path: Path, default_mpp: float | None, coords: np.ndarray, mpp: float,
                patch_size: int, batch_size: int
                ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        chunks = [coords[i:i + batch_size] for i in range(0, len(coords), batch_size)]
        if self.workers <= 1:
            try:
                for chunk in chunks:
                    yield read_patches(str(path), default_mpp, chunk, mpp, patch_size)
            finally:
                _close_reader()
            return
        if self._pool is None:
            import multiprocessing

            # spawn: no inherited OpenSlide handles or torch threads in the workers
            self._pool = ProcessPoolExecutor(self.workers,
                                             mp_context=multiprocessing.get_context("spawn"))
        pending: deque[Future[tuple[np.ndarray, dict[str, np.ndarray]]]] = deque()
        todo = iter(chunks)
        try:
            for chunk in todo:
                pending.append(self._pool.submit(read_patches, str(path), default_mpp, chunk,
                                                 mpp, patch_size))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool:
            self.close()  # a reader process died (e.g. a decoder crash): start afresh
            raise DataError(f"{path}: a patch-reading process crashed on this slide") from None
        finally:
            for fut in pending:
                fut.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# --- One slide -------------------------------------------------------------------------

def _write_features(
    out_path: Path, reader: SlideReader, grid: PatchGrid, encoder: Encoder,
    settings: PrepareSettings, patch_reader: PatchReader, default_mpp: float | None,
    batch_size: int, on_batch: Callable[[int], None], slide_path: str,
) -> None:
    from common.data.featurefile import writing

    with writing(out_path, grid.coords, grid.tissue_fraction, encoder.dim,
                 batch_size) as file:
        for patches, flags in patch_reader.batches(reader.path, default_mpp, grid.coords,
                                                   grid.mpp, grid.patch_size, batch_size):
            file.add(encoder(patches), flags)
            on_batch(len(patches))
        file.finish({
            "mpp": grid.mpp, "patch_size": grid.patch_size, "level": grid.level,
            "downsample": grid.downsample, "size_baseline": grid.size_baseline,
            "encoder": encoder.name, "weights_hash": encoder.weights_hash,
            # relative to the slide folder: an absolute path would tell anyone holding
            # the features how the hospital lays out its storage
            "slide_path": slide_path, "slide_mpp": reader.mpp,
            "slide_mpp_source": reader.mpp_source,
            "slide_dimensions": np.array(reader.dimensions, dtype=np.int64),
            "tissue_threshold": settings.tissue_threshold, "overlap": settings.overlap,
            "settings": settings.key(),
        })


def _process_slide(
    path: Path, out_path: Path, encoder: Encoder, settings: PrepareSettings,
    patch_reader: PatchReader, default_mpp: float | None, batch_size: int,
    thumbnail_size: int, on_grid: Callable[[int], None], on_batch: Callable[[int], None],
    name: str = "",
) -> int:
    with open_slide(path, default_mpp=default_mpp) as reader:
        grid = tile_tissue(reader, settings.mpp, settings.patch_size, overlap=settings.overlap,
                           tissue_threshold=settings.tissue_threshold,
                           thumbnail_size=thumbnail_size)
        if len(grid) == 0:
            scale = reader.mpp / settings.mpp
            width, height = (int(d * scale) for d in reader.dimensions)
            if min(width, height) < settings.patch_size:
                raise DataError(f"{path}: the slide is {width} x {height} px at {settings.mpp:g} "
                                f"um/px, smaller than one {settings.patch_size} px patch; use a "
                                "smaller --patch-size (or a finer --mpp)")
            raise DataError(f"{path}: no patch has {100 * settings.tissue_threshold:.0f} % "
                            "tissue (blank slide? try a lower --tissue-threshold)")
        on_grid(len(grid))
        _write_features(out_path, reader, grid, encoder, settings, patch_reader, default_mpp,
                        batch_size, on_batch, name or path.name)
        return len(grid)


# --- The folder ------------------------------------------------------------------------

def prepare(
    slides_dir: str | Path,
    out_dir: str | Path,
    mpp: float = 0.5,
    patch_size: int = 256,
    encoder: str = "color-texture",
    weights: str | Path | None = None,
    workers: int = 1,
    tissue_threshold: float = 0.5,
    *,
    overlap: int = 0,
    slide_mpp: float | None = None,
    batch_size: int = 64,
    thumbnail_size: int = 1024,
    progress: bool = True,
    device: str = "cpu",
) -> PrepareSummary:
    """Every slide of ``slides_dir`` to ``out_dir/<stem>.h5``; see the module docstring.

    Args:
        mpp: microns per pixel of the patches.
        patch_size: patch side in pixels (at ``mpp``).
        encoder, weights: the feature encoder (:func:`common.features.build_encoder`).
        workers: processes reading patches (1: in this process).
        tissue_threshold: minimum tissue fraction of a kept patch.
        overlap: pixels shared by neighbouring patches.
        slide_mpp: baseline µm/px of slides that record none (e.g. plain TIFF/PNG images).
        progress: show rich progress bars.
        device: where a torch encoder runs (``cuda`` on a GPU machine); patches are read
            by ``workers`` processes either way.

    Returns a :class:`PrepareSummary`. Raises :class:`DataError` (or
    :class:`~common.errors.ConfigError`, :class:`~common.errors.UnknownModelError`) for bad
    arguments before any slide is touched; a bad slide is recorded as failed instead.
    """
    from common.errors import ConfigError

    if not mpp > 0:
        raise ConfigError(f"mpp must be positive, got {mpp}")
    if patch_size < 8:
        raise ConfigError(f"patch size must be at least 8 px, got {patch_size}")
    if not 0.0 <= tissue_threshold <= 1.0:
        raise ConfigError(f"tissue threshold must be between 0 and 1, got {tissue_threshold}")
    if not 0 <= overlap < patch_size:
        raise ConfigError(f"overlap must be in [0, patch size), got {overlap}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if slide_mpp is not None and not slide_mpp > 0:
        raise ConfigError(f"slide mpp must be positive, got {slide_mpp}")
    slides_dir = Path(slides_dir)
    slides = find_slides(slides_dir)
    enc = build_encoder(encoder, weights)
    if device != "cpu":
        if not hasattr(enc, "to"):
            raise ConfigError(f"encoder {enc.name!r} runs on the CPU only; drop --device")
        try:
            enc.to(device)
        except (RuntimeError, AssertionError) as err:
            raise ConfigError(f"device {device!r}: {err}") from None
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; give a folder for the feature files")
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock_folder(out)
    try:
        return _prepare_locked(slides, slides_dir, out, enc, mpp, patch_size,
                               tissue_threshold, overlap, workers, slide_mpp, batch_size,
                               thumbnail_size, progress)
    finally:
        lock.close()


LOCK_FILE = ".prepare.lock"


def _lock_folder(out: Path) -> Any:
    """Hold ``out/.prepare.lock`` for the whole run: a second ``prepare`` on the same
    folder is refused instead of deleting the first one's temporary files."""
    import fcntl

    fh = (out / LOCK_FILE).open("a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise DataError(f"{out}: another `pathfed prepare` ({holder}) is writing this folder; "
                        "wait for it to finish or choose another --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()}\n")
    fh.flush()
    return fh


def _prepare_locked(slides: list[Path], slides_dir: Path, out: Path, enc: Any, mpp: float,
                    patch_size: int, tissue_threshold: float, overlap: int, workers: int,
                    slide_mpp: float | None, batch_size: int, thumbnail_size: int,
                    progress: bool) -> PrepareSummary:
    settings = PrepareSettings(mpp, patch_size, enc.name, enc.weights_hash, tissue_threshold,
                               overlap)
    manifest_path = out / MANIFEST
    rows = read_manifest(manifest_path)
    if (slides_dir / LABELS).is_file():  # so that OUT_DIR alone is a training data folder
        tmp = out / f".{LABELS}.tmp"
        shutil.copyfile(slides_dir / LABELS, tmp)
        os.replace(tmp, out / LABELS)

    start_all = time.perf_counter()
    results: list[SlideResult] = []
    stems: dict[str, str] = {}
    patch_reader = PatchReader(workers)
    bars = _Progress(progress, len(slides))
    try:
        for path in slides:
            name = slide_name(path, slides_dir)
            stem = slide_stem(path)
            out_path = out / f"{stem}.h5"
            bars.start_slide(name)
            t0 = time.perf_counter()
            previous = rows.get(name, {})
            if stem in stems:
                result = SlideResult(name, FAILED, f"same name as {stems[stem]}: both would "
                                     f"write {out_path.name}; rename one", settings=settings.key())
            elif (previous.get("status") in (DONE, SKIPPED)
                  and previous.get("settings") == settings.key() and out_path.is_file()):
                result = SlideResult(name, SKIPPED, "already done with the same settings",
                                     int(previous.get("n_patches") or 0),
                                     _seconds(previous.get("seconds")),  # the first run's
                                     out_path.name, settings.key())
            else:
                try:
                    n = _process_slide(path, out_path, enc, settings, patch_reader, slide_mpp,
                                       batch_size, thumbnail_size, bars.set_patches,
                                       bars.advance_patches, name)
                    result = SlideResult(name, DONE, "", n, time.perf_counter() - t0,
                                         out_path.name, settings.key())
                except (PathFedError, OSError, ValueError) as err:
                    result = SlideResult(name, FAILED, _one_line(err, path),
                                         seconds=time.perf_counter() - t0,
                                         settings=settings.key())
                except Exception as err:  # fault isolation: one slide never stops the run
                    log.exception("%s: unexpected error", path)
                    result = SlideResult(name, FAILED,
                                         f"unexpected {type(err).__name__}: {err}",
                                         seconds=time.perf_counter() - t0,
                                         settings=settings.key())
            stems.setdefault(stem, name)
            results.append(result)
            rows[name] = result.row()
            write_manifest(manifest_path, rows)
            _log_result(result)
            bars.finish_slide()
    finally:
        bars.stop()
        patch_reader.close()
    return PrepareSummary(results, manifest_path, time.perf_counter() - start_all)


def _seconds(text: str | None) -> float:
    try:
        return float(text or 0.0)
    except ValueError:
        return 0.0


def _one_line(err: BaseException, path: Path) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    prefix = f"{path}: "
    return text[len(prefix):] if text.startswith(prefix) else text


def _log_result(r: SlideResult) -> None:
    if r.status == DONE:
        log.info("%s: %d patches in %.1f s", r.slide, r.n_patches, r.seconds)
    elif r.status == SKIPPED:
        log.info("%s: skipped (%s)", r.slide, r.reason)
    else:
        log.warning("%s: failed: %s", r.slide, r.reason)


class _Progress:
    """Rich progress bars over slides and the current slide's patches (or nothing)."""

    def __init__(self, enabled: bool, n_slides: int) -> None:
        self._p: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        console = Console(stderr=True)
        if not console.is_terminal:  # logs and pipes get one log line per slide instead
            return
        self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self._p.start()
        self._slides = self._p.add_task("slides", total=n_slides)
        self._patches = self._p.add_task("patches", total=None)

    def start_slide(self, name: str) -> None:
        if self._p:
            self._p.reset(self._patches, total=0, description=name[-40:])

    def set_patches(self, n: int) -> None:
        if self._p:
            self._p.update(self._patches, total=n)

    def advance_patches(self, n: int) -> None:
        if self._p:
            self._p.advance(self._patches, n)

    def finish_slide(self) -> None:
        if self._p:
            self._p.advance(self._slides)

    def stop(self) -> None:
        if self._p:
            self._p.stop()
