"""ACMIL: attention-challenging MIL (Zhang et al., *Attention-Challenging Multiple
Instance Learning for Whole Slide Image Classification*, ECCV 2024).

Attention-MIL over-fits to a few salient patches. ACMIL counters it twice: *multiple
branch attention* (``branches`` gated-attention heads, each pooling the bag and
classified on its own, kept apart by a penalty on the cosine similarity of their
attention maps; each branch has its own classifier) and *stochastic top-k instance
masking* (in training, each branch's ``k``
most attended instances are masked with probability ``mask_prob``, so the model must find
evidence elsewhere). The bag is classified from the mean of the branches' attention.
Masking draws fresh randomness per bag, so DP's per-bag gradients (``torch.func`` with
``randomness="different"``) stay per bag.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from common.models.mil import BagClassifier, MILOutput, check_bags, masked_softmax


class ACMIL(BagClassifier):
    """Multi-branch gated attention with stochastic top-k masking.

    Args:
        in_dim: instance feature size ``D``.
        hidden_dim: instance embedding size.
        attention_dim: size of the attention network.
        branches: attention branches (5 in the paper).
        top_k: instances masked per branch in training (10 in the paper).
        mask_prob: probability of masking each of those instances.
        diversity: weight of the branches' attention-similarity penalty.
        dropout: dropout on the instance embedding.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 32, attention_dim: int = 16,
                 branches: int = 5, top_k: int = 10, mask_prob: float = 0.6,
                 diversity: float = 0.1, dropout: float = 0.0) -> None:
        super().__init__()
        if branches < 1 or top_k < 0 or not 0.0 <= mask_prob <= 1.0 or diversity < 0:
            raise ValueError("branches >= 1, top_k >= 0, mask_prob in [0, 1] and "
                             f"diversity >= 0 are needed, got {branches}, {top_k}, "
                             f"{mask_prob}, {diversity}")
        self.top_k, self.mask_prob, self.diversity = top_k, mask_prob, diversity
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Sigmoid())
        self.attention_w = nn.Linear(attention_dim, branches)
        self.branch_classifier = nn.Linear(hidden_dim, branches)  # row m: branch m's
        self.classifier = nn.Linear(hidden_dim, 1)

    def _parts(self, features: torch.Tensor, mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(bag logit [B], branch logits [B, M], branch attention [B, M, N])``."""
        check_bags(features)
        b, n, _ = features.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=features.device)
        h = self.embed(features)
        raw = self.attention_w(self.attention_v(h) * self.attention_u(h)).transpose(1, 2)
        keep = mask.unsqueeze(1).expand_as(raw)
        if self.training and self.top_k and self.mask_prob > 0:
            k = min(self.top_k, n)
            top = raw.masked_fill(~keep, torch.finfo(raw.dtype).min).topk(k, dim=-1).indices
            drop = torch.rand(top.shape, device=raw.device) < self.mask_prob
            hidden = torch.zeros_like(keep).scatter(-1, top, drop)
            # never mask a whole bag: a branch keeps its best instance if all would go
            hidden = hidden & ((keep & ~hidden).any(-1, keepdim=True))
            keep = keep & ~hidden
        attention = masked_softmax(raw, keep)  # [B, M, N]
        pooled = torch.einsum("bmn,bnh->bmh", attention, h)
        branch_logits = self.branch_classifier(pooled).diagonal(dim1=1, dim2=2)  # [B, M]
        mean_attention = attention.mean(dim=1)
        bag = torch.einsum("bn,bnh->bh", mean_attention, h)
        return self.classifier(bag).squeeze(-1), branch_logits, attention

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        logits, _, attention = self._parts(features, mask)
        return MILOutput(logits=logits, attention=attention.mean(dim=1))

    def sample_losses(self, features: torch.Tensor, mask: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        logits, branch_logits, attention = self._parts(features, mask)
        bag = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        branches = F.binary_cross_entropy_with_logits(
            branch_logits, labels.unsqueeze(1).expand_as(branch_logits), reduction="none")
        m = attention.shape[1]
        if m > 1 and self.diversity > 0:
            unit = F.normalize(attention, dim=-1)
            similarity = torch.einsum("bmn,bkn->bmk", unit, unit)
            off = similarity.sum(dim=(1, 2)) - similarity.diagonal(dim1=1, dim2=2).sum(-1)
            penalty = off / (m * (m - 1))
        else:
            penalty = torch.zeros_like(bag)
        return bag + branches.mean(dim=1) + self.diversity * penalty


def acmil(in_dim: int, **kwargs: Any) -> ACMIL:
    """ACMIL (Zhang et al. 2024)."""
    return ACMIL(in_dim, **kwargs)
