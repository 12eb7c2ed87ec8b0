"""Small padded bags for any bag model, built by the model's declared kind."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.data.multiscale import pack_regions
from common.models import build_model, model_spec

CHILDREN = 4
"""High-power patches per region of the multi-scale test bags."""


def children_of(name: str) -> int:
    return CHILDREN if model_spec(name).kind == "multiscale" else 0


def build(name: str, d: int = 12, **options: Any) -> torch.nn.Module:
    """Model ``name`` for bags of ``d`` features (and ``CHILDREN`` per region, by kind)."""
    children = children_of(name)
    return build_model(name, in_dim=d, **({"children": children} if children else {}),
                       **options)


def bags(name: str | None = None, b: int = 5, n: int = 9, d: int = 12,
         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(features[b, n, width], mask[b, n], labels[b])`` of different real lengths, as
    padded bags have; multi-scale rows (with 1 to ``CHILDREN`` children a region) for a
    model of kind ``multiscale``."""
    children = children_of(name) if name else 0
    g = torch.Generator().manual_seed(seed)
    if children:
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(b):
            kids = rng.integers(1, children + 1, size=n)
            parent = np.repeat(np.arange(n), kids)
            rows.append(pack_regions(rng.normal(size=(n, d)).astype(np.float32),
                                     rng.normal(size=(len(parent), d)).astype(np.float32),
                                     parent, children))
        x = torch.from_numpy(np.stack(rows))
    else:
        x = torch.randn(b, n, d, generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    for i in range(b):
        mask[i, n - i:] = False
    y = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0] * (b // 5 + 1))[:b]
    return x, mask, y


def assert_per_bag_gradients(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor,
                             y: torch.Tensor) -> None:
    """PathFed's torch.func per-bag gradients equal one bag at a time, for every parameter
    (each must get a gradient). Use the model in eval mode: training-time randomness
    (dropout, masking) is drawn per bag but differently in the two computations."""
    from common.training import _vmap_grad_samples

    _vmap_grad_samples(model, [x, mask, y])
    per_bag = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    for i in range(len(y)):
        model.zero_grad()
        model.sample_losses(x[i : i + 1], mask[i : i + 1], y[i : i + 1]).sum().backward()
        for n, p in model.named_parameters():
            assert p.grad is not None, n  # a parameter the model leaves unused
            assert torch.allclose(per_bag[n][i], p.grad, atol=1e-6), n
