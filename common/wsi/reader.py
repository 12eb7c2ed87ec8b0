"""Slide access: one reader protocol, three backends, one front door (:func:`open_slide`).

Coordinates are always baseline (level-0) pixels ``(x, y)``; sizes are ``(width, height)``
in pixels of the level (or of the output, for :meth:`SlideReader.read_at_mpp`). Every read
returns ``uint8[h, w, 3]`` RGB; regions outside the slide read as white.

Backends:

- :class:`OpenSlideReader`: every format OpenSlide reads (Aperio svs/tif, Hamamatsu
  ndpi/vms/vmu, Mirax mrxs, Leica scn, Ventana bif, Philips tiff, Sakura svslide, DICOM,
  generic tiled TIFF);
- :class:`ImageReader`: plain images (png, jpg, striped TIFF) that OpenSlide cannot open,
  decoded once into memory as a single level;
- :class:`ArrayReader`: a numpy array (or a list of them, a pyramid) in memory, for tests.

A slide's baseline microns per pixel, in order: ``mpp`` given by the user (an override);
the file's metadata; ``default_mpp`` given by the user (for files that record none); the
objective power, with a logged warning (10 µm/px divided by the objective: 20x -> 0.5).
With none of these, :class:`~common.errors.SlideReadError` asks for the value: PathFed
never guesses a resolution silently.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import numpy as np
import openslide
from PIL import Image, UnidentifiedImageError

from common.errors import SlideReadError

if TYPE_CHECKING:
    from common.wsi.tiles import TiffTiles

log = logging.getLogger(__name__)

OPENSLIDE_SUFFIXES = frozenset(
    {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".mrxs", ".scn", ".bif", ".svslide",
     ".dcm"}
)
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
SLIDE_SUFFIXES = OPENSLIDE_SUFFIXES | IMAGE_SUFFIXES
# Microscopy scans lie between ~0.05 (100x oil) and ~20 µm/px (macro photos); a TIFF's
# resolution tag outside that range is a default such as 72 dpi, not a measurement.
PLAUSIBLE_MPP = (0.05, 20.0)
_MPP_FIX = ("give its microns per pixel with `pathfed prepare --slide-mpp MPP` (0.5 for "
            "a 20x scan; in Python: open_slide(path, default_mpp=MPP))")

TILE_VENDORS = frozenset({"generic-tiff", "aperio"})
"""OpenSlide formats whose levels can be single TIFF pages, decoded by tile."""

Location = tuple[int, int]
Size = tuple[int, int]


class SlideReader(ABC):
    """The reader protocol every backend implements.

    Subclasses provide the level geometry, :attr:`mpp` and :meth:`read_region`;
    :meth:`read_at_mpp` and :meth:`thumbnail` are built on them here.
    """

    path: Path
    """The file (or a descriptive name for in-memory slides)."""
    mpp: float
    """Microns per pixel at baseline (level 0)."""
    mpp_source: str
    """Where :attr:`mpp` came from: ``metadata``, ``user``, ``objective-power``."""

    @property
    @abstractmethod
    def level_dimensions(self) -> tuple[Size, ...]:
        """``(width, height)`` of every level, baseline first."""

    @property
    def dimensions(self) -> Size:
        """Baseline ``(width, height)``."""
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Downsample of each level relative to baseline."""
        w0, h0 = self.dimensions
        return tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)

    @abstractmethod
    def read_region(self, location: Location, level: int, size: Size) -> np.ndarray:
        """RGB ``uint8[h, w, 3]`` of ``size`` level pixels whose top-left is baseline ``location``.

        Raises :class:`SlideReadError` naming the file if the pixels cannot be decoded.
        """

    def close(self) -> None:
        """Release the file; the reader cannot be used afterwards."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, dimensions={self.dimensions}, "
                f"levels={self.level_count}, mpp={self.mpp:.4g})")

    def best_level_for_downsample(self, downsample: float) -> int:
        """The smallest level whose downsample does not exceed ``downsample`` (1 % slack)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * 1.01 and ds >= self.level_downsamples[best]:
                best = level
        return best

    def read_at_mpp(self, location: Location, size: Size, mpp: float) -> np.ndarray:
        """RGB ``uint8[h, w, 3]``: ``size`` pixels at ``mpp`` µm/px from baseline ``location``.

        Reads the best level (the finest not finer than needed) and resizes with PIL.
        """
        w, h = size
        level, read = self._level_read(mpp, (w, h))
        region = self.read_region(location, level, read)
        if read == (w, h):
            return region
        return np.asarray(Image.fromarray(region).resize((w, h), Image.Resampling.BILINEAR))

    def _level_read(self, mpp: float, size: Size) -> tuple[int, Size]:
        """The level to read ``size`` pixels at ``mpp`` from, and how many of its pixels."""
        if mpp <= 0:
            raise ValueError(f"mpp must be positive, got {mpp}")
        downsample = mpp / self.mpp
        level = self.best_level_for_downsample(downsample)
        scale = downsample / self.level_downsamples[level]
        return level, (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))

    def read_patches_at_mpp(self, coords: np.ndarray, patch_size: int, mpp: float,
                            max_run: int = 32) -> np.ndarray:
        """Square patches ``uint8[n, P, P, 3]`` at baseline ``coords`` and ``mpp`` µm/px:
        each as :meth:`read_at_mpp` reads it, pixel for pixel.

        Where the level is read without resampling, neighbouring patches of a row (at
        most ``max_run``, level-pixel aligned, overlapping or touching) come from one
        region read and are cut out of it: one decode of the row's tiles instead of one
        per patch.
        """
        n, p = len(coords), patch_size
        out = np.empty((n, p, p, 3), dtype=np.uint8)
        level, read = self._level_read(mpp, (p, p))
        ds = self.level_downsamples[level]
        direct = read == (p, p)
        xy = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        aligned = direct and bool(np.all(np.mod(xy, ds) == 0)) if n else False
        if not aligned:
            for i, (x, y) in enumerate(xy):
                out[i] = self.read_at_mpp((int(x), int(y)), (p, p), mpp)
            return out
        span = p * ds  # a patch's width in baseline pixels
        order = np.lexsort((xy[:, 0], xy[:, 1]))
        start = 0
        while start < n:
            end = start + 1
            while (end < n and end - start < max_run
                   and xy[order[end], 1] == xy[order[start], 1]
                   and 0 < xy[order[end], 0] - xy[order[end - 1], 0] <= span):
                end += 1
            run = order[start:end]
            x0, y0 = int(xy[run[0], 0]), int(xy[run[0], 1])
            width = int((xy[run[-1], 0] - x0) // ds) + p
            region = self.read_region((x0, y0), level, (width, p))
            for i in run:
                off = int((xy[i, 0] - x0) // ds)
                out[i] = region[:, off:off + p]
            start = end
        return out

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """RGB image of the whole slide whose longer side is at most ``max_size`` pixels.

        Reads from the smallest level still at least as large as the thumbnail, in blocks,
        so a single-level gigapixel slide never has to fit in memory at once.
        """
        w0, h0 = self.dimensions
        factor = max(w0 / max_size, h0 / max_size, 1.0)
        tw, th = max(1, int(w0 / factor)), max(1, int(h0 / factor))
        level = self.best_level_for_downsample(factor)
        ds = self.level_downsamples[level]
        out = np.empty((th, tw, 3), dtype=np.uint8)
        block = 512  # thumbnail pixels per block side
        for ty in range(0, th, block):
            for tx in range(0, tw, block):
                bw, bh = min(block, tw - tx), min(block, th - ty)
                x0, y0 = round(tx * factor), round(ty * factor)
                x1, y1 = round((tx + bw) * factor), round((ty + bh) * factor)
                size = (max(1, round((x1 - x0) / ds)), max(1, round((y1 - y0) / ds)))
                region = self.read_region((x0, y0), level, size)
                if size != (bw, bh):
                    region = np.asarray(
                        Image.fromarray(region).resize((bw, bh), Image.Resampling.BILINEAR)
                    )
                out[ty:ty + bh, tx:tx + bw] = region
        return out


def _resolve_mpp(path: Path, metadata: float | None, user: float | None,
                 objective: float | None, default: float | None = None) -> tuple[float, str]:
    """The baseline µm/px and its source, by the order documented in the module."""
    for name, value in (("mpp", user), ("default_mpp", default)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise SlideReadError(f"{path}: {name}={value!r} is not a positive number")
    if user is not None:
        if metadata is not None and abs(user - metadata) > 0.05 * metadata:
            log.warning("%s: records %.4g µm/px; using the %.4g µm/px given instead",
                        path, metadata, user)
        return float(user), "user"
    if metadata is not None:
        return metadata, "metadata"
    if default is not None:
        return float(default), "user-default"
    if objective is not None and objective > 0:
        mpp = 10.0 / objective
        log.warning("%s: no microns-per-pixel in the file; assuming %.4g µm/px from its "
                    "%gx objective power (if that is wrong, %s)", path, mpp, objective, _MPP_FIX)
        return mpp, "objective-power"
    raise SlideReadError(f"{path}: the file records neither microns per pixel nor objective "
                         f"power; {_MPP_FIX}")


def _float(value: str | None) -> float | None:
    try:
        out = float(value) if value is not None else None
    except ValueError:
        return None
    return out if out is not None and math.isfinite(out) and out > 0 else None


def _mpp_from_resolution(path: Path, resolution: float | None, unit: str | None) -> float | None:
    """µm/px from TIFF resolution tags, or None when they are absent or implausible."""
    if resolution is None or unit not in ("centimeter", "inch"):
        return None
    mpp = (1e4 if unit == "centimeter" else 25400.0) / resolution
    if not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        log.debug("%s: ignoring resolution tag (%g px per %s = %.4g µm/px): not a microscope "
                  "resolution", path, resolution, unit, mpp)
        return None
    return mpp


def _white_composite(rgba: Image.Image) -> np.ndarray:
    """OpenSlide returns transparent pixels outside the scanned area: make them white."""
    alpha: tuple[int, int] = rgba.getextrema()[3]  # type: ignore[misc]
    if alpha[0] == 255:  # opaque (the usual case): PIL converts in C
        return np.asarray(rgba.convert("RGB"))
    arr = np.asarray(rgba)
    rgb, a = arr[..., :3], arr[..., 3:4].astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


class OpenSlideReader(SlideReader):
    """Any slide OpenSlide can open.

    Levels that are plain tiled TIFF pages (generic tiled TIFF, Aperio) are read tile by
    tile with tifffile wherever a read needs no resampling, once two of their tiles were
    checked equal to OpenSlide's pixels (:mod:`common.wsi.tiles`; ``tiles=False``: OpenSlide
    only).
    """

    def __init__(self, path: str | Path, mpp: float | None = None,
                 default_mpp: float | None = None, tiles: bool = True) -> None:
        self.path = Path(path)
        try:
            self._slide = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideError as err:
            raise SlideReadError(f"{self.path}: OpenSlide cannot read it ({err})") from None
        props = self._slide.properties
        metadata = _float(props.get(openslide.PROPERTY_NAME_MPP_X))
        if metadata is None:  # OpenSlide < 4 did not read generic TIFF resolution tags
            metadata = _mpp_from_resolution(self.path, _float(props.get("tiff.XResolution")),
                                            props.get("tiff.ResolutionUnit"))
        objective = _float(props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
        try:
            self.mpp, self.mpp_source = _resolve_mpp(self.path, metadata, mpp, objective,
                                                    default_mpp)
        except SlideReadError:
            self._slide.close()
            raise
        self.vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "unknown")
        self._dims: tuple[Size, ...] = tuple(
            (int(w), int(h)) for w, h in self._slide.level_dimensions
        )
        self._downsamples = tuple(float(d) for d in self._slide.level_downsamples)
        self._tiles = self._tile_decoder() if tiles else None

    def _tile_decoder(self) -> TiffTiles | None:
        """tifffile for the levels that are plain tiled TIFF pages (``common/wsi/tiles.py``),
        each checked against OpenSlide's pixels; None when no level qualifies."""
        from common.wsi.tiles import TiffTiles

        if self.vendor not in TILE_VENDORS:
            return None
        try:
            tiles = TiffTiles(self.path)
        except Exception as err:  # noqa: BLE001 (not a TIFF tifffile reads: OpenSlide only)
            log.debug("%s: not decoded by tile (%s)", self.path, err)
            return None

        def openslide_at(level: int, location: Location, size: Size) -> np.ndarray:
            ds = self._downsamples[level]  # the check reads in the level's pixels
            return self._openslide_region(level, (round(location[0] * ds),
                                                  round(location[1] * ds)), size)

        if not tiles.adopt(self._dims, openslide_at):
            tiles.close()
            return None
        return tiles

    @property
    def level_dimensions(self) -> tuple[Size, ...]:
        return self._dims

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        return self._downsamples

    def read_region(self, location: Location, level: int, size: Size) -> np.ndarray:
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} does not exist "
                             f"(the slide has {self.level_count})")
        if self._tiles is not None and self._tiles.covers(level):
            ds = self._downsamples[level]
            x, y = int(location[0]), int(location[1])
            if x % ds == 0 and y % ds == 0:  # on a pixel of the level: no resampling
                try:
                    region = self._tiles.region(level, (int(x // ds), int(y // ds)),
                                                (int(size[0]), int(size[1])))
                except Exception as err:  # noqa: BLE001 (a bad tile: OpenSlide's verdict)
                    log.debug("%s: tile decoding failed at %s level %d (%s); reading it "
                              "with OpenSlide", self.path, location, level, err)
                    region = None
                if region is not None:
                    return region
        return self._openslide_region(level, (int(location[0]), int(location[1])), size)

    def _openslide_region(self, level: int, location: Location, size: Size) -> np.ndarray:
        """OpenSlide's own pixels at baseline ``location``."""
        try:
            region = self._slide.read_region((int(location[0]), int(location[1])), level,
                                             (int(size[0]), int(size[1])))
        except openslide.OpenSlideError as err:
            raise SlideReadError(
                f"{self.path}: cannot decode the region at {tuple(location)} level {level} "
                f"({err}); the file is corrupt or truncated"
            ) from None
        return _white_composite(region)

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
        self._slide.close()


class ArrayReader(SlideReader):
    """A slide held in memory: one ``uint8[H, W, 3]`` array or a pyramid of them."""

    def __init__(self, levels: np.ndarray | Sequence[np.ndarray], mpp: float,
                 name: str = "<memory>") -> None:
        arrays = [levels] if isinstance(levels, np.ndarray) else list(levels)
        if not arrays:
            raise SlideReadError(f"{name}: no image given")
        for a in arrays:
            if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
                raise SlideReadError(f"{name}: expected uint8[H, W, 3] arrays, got "
                                     f"{a.dtype}{list(a.shape)}")
        self._levels = [np.ascontiguousarray(a[..., :3]) for a in arrays]
        self.path = Path(name)
        self.mpp, self.mpp_source = _resolve_mpp(self.path, None, mpp, None)

    @property
    def level_dimensions(self) -> tuple[Size, ...]:
        return tuple((a.shape[1], a.shape[0]) for a in self._levels)

    def read_region(self, location: Location, level: int, size: Size) -> np.ndarray:
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} does not exist "
                             f"(the slide has {self.level_count})")
        ds = self.level_downsamples[level]
        x, y = int(location[0] / ds), int(location[1] / ds)
        w, h = int(size[0]), int(size[1])
        img = self._levels[level]
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + w, img.shape[1]), min(y + h, img.shape[0])
        if x1 > x0 and y1 > y0:
            out[y0 - y:y1 - y, x0 - x:x1 - x] = img[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._levels = []


DECODE_ONCE_PIXELS = 64 * 2**20
"""Largest single-level slide (pixels) that :func:`decoded_once` holds in memory."""


def decoded_once(reader: SlideReader, max_pixels: int | None = None) -> ArrayReader | None:
    """The whole slide in memory, when it has a single level of at most ``max_pixels``
    (:data:`DECODE_ONCE_PIXELS` by default).

    Such a slide has no smaller level to take a thumbnail from: tissue detection decodes
    all of it, and reading its patches decodes most of it again. Decoded once here, the
    thumbnail and the patches are cut from the same pixels (``read_region`` of a level
    gives the pixels of any region read within it). None for pyramids, larger slides and
    slides already in memory. The copy keeps the slide's path, mpp and mpp source.
    """
    if isinstance(reader, ArrayReader) or reader.level_count != 1:
        return None
    width, height = reader.dimensions
    if width * height > (DECODE_ONCE_PIXELS if max_pixels is None else max_pixels):
        return None
    memory = ArrayReader(reader.read_region((0, 0), 0, (width, height)), mpp=reader.mpp,
                         name=str(reader.path))
    memory.mpp_source = reader.mpp_source
    return memory


class ImageReader(ArrayReader):
    """A plain image file (png, jpg, striped TIFF) as a one-level slide, decoded into memory."""

    def __init__(self, path: str | Path, mpp: float | None = None,
                 default_mpp: float | None = None) -> None:
        path = Path(path)
        try:
            with Image.open(path) as im:
                metadata = self._metadata_mpp(path, im)
                rgb = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
            rgb, metadata = self._read_tifffile(path, err)
        self._levels = [np.ascontiguousarray(rgb)]
        self.path = path
        self.mpp, self.mpp_source = _resolve_mpp(path, metadata, mpp, None, default_mpp)

    @staticmethod
    def _metadata_mpp(path: Path, im: Image.Image) -> float | None:
        tags = getattr(im, "tag_v2", None)
        if tags is None:
            return None
        units = {2: "inch", 3: "centimeter"}
        xres = tags.get(282)
        return _mpp_from_resolution(path, float(xres) if xres else None, units.get(tags.get(296)))

    @staticmethod
    def _read_tifffile(path: Path, pil_error: Exception) -> tuple[np.ndarray, float | None]:
        """TIFFs PIL cannot decode (e.g. tiled or 16-bit) via tifffile, else a clear error."""
        if path.suffix.lower() not in (".tif", ".tiff"):
            raise SlideReadError(f"{path}: cannot decode the image ({pil_error})") from None
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages.first
                arr = page.asarray()
        except Exception as err:  # tifffile raises many types for corrupt files
            raise SlideReadError(f"{path}: cannot decode the TIFF ({err})") from None
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] < 3:
            raise SlideReadError(f"{path}: unsupported TIFF layout {arr.shape}; expected RGB")
        if arr.dtype != np.uint8:
            arr = (arr.astype(np.float64) / max(float(arr.max()), 1.0) * 255).astype(np.uint8)
        return arr[..., :3], None


def _not_a_slide_reason(path: Path) -> str:
    """Why OpenSlide and PIL refused ``path``, as precisely as a cheap look can tell."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
    except OSError as err:
        return f"cannot read the file ({err.strerror})"
    if size == 0:
        return "the file is empty"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        order = "<" if head[:2] == b"II" else ">"
        if head[2:4] in (b"*\x00", b"\x00*"):
            first_ifd = int.from_bytes(head[4:8], "little" if order == "<" else "big")
        else:  # BigTIFF: the offset is 8 bytes at byte 8
            with path.open("rb") as fh:
                fh.seek(8)
                first_ifd = int.from_bytes(fh.read(8), "little" if order == "<" else "big")
        if first_ifd >= size:
            return (f"truncated TIFF: its first image directory is at byte {first_ifd:,} but "
                    f"the file has {size:,} bytes (copy it again)")
        return "a TIFF that OpenSlide cannot read as a slide (corrupt, or not tiled)"
    return f"not a slide format OpenSlide reads (file starts with {head!r})"


def open_slide(path: str | Path, mpp: float | None = None, *,
               default_mpp: float | None = None) -> SlideReader:
    """Open a whole-slide image or plain image: the one front door to slide access.

    Args:
        path: the slide file (for DICOM, any ``.dcm`` file of the slide; for MIRAX the
            ``.mrxs`` file beside its data folder).
        mpp: baseline microns per pixel; overrides the file's value.
        default_mpp: baseline microns per pixel of files that record none (most PNG/JPEG
            files); ignored for files that do.

    Raises:
        SlideReadError: missing, unsupported, corrupt or truncated file, or unknown
            resolution; the message names the file and the reason.
    """
    path = Path(path)
    if not path.exists():
        raise SlideReadError(f"{path}: slide not found")
    if path.is_dir():
        raise SlideReadError(f"{path}: is a folder, not a slide file")
    suffix = path.suffix.lower()
    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except openslide.OpenSlideError:
        fmt = None
    if fmt is not None:
        return OpenSlideReader(path, mpp, default_mpp)
    if suffix in IMAGE_SUFFIXES:
        try:
            return ImageReader(path, mpp, default_mpp)
        except SlideReadError as err:
            if "microns per pixel" in str(err):
                raise
            raise SlideReadError(f"{path}: {_not_a_slide_reason(path)}") from None
    if suffix in SLIDE_SUFFIXES:
        raise SlideReadError(f"{path}: {_not_a_slide_reason(path)}")
    raise SlideReadError(
        f"{path}: unsupported file type {suffix or '(no suffix)'!r}; supported: "
        f"{', '.join(sorted(SLIDE_SUFFIXES))}"
    )
