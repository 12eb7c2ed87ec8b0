"""Predictive uncertainty: MC dropout, test-time augmentation, coverage and abstention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.models import build_model, models_of_kind
from common.models.base import BAG_KINDS
from common.uncertainty import (
    abstention_threshold,
    accuracy_at_coverage,
    augmented,
    coverage_accuracy,
    mc_dropout,
)
from tests._bags import bags, build


@pytest.mark.parametrize("name", models_of_kind(*BAG_KINDS))
def test_mc_dropout_spreads_only_with_dropout(name: str) -> None:
    torch.manual_seed(0)
    x, _, _ = bags(name, b=6, n=10, d=8)
    mask = torch.ones(6, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match="dropout > 0"):
        mc_dropout(build(name, d=8), (x, mask), passes=5)
    model = build(name, d=8, dropout=0.5)
    pred = mc_dropout(model, (x, mask), passes=10)
    assert pred.probability.shape == (6,) and (pred.uncertainty > 0).any()
    again = mc_dropout(model, (x, mask), passes=10)
    assert np.array_equal(pred.probability, again.probability)  # seeded
    single = mc_dropout(model, (x, mask), passes=1)
    assert (single.uncertainty == 0).all()
    model.eval()
    assert np.allclose(single.probability, torch.sigmoid(model.scores(x, mask)).detach())


def test_tta_of_the_patch_cnn() -> None:
    torch.manual_seed(0)
    model = build_model("residual-patch-cnn", patch_size=16).train()
    patches = torch.randn(3, 4, 3, 16, 16)
    pred = augmented(model, patches, passes=6)
    assert pred.probability.shape == (3,) and (pred.uncertainty >= 0).all()
    assert model.training  # its mode is restored


def test_coverage_accuracy_and_abstention() -> None:
    labels = np.array([1, 1, 0, 0, 1, 0])
    prob = np.array([0.9, 0.8, 0.2, 0.6, 0.4, 0.45])
    unc = np.array([0.01, 0.02, 0.03, 0.20, 0.30, 0.30])
    coverage, accuracy, cut = coverage_accuracy(prob, unc, labels)
    assert list(coverage) == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 1.0])  # ties together
    assert list(accuracy) == pytest.approx([1, 1, 1, 0.75, 4 / 6])
    assert abstention_threshold(prob, unc, labels, 0.99) == {
        "uncertainty": 0.03, "coverage": 0.5, "accuracy": 1.0}
    assert accuracy_at_coverage(prob, unc, labels, 0.6) == pytest.approx(0.75)
    assert abstention_threshold(prob, unc, 1 - labels, 1.0)["uncertainty"] is None
