"""Whole-slide images: reading, tissue detection, tiling, stain handling, feature extraction.

OpenSlide is imported only in this package. :func:`open_slide` is the one front door to
slide access; :func:`common.wsi.extract.prepare` turns a folder of slides into per-slide
HDF5 feature files.
"""

from common.wsi.reader import (
    SLIDE_SUFFIXES,
    ArrayReader,
    ImageReader,
    OpenSlideReader,
    SlideReader,
    open_slide,
)
from common.wsi.tiling import PatchGrid, quality_flags, tile_tissue
from common.wsi.tissue import tissue_mask

__all__ = [
    "SLIDE_SUFFIXES", "ArrayReader", "ImageReader", "OpenSlideReader", "PatchGrid",
    "SlideReader", "open_slide", "quality_flags", "tile_tissue", "tissue_mask",
]
