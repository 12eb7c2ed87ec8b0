"""CLAM-SB: clustering-constrained attention MIL, single branch (Lu et al., *Data-efficient
and weakly supervised computational pathology on whole-slide images*, Nat. Biomed. Eng.
2021; mahmoodlab/CLAM).

Gated attention pooling as in attention-MIL, plus the instance-level clustering loss:
the ``k`` most attended instances of a bag are pseudo-labelled as evidence for the bag's
class and the ``k`` least attended as not, and an instance classifier of that class learns
to tell them apart. The training loss is ``bag_weight * bag loss + (1 - bag_weight) *
instance loss`` per bag (0.7 in the paper). As in CLAM's binary, non-subtyping setting
only the instance classifier of the bag's own class is trained. Instances are chosen
among real ones only; a bag with fewer than ``k`` real instances uses them all.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from common.models.mil import BagClassifier, GatedAttention, MILOutput, check_bags, masked_softmax


class CLAMSingleBranch(BagClassifier):
    """Gated attention-MIL with CLAM's instance clustering loss.

    Args:
        in_dim: instance feature size ``D``.
        hidden_dim: instance embedding size.
        attention_dim: size of the attention network.
        k_sample: attended / unattended instances pseudo-labelled per bag (8 in CLAM).
        bag_weight: weight of the bag loss against the instance loss.
        dropout: dropout on the instance embedding.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 32, attention_dim: int = 16,
                 k_sample: int = 8, bag_weight: float = 0.7, dropout: float = 0.0) -> None:
        super().__init__()
        if k_sample < 1 or not 0.0 <= bag_weight <= 1.0:
            raise ValueError(f"k_sample must be >= 1 and bag_weight in [0, 1], got "
                             f"{k_sample}, {bag_weight}")
        self.k_sample, self.bag_weight = k_sample, bag_weight
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.pool = GatedAttention(hidden_dim, attention_dim)
        self.classifier = nn.Linear(hidden_dim, 1)
        # one instance classifier per class: "is this instance evidence for class c?"
        self.instance_classifiers = nn.ModuleList([nn.Linear(hidden_dim, 2) for _ in range(2)])

    def _parts(self, features: torch.Tensor, mask: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        check_bags(features)
        h = self.embed(features)
        raw = self.pool(h)
        attention = masked_softmax(raw, mask)
        pooled = torch.einsum("bn,bnm->bm", attention, h)
        return self.classifier(pooled).squeeze(-1), attention, raw, h

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        logits, attention, _, _ = self._parts(features, mask)
        return MILOutput(logits=logits, attention=attention)

    def instance_loss(self, raw: torch.Tensor, h: torch.Tensor, mask: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        """CLAM's clustering loss per bag ``[B]``: top-k attended instances are class
        evidence (target 1), bottom-k are not (target 0), for the bag's class."""
        k = min(self.k_sample, raw.shape[1])
        low = torch.finfo(raw.dtype).min
        top = raw.masked_fill(~mask, low).topk(k, dim=1).indices
        bottom = (-raw).masked_fill(~mask, low).topk(k, dim=1).indices
        index = torch.cat([top, bottom], dim=1)  # [B, 2k]
        chosen = h.gather(1, index.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
        real = mask.gather(1, index).to(h.dtype)  # short bags: only real instances count
        targets = torch.cat([torch.ones_like(top), torch.zeros_like(bottom)], dim=1)
        losses = [F.cross_entropy(head(chosen).transpose(1, 2), targets, reduction="none")
                  for head in self.instance_classifiers]  # [B, 2k] each
        own = torch.where(labels.view(-1, 1) > 0.5, losses[1], losses[0])
        return (own * real).sum(1) / real.sum(1).clamp(min=1.0)

    def sample_losses(self, features: torch.Tensor, mask: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        logits, _, raw, h = self._parts(features, mask)
        bag = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        return (self.bag_weight * bag
                + (1 - self.bag_weight) * self.instance_loss(raw, h, mask, labels))


def clam_sb(in_dim: int, **kwargs: Any) -> CLAMSingleBranch:
    """CLAM-SB (Lu et al. 2021)."""
    return CLAMSingleBranch(in_dim, **kwargs)
