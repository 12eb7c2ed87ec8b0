"""Sparse MIL: the seed's SS-MIL idea, a few key patches chosen and classified alone.

Each instance gets a learned score; *sparsemax* (Martins and Astudillo, ICML 2016) turns
the scores into pooling weights that are exactly zero outside a small support, the key
patches. The selection is differentiable (sparsemax is piecewise linear), so it is
learned end to end by DP-SGD like any layer, and the bag is classified from the selected
patches alone. :meth:`SparseMIL.selected` says how many and which patches were chosen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.models.mil import BagClassifier, GatedAttention, MILOutput, check_bags

_PAD = -1e9  # far below any real score; padding never enters the support


def sparsemax(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sparsemax over the last dimension: the Euclidean projection of ``scores`` onto the
    simplex, zero outside its support (and on padding)."""
    if mask is not None:
        scores = scores.masked_fill(~mask, _PAD)
    z, _ = scores.sort(dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    cumulative = z.cumsum(dim=-1)
    support = (1 + k * z > cumulative).to(z.dtype)
    size = support.sum(dim=-1, keepdim=True)  # >= 1: the top score is always in
    tau = (cumulative.gather(-1, size.long() - 1) - 1) / size
    return (scores - tau).clamp(min=0.0)


class SparseMIL(BagClassifier):
    """Gated-attention scores, sparsemax pooling, a classifier of the selected patches.

    Args:
        in_dim: instance feature size ``D``.
        hidden_dim: instance embedding size.
        attention_dim: size of the scoring network.
        temperature: scores are divided by it before sparsemax; lower selects fewer.
        dropout: dropout on the instance embedding.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 32, attention_dim: int = 16,
                 temperature: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.score = GatedAttention(hidden_dim, attention_dim)
        self.classifier = nn.Linear(hidden_dim, 1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        check_bags(features)
        h = self.embed(features)
        weights = sparsemax(self.score(h) / self.temperature, mask)
        pooled = torch.einsum("bn,bnm->bm", weights, h)
        return MILOutput(logits=self.classifier(pooled).squeeze(-1), attention=weights)

    def selected(self, features: torch.Tensor, mask: torch.Tensor | None = None
                 ) -> list[torch.Tensor]:
        """The indices of each bag's key patches (its nonzero pooling weights)."""
        with torch.no_grad():
            weights = self(features, mask).attention
        return [row.nonzero().flatten() for row in weights]


def sparse_mil(in_dim: int, **kwargs: Any) -> SparseMIL:
    """Sparse MIL (the seed's SS-MIL: sparsemax selection of key patches)."""
    return SparseMIL(in_dim, **kwargs)
