"""Classification metrics that can be pooled across sites from counts alone.

A site reports confusion counts and a histogram of its validation scores per class;
summing those over sites gives pooled accuracy, balanced accuracy and AUC without any
per-slide score leaving a hospital.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

HIST_BINS = 256
LOGIT_RANGE = 12.0
LOGIT_SCALE = 0.01
"""Bins are even in ``asinh(logit / LOGIT_SCALE)``: about 0.0006 logits wide near 0 and
6 % of the logit elsewhere, up to +/-``LOGIT_RANGE``. Even bins 0.094 logits wide lumped a
barely trained model's scores (all within a few hundredths of 0 under strong DP noise)
into one bin: its AUC read 0.5 one round and 0.97 the next."""


def score_edges() -> np.ndarray:
    """The ``HIST_BINS - 1`` inner edges of the score histograms (logits, increasing)."""
    top = np.arcsinh(LOGIT_RANGE / LOGIT_SCALE)
    return LOGIT_SCALE * np.sinh(np.linspace(-top, top, HIST_BINS - 1))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Exact ROC AUC (Mann-Whitney, ties count one half); NaN with one class only."""
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks for ties
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = start + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from per-class score histograms over the same bins (ties within a bin: 1/2)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def roc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr)`` of per-class score histograms, from (0, 0) to (1, 1)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if not pos.sum() or not neg.sum():
        return np.array([0.0, 1.0]), np.array([0.0, 1.0])
    # predicting positive from bin k upwards, k from above the top bin down to 0
    tpr = np.concatenate([[0.0], np.cumsum(pos[::-1])]) / pos.sum()
    fpr = np.concatenate([[0.0], np.cumsum(neg[::-1])]) / neg.sum()
    return fpr, tpr


def calibration_from_histograms(pos: np.ndarray, neg: np.ndarray, bins: int = 10
                                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reliability diagram of per-class logit histograms: for ``bins`` even bins of the
    predicted probability, ``(mean predicted probability, fraction positive, slides)``
    of the non-empty ones. A histogram bin counts at the probability of its centre."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    inner = score_edges()
    centres = np.concatenate([[inner[0] - 1.0], (inner[:-1] + inner[1:]) / 2,
                              [inner[-1] + 1.0]])
    prob = 1 / (1 + np.exp(-centres))
    which = np.minimum((prob * bins).astype(int), bins - 1)
    n = np.bincount(which, pos + neg, minlength=bins)
    positives = np.bincount(which, pos, minlength=bins)
    mean_p = np.bincount(which, prob * (pos + neg), minlength=bins)
    keep = n > 0
    return mean_p[keep] / n[keep], positives[keep] / n[keep], n[keep]


def expected_calibration_error(prob: np.ndarray, labels: np.ndarray, bins: int = 15
                               ) -> float:
    """ECE (Guo et al. 2017) of positive-class probabilities against 0/1 labels: over
    ``bins`` even bins of the probability, the share-weighted gap between the fraction
    positive and the mean probability."""
    prob, labels = np.asarray(prob, float).ravel(), np.asarray(labels, float).ravel()
    if not len(prob):
        return float("nan")
    which = np.minimum((prob * bins).astype(int), bins - 1)
    n = np.bincount(which, minlength=bins)
    gap = np.bincount(which, labels, minlength=bins) - np.bincount(which, prob, minlength=bins)
    return float(np.abs(gap).sum() / n.sum())


def ece_from_histograms(pos: np.ndarray, neg: np.ndarray, bins: int = 15) -> float:
    """:func:`expected_calibration_error` of per-class logit histograms (a histogram bin
    counts at the probability of its centre, as in :func:`calibration_from_histograms`)."""
    mean_p, frac, n = calibration_from_histograms(pos, neg, bins)
    return float((n * np.abs(frac - mean_p)).sum() / n.sum()) if n.sum() else float("nan")


@dataclass
class EvalCounts:
    """Additive evaluation counts of one site (or of several, summed)."""

    n: int = 0
    loss_sum: float = 0.0
    tp: int = 0
    tn: int = 0
    fp: int = 0
    fn: int = 0
    hist_pos: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    hist_neg: list[int] = field(default_factory=lambda: [0] * HIST_BINS)

    @classmethod
    def from_predictions(cls, logits: np.ndarray, labels: np.ndarray,
                         loss_sum: float) -> EvalCounts:
        logits, labels = np.asarray(logits, float), np.asarray(labels).astype(bool)
        pred = logits > 0
        edges = score_edges()
        bins = np.searchsorted(edges, logits)
        return cls(
            n=len(labels), loss_sum=float(loss_sum),
            tp=int((pred & labels).sum()), tn=int((~pred & ~labels).sum()),
            fp=int((pred & ~labels).sum()), fn=int((~pred & labels).sum()),
            hist_pos=np.bincount(bins[labels], minlength=HIST_BINS).tolist(),
            hist_neg=np.bincount(bins[~labels], minlength=HIST_BINS).tolist(),
        )

    def __add__(self, other: EvalCounts) -> EvalCounts:
        out: dict[str, Any] = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            out[f.name] = [x + y for x, y in zip(a, b)] if isinstance(a, list) else a + b
        return EvalCounts(**out)

    @property
    def loss(self) -> float:
        return self.loss_sum / self.n if self.n else float("nan")

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.n if self.n else float("nan")

    @property
    def balanced_accuracy(self) -> float:
        tpr = self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")
        tnr = self.tn / (self.tn + self.fp) if self.tn + self.fp else float("nan")
        return float(np.nanmean([tpr, tnr])) if self.n else float("nan")

    def calibrated(self) -> tuple[float, float]:
        """The logit threshold that maximises balanced accuracy on these counts, and that
        balanced accuracy (NaN with one class). Chosen from the score histograms alone, so
        no per-slide score is needed; it is tuned on the data it is reported on."""
        pos, neg = np.array(self.hist_pos, float), np.array(self.hist_neg, float)
        if not pos.sum() or not neg.sum():
            return 0.0, float("nan")
        edges = score_edges()
        # predicting positive from bin k upwards: TPR = pos[k:]/P, TNR = neg[:k]/N
        tpr = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]]) / pos.sum()
        tnr = np.concatenate([[0.0], np.cumsum(neg)]) / neg.sum()
        balanced = (tpr + tnr) / 2
        k = int(np.argmax(balanced))
        threshold = float(edges[k - 1]) if 0 < k < len(edges) + 1 else (
            -LOGIT_RANGE if k == 0 else LOGIT_RANGE)
        return threshold, float(balanced[k])

    @property
    def auc(self) -> float:
        return auc_from_histograms(np.array(self.hist_pos), np.array(self.hist_neg))

    def to_metrics(self) -> dict[str, int | float | bytes]:
        """Flat scalars (histograms as little-endian int32 bytes), as Flower metrics allow."""
        out: dict[str, int | float | bytes] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = np.asarray(value, "<i4").tobytes() if isinstance(value, list) else value
        return out
