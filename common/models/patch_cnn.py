"""The residual patch classifier of the seed review ("A Classification Method of Breast
Pathological Image Based on Residual Learning"), made fit for DP-SGD.

As described: residual units, normalisation after every convolution (GroupNorm, so that
per-sample gradients exist), pooling only after the first two convolution layers, a
128-unit fully connected layer, dropout 0.5 and a softmax output. ``forward`` returns
logits (the softmax is applied by :meth:`predict_proba` and inside the cross-entropy).

For slide-level privacy one training sample is a *slide*: :class:`SlidePatchClassifier`
takes ``patches[B, k, 3, P, P]`` (k patches of each slide, labelled with the slide's
label) and averages the patch losses per slide, so that one slide is one DP sample.
:meth:`ResidualPatchCNN.embed` gives the 128-d patch features used as an encoder.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class ResidualUnit(nn.Module):
    """conv-GN-ReLU-conv-GN plus the input (a 1x1 conv-GN when channels change)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.norm1 = _gn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _gn(cout)
        self.skip = (nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), _gn(cout))
                     if cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.skip(x))  # out of place: Opacus rejects in-place adds


class ResidualPatchCNN(nn.Module):
    """Patch classifier ``x[B, 3, P, P] -> logits[B, num_classes]``.

    Args:
        patch_size: input side ``P`` (the fully connected layer's size depends on it).
        widths: channels of the stem and of the residual stages.
        num_classes: output classes (2 for benign/malignant).
    """

    def __init__(self, patch_size: int = 32, widths: tuple[int, int, int] = (16, 32, 32),
                 num_classes: int = 2, dropout: float = 0.5) -> None:
        super().__init__()
        if patch_size % 4:
            raise ValueError(f"patch_size must be a multiple of 4, got {patch_size}")
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
                                  _gn(widths[0]), nn.ReLU())
        self.pool1 = nn.MaxPool2d(2)  # pooling after the first convolution layer ...
        self.unit1 = ResidualUnit(widths[0], widths[1])
        self.pool2 = nn.MaxPool2d(2)  # ... and after the second; none after
        self.unit2 = ResidualUnit(widths[1], widths[2])
        self.fc = nn.Linear(widths[2] * (patch_size // 4) ** 2, 128)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(128, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """128-d patch features (the fully connected layer, after ReLU)."""
        h = self.pool1(self.stem(x))
        h = self.pool2(self.unit1(h))
        h = self.unit2(h)
        return F.relu(self.fc(torch.flatten(h, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.embed(x)))

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """The softmax output of the paper."""
        return torch.softmax(self.forward(x), dim=-1)


class SlidePatchClassifier(nn.Module):
    """A :class:`ResidualPatchCNN` applied to ``k`` patches of each slide.

    ``forward(patches[B, k, 3, P, P]) -> logits[B, k, C]``; one slide is one sample, so
    per-sample gradients are per slide (computed with ``torch.func.vmap``: Opacus' layer
    hooks would give one per patch).
    """

    input_kind = "patches"
    """Trains on ``(patches[B, k, 3, P, P], labels[B])``, patches scaled as for encoders."""
    per_sample_grads = "vmap"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.cnn = ResidualPatchCNN(**kwargs)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, k = patches.shape[:2]
        out = self.cnn(patches.reshape(b * k, *patches.shape[2:]))
        return out.reshape(b, k, out.shape[-1])  # explicit: b may be 0 (empty Poisson batch)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """128-d features of single patches ``x[B, 3, P, P]`` (for use as an encoder)."""
        return self.cnn.embed(x)

    def sample_losses(self, patches: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-slide losses ``[B]``: cross-entropy of each patch against its label, averaged
        over the slide's patches. ``labels`` is ``[B]`` (the slide's label for every patch)
        or ``[B, k]`` (patch labels from annotations)."""
        logits = self(patches)
        b, k, c = logits.shape
        target = (labels.long().reshape(b * k) if labels.dim() == 2
                  else labels.long().repeat_interleave(k))
        return F.cross_entropy(logits.reshape(b * k, c), target,
                               reduction="none").reshape(b, k).mean(1)

    def scores(self, patches: torch.Tensor) -> torch.Tensor:
        """Per-slide score ``[B]``: mean over patches of the class-1 log-odds."""
        logits = self(patches)
        return (logits[..., 1] - logits[..., 0]).mean(1)


def residual_patch_cnn(in_dim: int | None = None, **kwargs: Any) -> SlidePatchClassifier:
    """Registry builder (``in_dim`` is unused: the input is image patches)."""
    return SlidePatchClassifier(**kwargs)
