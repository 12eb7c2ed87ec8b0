"""A differentially private conditional GAN of image patches, trainable in federation.

DCGAN-style (Radford et al. 2016) with GroupNorm in place of BatchNorm (per-sample
gradients must exist, and a batch statistic would mix slides): the generator maps noise
and a class (benign / malignant) to a patch; the discriminator scores a patch and its
class (a projection discriminator, Miyato and Koyama 2018). Both live in one module, so
one state dict is averaged by FedAvg and SecAgg+ like any model's.

**Privacy** (docs/privacy.md, "A DP GAN"). Only the discriminator sees real patches, and it
trains with DP-SGD: one sample is one slide (its ``k`` real patches with ``k`` generated
ones), clipped and noised by Opacus, every step accounted. The generator's steps use the
discriminator's (already private) weights and fresh noise, never a real patch: they are
post-processing, and so are the synthetic patches drawn from it later.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from common.features import IMAGENET_MEAN, IMAGENET_STD


def _gn(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


class Generator(nn.Module):
    """``(z[B, latent], labels[B]) -> patches[B, 3, P, P]``, scaled as the encoders scale
    real patches (ImageNet mean and std), from a ``tanh`` in pixel space."""

    def __init__(self, patch_size: int, latent: int, width: int, classes: int = 2) -> None:
        super().__init__()
        self.latent, self.start = latent, patch_size // 8
        self.embed = nn.Embedding(classes, latent)
        self.project = nn.Linear(latent, 4 * width * self.start**2)
        self.norm0 = _gn(4 * width)
        blocks: list[nn.Module] = []
        for cin, cout in ((4 * width, 2 * width), (2 * width, width), (width, width)):
            blocks += [nn.Upsample(scale_factor=2), nn.Conv2d(cin, cout, 3, padding=1),
                       _gn(cout), nn.ReLU()]
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Conv2d(width, 3, 3, padding=1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1),
                             persistent=False)

    def pixels(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Patches in ``[0, 1]`` pixel space ``[B, 3, P, P]``."""
        h = self.project(z * self.embed(labels.long()))
        h = F.relu(self.norm0(h.view(len(z), -1, self.start, self.start)))
        return (torch.tanh(self.out(self.blocks(h))) + 1) / 2

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        mean, std = cast(torch.Tensor, self.mean), cast(torch.Tensor, self.std)
        return (self.pixels(z, labels) - mean) / std


class Discriminator(nn.Module):
    """``(patches[B, 3, P, P], labels[B]) -> logits[B]`` (real: high)."""

    def __init__(self, patch_size: int, width: int, classes: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for cin, cout in ((3, width), (width, 2 * width), (2 * width, 4 * width)):
            layers += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), _gn(cout),
                       nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        dim = 4 * width * (patch_size // 8) ** 2
        self.linear = nn.Linear(dim, 1)
        self.embed = nn.Embedding(classes, dim)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.flatten(self.features(x), 1)
        return self.linear(h).squeeze(-1) + (self.embed(labels.long()) * h).sum(-1)

    def sample_losses(self, real: torch.Tensor, fake: torch.Tensor,
                      labels: torch.Tensor) -> torch.Tensor:
        """Per-slide discriminator losses ``[B]``: each slide's ``k`` real patches
        ``real[B, k, 3, P, P]`` against ``k`` generated ones of the same classes, the
        non-saturating GAN loss averaged over its patches. ``labels``: ``[B]`` or
        ``[B, k]`` (0/1; soft labels are rounded)."""
        b, k = real.shape[:2]
        y = labels.round().long()
        y = (y.unsqueeze(1).expand(b, k) if y.dim() == 1 else y).reshape(b * k)
        real_logits = self(real.reshape(b * k, *real.shape[2:]), y)
        fake_logits = self(fake.reshape(b * k, *fake.shape[2:]), y)
        return (F.softplus(-real_logits) + F.softplus(fake_logits)).reshape(b, k).mean(1)


class DPGAN(nn.Module):
    """A conditional generator and discriminator of ``patch_size`` patches, trained by
    :func:`common.training.adversarial_train` (the discriminator with DP-SGD).

    Args:
        patch_size: patch side (a multiple of 8).
        latent: the generator's noise size.
        width: channels of the first discriminator layer and the last generator layer.
    """

    input_kind = "patches"
    per_sample_grads = "vmap"
    adversarial = True
    """Trained by :func:`common.training.adversarial_train`, not the classifier loop."""

    def __init__(self, patch_size: int = 32, latent: int = 64, width: int = 32) -> None:
        super().__init__()
        if patch_size % 8:
            raise ValueError(f"patch_size must be a multiple of 8, got {patch_size}")
        self.generator = Generator(patch_size, latent, width)
        self.discriminator = Discriminator(patch_size, width)

    def sample(self, labels: torch.Tensor, generator: torch.Generator | None = None
               ) -> torch.Tensor:
        """One generated patch per label ``[B, 3, P, P]`` (scaled as real patches are)."""
        z = torch.randn(len(labels), self.generator.latent, generator=generator)
        return self.generator(z, labels)

    def sample_losses(self, patches: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The discriminator's per-slide losses against fresh generated patches (for
        evaluation; training goes through :func:`common.training.adversarial_train`)."""
        b, k = patches.shape[:2]
        y = labels.round().long()
        y = y.unsqueeze(1).expand(b, k) if y.dim() == 1 else y
        fake = self.sample(y.reshape(-1)).reshape(patches.shape)
        return self.discriminator.sample_losses(patches, fake, labels)

    def scores(self, patches: torch.Tensor) -> torch.Tensor:
        """Per-slide mean discriminator logit of its patches, each scored as benign and as
        malignant and the larger kept (how real the slide's patches look)."""
        b, k = patches.shape[:2]
        flat = patches.reshape(b * k, *patches.shape[2:])
        logits = torch.stack([self.discriminator(flat, torch.full((b * k,), c))
                              for c in (0, 1)]).amax(0)
        return logits.reshape(b, k).mean(1)

    @torch.no_grad()
    def eval_counts(self, data: Any, seed: int = 0) -> Any:
        """Validation of a GAN: how well the discriminator tells the slides' real patches
        from as many generated ones of the same classes (AUC 0.5: it cannot)."""
        from common.metrics import EvalCounts

        patches, labels = data.tensors
        if not len(patches):
            return EvalCounts()
        b, k = patches.shape[:2]
        gen = torch.Generator().manual_seed(seed)
        y = labels.round().long()
        y = y.unsqueeze(1).expand(b, k) if y.dim() == 1 else y
        fake = self.sample(y.reshape(-1), gen).reshape(patches.shape)
        real_s, fake_s = self.scores(patches), self.scores(fake)
        loss = float(self.discriminator.sample_losses(patches, fake, labels).sum())
        return EvalCounts.from_predictions(
            torch.cat([real_s, fake_s]).numpy(),
            torch.cat([torch.ones(b), torch.zeros(b)]).numpy(), loss)


def dp_gan(in_dim: int | None = None, **kwargs: Any) -> DPGAN:
    """Registry builder (``in_dim`` is unused: the input is image patches)."""
    return DPGAN(**kwargs)
