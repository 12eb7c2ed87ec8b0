"""A small U-Net for patch segmentation, made fit for DP-SGD (the seed's "CNNs for
segmentation").

Two down-sampling stages, a bottleneck and two up-sampling stages with skip connections
(Ronneberger et al. 2015), GroupNorm after every convolution (per-sample gradients exist;
no BatchNorm statistics mix slides), nearest-neighbour up-sampling then a convolution
(no transposed convolution: its checkerboard artefacts, and a simpler per-sample
gradient). ``forward`` returns one tumour logit per pixel.

For slide-level privacy one training sample is a *slide*, as for the patch classifier
(:mod:`common.models.patch_cnn`): :class:`SlideSegmenter` takes ``patches[B, k, 3, P, P]``
with their annotation masks ``masks[B, k, P, P]`` and gives one loss per slide (pixel
cross-entropy plus a soft Dice over the slide's patches), so DP-SGD clips and noises each
slide's gradient. Validation and ``pathfed predict`` also need a *slide* score: the
largest tumour fraction among the slide's patches, as a logit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

DICE_SMOOTH = 1.0
"""Added to the soft Dice's numerator and denominator: a slide whose drawn patches hold
no tumour is still a well-defined loss (its Dice is 1 when the model predicts none)."""


def _block(cin: int, cout: int) -> nn.Sequential:
    """Two conv-GroupNorm-ReLU layers."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout),
        nn.ReLU())


class UNet(nn.Module):
    """``x[B, 3, P, P] -> logits[B, P, P]`` (``P`` a multiple of 4).

    Args:
        width: channels of the first stage; the second has twice, the bottleneck four times.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.enc1 = _block(3, width)
        self.enc2 = _block(width, 2 * width)
        self.mid = _block(2 * width, 4 * width)
        self.dec2 = _block(4 * width + 2 * width, 2 * width)
        self.dec1 = _block(2 * width + width, width)
        self.out = nn.Conv2d(width, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"patch sides must be multiples of 4, got {tuple(x.shape[-2:])}")
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2.0, mode="nearest"), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0, mode="nearest"), e1], 1))
        return self.out(d1)[:, 0]


class SlideSegmenter(nn.Module):
    """A :class:`UNet` applied to ``k`` patches of each slide; one slide is one sample.

    ``forward(patches[B, k, 3, P, P]) -> logits[B, k, P, P]``. Per-sample gradients are per
    slide (``torch.func.vmap`` over slides: Opacus' layer hooks would give one per patch).
    """

    input_kind = "patches"
    """Trains on ``(patches[B, k, 3, P, P], masks[B, k, P, P])``, validates on slide labels."""
    per_sample_grads = "vmap"

    def __init__(self, patch_size: int = 32, width: int = 8, dice_weight: float = 1.0) -> None:
        super().__init__()
        if patch_size % 4:
            raise ValueError(f"patch_size must be a multiple of 4, got {patch_size}")
        self.unet = UNet(width)
        self.dice_weight = dice_weight

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        b, k = patches.shape[:2]
        out = self.unet(patches.reshape(b * k, *patches.shape[2:]))
        return out.reshape(b, k, *out.shape[1:])  # explicit: b may be 0 (empty Poisson batch)

    def segment(self, patches: torch.Tensor) -> torch.Tensor:
        """Tumour probability of every pixel of single patches ``[N, 3, P, P] -> [N, P, P]``."""
        return torch.sigmoid(self.unet(patches))

    def patch_logits(self, patches: torch.Tensor) -> torch.Tensor:
        """Each patch's tumour fraction (its pixels' mean probability) as a logit ``[B, k]``."""
        fraction = torch.sigmoid(self(patches)).mean(dim=(-2, -1))
        return torch.logit(fraction, eps=1e-6)

    def scores(self, patches: torch.Tensor) -> torch.Tensor:
        """Per-slide logit ``[B]``: the largest tumour fraction among the slide's patches
        (a tumour focus anywhere makes the slide positive)."""
        return self.patch_logits(patches).amax(dim=1)

    def sample_losses(self, patches: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-slide losses ``[B]``. With masks ``targets[B, k, P, P]`` (values in [0, 1]):
        the slide's mean pixel cross-entropy plus ``dice_weight`` times one minus its soft
        Dice over all its patches. With slide labels ``targets[B]`` (validation): the
        cross-entropy of the slide score."""
        if targets.dim() == 1:
            return F.binary_cross_entropy_with_logits(self.scores(patches), targets.float(),
                                                      reduction="none")
        return segmentation_losses(self(patches), targets, self.dice_weight)


def segmentation_losses(logits: torch.Tensor, masks: torch.Tensor,
                        dice_weight: float = 1.0) -> torch.Tensor:
    """Per-slide loss ``[B]`` of pixel ``logits[B, k, P, P]`` against ``masks`` (same shape,
    in [0, 1]): mean binary cross-entropy plus ``dice_weight`` (1 - soft Dice), the Dice
    taken over each slide's pixels together (:data:`DICE_SMOOTH` keeps a tumour-free
    slide well defined)."""
    if masks.shape != logits.shape:
        raise ValueError(f"masks of shape {tuple(masks.shape)} for logits of shape "
                         f"{tuple(logits.shape)}")
    masks = masks.to(logits.dtype)
    b = logits.shape[0]
    bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none")
    losses = bce.reshape(b, -1).mean(1)
    if dice_weight:
        prob = torch.sigmoid(logits).reshape(b, -1)
        truth = masks.reshape(b, -1)
        dice = ((2 * (prob * truth).sum(1) + DICE_SMOOTH)
                / (prob.sum(1) + truth.sum(1) + DICE_SMOOTH))
        losses = losses + dice_weight * (1 - dice)
    return losses


def seg_cnn(in_dim: int | None = None, **kwargs: Any) -> SlideSegmenter:
    """Registry builder (``in_dim`` is unused: the input is image patches)."""
    return SlideSegmenter(**kwargs)
