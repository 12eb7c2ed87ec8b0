"""Predictive uncertainty and abstention: MC dropout, test-time augmentation, coverage.

A model's score for a slide becomes a distribution: ``passes`` forward passes with its
dropout layers active (MC dropout, Gal and Ghahramani 2016; any model of
:mod:`common.models` with ``dropout > 0``) or, for patch models, over random rotations
by 90 degrees and flips of the patches (test-time augmentation, as the seed review
describes). The spread of the positive-class probability is the uncertainty. A pathologist
then lets the model decide only where it is sure: :func:`coverage_accuracy` is the
accuracy on the most confident fraction of slides, for every fraction, and
:func:`abstention_threshold` the largest uncertainty that keeps a chosen accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class Prediction:
    """Per-slide mean probability of the positive class and its spread over passes."""

    probability: np.ndarray
    uncertainty: np.ndarray
    """Standard deviation of the probability over the passes (0 for one pass)."""


def _dropout_active(model: nn.Module) -> list[nn.Module]:
    layers: list[nn.Module] = [m for m in model.modules()
                               if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    for layer in layers:
        layer.train()
    return layers


def mc_dropout(model: nn.Module, inputs: tuple[torch.Tensor, ...], passes: int = 20,
               seed: int = 0) -> Prediction:
    """``passes`` scorings of ``inputs`` with dropout on (everything else in eval mode)."""
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    was_training = model.training
    model.eval()
    layers = _dropout_active(model) if passes > 1 else []
    if passes > 1 and not layers:
        raise ValueError("the model has no dropout layer: build it with dropout > 0 "
                         "(e.g. --set model-options=dropout=0.25) for MC dropout")
    try:
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(seed)
            probs = torch.stack([torch.sigmoid(_scores(model, inputs))
                                 for _ in range(passes)])
    finally:
        model.train(was_training)
    return _summary(probs)


def augmented(model: nn.Module, patches: torch.Tensor, passes: int = 8,
                           seed: int = 0) -> Prediction:
    """Scorings of ``patches[B, K, 3, P, P]`` under random 90-degree rotations and flips
    (one draw per pass for the whole batch; the first pass is the identity)."""
    if patches.dim() != 5:
        raise ValueError(f"patches must be [B, K, 3, P, P], got {tuple(patches.shape)}")
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    outs = []
    try:
        with torch.no_grad():
            for i in range(passes):
                turns, flip = (0, False) if i == 0 else (int(rng.integers(4)),
                                                         bool(rng.integers(2)))
                x = torch.rot90(patches, turns, dims=(3, 4))
                if flip:
                    x = x.flip(4)
                outs.append(torch.sigmoid(_scores(model, (x,))))
    finally:
        model.train(was_training)
    return _summary(torch.stack(outs))


def _scores(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return model.scores(*inputs)  # type: ignore[operator]


def _summary(probs: torch.Tensor) -> Prediction:
    p = probs.double().numpy()
    return Prediction(p.mean(axis=0), p.std(axis=0))


def coverage_accuracy(probability: np.ndarray, uncertainty: np.ndarray,
                      labels: np.ndarray, threshold: float = 0.5
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(coverage, accuracy, uncertainty cut)``: keeping the ``i + 1`` least uncertain
    slides, the fraction kept, their accuracy at ``threshold`` and the largest
    uncertainty kept. Ties in uncertainty are kept or dropped together."""
    probability, uncertainty = np.asarray(probability, float), np.asarray(uncertainty, float)
    labels = np.asarray(labels).astype(bool)
    if not len(labels):
        return np.zeros(0), np.zeros(0), np.zeros(0)
    order = np.argsort(uncertainty, kind="stable")
    correct = ((probability > threshold) == labels)[order].astype(float)
    cut = uncertainty[order]
    last = np.r_[cut[1:] != cut[:-1], True]  # the last slide of each group of ties
    kept = np.arange(1, len(labels) + 1)[last]
    return kept / len(labels), np.cumsum(correct)[last] / kept, cut[last]


def abstention_threshold(probability: np.ndarray, uncertainty: np.ndarray,
                         labels: np.ndarray, target_accuracy: float,
                         threshold: float = 0.5) -> dict[str, Any]:
    """The largest uncertainty at which the kept slides reach ``target_accuracy``: the
    model decides below it and abstains above. Chosen on validation slides."""
    coverage, accuracy, cut = coverage_accuracy(probability, uncertainty, labels, threshold)
    ok = np.flatnonzero(accuracy >= target_accuracy)
    if not len(ok):
        return {"uncertainty": None, "coverage": 0.0, "accuracy": None}
    i = int(ok[-1])
    return {"uncertainty": float(cut[i]), "coverage": float(coverage[i]),
            "accuracy": float(accuracy[i])}


def accuracy_at_coverage(probability: np.ndarray, uncertainty: np.ndarray,
                         labels: np.ndarray, coverage: float,
                         threshold: float = 0.5) -> float:
    """Accuracy on the least uncertain ``coverage`` fraction of slides (at least that)."""
    cov, acc, _ = coverage_accuracy(probability, uncertainty, labels, threshold)
    if not len(cov):
        return float("nan")
    return float(acc[int(np.searchsorted(cov, coverage - 1e-12))])


__all__ = ["Prediction", "abstention_threshold", "accuracy_at_coverage", "coverage_accuracy",
           "augmented", "mc_dropout"]
