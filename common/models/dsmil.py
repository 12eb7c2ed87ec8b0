"""Dual-stream MIL (DSMIL; Li, Li and Eliceiri, CVPR 2021).

Stream one classifies every instance and max-pools: the highest-scoring instance is the
*critical* one. Stream two measures every instance's query against the critical
instance's (scaled dot product, softmax over the bag) and pools the instances' values
with those weights into a bag embedding, classified by a linear layer (the paper's 1-D
convolution over the embedding is the same linear map). The bag's logit is the mean of
the two streams'; the loss is the mean of the two streams' losses, as in the paper.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from common.models.mil import BagClassifier, MILOutput, check_bags, masked_softmax


class DSMIL(BagClassifier):
    """Instance classifier with max pooling, plus critical-instance attention pooling.

    Args:
        in_dim: instance feature size ``D``.
        hidden_dim: size of the instance values (the bag embedding).
        attention_dim: size of the queries.
        dropout: dropout on the values.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 32, attention_dim: int = 16,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.instance_classifier = nn.Linear(in_dim, 1)
        self.query = nn.Sequential(nn.Linear(in_dim, attention_dim), nn.Tanh())
        self.value = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(hidden_dim, 1)

    def streams(self, features: torch.Tensor, mask: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(max-instance logit [B], attention-stream logit [B], attention [B, N])``."""
        check_bags(features)
        inst = self.instance_classifier(features).squeeze(-1)  # [B, N]
        if mask is not None:
            inst = inst.masked_fill(~mask, torch.finfo(inst.dtype).min)
        top = inst.argmax(dim=1)  # the critical instance of each bag
        max_logit = inst.gather(1, top.unsqueeze(1)).squeeze(1)
        q = self.query(features)  # [B, N, A]
        q_crit = q.gather(1, top.view(-1, 1, 1).expand(-1, 1, q.shape[-1]))  # [B, 1, A]
        sim = (q * q_crit).sum(-1) / math.sqrt(q.shape[-1])
        attention = masked_softmax(sim, mask)
        bag = torch.einsum("bn,bnh->bh", attention, self.value(features))
        return max_logit, self.classifier(bag).squeeze(-1), attention

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> MILOutput:
        max_logit, bag_logit, attention = self.streams(features, mask)
        return MILOutput(logits=(max_logit + bag_logit) / 2, attention=attention)

    def sample_losses(self, features: torch.Tensor, mask: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        max_logit, bag_logit, _ = self.streams(features, mask)
        return 0.5 * (F.binary_cross_entropy_with_logits(max_logit, labels, reduction="none")
                      + F.binary_cross_entropy_with_logits(bag_logit, labels, reduction="none"))


def dsmil(in_dim: int, **kwargs: Any) -> DSMIL:
    """DSMIL (Li et al. 2021)."""
    return DSMIL(in_dim, **kwargs)
