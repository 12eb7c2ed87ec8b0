"""TransMIL: a transformer over the bag (Shao et al., *TransMIL: Transformer based
Correlated Multiple Instance Learning for Whole Slide Image Classification*, NeurIPS 2021).

Instances are projected, a learned class token is prepended, and two pre-norm
self-attention layers (LayerNorm only: no BatchNorm, for Opacus) let every instance see
every other; between them the PPEG module adds position information with depthwise
convolutions of kernel 7, 5 and 3. The class token's final state is classified.

Differences from the paper, stated: attention is full (exact) multi-head self-attention
(the paper approximates it with Nystrom attention to reach bags of tens of thousands of
patches; PathFed's bags are a few thousand); PPEG convolves along the instance sequence
instead of the square grid the paper folds it into, because that fold depends on the
padded length and would make a padded bag's output differ from the bag alone. Padding is
masked out of every attention and zeroed before every convolution.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.models.mil import BagClassifier, MILOutput, check_bags, masked_softmax


class _SelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with a residual; keys masked (True = real)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden_dim {dim} must be divisible by heads {heads}")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, n, 3, self.heads, d // self.heads).unbind(2)
        sim = torch.einsum("bnhd,bmhd->bhnm", q, k) / (d // self.heads) ** 0.5
        weights = masked_softmax(sim, mask[:, None, None, :])  # [B, H, N, N]
        context = torch.einsum("bhnm,bmhd->bnhd", weights, v).reshape(b, n, d)
        return x + self.dropout(self.out(context)), weights


class _PPEG(nn.Module):
    """Pyramid position encoding: depthwise convolutions (7, 5, 3) plus identity."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(dim, dim, k, padding=k // 2, groups=dim)
                                    for k in (7, 5, 3)])

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = (tokens * mask.unsqueeze(-1)).transpose(1, 2)  # [B, D, N], padding zero
        out = x + sum(conv(x) for conv in self.convs)
        return out.transpose(1, 2) * mask.unsqueeze(-1)


class TransMIL(BagClassifier):
    """Class token + 2 self-attention layers with PPEG between them.

    Args:
        in_dim: instance feature size ``D``.
        hidden_dim: token size (divisible by ``heads``).
        heads: attention heads.
        dropout: dropout after each attention layer.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 32, heads: int = 4,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, hidden_dim) * 0.02)
        self.layer1 = _SelfAttention(hidden_dim, heads, dropout)
        self.ppeg = _PPEG(hidden_dim)
        self.layer2 = _SelfAttention(hidden_dim, heads, dropout)
        self.norm = nn.LayerNorm(hidden_dim)
        self.classifier = nn.Linear(hidden_dim, 1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        check_bags(features)
        b, n, _ = features.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.bool, device=features.device)
        h = self.project(features)
        real = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=h.device), mask], dim=1)
        x = torch.cat([self.cls_token.expand(b, -1, -1), h], dim=1)
        x, _ = self.layer1(x, real)
        x = torch.cat([x[:, :1], self.ppeg(x[:, 1:], mask)], dim=1)
        x, weights = self.layer2(x, real)
        logits = self.classifier(self.norm(x[:, 0])).squeeze(-1)
        # the class token's attention over the instances (mean over heads), renormalised
        attention = weights[:, :, 0, 1:].mean(dim=1) * mask
        attention = attention / attention.sum(dim=1, keepdim=True).clamp(min=1e-12)
        return MILOutput(logits=logits, attention=attention)


def transmil(in_dim: int, **kwargs: Any) -> TransMIL:
    """TransMIL (Shao et al. 2021), full attention, sequence PPEG."""
    return TransMIL(in_dim, **kwargs)
