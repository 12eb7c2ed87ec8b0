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

Modules: :mod:`common.wsi.manifest` (the manifest and the settings key),
:mod:`common.wsi.patches` (the patch reader), :mod:`common.data.featurefile` (the feature
file's schema); this module is the run over a folder (:class:`PrepareOptions`, one slide,
progress).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.data.featurefile import MANIFEST
from common.data.labels import LABELS
from common.errors import DataError, PathFedError
from common.features import Encoder, build_encoder
from common.wsi.manifest import (
    DONE,
    FAILED,
    SKIPPED,
    PrepareSettings,
    SlideResult,
    read_manifest,
    write_manifest,
)
from common.wsi.patches import PatchReader
from common.wsi.reader import SLIDE_SUFFIXES, SlideReader, decoded_once, open_slide
from common.wsi.tiling import ContextGrid, PatchGrid, context_grid, tile_tissue

log = logging.getLogger(__name__)

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


# --- One slide -------------------------------------------------------------------------

def _write_features(
    out_path: Path, reader: SlideReader, grid: PatchGrid, encoder: Encoder,
    settings: PrepareSettings, patch_reader: PatchReader, default_mpp: float | None,
    batch_size: int, on_batch: Callable[[int], None], slide_path: str,
    contexts: list[ContextGrid], stain: Callable[[np.ndarray], np.ndarray],
    memory: SlideReader | None = None,
) -> None:
    from common.data.featurefile import writing

    # in this process, cut the patches from the slide already open (or decoded) here
    memory = memory or (reader if patch_reader.workers <= 1 else None)
    with writing(out_path, grid.coords, grid.tissue_fraction, encoder.dim,
                 batch_size) as file:
        for patches, flags in patch_reader.batches(reader.path, default_mpp, grid.coords,
                                                   grid.mpp, grid.patch_size, batch_size,
                                                   memory):
            file.add(encoder(stain(patches)), flags)  # QC flags are of the raw pixels
            on_batch(len(patches))
        for context in contexts:
            features = [encoder(stain(patches)) for patches, _ in patch_reader.batches(
                reader.path, default_mpp, context.coords, context.mpp, grid.patch_size,
                batch_size, memory)]
            on_batch(len(context))
            file.add_scale(context.mpp, context.coords, context.tissue_fraction,
                           np.concatenate(features), context.parent, context.children,
                           {"patch_size": grid.patch_size,
                            "size_baseline": context.size_baseline})
        file.finish({
            "mpp": grid.mpp, "patch_size": grid.patch_size, "level": grid.level,
            "downsample": grid.downsample, "size_baseline": grid.size_baseline,
            "encoder": encoder.name, "weights_hash": encoder.weights_hash,
            "encoder_precision": getattr(encoder, "precision", "float32"),
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
    name: str = "", stain: Callable[[np.ndarray], np.ndarray] | None = None,
) -> int:
    with open_slide(path, default_mpp=default_mpp) as reader:
        memory = decoded_once(reader)  # a small single-level slide: decode it only once
        source = memory or reader
        grid = tile_tissue(source, settings.mpp, settings.patch_size, overlap=settings.overlap,
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
        contexts = [context_grid(source, grid, mpp, settings.overlap)
                    for mpp in settings.context_mpp]
        on_grid(len(grid) + sum(len(c) for c in contexts))
        _write_features(out_path, reader, grid, encoder, settings, patch_reader, default_mpp,
                        batch_size, on_batch, name or path.name, contexts,
                        stain or (lambda patches: patches), memory)
        return len(grid)


# --- The folder ------------------------------------------------------------------------

@dataclass(frozen=True)
class PrepareOptions:
    """How ``pathfed prepare`` works on a folder; checked before any slide is touched.

    The fields that decide a feature file's content (mpp, patch size, encoder and its
    weights, tissue threshold, overlap) become the :class:`PrepareSettings` key; the
    others only decide how the work is done.
    """

    mpp: float = 0.5
    """Microns per pixel of the patches."""
    context_mpp: tuple[float, ...] = ()
    """Coarser scales (µm/px) whose patches are also embedded, each finest patch linked to
    the coarse patch it lies in (multi-scale features; ``--mpp 0.5,2.0``)."""
    patch_size: int = 256
    """Patch side in pixels (at ``mpp``)."""
    encoder: str = "color-texture"
    """The feature encoder (:func:`common.features.build_encoder`)."""
    weights: str | Path | None = None
    """The encoder's local weights file."""
    stain_normalize: str = "none"
    """Stain normalisation of every patch before the encoder: ``none``, ``macenko`` or
    ``reinhard`` (:class:`common.wsi.stain.StainNormalizer`)."""
    stain_target: str | Path | None = None
    """The image to normalise to; PathFed's reference tile when None."""
    workers: int = 1
    """Processes reading patches (1: in this process)."""
    tissue_threshold: float = 0.5
    """Minimum tissue fraction of a kept patch."""
    overlap: int = 0
    """Pixels shared by neighbouring patches."""
    slide_mpp: float | None = None
    """Baseline µm/px of slides that record none (e.g. plain TIFF/PNG images)."""
    batch_size: int = 64
    thumbnail_size: int = 1024
    progress: bool = True
    """Show rich progress bars (on a terminal)."""
    device: str = "cpu"
    """Where a torch encoder runs (``cuda`` on a GPU machine)."""

    def check(self) -> None:
        """Raise :class:`~common.errors.ConfigError` naming the first bad option."""
        from common.errors import ConfigError

        problems = [
            (not self.mpp > 0, f"mpp must be positive, got {self.mpp}"),
            (self.patch_size < 8, f"patch size must be at least 8 px, got {self.patch_size}"),
            (not 0.0 <= self.tissue_threshold <= 1.0,
             f"tissue threshold must be between 0 and 1, got {self.tissue_threshold}"),
            (not 0 <= self.overlap < self.patch_size,
             f"overlap must be in [0, patch size), got {self.overlap}"),
            (self.workers < 1, f"workers must be at least 1, got {self.workers}"),
            (self.slide_mpp is not None and not self.slide_mpp > 0,
             f"slide mpp must be positive, got {self.slide_mpp}"),
            (any(not m > self.mpp for m in self.context_mpp),
             f"--mpp {','.join(f'{m:g}' for m in (self.mpp, *self.context_mpp))}: the first "
             "scale is the finest; every other must be coarser (a larger um/px)"),
            (len(set(self.context_mpp)) != len(self.context_mpp) or len(self.context_mpp) > 2,
             "--mpp: two or three different scales at most"),
            (self.stain_normalize not in ("none", "macenko", "reinhard"),
             f"--stain-normalize {self.stain_normalize}: none, macenko or reinhard"),
            (self.stain_target is not None and self.stain_normalize == "none",
             "--stain-target without --stain-normalize macenko|reinhard does nothing"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)

    def build_encoder(self) -> Encoder:
        """The encoder on its device, checked against the patch size."""
        from common.errors import ConfigError

        enc = build_encoder(self.encoder, self.weights)
        if enc.input_size and enc.input_size != self.patch_size:
            raise ConfigError(f"encoder {enc.name!r} takes {enc.input_size}-px patches; use "
                              f"--patch-size {enc.input_size} (or weights trained at "
                              f"{self.patch_size} px)")
        if self.device != "cpu":
            if not hasattr(enc, "to"):
                raise ConfigError(f"encoder {enc.name!r} runs on the CPU only; drop --device")
            try:
                enc.to(self.device)
            except (RuntimeError, AssertionError) as err:
                raise ConfigError(f"device {self.device!r}: {err}") from None
        return enc


def prepare(slides_dir: str | Path, out_dir: str | Path,
            options: PrepareOptions | None = None, **fields: Any) -> PrepareSummary:
    """Every slide of ``slides_dir`` to ``out_dir/<stem>.h5``; see the module docstring.

    ``options`` (or its fields as keywords, e.g. ``mpp=1.0, patch_size=32``) say how; see
    :class:`PrepareOptions`. Returns a :class:`PrepareSummary`. Raises :class:`DataError`
    (or :class:`~common.errors.ConfigError`, :class:`~common.errors.UnknownModelError`) for
    bad arguments before any slide is touched; a bad slide is recorded as failed instead.
    """
    from dataclasses import replace

    from common.errors import ConfigError

    opts = replace(options or PrepareOptions(), **fields)
    opts.check()
    slides_dir = Path(slides_dir)
    slides = find_slides(slides_dir)
    enc = opts.build_encoder()
    from common.wsi.stain import StainNormalizer

    stain = StainNormalizer(opts.stain_normalize,
                            str(opts.stain_target) if opts.stain_target else None)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; give a folder for the feature files")
    out.mkdir(parents=True, exist_ok=True)
    lock = _lock_folder(out)
    try:
        return _prepare_locked(slides, slides_dir, out, enc, opts, stain)
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


def _prepare_locked(slides: list[Path], slides_dir: Path, out: Path, enc: Encoder,
                    opts: PrepareOptions, stain: Callable[[np.ndarray], np.ndarray]
                    ) -> PrepareSummary:
    settings = PrepareSettings(opts.mpp, opts.patch_size, enc.name, enc.weights_hash,
                               opts.tissue_threshold, opts.overlap, tuple(opts.context_mpp),
                               getattr(stain, "key", "none"))
    manifest_path = out / MANIFEST
    rows = read_manifest(manifest_path)
    if (slides_dir / LABELS).is_file():  # so that OUT_DIR alone is a training data folder
        tmp = out / f".{LABELS}.tmp"
        shutil.copyfile(slides_dir / LABELS, tmp)
        os.replace(tmp, out / LABELS)

    start_all = time.perf_counter()
    results: list[SlideResult] = []
    stems: dict[str, str] = {}
    patch_reader = PatchReader(opts.workers)
    bars = _Progress(opts.progress, len(slides))
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
                    n = _process_slide(path, out_path, enc, settings, patch_reader,
                                       opts.slide_mpp, opts.batch_size, opts.thumbnail_size,
                                       bars.set_patches, bars.advance_patches, name, stain)
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
