"""What a model must offer to be trained by PathFed: the contract, as typed Protocols.

Every registered model (:data:`common.models.MODELS`) declares its *kind*, which decides
the data path a site builds for it (never its name):

- ``bags``: MIL over a bag of patch features; inputs ``(features[B, N, D], mask[B, N])``;
  built with ``in_dim``.
- ``multiscale``: MIL over a bag of regions, each a low-power patch with its high-power
  children (:mod:`common.data.multiscale`); inputs ``(rows[B, M, width], mask[B, M])``;
  built with ``in_dim`` and ``children``. It needs multi-scale data (``pathfed prepare
  --mpp 0.5,2.0``, or the synthetic default); the other bag models take the high-power
  patches of the same data.
- ``patches``: a model of image patches; inputs ``patches[B, K, 3, P, P]`` drawn from
  each slide; built with ``patch_size``. What it learns from them is its spec's
  ``trains``: slide or patch labels (a classifier), pixel masks (a segmenter), or the
  patches themselves (a GAN).

Training needs :class:`TrainableModel`. :class:`InstanceScorer` is the contract a model
offers for per-patch scores (its pooling weights); every bag model implements it (through
:class:`common.models.mil.BagClassifier`), for the heatmaps of ``pathfed predict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

Kind = Literal["bags", "multiscale", "patches"]
KINDS: tuple[Kind, ...] = ("bags", "multiscale", "patches")
BAG_KINDS: tuple[Kind, ...] = ("bags", "multiscale")
"""The kinds whose inputs are padded bags ``(features, mask)``."""


@runtime_checkable
class TrainableModel(Protocol):
    """The methods local training and evaluation call."""

    per_sample_grads: str
    """``"vmap"`` (per-sample gradients with ``torch.func``) or ``"hooks"`` (Opacus')."""

    def sample_losses(self, *inputs: torch.Tensor) -> torch.Tensor:
        """One loss per sample (slide or patient): ``(*inputs, labels) -> [B]``."""
        ...

    def scores(self, *inputs: torch.Tensor) -> torch.Tensor:
        """One logit per sample: ``(*inputs) -> [B]``."""
        ...


@runtime_checkable
class InstanceScorer(Protocol):
    """Models that can say which instances (patches) drove a prediction."""

    def instance_scores(self, *inputs: torch.Tensor) -> torch.Tensor:
        """One score per instance: ``[B, N]``."""
        ...


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: how to build a model, what it consumes, what it can do."""

    builder: str
    """``module:function``; importing it is deferred so the registry needs no torch."""
    kind: Kind
    summary: str
    options: dict[str, Any] = field(default_factory=dict)
    """Constructor options and their defaults (beyond the data size)."""
    choices: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    """The allowed values of options that take one of a few (e.g. a kernel's name)."""
    trains: Literal["classifier", "adversarial", "segmenter"] = "classifier"
    """``adversarial``: a generator and a discriminator, trained by
    :func:`common.training.adversarial_train` (its samples are what it makes, not a
    prediction). ``segmenter``: a patch model whose training targets are the pixels of
    annotation masks (``mask`` column of labels.csv), not labels; it still gives a slide
    score, for validation and ``pathfed predict``, which writes its pixel masks."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model kind {self.kind!r}: one of {KINDS}")
