"""Multi-scale MIL: cross-scale attention from each low-power region to its high-power
patches, then gated attention over the regions (the seed's MC-ViT idea, on features).

The bag's instances are regions (:mod:`common.data.multiscale`): a low-power patch and up
to ``K`` high-power children. Each region's low-power embedding queries its children's
embeddings (scaled dot product, softmax over the present children), so that what the
region looks like at low power decides which of its cells matter; the region's embedding
is a learned mix of its own and its attended children's. Gated attention (Ilse et al.
2018) pools the regions into the slide's embedding. ``scales`` ablates the cross-scale
view: ``high`` drops the low-power features (a learned query attends over the children),
``low`` drops the children, on the same data.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from common.data.multiscale import Layout, unpack
from common.models.mil import BagClassifier, GatedAttention, MILOutput, check_bags, masked_softmax

SCALES = ("both", "high", "low")


class MultiScaleMIL(BagClassifier):
    """Cross-scale region embeddings, pooled by gated attention.

    Args:
        in_dim: feature size ``D`` of one patch (at either scale).
        children: high-power patches per region ``K`` (the data's layout).
        hidden_dim: size of the patch and region embeddings.
        attention_dim: size of the cross-scale queries and of the pooling's attention.
        dropout: dropout on the patch embeddings.
        scales: ``both``, or the ablations ``high`` and ``low``.
    """

    input_kind = "multiscale"

    def __init__(self, in_dim: int, children: int = 16, hidden_dim: int = 32,
                 attention_dim: int = 16, dropout: float = 0.0, scales: str = "both") -> None:
        super().__init__()
        if scales not in SCALES:
            raise ValueError(f"scales must be one of {', '.join(SCALES)}, got {scales!r}")
        if children < 1:
            raise ValueError(f"children must be at least 1, got {children}")
        self.layout = Layout(in_dim, children)
        self.scales = scales
        self.hidden_dim = hidden_dim

        def embedding() -> nn.Module:
            return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))

        # only the parameters a variant uses, so that every one gets a gradient
        self.embed_low = embedding() if scales != "high" else None
        self.embed_high = embedding() if scales != "low" else None
        self.query = nn.Linear(hidden_dim, attention_dim) if scales == "both" else None
        self.key = nn.Linear(hidden_dim, attention_dim) if scales != "low" else None
        self.fixed_query = (nn.Parameter(torch.zeros(attention_dim)) if scales == "high"
                            else None)
        """The query of ``scales="high"``, where no low-power patch asks."""
        self.fuse = nn.Sequential(nn.Linear(2 * hidden_dim if scales == "both" else hidden_dim,
                                            hidden_dim), nn.ReLU())
        self.pool = GatedAttention(hidden_dim, attention_dim)
        self.classifier = nn.Linear(hidden_dim, 1)

    @property
    def in_width(self) -> int:
        """Columns of an input row."""
        return self.layout.width

    def regions(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(region embeddings [B, M, H], cross-scale attention [B, M, K])``."""
        check_bags(features)
        if features.shape[-1] != self.layout.width:
            raise ValueError(f"rows of {features.shape[-1]} columns; this model takes "
                             f"{self.layout.width} ({self.layout.dim} features x (1 + "
                             f"{self.layout.children} children) + {self.layout.children})")
        low, high, present = unpack(features, self.layout)
        parts = []
        cross = torch.zeros_like(present, dtype=features.dtype)
        if self.embed_low is not None:
            h_low = self.embed_low(low)  # [B, M, H]
            parts.append(h_low)
        if self.embed_high is not None and self.key is not None:
            h_high = self.embed_high(high)  # [B, M, K, H]
            if self.query is not None:
                q = self.query(h_low)
            else:
                assert self.fixed_query is not None
                q = self.fixed_query.expand(*h_high.shape[:-2], -1)
            sim = (q.unsqueeze(-2) * self.key(h_high)).sum(-1) / math.sqrt(q.shape[-1])
            cross = masked_softmax(sim, present)  # [B, M, K]; zero for a childless region
            parts.append(torch.einsum("bmk,bmkh->bmh", cross, h_high))
        return self.fuse(torch.cat(parts, dim=-1)), cross

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        """Classify bags of region rows ``features[B, M, width]`` with ``mask[B, M]``."""
        region, _ = self.regions(features)
        attention = masked_softmax(self.pool(region), mask)  # [B, M]
        pooled = torch.einsum("bm,bmh->bh", attention, region)
        return MILOutput(logits=self.classifier(pooled).squeeze(-1), attention=attention)

    def patch_scores(self, features: torch.Tensor, mask: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """Weight of each high-power patch ``[B, M, K]``: its region's pooling weight times
        its share of the region's cross-scale attention (zero for absent children)."""
        region, cross = self.regions(features)
        attention = masked_softmax(self.pool(region), mask)
        return attention.unsqueeze(-1) * cross


def multiscale_mil(in_dim: int, **kwargs: Any) -> MultiScaleMIL:
    """Multi-scale MIL with cross-scale attention."""
    return MultiScaleMIL(in_dim, **kwargs)
