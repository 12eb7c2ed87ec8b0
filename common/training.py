"""A site's local training (DP-SGD through Opacus, or plain) and evaluation.

Plain Python over torch and Opacus: the Flower client calls these, and so do tests.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from common.metrics import EvalCounts
from common.privacy import DPPlan, SiteAccountant

log = logging.getLogger(__name__)

NDArrays = list[np.ndarray]

# Adam moves a parameter by at most about lr * (1 - beta1) / sqrt(1 - beta2) per step
# (3.16 lr at the defaults); we allow 4 lr.
ADAM_STEP_BOUND = 4.0


def get_weights(model: nn.Module) -> NDArrays:
    """Model state as a list of arrays, in ``state_dict`` order."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: NDArrays) -> None:
    """Load ``weights`` (as from :func:`get_weights`) into ``model``."""
    keys = list(model.state_dict().keys())
    if len(keys) != len(weights):
        raise ValueError(f"expected {len(keys)} arrays, got {len(weights)}")
    state = {k: torch.as_tensor(np.asarray(w)) for k, w in zip(keys, weights)}
    model.load_state_dict(state, strict=True)


@dataclass(frozen=True)
class TrainResult:
    update: NDArrays
    """New weights minus received weights."""
    n_samples: int
    steps: int
    loss: float
    epsilon: float
    """Cumulative epsilon of the site after this round (0 without DP)."""


def update_value_bound(optimizer: str, lr: float, steps: int, max_grad_norm: float,
                       noise_multiplier: float, batch_size: int) -> float:
    """Bound on any single coordinate of a round's update.

    Used to set SecAgg+'s clipping range, which silently clips larger values. With Adam
    the bound is deterministic. With SGD each step moves a coordinate by at most
    ``lr * C`` (clipped gradients) plus Gaussian noise ``lr * sigma * C / B``; we allow
    six standard deviations of the noise summed over the round.
    """
    if optimizer == "adam":
        return ADAM_STEP_BOUND * lr * steps
    noise = 6.0 * lr * noise_multiplier * max_grad_norm * math.sqrt(steps) / batch_size
    return lr * max_grad_norm * steps + noise


def _bag_loss(model: nn.Module, features: torch.Tensor, mask: torch.Tensor,
              labels: torch.Tensor) -> torch.Tensor:
    out = model(features, mask)
    if labels.numel() == 0:
        # An empty Poisson batch still takes a (noise-only) DP step: keep the graph alive.
        return out.logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(out.logits, labels)


def local_train(
    model: nn.Module,
    data: TensorDataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "adam",
    plan: DPPlan | None = None,
    accountant: SiteAccountant | None = None,
    seed: int | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` for ``epochs``; DP-SGD when ``plan`` is given.

    With DP, Opacus samples batches by Poisson sampling, clips each slide's gradient to
    ``plan.max_grad_norm`` and adds Gaussian noise; ``accountant`` (the site's persistent
    accountant) records every step. ``seed`` makes sampling and noise reproducible
    (simulations); ``None`` draws them from the OS.
    """
    start = get_weights(model)
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    )
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    model.train()
    train_model: nn.Module = model
    if plan is not None:
        if accountant is None:
            raise ValueError("DP training needs the site's accountant")
        with warnings.catch_warnings():
            # Seeded noise is deliberate in simulations (`deterministic`); see docs/privacy.md.
            warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
            engine = PrivacyEngine(accountant=plan.accountant)
            engine.accountant = accountant.accountant  # the site's persistent accountant
            train_model, opt, loader = engine.make_private(
                module=model, optimizer=opt, data_loader=loader,
                noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                poisson_sampling=True, noise_generator=generator,
            )
        # Opacus' loader builds its own sampler generator; seed it as well.
        if seed is not None:
            loader.batch_sampler.generator = generator  # type: ignore[union-attr]
    train_model.train()
    losses, steps = [], 0
    with warnings.catch_warnings():
        # Opacus' hooks on a model whose inputs need no gradient: expected, harmless.
        warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
        for _ in range(epochs):
            for features, mask, labels in loader:
                opt.zero_grad(set_to_none=True)
                loss = _bag_loss(train_model, features, mask, labels)
                loss.backward()
                opt.step()
                steps += 1
                if labels.numel():
                    losses.append(float(loss.detach()))
    if plan is not None:
        train_model.remove_hooks()  # type: ignore[operator]
    end = get_weights(model)
    update = [b - a for a, b in zip(start, end)]
    epsilon = accountant.epsilon(plan.delta) if (plan is not None and accountant) else 0.0
    return TrainResult(
        update=update, n_samples=len(data), steps=steps,
        loss=float(np.mean(losses)) if losses else float("nan"), epsilon=epsilon,
    )


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, batch_size: int = 64) -> EvalCounts:
    """Evaluation counts of ``model`` on ``data`` (loss, confusion, score histograms)."""
    model.eval()
    logits, labels, loss_sum = [], [], 0.0
    for features, mask, y in DataLoader(data, batch_size=batch_size):
        out = model(features, mask).logits
        loss_sum += float(F.binary_cross_entropy_with_logits(out, y, reduction="sum"))
        logits.append(out.numpy())
        labels.append(y.numpy())
    if not logits:
        return EvalCounts()
    return EvalCounts.from_predictions(np.concatenate(logits), np.concatenate(labels), loss_sum)
