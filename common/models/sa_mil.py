"""Self-attention MIL (SA-MIL): instances attend to each other before attention pooling.

The seed's SA-MIL; Rymarczyk et al., *Kernel Self-Attention for Weakly-supervised Image
Classification using Deep Multiple Instance Learning* (WACV 2021; gmum/Kernel_SA-MIL).
Each instance embedding is refined by a self-attention layer over the bag (dot-product,
or the paper's RBF or Laplace kernel over query/key distances), added back with a
learned scale that starts at zero (so training starts from plain attention-MIL), then the
bag is pooled by gated attention. Padding never enters the self-attention (keys are
masked), so a padded bag gives the same output as the bag alone.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from common.models.mil import BagClassifier, GatedAttention, MILOutput, check_bags, masked_softmax

Kernel = Literal["dot", "rbf", "laplace"]
KERNELS = ("dot", "rbf", "laplace")


class SelfAttentionMIL(BagClassifier):
    """Self-attention over the bag, then gated attention pooling.

    Args:
        in_dim: instance feature size ``D``.
        hidden_dim: instance embedding size.
        attention_dim: size of the pooling attention network and of queries/keys.
        kernel: similarity of query and key: ``dot`` (scaled dot product), ``rbf``
            (``exp(-|q-k|^2 / 2)``) or ``laplace`` (``exp(-|q-k|_1)``), as in the paper.
        dropout: dropout on the instance embedding.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 32, attention_dim: int = 16,
                 kernel: str = "dot", dropout: float = 0.0) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel: {kernel!r} is not one of {KERNELS}")
        self.kernel = kernel
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.query = nn.Linear(hidden_dim, attention_dim)
        self.key = nn.Linear(hidden_dim, attention_dim)
        self.value = nn.Linear(hidden_dim, hidden_dim)
        self.gamma = nn.Linear(1, 1, bias=False)  # the residual scale, a Linear for Opacus
        nn.init.zeros_(self.gamma.weight)
        self.pool = GatedAttention(hidden_dim, attention_dim)
        self.classifier = nn.Linear(hidden_dim, 1)

    def _similarity(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dot":
            return torch.einsum("bnd,bmd->bnm", q, k) / math.sqrt(q.shape[-1])
        diff = q.unsqueeze(2) - k.unsqueeze(1)  # [B, N, N, d]
        if self.kernel == "rbf":
            return -0.5 * diff.pow(2).sum(-1)
        return -diff.abs().sum(-1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        check_bags(features)
        h = self.embed(features)  # [B, N, M]
        sim = self._similarity(self.query(h), self.key(h))  # [B, N, N]
        weights = masked_softmax(sim, None if mask is None else mask.unsqueeze(1))
        context = torch.einsum("bnm,bmh->bnh", weights, self.value(h))
        scale = self.gamma(torch.ones(1, 1, dtype=h.dtype, device=h.device)).reshape(())
        h = h + scale * context
        attention = masked_softmax(self.pool(h), mask)
        pooled = torch.einsum("bn,bnm->bm", attention, h)
        return MILOutput(logits=self.classifier(pooled).squeeze(-1), attention=attention)


def sa_mil(in_dim: int, **kwargs: Any) -> SelfAttentionMIL:
    """SA-MIL (Rymarczyk et al. 2021)."""
    return SelfAttentionMIL(in_dim, **kwargs)
