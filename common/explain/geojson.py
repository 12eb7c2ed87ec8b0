"""QuPath GeoJSON: one tile per patch with its score, and the merged tumour regions.

QuPath (0.4 and later) imports a GeoJSON ``FeatureCollection`` by drag and drop or
*File > Import objects from file*. Each ``Feature`` is a ``Polygon`` in level-0 (baseline)
pixel coordinates with ``properties``: ``objectType`` (``tile``, or ``annotation`` for a
merged region), ``classification`` with both ``name`` and ``color`` (``[r, g, b]``:
QuPath's reader throws on a classification without its colour) and ``measurements``, a
dict of numbers (QuPath shows them in its measurement table and can colour tiles by them).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

TUMOUR = {"name": "Tumor", "color": [200, 0, 0]}
OTHER = {"name": "Other", "color": [20, 120, 20]}


def _square(x: float, y: float, side: float) -> list[list[list[float]]]:
    x, y = float(x), float(y)
    return [[[x, y], [x + side, y], [x + side, y + side], [x, y + side], [x, y]]]


def slide_geojson(coords: np.ndarray, size_baseline: float, scores: np.ndarray,
                  tumour: np.ndarray, probability: float) -> dict[str, Any]:
    """The FeatureCollection of one slide: a tile per patch (its raw score, rank score and
    the slide's probability as measurements), and one annotation per connected tumour
    region (the union of its tumour tiles)."""
    from shapely.geometry import box, mapping
    from shapely.ops import unary_union

    from common.explain.segment import rank_normalise

    ranks = rank_normalise(scores)
    features: list[dict[str, Any]] = []
    for i, ((x, y), score) in enumerate(zip(coords, scores)):
        features.append({
            "type": "Feature", "id": f"tile-{i}",
            "geometry": {"type": "Polygon", "coordinates": _square(x, y, size_baseline)},
            "properties": {
                "objectType": "tile",
                "classification": dict(TUMOUR if tumour[i] else OTHER),
                "measurements": {"score": float(score), "rank score": float(ranks[i]),
                                 "slide probability": float(probability)},
            },
        })
    squares = [box(float(x), float(y), float(x) + size_baseline, float(y) + size_baseline)
               for (x, y) in coords[np.asarray(tumour, bool)]]
    merged = unary_union(squares) if squares else None
    parts = (list(getattr(merged, "geoms", [merged])) if merged is not None
             and not merged.is_empty else [])
    for k, part in enumerate(parts):
        features.append({
            "type": "Feature", "id": f"tumour-{k}",
            "geometry": mapping(part),
            "properties": {"objectType": "annotation", "classification": dict(TUMOUR),
                           "measurements": {"area px2": float(part.area),
                                            "slide probability": float(probability)}},
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: Path, collection: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(collection, default=_plain))
    tmp.replace(path)
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(type(value).__name__)


def check_geojson(collection: dict[str, Any], dimensions: tuple[int, int]) -> list[str]:
    """What would stop QuPath importing ``collection`` (or place it off the slide):
    empty when it is fine. Checks the schema QuPath reads and every coordinate."""
    from shapely.geometry import shape

    problems = []
    if collection.get("type") != "FeatureCollection":
        return ["not a FeatureCollection"]
    w0, h0 = dimensions
    for feature in collection.get("features", []):
        fid = feature.get("id", "?")
        props = feature.get("properties", {})
        if feature.get("type") != "Feature":
            problems.append(f"{fid}: not a Feature")
        if props.get("objectType") not in ("tile", "annotation", "detection"):
            problems.append(f"{fid}: objectType {props.get('objectType')!r}")
        cls = props.get("classification", {})
        color = cls.get("color")
        if not isinstance(cls.get("name"), str) or not (
                isinstance(color, list) and len(color) == 3
                and all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
            problems.append(f"{fid}: classification needs a name and an [r, g, b] color")
        measurements = props.get("measurements", {})
        if not isinstance(measurements, dict) or not all(
                isinstance(v, (int, float)) and math.isfinite(v) for v in measurements.values()):
            problems.append(f"{fid}: measurements must be a dict of finite numbers")
        geom = shape(feature.get("geometry"))
        if not geom.is_valid:
            problems.append(f"{fid}: invalid geometry")
        x0, y0, x1, y1 = geom.bounds
        if x0 < 0 or y0 < 0 or x1 > w0 + 1 or y1 > h0 + 1:
            problems.append(f"{fid}: outside the slide ({x0:.0f}, {y0:.0f}, {x1:.0f}, "
                            f"{y1:.0f}) of {w0} x {h0}")
    return problems


__all__ = ["OTHER", "TUMOUR", "check_geojson", "slide_geojson", "write_geojson"]
