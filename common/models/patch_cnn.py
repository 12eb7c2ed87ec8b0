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
        or ``[B, k]`` (patch labels from annotations, or MixPatch's soft labels: the
        positive share of a mixed patch)."""
        return patch_losses(self(patches), labels)

    def slide_gradients(self, patches: torch.Tensor, labels: torch.Tensor
                        ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-slide gradients ``{name: [B, *shape]}`` of the trainable parameters and the
        per-slide losses ``[B]``, in one forward and backward pass.

        Each slide gets its own copy of the weights ("expanded weights"): its patches run
        through grouped convolutions (one group per slide), a GroupNorm with the slide's
        groups, and batched matrix products, so the gradient of the summed loss with
        respect to copy ``b`` is slide ``b``'s gradient. The same numbers as
        ``torch.func.vmap`` over slides (tested), at a fraction of its cost on CPU.
        """
        cnn = self.cnn
        b, k, _, size, _ = patches.shape
        own = dict(cnn.named_parameters())
        trainable = [n for n, p in own.items() if p.requires_grad]
        w = {n: (p.detach().unsqueeze(0).expand(b, *p.shape).clone().requires_grad_(True)
                 if n in trainable else p.detach().unsqueeze(0).expand(b, *p.shape))
             for n, p in own.items()}

        def conv(x: torch.Tensor, name: str, padding: int) -> torch.Tensor:
            weight = w[name]
            return F.conv2d(x, weight.reshape(b * weight.shape[1], *weight.shape[2:]),
                            padding=padding, groups=b)

        def norm(x: torch.Tensor, name: str, module: nn.Module) -> torch.Tensor:
            assert isinstance(module, nn.GroupNorm)
            return F.group_norm(x, b * module.num_groups, w[f"{name}.weight"].reshape(-1),
                                w[f"{name}.bias"].reshape(-1), module.eps)

        def unit(x: torch.Tensor, name: str, module: ResidualUnit) -> torch.Tensor:
            out = F.relu(norm(conv(x, f"{name}.conv1.weight", 1), f"{name}.norm1",
                              module.norm1))
            out = norm(conv(out, f"{name}.conv2.weight", 1), f"{name}.norm2", module.norm2)
            skip = x
            if isinstance(module.skip, nn.Sequential):
                skip = norm(conv(x, f"{name}.skip.0.weight", 0), f"{name}.skip.1",
                            module.skip[1])
            return F.relu(out + skip)

        def linear(x: torch.Tensor, name: str) -> torch.Tensor:  # x[k, B, F]
            return (torch.einsum("kbf,bof->kbo", x, w[f"{name}.weight"])
                    + w[f"{name}.bias"].unsqueeze(0))

        x = patches.transpose(0, 1).reshape(k, b * 3, size, size)  # slide b: channels 3b..
        h = F.relu(norm(conv(x, "stem.0.weight", 1), "stem.1", cnn.stem[1]))
        h = F.max_pool2d(h, 2)
        h = F.max_pool2d(unit(h, "unit1", cnn.unit1), 2)
        h = unit(h, "unit2", cnn.unit2)
        h = F.relu(linear(h.reshape(k, b, -1), "fc"))
        logits = linear(cnn.dropout(h), "head").transpose(0, 1)  # [B, k, C]
        losses = patch_losses(logits, labels)
        grads = torch.autograd.grad(losses.sum(), [w[n] for n in trainable])
        return ({f"cnn.{n}": g for n, g in zip(trainable, grads, strict=True)},
                losses.detach())

    def scores(self, patches: torch.Tensor) -> torch.Tensor:
        """Per-slide score ``[B]``: mean over patches of the class-1 log-odds."""
        logits = self(patches)
        return (logits[..., 1] - logits[..., 0]).mean(1)


def patch_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-slide mean cross-entropy ``[B]`` of ``logits[B, k, C]``: against the slide's
    class for ``labels[B]``; for ``labels[B, k]``, against each patch's probability of the
    positive class (a hard 0/1 label gives exactly the class-index cross-entropy; a soft
    one is MixPatch's proportion), which needs two classes."""
    b, k, c = logits.shape
    if labels.dim() == 2:
        if c != 2:
            raise ValueError(f"patch labels need a two-class head, this one has {c}")
        positive = labels.to(logits.dtype).reshape(b * k)
        target = torch.stack([1 - positive, positive], dim=-1)
        losses = -(target * F.log_softmax(logits.reshape(b * k, c), dim=-1)).sum(-1)
    else:
        losses = F.cross_entropy(logits.reshape(b * k, c), labels.long().repeat_interleave(k),
                                 reduction="none")
    return losses.reshape(b, k).mean(1)


def residual_patch_cnn(in_dim: int | None = None, **kwargs: Any) -> SlidePatchClassifier:
    """Registry builder (``in_dim`` is unused: the input is image patches)."""
    return SlidePatchClassifier(**kwargs)
