"""Reading a slide's patches in batches, in this process or in worker processes.

In this process, two reading threads read and check the next batches while the caller
encodes the current one (OpenSlide, tifffile's codecs, PIL and NumPy release the GIL while
they decode and compute; one slide handle serves both threads); at most four batches
wait, which bounds memory. Each worker process holds its
own slide handle (one open slide per process); batches come back in order and at most
``2 * workers`` are in flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataError
from common.wsi.reader import SlideReader, open_slide
from common.wsi.tiling import quality_flags

_OPEN: dict[str, Any] = {"key": None, "reader": None}
READ_THREADS = 2
"""Threads reading ahead in this process: 2 read and check the synthetic 8192^2 slide's
patches at 1.29x a bare OpenSlide loop, 1 at 0.76x (``benchmarks tiling``, 2 cores)."""


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
    return _cut(_reader_for(path, default_mpp), coords, mpp, patch_size)


def _cut(reader: SlideReader, coords: np.ndarray, mpp: float, patch_size: int
         ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    patches = reader.read_patches_at_mpp(coords, patch_size, mpp)
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
                patch_size: int, batch_size: int, memory: SlideReader | None = None
                ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """Batches of ``coords``' patches and their QC flags, in order. ``memory``: a
        reader of the slide already open in this process (the slide itself, or decoded
        by :func:`common.wsi.reader.decoded_once`), cut here by the reading threads."""
        if memory is None and self.workers <= 1:  # open it here, once, for both threads
            try:
                yield from self.batches(path, default_mpp, coords, mpp, patch_size, batch_size,
                                        _reader_for(str(path), default_mpp))
            finally:
                _close_reader()
            return
        chunks = [coords[i:i + batch_size] for i in range(0, len(coords), batch_size)]
        if memory is not None:
            yield from _prefetched(lambda chunk: _cut(memory, chunk, mpp, patch_size), chunks)
            return
        if self._pool is None:
            import multiprocessing

            # spawn: no inherited OpenSlide handles or torch threads in the workers
            self._pool = ProcessPoolExecutor(self.workers,
                                             mp_context=multiprocessing.get_context("spawn"))
        pool = self._pool
        try:
            yield from _in_order(lambda chunk: pool.submit(
                read_patches, str(path), default_mpp, chunk, mpp, patch_size),
                chunks, 2 * self.workers)
        except BrokenProcessPool:
            self.close()  # a reader process died (e.g. a decoder crash): start afresh
            raise DataError(f"{path}: a patch-reading process crashed on this slide") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def _prefetched(read: Callable[[np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]],
                chunks: list[np.ndarray]
                ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """``read(chunk)`` of each chunk in order, the next ones read by :data:`READ_THREADS`
    threads while the caller works on the current one. A read's error reaches the caller
    at its batch."""
    if len(chunks) <= 1:
        yield from (read(chunk) for chunk in chunks)
        return
    threads = READ_THREADS
    with ThreadPoolExecutor(threads, thread_name_prefix="pathfed-read") as pool:
        yield from _in_order(lambda chunk: pool.submit(read, chunk), chunks, 2 * threads)


def _in_order(submit: Callable[[np.ndarray], Future[tuple[np.ndarray, dict[str, np.ndarray]]]],
              chunks: list[np.ndarray], depth: int
              ) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """The results of ``submit(chunk)`` for each chunk, in order, with at most ``depth``
    submitted and not yet handed out (which bounds memory); the rest are cancelled when
    the caller stops early or a result raises."""
    pending: deque[Future[tuple[np.ndarray, dict[str, np.ndarray]]]] = deque()
    try:
        for chunk in chunks:
            pending.append(submit(chunk))
            if len(pending) >= depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for fut in pending:
            fut.cancel()


__all__ = ["PatchReader", "read_patches"]
