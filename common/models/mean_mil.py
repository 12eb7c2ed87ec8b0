"""Mean-pooling MIL: the embedding-level baseline of Ilse, Tomczak and Welling (2018).

Each instance is embedded (``Linear -> ReLU``, or kept as is with ``hidden_dim = 0``), the
embeddings of a bag are averaged, and a linear classifier scores the mean. With a few
hundred parameters it is the model of choice where the DP noise, not the data, limits
what a federation learns: noise is added to every coordinate of every step, so the
gradient's signal per coordinate falls with the square root of the parameter count
(docs/RESULTS.md: distributed DP on UCSB).
"""

from __future__ import annotations

import torch
from torch import nn

from common.models.mil import BagClassifier, MILOutput, check_bags


class MeanMIL(BagClassifier):
    """Mean pooling of (embedded) instances, then a linear classifier.

    Args:
        in_dim: instance feature size ``D``.
        hidden_dim: instance embedding size; 0 classifies the mean of the raw features
            (a linear model of ``D + 1`` parameters).
        dropout: dropout on the instance embedding.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_dim < 0:
            raise ValueError(f"hidden_dim must be 0 or more, got {hidden_dim}")
        self.opacus_hooks = True
        self.embed: nn.Module = (
            nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
            if hidden_dim else nn.Identity())
        self.classifier = nn.Linear(hidden_dim or in_dim, 1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """Classify bags ``features[B, N, D]`` with ``mask[B, N]`` (True = real instance);
        the pooling's weights (``attention``) are uniform over a bag's instances."""
        check_bags(features)
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        weights = mask.to(features.dtype)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
        pooled = torch.einsum("bn,bnm->bm", weights, self.embed(features))
        return MILOutput(logits=self.classifier(pooled).squeeze(-1), attention=weights)


def mean_mil(in_dim: int, **kwargs: int | float) -> MeanMIL:
    """Mean-pooling MIL (Ilse et al. 2018's embedding-level baseline)."""
    return MeanMIL(in_dim, **kwargs)  # type: ignore[arg-type]
