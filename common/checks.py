"""What a server accepts from a site, and what a site agrees to send (no Flower here).

One home for the checks of a round's replies, used by the Flower strategy
(``server/strategy.py``), the SecAgg+ seam and :meth:`common.site.Site.train`:

- an update (or a SecAgg+ aggregate) must have the global model's shapes, be finite and
  stay inside the value bound every honest update obeys (:func:`update_bound`);
- a site's example count must be positive, at most ``secagg-max-weight`` and the same in
  every round as it was the first time the site replied (trust on first use);
- training and evaluation metrics must have the types and ranges PathFed sends.

Every check returns a reason (a sentence) or None; none of them raises on odd input, so
one site's malformed reply is rejected alone and never ends the federation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.metrics import HIST_BINS, EvalCounts

BOUND_SLACK = 1e-6
"""Relative slack on value bounds (float rounding, SecAgg+ quantisation)."""


# Adam moves a parameter by at most about lr * (1 - beta1) / sqrt(1 - beta2) per step
# (3.16 lr at the defaults); we allow 4 lr.
ADAM_STEP_BOUND = 4.0


def update_value_bound(optimizer: str, lr: float, steps: int, max_grad_norm: float,
                       noise_multiplier: float, batch_size: int) -> float:
    """Bound on any single coordinate of a round's update.

    With Adam the bound is deterministic. With SGD each step moves a coordinate by at most
    ``lr * C`` (clipped gradients) plus Gaussian noise ``lr * sigma * C / B``; we allow
    six standard deviations of the noise summed over the round.
    """
    if optimizer == "adam":
        return ADAM_STEP_BOUND * lr * steps
    noise = 6.0 * lr * noise_multiplier * max_grad_norm * math.sqrt(steps) / batch_size
    return lr * max_grad_norm * steps + noise


def update_bound(cfg: Any) -> float:
    """The largest value any coordinate of an honest site's round update can take.

    Every site clips its gradients to ``max-grad-norm`` (with or without DP), so with
    ``local-epochs`` over at most ``secagg-max-weight`` slides a round's update is bounded
    (:func:`update_value_bound`). It is also SecAgg+'s clipping range, which silently
    clips larger values; ``secagg-clipping-range`` overrides it.
    """
    if cfg.secagg_clipping_range > 0:
        return float(cfg.secagg_clipping_range)
    if getattr(cfg, "dp_mode", "local") == "distributed":
        # one step of lr times a mean of clipped slide gradients, weighted by n / max-weight
        return float(cfg.lr * cfg.max_grad_norm)
    steps = cfg.local_epochs * math.ceil(cfg.secagg_max_weight / cfg.batch_size)
    sigma = cfg.max_noise_multiplier if cfg.dp else 0.0
    return update_value_bound(cfg.optimizer, cfg.lr, steps, cfg.max_grad_norm, sigma,
                              cfg.batch_size)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_))


def _is_count(value: Any) -> bool:
    """A finite whole number >= 0 (an int, or a float with an integral value)."""
    return (_is_number(value) and math.isfinite(float(value)) and float(value) >= 0
            and float(value) == int(value))


def update_problem(update: Sequence[Any], shapes: Sequence[tuple[int, ...]],
                   bound: float) -> str | None:
    """Why ``update`` cannot be aggregated (shapes, finiteness, bound), or None."""
    try:
        arrays = [np.asarray(u) for u in update]
    except (TypeError, ValueError) as err:
        return f"update is not a list of arrays ({err})"
    got = [tuple(a.shape) for a in arrays]
    if got != [tuple(s) for s in shapes]:
        return (f"update has the wrong shapes ({len(got)} arrays, first "
                f"{got[:2]}; expected {len(shapes)}, first {list(shapes)[:2]})")
    if any(a.dtype.kind not in "fiu" for a in arrays):
        return "update is not numeric"
    if not all(np.isfinite(a).all() for a in arrays):
        return "update is not finite (NaN or inf values)"
    largest = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
    if largest > bound * (1 + BOUND_SLACK):
        return (f"update value {largest:.4g} is beyond the bound {bound:.4g} that every "
                "honest update obeys (lr x clipping norm x steps, plus noise)")
    return None


def count_problem(site: str, n: Any, declared: Mapping[str, int], max_weight: int) -> str | None:
    """Why a reply's example count ``n`` is not credible for ``site``, or None."""
    if not _is_number(n) or not math.isfinite(float(n)) or int(n) != n:
        return f"example count {n!r} is not an integer"
    if n <= 0:
        return "no training slides"
    if n > max_weight:
        return (f"claims {int(n)} training samples, more than secagg-max-weight "
                f"{max_weight}")
    if site in declared and int(n) != declared[site]:
        return (f"claims {int(n)} training samples where it declared {declared[site]} in its "
                "first round")
    return None


_TRAIN_NUMBERS = ("epsilon", "noise_multiplier", "sample_rate", "max_grad_norm",
                  "epsilon_budget")


def train_metrics_problem(metrics: Mapping[str, Any], dp: bool) -> str | None:
    """Why a training reply's metrics are malformed, or None."""
    if not isinstance(metrics, Mapping):
        return "metrics are not a mapping"
    site = metrics.get("site")
    if site is not None and not isinstance(site, str):
        return f"metric 'site' is {site!r}, not a name"
    if dp and not {"epsilon", "noise_multiplier", "steps"} <= set(metrics):
        return "update carries no privacy accounting"
    for key in _TRAIN_NUMBERS:
        if key in metrics:
            value = metrics[key]
            if not _is_number(value) or not math.isfinite(float(value)) or value < 0:
                return f"metric {key!r} is {value!r}, not a finite number >= 0"
    steps = metrics.get("steps", 0)
    if not _is_count(steps):
        return f"metric 'steps' is {steps!r}, not a count"
    if "train_loss" in metrics and not _is_number(metrics["train_loss"]):
        return f"metric 'train_loss' is {metrics['train_loss']!r}, not a number"
    if "can_train_next" in metrics and not isinstance(metrics["can_train_next"],
                                                      (bool, np.bool_)):
        return f"metric 'can_train_next' is {metrics['can_train_next']!r}, not a bool"
    return None


def eval_counts(metrics: Mapping[str, Any]) -> tuple[EvalCounts | None, str | None]:
    """A site's evaluation counts from its reply, or None and why they are malformed."""
    if not isinstance(metrics, Mapping):
        return None, "metrics are not a mapping"
    values: dict[str, Any] = {}
    for name in ("n", "tp", "tn", "fp", "fn"):
        value: Any = metrics.get(name)
        if not _is_count(value):
            return None, f"evaluation field {name!r} is {value!r}, not a count"
        values[name] = int(value)
    loss_sum: Any = metrics.get("loss_sum")
    if not _is_number(loss_sum) or not math.isfinite(float(loss_sum)) or loss_sum < 0:
        return None, f"evaluation field 'loss_sum' is {loss_sum!r}, not a finite number >= 0"
    values["loss_sum"] = float(loss_sum)
    for name in ("hist_pos", "hist_neg"):
        raw = metrics.get(name)
        if not isinstance(raw, bytes) or len(raw) != 4 * HIST_BINS:
            size = len(raw) if isinstance(raw, bytes) else type(raw).__name__
            return None, (f"evaluation field {name!r} is not {HIST_BINS} int32 counts "
                          f"({size})")
        hist = np.frombuffer(raw, "<i4")
        if (hist < 0).any():
            return None, f"evaluation field {name!r} has negative counts"
        values[name] = hist.astype(int).tolist()
    counts = EvalCounts(**values)
    if counts.tp + counts.tn + counts.fp + counts.fn != counts.n or (
            sum(counts.hist_pos) != counts.tp + counts.fn
            or sum(counts.hist_neg) != counts.tn + counts.fp):
        return None, "evaluation counts do not add up (confusion counts vs n vs histograms)"
    epsilon = metrics.get("epsilon", 0.0)
    if not _is_number(epsilon) or not math.isfinite(float(epsilon)) or epsilon < 0:
        return None, f"metric 'epsilon' is {epsilon!r}, not a finite number >= 0"
    return counts, None


__all__ = ["BOUND_SLACK", "count_problem", "eval_counts", "train_metrics_problem",
           "update_bound", "update_problem"]
