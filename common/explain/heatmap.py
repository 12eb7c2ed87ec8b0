"""Heatmaps: a slide's patch scores, rank-normalised, blended over its thumbnail.

Ranks rather than raw scores: attention weights of one slide span orders of magnitude,
and ranks make slides comparable (0 = the patch the model weighed least, 1 = most).
Patches are drawn as squares of their own size; the colour bar says what the colours
mean. Without the slide (a folder of features only), the squares lie on a grey canvas
of the slide's size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.explain.segment import rank_normalise


def render_heatmap(path: Path, coords: np.ndarray, size_baseline: float,
                   scores: np.ndarray, dimensions: tuple[int, int],
                   thumbnail: np.ndarray | None = None, title: str = "",
                   alpha: float = 0.55) -> Path:
    """Write the heatmap PNG of one slide to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    w0, h0 = dimensions
    if thumbnail is None:
        scale = min(1.0, 1024 / max(w0, h0))
        thumbnail = np.full((max(1, round(h0 * scale)), max(1, round(w0 * scale)), 3), 235,
                            np.uint8)
    th, tw = thumbnail.shape[:2]
    sx, sy = tw / w0, th / h0
    ranks = rank_normalise(scores)
    cmap = plt.get_cmap("inferno")
    overlay = np.zeros((th, tw, 4), dtype=np.float32)
    for (x, y), r in zip(coords, ranks):
        x0, y0 = int(x * sx), int(y * sy)
        x1 = max(x0 + 1, int(round((x + size_baseline) * sx)))
        y1 = max(y0 + 1, int(round((y + size_baseline) * sy)))
        overlay[y0:y1, x0:x1] = cmap(float(r))
    covered = overlay[..., 3:4] > 0
    base = thumbnail[..., :3].astype(np.float32) / 255.0
    blended = np.where(covered, (1 - alpha) * base + alpha * overlay[..., :3], base)
    fig, ax = plt.subplots(figsize=(7, 7 * th / tw + 0.6), dpi=120)
    image = ax.imshow(blended, interpolation="nearest")
    image.set_cmap(cmap)
    image.set_clim(0, 1)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    bar = fig.colorbar(plt.cm.ScalarMappable(cmap=cmap), ax=ax, fraction=0.035, pad=0.02)
    bar.set_label("patch score rank (0 lowest, 1 highest)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` highest-scoring patches, best first."""
    return np.argsort(-np.asarray(scores), kind="stable")[:k]


__all__ = ["render_heatmap", "top_indices"]
