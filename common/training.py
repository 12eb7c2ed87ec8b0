"""A site's local training (DP-SGD through Opacus, or plain) and evaluation.

Plain Python over torch and Opacus: the Flower client calls these, and so do tests.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.metrics import EvalCounts
from common.privacy import DPPlan, SiteAccountant

log = logging.getLogger(__name__)

NDArrays = list[np.ndarray]

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


def _mean_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    """Mean of the model's per-sample losses over a batch ``(*inputs, labels)``."""
    losses: torch.Tensor = cast(Any, model).sample_losses(*batch)
    if losses.numel() == 0:
        # An empty Poisson batch still takes a (noise-only) DP step: keep the graph alive.
        return losses.sum() * 0.0
    return losses.mean()


def _vmap_grad_samples(module: nn.Module, batch: list[torch.Tensor],
                       model_gradients: bool = True) -> torch.Tensor:
    """Per-sample gradients (one sample = one slide), for Opacus' ``no_op`` mode: each
    parameter gets ``grad_sample[B, *shape]``. A model with its own ``slide_gradients``
    computes them (unless ``model_gradients`` is False), any other through
    ``torch.func.vmap``. Returns the batch's mean loss, from the same forward pass
    (``grad_and_value``: no second forward)."""
    from torch.func import functional_call, grad_and_value, vmap

    view = _LossView(module)
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if batch[-1].shape[0] == 0:  # empty Poisson batch: zero gradients, noise still added
        for _, p in trainable:
            setattr(p, "grad_sample", torch.zeros((0, *p.shape)))  # noqa: B010 (Opacus)
        return torch.zeros(())
    fast = getattr(module, "slide_gradients", None) if model_gradients else None
    if callable(fast):  # the model computes its own per-slide gradients (expanded weights)
        per_slide, losses = fast(*batch)
        for n, p in trainable:
            setattr(p, "grad_sample", per_slide[n])  # noqa: B010 (Opacus' attribute)
        return losses.mean()
    params = {f"model.{n}": p.detach() for n, p in trainable}

    def one_loss(p: dict[str, torch.Tensor], *sample: torch.Tensor) -> torch.Tensor:
        return functional_call(view, p, tuple(t.unsqueeze(0) for t in sample))[0]

    grads, losses = vmap(grad_and_value(one_loss), in_dims=(None, *([0] * len(batch))),
                         randomness="different")(params, *batch)
    for n, p in trainable:
        setattr(p, "grad_sample", grads[f"model.{n}"])  # noqa: B010 (Opacus' attribute)
    return losses.detach().mean()


class _LossView(nn.Module):
    """``forward`` = the wrapped model's ``sample_losses`` (for ``functional_call``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return cast(Any, self.model).sample_losses(*batch)


def _generator(seed: int | None) -> torch.Generator:
    """The round's generator (sampling, noise): seeded, or from the OS when ``seed`` is None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _result(model: nn.Module, start: NDArrays, n_samples: int, steps: int,
            losses: list[float], plan: DPPlan | None, accountant: SiteAccountant | None
            ) -> TrainResult:
    """The round's update (the weights now minus ``start``) and what it spent."""
    update = [b - a for a, b in zip(start, get_weights(model))]
    epsilon = accountant.epsilon(plan.delta) if (plan is not None and accountant) else 0.0
    return TrainResult(update=update, n_samples=n_samples, steps=steps,
                       loss=float(np.mean(losses)) if losses else float("nan"),
                       epsilon=epsilon)


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
    max_grad_norm: float | None = None,
    noise: str = "seeded",
    prox_mu: float = 0.0,
    correction: NDArrays | None = None,
) -> TrainResult:
    """Train ``model`` in place on ``data`` for ``epochs``; DP-SGD when ``plan`` is given.

    With DP, Opacus samples batches by Poisson sampling, clips each slide's gradient to
    ``plan.max_grad_norm`` and adds Gaussian noise; ``accountant`` (the site's persistent
    accountant) records every step. ``seed`` makes sampling and noise reproducible
    (simulations); ``None`` draws them from the OS. Without DP, ``max_grad_norm`` clips
    each batch's gradient, so that every site's update obeys
    :func:`common.checks.update_value_bound` (the bound the server checks). ``noise`` names where DP
    noise comes from: ``"csprng"`` draws it from ChaCha20 keyed by the OS
    (:func:`common.privacy.use_csprng_noise`), otherwise from ``generator``.
    ``prox_mu`` > 0 adds FedProx's proximal gradient ``mu (w - w_start)`` to every step's
    gradient after DP-SGD has clipped and noised it: it depends on no data, so it costs
    no privacy (:func:`add_proximal_term`). ``correction`` (one array per trainable
    parameter, in ``named_parameters`` order) is added to every step's gradient at the
    same place: SCAFFOLD's ``c - c_i`` (:mod:`common.scaffold`), equally free.
    """
    start = get_weights(model)
    generator = _generator(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer = (
        torch.optim.Adam(params, lr=lr) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    )
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    model.train()
    vmap_grads = plan is not None and getattr(model, "per_sample_grads", "hooks") == "vmap"
    train_model: nn.Module = model
    if plan is not None:
        if accountant is None:
            raise ValueError("DP training needs the site's accountant")
        from common.privacy import make_private

        train_model, opt, loader = make_private(
            model, opt, loader, plan, accountant, generator,
            per_sample="vmap" if vmap_grads else "hooks", noise=noise, seeded=seed is not None)
    if prox_mu > 0:
        add_proximal_term(opt, params, prox_mu)
    if correction is not None:
        add_gradient_correction(opt, params, correction)
    train_model.train()
    losses, steps = [], 0
    with warnings.catch_warnings():
        # Opacus' hooks on a model whose inputs need no gradient: expected, harmless.
        warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
        for _ in range(epochs):
            for batch in loader:
                opt.zero_grad(set_to_none=True)
                if vmap_grads:
                    loss = _vmap_grad_samples(model, batch)
                else:
                    loss = _mean_loss(model, batch)
                    loss.backward()  # type: ignore[no-untyped-call]
                    if plan is None and max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                opt.step()
                steps += 1
                if batch[-1].numel():
                    losses.append(float(loss.detach()))
    if plan is not None and not vmap_grads:
        train_model.remove_hooks()  # type: ignore[operator]
    return _result(model, start, len(data), steps, losses, plan, accountant)


def adversarial_train(
    model: nn.Module,
    data: TensorDataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    plan: DPPlan | None = None,
    accountant: SiteAccountant | None = None,
    seed: int | None = None,
    max_grad_norm: float | None = None,
    noise: str = "seeded",
) -> TrainResult:
    """Train a GAN (``model.generator``, ``model.discriminator``; :mod:`common.models.dp_gan`)
    in place on ``data`` = ``(patches[n, k, 3, P, P], labels)`` for ``epochs``.

    Each step: the discriminator's step over a (Poisson) batch of slides, each slide's
    ``k`` real patches against ``k`` generated ones of its classes; with ``plan`` a DP-SGD
    step (per-slide gradients by ``torch.func``, clipped and noised by Opacus, recorded in
    ``accountant``), else a plain one clipped at ``max_grad_norm``. Then one generator
    step through the updated discriminator on noise and uniformly drawn classes: it sees
    no real patch (post-processing of the discriminator's private weights). Both use Adam
    at its default betas, whose per-step bound the server's update check assumes
    (:data:`common.checks.ADAM_STEP_BOUND`). The update covers both networks.
    """
    from torch.nn import functional as F

    start = get_weights(model)
    generator = _generator(seed)
    gen_net, disc = cast(Any, model).generator, cast(Any, model).discriminator
    d_params = [p for p in disc.parameters() if p.requires_grad]
    g_params = [p for p in gen_net.parameters() if p.requires_grad]
    opt_d: torch.optim.Optimizer = torch.optim.Adam(d_params, lr=lr)
    opt_g = torch.optim.Adam(g_params, lr=lr)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator)
    if plan is not None:
        if accountant is None:
            raise ValueError("DP training needs the site's accountant")
        from common.privacy import make_private

        _, opt_d, loader = make_private(disc, opt_d, loader, plan, accountant, generator,
                                        per_sample="vmap", noise=noise,
                                        seeded=seed is not None)
    model.train()
    losses, steps = [], 0
    for _ in range(epochs):
        for real, labels in loader:
            b, k = real.shape[:2]
            y = labels.round().long()
            y = y.unsqueeze(1).expand(b, k) if y.dim() == 1 else y
            fake = torch.zeros_like(real)
            if b:  # an empty Poisson batch still takes a (noise-only) DP step
                with torch.no_grad():
                    z = torch.randn(b * k, gen_net.latent, generator=generator)
                    fake = gen_net(z, y.reshape(-1)).reshape(real.shape)
            opt_d.zero_grad(set_to_none=True)
            if plan is not None:
                loss = _vmap_grad_samples(disc, [real, fake, labels])
            else:
                loss = _mean_loss(disc, [real, fake, labels])
                loss.backward()  # type: ignore[no-untyped-call]
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(d_params, max_grad_norm)
            opt_d.step()
            # the generator's step: noise and public classes through the private critic
            count = max(b, batch_size) * k
            z = torch.randn(count, gen_net.latent, generator=generator)
            classes = torch.randint(0, 2, (count,), generator=generator)
            opt_g.zero_grad(set_to_none=True)
            g_loss = F.softplus(-disc(gen_net(z, classes), classes)).mean()
            g_loss.backward()  # type: ignore[no-untyped-call]
            opt_g.step()
            for p in d_params:  # the generator's backward reached the critic: not a step
                p.grad = None
            steps += 1
            if b:
                losses.append(float(loss.detach()))
    return _result(model, start, len(data), steps, losses, plan, accountant)


def add_proximal_term(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter],
                      mu: float) -> None:
    """FedProx (Li et al. 2020): before each step of ``optimizer`` (the torch optimiser
    inside Opacus' ``DPOptimizer``, so after clipping and noise), add ``mu (w - w0)`` to
    the gradient of every parameter, ``w0`` being the weights the round started from."""
    inner = cast(torch.optim.Optimizer, getattr(optimizer, "original_optimizer", optimizer))
    anchors = [p.detach().clone() for p in params]

    def hook(*_: Any) -> None:
        with torch.no_grad():
            for p, anchor in zip(params, anchors):
                if p.grad is not None:
                    p.grad.add_(p.detach() - anchor, alpha=mu)

    inner.register_step_pre_hook(hook)


def add_gradient_correction(optimizer: torch.optim.Optimizer,
                            params: list[torch.nn.Parameter], correction: NDArrays) -> None:
    """Before each step of ``optimizer`` (inside Opacus' ``DPOptimizer``: after clipping
    and noise), add the fixed ``correction`` to the gradient of every parameter
    (SCAFFOLD's ``c - c_i``)."""
    if len(correction) != len(params):
        raise ValueError(f"gradient correction has {len(correction)} arrays, the model "
                         f"trains {len(params)} parameters")
    inner = cast(torch.optim.Optimizer, getattr(optimizer, "original_optimizer", optimizer))
    terms = [torch.as_tensor(np.asarray(c), dtype=p.dtype).reshape(p.shape)
             for p, c in zip(params, correction)]

    def hook(*_: Any) -> None:
        with torch.no_grad():
            for p, term in zip(params, terms):
                if p.grad is not None:
                    p.grad.add_(term)

    inner.register_step_pre_hook(hook)


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorDataset, batch_size: int = 64) -> EvalCounts:
    """Evaluation counts of ``model`` on ``data`` (loss, confusion, score histograms)."""
    model.eval()
    own = getattr(model, "eval_counts", None)
    if callable(own):  # a model with its own validation (a GAN's real-vs-generated)
        return cast(EvalCounts, own(data))
    logits, labels, loss_sum = [], [], 0.0
    for batch in DataLoader(data, batch_size=batch_size):
        *inputs, y = batch
        scorer = cast(Any, model)
        loss_sum += float(scorer.sample_losses(*inputs, y).sum())
        logits.append(scorer.scores(*inputs).numpy())
        # patch labels (annotations): a slide is positive when any drawn patch is
        labels.append((y if y.dim() == 1 else y.amax(dim=1)).numpy())
    if not logits:
        return EvalCounts()
    return EvalCounts.from_predictions(np.concatenate(logits), np.concatenate(labels), loss_sum)
