"""The DP planner: from a site's budget, data size and rounds to its noise, sampling rate and
local steps, searched over the accountant (``pathfed plan``).

Each candidate layout (expected batch ``B`` and local epochs ``E``; distributed DP has one:
a full-batch step per round) is calibrated by the site's own accountant
(:func:`common.privacy.plan_site`, :func:`common.privacy.plan_distributed`), so what the
planner prints is what the site will train with. Candidates are ranked by the
signal-to-noise ratio of a run's summed steps: ``T`` steps of mean clipped gradients
(signal ``T``) carry noise of standard deviation ``sqrt(T) sigma / B`` (per coordinate,
in units of the clipping norm), so ``snr = sqrt(T) B / sigma``; in distributed DP ``B`` is
every site's slides together and ``sigma`` includes quantisation. In DP-SGD's linear
regime ``snr`` barely depends on the layout; it falls where amplification by sampling
weakens (``sigma`` near 0.5) or where the budget needs more noise than
``max-noise-multiplier``. Ties go to more steps. The score is a guide, not a promise of
accuracy: it ignores optimisation (lr, clipping bias).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from common.privacy import DPPlan, history_epsilon, plan_distributed, plan_site


@dataclass(frozen=True)
class Candidate:
    """One layout the planner considered, with its calibrated plan."""

    batch_size: int
    local_epochs: int
    plan: DPPlan
    batch: float
    """Expected slides per step (all sites' in distributed DP)."""
    steps: int
    """Steps over the planned rounds."""
    epsilon: float
    """What the planned rounds spend (the accountant's own number)."""
    snr: float
    capped: bool
    """The budget needs more noise than ``max-noise-multiplier``: it runs out early."""

    def row(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "local_epochs": self.local_epochs,
                "sample_rate": self.plan.sample_rate, "steps": self.steps,
                "noise_multiplier": self.plan.noise_multiplier, "epsilon": self.epsilon,
                "accountant": self.plan.accountant, "snr": self.snr, "capped": self.capped}


def _batches(n: int) -> list[int]:
    sizes = sorted({min(n, 2**k) for k in range(int(math.log2(max(n, 1))) + 2)})
    return [b for b in sizes if b >= 1]


def plan_candidates(cfg: Any, n_train: int, sites: int | None = None,
                    dim: int | None = None, epochs: tuple[int, ...] = (1, 2, 4)
                    ) -> list[Candidate]:
    """Every layout for a site of ``n_train`` slides under ``cfg``, best first.

    Local DP: expected batches 1, 2, 4, ... up to ``n_train`` and ``epochs`` local epochs.
    Distributed DP: the one layout, with ``sites`` sites of this size (``cfg.sites`` by
    default) and a model of ``dim`` trainable coordinates.
    """
    out = []
    budget = cfg.epsilon
    if cfg.dp_mode == "distributed":
        from common.checks import update_bound

        if dim is None:
            raise ValueError("a distributed plan needs the model's trainable coordinates")
        plan = plan_distributed(
            n_train, rounds=cfg.rounds, epsilon=budget, delta=cfg.delta,
            max_grad_norm=cfg.max_grad_norm, max_noise_multiplier=cfg.max_noise_multiplier,
            lr=cfg.lr, dim=dim, max_weight=float(cfg.secagg_max_weight),
            quantization_range=cfg.secagg_quantization_range,
            clipping_range=update_bound(cfg))
        total = n_train * (sites or cfg.sites)
        scale = cfg.secagg_quantization_range / (2 * update_bound(cfg))
        ideal = scale * cfg.lr * cfg.max_grad_norm / cfg.secagg_max_weight
        sigma = plan.noise_multiplier * plan.l2_sensitivity / ideal  # in clipping units
        out.append(Candidate(total, 1, plan, float(total), cfg.rounds,
                             history_epsilon([plan.entry(cfg.rounds)], cfg.delta),
                             math.sqrt(cfg.rounds) * total / sigma,
                             plan.noise_multiplier >= cfg.max_noise_multiplier))
        return out
    for batch_size in _batches(n_train):
        for local_epochs in epochs:
            plan = plan_site(n_train, batch_size=batch_size, local_epochs=local_epochs,
                             rounds=cfg.rounds, epsilon=budget, delta=cfg.delta,
                             max_grad_norm=cfg.max_grad_norm,
                             max_noise_multiplier=cfg.max_noise_multiplier,
                             accountant=cfg.accountant)
            steps = plan.steps_per_round * cfg.rounds
            batch = plan.sample_rate * n_train
            capped = plan.noise_multiplier >= cfg.max_noise_multiplier
            spent = history_epsilon([plan.entry(steps)], cfg.delta, plan.accountant)
            out.append(Candidate(batch_size, local_epochs, plan, batch, steps, spent,
                                 math.sqrt(steps) * batch / plan.noise_multiplier, capped))
    return sorted(out, key=lambda c: (c.capped, -round(c.snr, 6), -c.steps))


__all__ = ["Candidate", "plan_candidates"]
