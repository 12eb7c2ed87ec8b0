"""Decoding only the tiles a region needs, with tifffile (and imagecodecs for JPEG).

For a level that is one plain tiled TIFF page (generic tiled TIFF, Aperio SVS), a region
whose origin falls on a pixel of the level is the page's tiles cut and pasted: no
resampling, so the pixels can equal OpenSlide's. tifffile decodes a tile about twice as
fast as OpenSlide's ``read_region`` (measured in ``../shared/notes/speed-findings.md``),
and decoded tiles are kept (``cache_bytes``), so the rows of patches a tile holds decode
it once.

Nothing is trusted on faith: :meth:`TiffTiles.adopt` takes a level only when its page is
tiled, 8-bit RGB, interleaved, in a compression tifffile decodes here, of the level's
size, and when one of its tiles decodes to exactly OpenSlide's pixels (the caller's
``check``). Every other level, and every read that is not pixel-aligned on its level,
stays OpenSlide's (``common/wsi/reader.py``).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

CACHE_BYTES = 64 * 2**20
"""Decoded tiles kept per slide (a 256 x 256 RGB tile is 192 kB: about 340 tiles)."""

# TIFF compression codes tifffile decodes without imagecodecs, and JPEG with it
_PLAIN = {1, 5, 8, 32946}  # none, LZW, Adobe deflate, deflate
_JPEG = {7}


def _jpeg_decoder() -> bool:
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        return False
    return True


class TiffTiles:
    """The adopted levels of one slide file, read tile by tile."""

    def __init__(self, path: str | Path, cache_bytes: int = CACHE_BYTES) -> None:
        import tifffile

        self.path = Path(path)
        self._tif = tifffile.TiffFile(str(self.path))
        self._fh = self.path.open("rb")
        self._pages: dict[int, Any] = {}
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached = 0
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()

    # ---- which levels ----------------------------------------------------------------
    def adopt(self, level_dimensions: tuple[tuple[int, int], ...],
              check: Callable[[int, tuple[int, int], tuple[int, int]], np.ndarray]) -> list[int]:
        """Take every level whose page fits (see the module); ``check(level, location,
        size)`` reads the same region through OpenSlide. The adopted levels."""
        jpeg = _jpeg_decoder()
        pages = list(self._tif.pages)
        for level, (width, height) in enumerate(level_dimensions):
            page = next((p for p in pages if getattr(p, "shape", None)
                         and tuple(p.shape[:2]) == (height, width)), None)
            if page is None or not self._fits(page, jpeg):
                continue
            self._pages[level] = page
            if not self._agrees(level, page, check):
                del self._pages[level]
        self._cache.clear()
        self._cached = 0
        return sorted(self._pages)

    @staticmethod
    def _fits(page: Any, jpeg: bool) -> bool:
        codes = _PLAIN | (_JPEG if jpeg else set())
        return bool(page.is_tiled and page.dtype == np.uint8 and len(page.shape) == 3
                    and page.shape[2] == 3 and int(page.planarconfig) == 1
                    and int(page.compression) in codes
                    # RGB; or YCbCr inside JPEG streams, which the JPEG decoder converts
                    and (int(page.photometric) == 2
                         or (int(page.photometric) == 6 and int(page.compression) in _JPEG))
                    and getattr(page, "imagedepth", 1) == 1
                    and all(int(n) > 0 for n in page.databytecounts))

    def _agrees(self, level: int, page: Any,
                check: Callable[[int, tuple[int, int], tuple[int, int]], np.ndarray]) -> bool:
        """One tile in the middle of the level, and the level's last tile (cut by the
        image's edges), equal OpenSlide's pixels."""
        across = -(-page.shape[1] // page.tilewidth)
        down = -(-page.shape[0] // page.tilelength)
        for tx, ty in ((across // 2, down // 2), (across - 1, down - 1)):
            x, y = tx * page.tilewidth, ty * page.tilelength
            size = (min(page.tilewidth, page.shape[1] - x), min(page.tilelength, page.shape[0] - y))
            try:
                ours = self.region(level, (x, y), size)
                theirs = check(level, (x, y), size)
            except Exception as err:  # noqa: BLE001 (any failure: leave the level to OpenSlide)
                log.debug("%s level %d: tile decoding not used (%s)", self.path, level, err)
                return False
            if ours is None or not np.array_equal(ours, theirs):
                log.debug("%s level %d: tifffile's pixels differ from OpenSlide's; "
                          "reading it with OpenSlide", self.path, level)
                return False
        return True

    def covers(self, level: int) -> bool:
        return level in self._pages

    # ---- reading -----------------------------------------------------------------------
    def region(self, level: int, location: tuple[int, int],
               size: tuple[int, int]) -> np.ndarray | None:
        """RGB ``uint8[h, w, 3]`` at ``location`` in *level* pixels (white outside the
        image), or None when ``level`` is not adopted."""
        page = self._pages.get(level)
        if page is None:
            return None
        (x, y), (w, h) = location, size
        tw, th = page.tilewidth, page.tilelength
        height, width = page.shape[:2]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x0 >= x1 or y0 >= y1:
            return out
        across = -(-width // tw)
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(level, page, ty * across + tx)
                # the part of this tile inside both the region and the image
                ax, ay = max(x0, tx * tw), max(y0, ty * th)
                bx, by = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                out[ay - y:by - y, ax - x:bx - x] = tile[ay - ty * th:by - ty * th,
                                                         ax - tx * tw:bx - tx * tw]
        return out

    def _tile(self, level: int, page: Any, index: int) -> np.ndarray:
        key = (level, index)
        with self._lock:
            tile = self._cache.get(key)
            if tile is not None:
                self._cache.move_to_end(key)
                return tile
            self._fh.seek(int(page.dataoffsets[index]))
            data = self._fh.read(int(page.databytecounts[index]))
        decoded, _, shape = page.decode(data, index, jpegtables=page.jpegtables)
        tile = np.asarray(decoded).reshape(shape[-3:])
        with self._lock:
            if key not in self._cache:
                self._cache[key] = tile
                self._cached += tile.nbytes
                while self._cached > self.cache_bytes and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= old.nbytes
        return tile

    def close(self) -> None:
        self._fh.close()
        self._tif.close()
