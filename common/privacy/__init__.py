"""Differential privacy: per-site plans, persistent accountants, budget enforcement, and
the Opacus engine that trains with them (:func:`make_private`).

The one front door for private training and accounting: PathFed imports Opacus here only.
Every epsilon PathFed reports comes from an Opacus accountant fed with the real sampling
rate, noise multiplier and step count, and a site's accountant state is kept for the whole
federation (it is saved between rounds, never re-created), so the epsilon it reports is
cumulative.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

_ROOT_HANDLERS = list(logging.getLogger().handlers)
from opacus.accountants import RDPAccountant, create_accountant  # noqa: E402
from opacus.accountants.analysis import rdp as privacy_analysis  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402

from common.errors import ConfigError, PrivacyBudgetExhausted  # noqa: E402

# Importing Opacus calls logging.basicConfig(), which gives the root logger a handler
# where the application set none: every Flower line would then be printed twice (Flower's
# own handler, and the root's). The application decides how logs look, not a library.
for _handler in logging.getLogger().handlers:
    if _handler not in _ROOT_HANDLERS:
        logging.getLogger().removeHandler(_handler)

# With tens of slides per site Poisson sampling often draws an empty batch; training
# handles it (a noise-only step, see common.training), so Opacus' warning is noise.
logging.getLogger("opacus.data_loader").setLevel(logging.ERROR)

log = logging.getLogger(__name__)

# Opacus' default RDP orders stop at 63; large epsilons over few steps need higher orders
# for a tight bound. Every RDP epsilon in PathFed (claimed or recomputed) uses these.
RDP_ALPHAS = list(RDPAccountant.DEFAULT_ALPHAS) + [80, 96, 128, 192, 256, 384, 512]

BUDGET_SLACK = 1e-9
"""Relative slack of every budget comparison (floating-point rounding of the accountant)."""


def within_budget(epsilon: float, budget: float) -> bool:
    """Whether ``epsilon`` fits ``budget`` (with :data:`BUDGET_SLACK`)."""
    return epsilon <= budget * (1 + BUDGET_SLACK)


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """RDP of one step at every order of :data:`RDP_ALPHAS` (cached: it is the slow part)."""
    rdp = privacy_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier,
                                       steps=1, orders=RDP_ALPHAS)
    rdp = np.asarray(rdp)
    rdp.flags.writeable = False
    return rdp


def rdp_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    """RDP epsilon of ``(noise_multiplier, sample_rate, steps)`` entries at ``delta``.

    The same numbers as ``RDPAccountant.get_epsilon(delta, alphas=RDP_ALPHAS)`` (Opacus
    computes ``rdp_per_step * steps`` too), but the per-step RDP is cached: with the
    fractional orders and large sampling rates of small sites one evaluation takes about
    0.4 s, and a site asks for its epsilon several times per round.
    """
    if not history:
        return 0.0
    rdp = sum(_rdp_per_step(float(q), float(sigma)) * steps for sigma, q, steps in history)
    return spent(RDP_ALPHAS, rdp, delta)


def spent(orders: list[Any], rdp: Any, delta: float) -> float:
    """Opacus' RDP to ``(epsilon, delta)`` conversion, over ``orders``. Few steps have
    their optimum below the smallest order: the bound then holds, a little loosely, and
    Opacus' warning about it says nothing the caller can act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest)")
        eps, _ = privacy_analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


SUBSTITUTION = 1.0
"""The fourth field of a DP-SGD entry whose unit's change *substitutes* one sample
(``(noise_multiplier, sample_rate, steps, SUBSTITUTION)``): MixPatch's mixing groups,
where adding or removing a slide changes the one group (sample) it belongs to."""


def substitution_rdp(sigma: float, q: float, steps: int, orders: list[Any]) -> np.ndarray:
    """RDP at ``orders`` of ``steps`` Poisson-subsampled Gaussian steps under *substitution*
    of one sample, from Opacus' add/remove RDP by the weak triangle inequality of Renyi
    divergence (Mironov 2017, Proposition 11), through the distribution ``R`` of the
    steps without that sample::

        D_a(P || Q) <= (a - 1/2) / (a - 1) D_2a(P || R) + D_(2a-1)(R || Q)

    Both terms are add/remove divergences of the same steps, which Opacus' sampled
    Gaussian RDP bounds (its bound holds in either direction; Mironov, Talwar and Zhang
    2019). Orders must exceed 1."""
    a = np.asarray(orders, dtype=np.float64)
    if (a <= 1).any():
        raise ValueError("substitution RDP needs orders above 1")
    double = np.asarray(privacy_analysis.compute_rdp(q=q, noise_multiplier=sigma,
                                                     steps=int(steps), orders=list(2 * a)))
    odd = np.asarray(privacy_analysis.compute_rdp(q=q, noise_multiplier=sigma,
                                                  steps=int(steps), orders=list(2 * a - 1)))
    return np.asarray((a - 0.5) / (a - 1) * double + odd)


def history_epsilon(history: list[tuple[float, ...]], delta: float,
                    mechanism: str = "rdp") -> float:
    """Epsilon at ``delta`` of an accountant's entries, by ``mechanism``'s accountant.

    Entries are Opacus' ``(noise_multiplier, sample_rate, steps)`` of DP-SGD (local DP),
    ``(noise_multiplier, sample_rate, steps, SUBSTITUTION)`` of DP-SGD over samples that a
    unit's change substitutes (:func:`substitution_rdp`), or ``(noise_multiplier, 1.0,
    steps, l2, l1)`` of the Skellam mechanism (distributed DP,
    :mod:`common.privacy.distributed`). A history holding Skellam or substitution entries
    (alone, or beside earlier local-DP runs of the same site) is composed in RDP at the
    integer orders of :data:`~common.privacy.distributed.INT_ALPHAS`: Opacus' subsampled
    Gaussian RDP for DP-SGD entries, the Skellam bound or the substitution bound for the
    others. PRV has no form for either, so ``mechanism`` only chooses for plain entries.
    """
    if not history:
        return 0.0
    if any(len(h) in (4, 5) for h in history):
        from common.privacy.distributed import INT_ALPHAS, skellam_entry_rdp

        rdp = np.zeros(len(INT_ALPHAS))
        for entry in history:
            if len(entry) == 5:
                rdp += skellam_entry_rdp(tuple(entry))
            elif len(entry) == 4:
                sigma, q, steps, kind = entry
                if kind != SUBSTITUTION:
                    raise ValueError(f"unknown accountant entry {tuple(entry)}")
                rdp += _substitution_rdp_cached(float(sigma), float(q), int(steps))
            else:
                sigma, q, steps = entry
                rdp += np.asarray(privacy_analysis.compute_rdp(
                    q=q, noise_multiplier=sigma, steps=int(steps), orders=INT_ALPHAS))
        return spent(INT_ALPHAS, rdp, delta)
    if mechanism == "rdp":
        return rdp_epsilon([(float(a), float(b), int(c)) for a, b, c in history], delta)
    return _prv_epsilon(_merged(history), float(delta))


@functools.lru_cache(maxsize=1024)
def _substitution_rdp_cached(sigma: float, q: float, steps: int) -> np.ndarray:
    from common.privacy.distributed import INT_ALPHAS

    rdp = substitution_rdp(sigma, q, 1, INT_ALPHAS) * steps
    rdp.flags.writeable = False
    return rdp


def _merged(history: list[tuple[float, ...]]) -> tuple[tuple[float, float, int], ...]:
    """The same schedule with the steps of equal ``(noise_multiplier, sample_rate)``
    entries added up: composition does not depend on order, and PRV composes each entry
    on its own (one entry per round would cost one PRV each)."""
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        key = (float(sigma), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    return tuple(sorted((s, q, n) for (s, q), n in steps.items()))


@functools.lru_cache(maxsize=4096)
def _prv_epsilon(history: tuple[tuple[float, float, int], ...], delta: float) -> float:
    """Opacus' PRV accountant's epsilon (its upper bound) of a merged schedule; cached, as
    a site asks for the same schedule's epsilon several times a round (about 0.2 s each)."""
    import warnings

    accountant = create_accountant("prv")
    accountant.history = list(history)
    with warnings.catch_warnings():  # log(1 - q) at q = 1 (full batches): harmless
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="opacus")
        return float(accountant.get_epsilon(delta=delta))


@dataclass(frozen=True)
class DPPlan:
    """How one site trains privately, fixed for the whole federation."""

    sample_rate: float
    """Poisson sampling rate of one slide in one step."""
    steps_per_round: int
    noise_multiplier: float
    max_grad_norm: float
    epsilon_budget: float
    delta: float
    accountant: str
    planned_rounds: int
    mode: str = "local"
    """``local`` (DP-SGD noise at the site) or ``distributed`` (a Skellam share, summed by
    SecAgg+; :mod:`common.privacy.distributed`)."""
    l2_sensitivity: float = 0.0
    """Distributed: one slide's L2 sensitivity on the quantised vector (integer units)."""
    l1_sensitivity: float = 0.0
    """Distributed: its L1 sensitivity."""
    substitution: bool = False
    """A unit's change substitutes one sample (MixPatch's mixing groups): accounted by
    :func:`substitution_rdp`."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def distributed(self) -> bool:
        return self.mode == "distributed"

    def entry(self, steps: int | None = None) -> tuple[float, ...]:
        """The accountant's entry for ``steps`` steps (one round's by default)."""
        steps = self.steps_per_round if steps is None else steps
        if self.distributed:
            return (self.noise_multiplier, self.sample_rate, steps, self.l2_sensitivity,
                    self.l1_sensitivity)
        if self.substitution:
            return (self.noise_multiplier, self.sample_rate, steps, SUBSTITUTION)
        return (self.noise_multiplier, self.sample_rate, steps)

    @property
    def noise_variance(self) -> float:
        """Distributed: the per-coordinate variance of the summed Skellam noise."""
        return (self.noise_multiplier * self.l2_sensitivity) ** 2


@functools.lru_cache(maxsize=64)
def plan_site(
    n_train: int, *, batch_size: int, local_epochs: int, rounds: int, epsilon: float,
    delta: float, max_grad_norm: float, max_noise_multiplier: float, accountant: str = "rdp",
    substitution: bool = False,
) -> DPPlan:
    """Calibrate the noise so that ``rounds`` rounds spend at most ``epsilon`` at ``delta``.
    With ``substitution`` a unit's change substitutes one of the ``n_train`` samples
    (MixPatch's mixing groups): calibrated and accounted by :func:`substitution_rdp`.

    Calibration takes most of a second and every round's message builds the site anew,
    so plans are cached per process (the result is a frozen value).

    The sampling rate and steps match Opacus' Poisson loader over a ``DataLoader`` of
    ``batch_size``: ``q = 1 / ceil(n / B)`` and ``ceil(n / B)`` steps per epoch. When the
    budget would need more noise than ``max_noise_multiplier``, the site trains with that
    much noise and its budget runs out before the planned rounds (it then stops training).
    """
    if n_train < 1:
        raise ConfigError("site has no training slides: nothing to train on")
    if delta >= 1.0 / n_train:
        raise ConfigError(
            f"delta: {delta:g} is not below 1/n = 1/{n_train} (n training slides at this "
            f"site); use delta < {1.0 / n_train:.2g}"
        )
    sample_rate, steps_per_round = plan_layout(n_train, batch_size, local_epochs)
    steps = rounds * steps_per_round
    if substitution:
        sigma = _calibrate_entry(epsilon, delta, lambda s: (s, sample_rate, steps,
                                                            SUBSTITUTION))
        accountant = "rdp"  # PRV has no substitution form
    else:
        sigma = _calibrate(epsilon, delta, sample_rate, steps, "rdp")
    if accountant == "prv":
        # PRV where it is stable: below RDP's noise, and keeping the budget by PRV
        prv_sigma = _calibrate_prv(epsilon, delta, sample_rate, steps, sigma)
        if prv_sigma is None:
            log.warning("PRV accountant unstable for this schedule (RDP's noise %.4g): this "
                        "site accounts with RDP", sigma)
            accountant = "rdp"
        else:
            sigma = prv_sigma
    if sigma > max_noise_multiplier:
        log.warning(
            "budget epsilon=%g needs noise multiplier %.3g > max-noise-multiplier %g over %d "
            "rounds: training with %g, so the budget runs out early",
            epsilon, sigma, max_noise_multiplier, rounds, max_noise_multiplier,
        )
        sigma = max_noise_multiplier
    return DPPlan(
        sample_rate=sample_rate, steps_per_round=steps_per_round, noise_multiplier=float(sigma),
        max_grad_norm=max_grad_norm, epsilon_budget=epsilon, delta=delta,
        accountant=accountant, planned_rounds=rounds, substitution=substitution,
    )


def _calibrate_entry(epsilon: float, delta: float, entry: Any) -> float:
    """The least noise multiplier (to 0.1 %) whose schedule ``entry(sigma)`` spends at most
    ``epsilon`` by :func:`history_epsilon` (inf when even 1000 overspends)."""
    def fits(sigma: float) -> bool:
        return within_budget(history_epsilon([entry(sigma)], delta), epsilon)

    high = 1.0
    while not fits(high):
        high *= 2
        if high > 1000:
            return math.inf
    low = high / 2 if high > 1.0 else 0.0
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        if mid > 0 and fits(mid):
            high = mid
        else:
            low = mid
    return high


def _calibrate(epsilon: float, delta: float, sample_rate: float, steps: int,
               accountant: str) -> float:
    """Opacus' ``get_noise_multiplier`` (inf when it finds none, or the accountant fails)."""
    import warnings

    try:
        with warnings.catch_warnings():  # as in _prv_epsilon and spent()
            warnings.filterwarnings("ignore", category=RuntimeWarning, module="opacus")
            warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest)")
            return float(get_noise_multiplier(
                target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                steps=steps, accountant=accountant,
                **({"alphas": RDP_ALPHAS} if accountant == "rdp" else {})))
    except (ValueError, RuntimeError, OverflowError):
        return math.inf


def _calibrate_prv(epsilon: float, delta: float, sample_rate: float, steps: int,
                   rdp_sigma: float) -> float | None:
    """The least noise (to 0.1 %, or to 0.005 in epsilon) whose PRV epsilon keeps the
    budget, searched below RDP's calibration ``rdp_sigma`` (PRV is the tighter bound: it
    needs no more noise) by regula falsi on epsilon(sigma), about 5 PRV evaluations; None
    where PRV cannot compose the schedule or says RDP's noise overspends (unstable)."""
    if not math.isfinite(rdp_sigma):
        return None

    def spend(sigma: float) -> float:
        return _prv_epsilon(((sigma, sample_rate, steps),), delta)

    try:
        high, e_high = rdp_sigma, spend(rdp_sigma)
        if not within_budget(e_high, epsilon):
            return None
        low = 0.8 * high
        e_low = spend(low)
        while within_budget(e_low, epsilon) and low > 1e-3:  # PRV far below RDP: widen
            high, e_high, low = low, e_low, low / 2
            e_low = spend(low)
        side = 0
        while high - low > 1e-3 * high and e_high < epsilon - 0.005:
            # Illinois regula falsi: the secant through the bracket, halving a stuck end
            t = (e_low - epsilon) / (e_low - e_high)
            mid = min(max(low + t * (high - low), low + 1e-4 * high), high - 1e-4 * high)
            e_mid = spend(mid)
            if within_budget(e_mid, epsilon):
                high, e_high = mid, e_mid
                if side == 1:
                    e_low = epsilon + (e_low - epsilon) / 2
                side = 1
            else:
                low, e_low = mid, e_mid
                if side == -1:
                    e_high = epsilon + (e_high - epsilon) / 2
                side = -1
    except (ValueError, RuntimeError, OverflowError):
        return None
    return high


def restore_plan(saved: Any, n_train: int, **settings: Any) -> DPPlan | None:
    """A plan an earlier message of this run saved (``{"inputs", "plan"}``), if it was made
    for these inputs and its noise still keeps the budget; else None (calibrate anew).

    In deployment every message starts a fresh ClientApp process, and calibrating takes
    about 15 accountant evaluations (2 s here); checking a saved plan takes one. A saved
    plan is never trusted as written: its noise must spend at most its budget over the
    planned rounds, or be the ``max_noise_multiplier`` cap the calibration itself falls
    back to.
    """
    inputs = {"n_train": n_train, **settings}
    if not isinstance(saved, dict) or saved.get("inputs") != inputs:
        return None
    try:
        plan = DPPlan(**saved["plan"])
        if settings.get("mode", "local") == "distributed":
            expected = (1.0, 1)
            sensitivity = distributed_sensitivity(settings)
        else:
            expected = plan_layout(n_train, settings["batch_size"], settings["local_epochs"])
            sensitivity = (0.0, 0.0)
    except (KeyError, TypeError):
        return None
    if ((plan.sample_rate, plan.steps_per_round) != expected
            or (plan.mode, plan.l2_sensitivity, plan.l1_sensitivity) != (
                settings.get("mode", "local"), *sensitivity)
            or plan.substitution != bool(settings.get("substitution", False))
            or (plan.max_grad_norm, plan.epsilon_budget, plan.delta,
                plan.planned_rounds) != (settings["max_grad_norm"], settings["epsilon"],
                                         settings["delta"], settings["rounds"])
            # the configured accountant, or RDP where PRV was unstable for the schedule
            or plan.accountant not in {settings["accountant"],
                                       "rdp" if settings["accountant"] == "prv" else None}
            or not 0 < plan.noise_multiplier <= settings["max_noise_multiplier"]):
        return None
    if plan.noise_multiplier < settings["max_noise_multiplier"]:
        planned = history_epsilon([plan.entry(plan.planned_rounds * plan.steps_per_round)],
                                  plan.delta, plan.accountant)
        if not within_budget(planned, plan.epsilon_budget):
            return None
    return plan


def distributed_sensitivity(settings: dict[str, Any]) -> tuple[float, float]:
    """``(Delta_2, Delta_1)`` of a distributed plan's settings."""
    from common.privacy.distributed import integer_sensitivity

    return integer_sensitivity(
        int(settings["dim"]), lr=settings["lr"], max_grad_norm=settings["max_grad_norm"],
        max_weight=settings["max_weight"], quantization_range=settings["quantization_range"],
        clipping_range=settings["clipping_range"])


@functools.lru_cache(maxsize=64)
def plan_distributed(
    n_train: int, *, rounds: int, epsilon: float, delta: float, max_grad_norm: float,
    max_noise_multiplier: float, lr: float, dim: int, max_weight: float,
    quantization_range: int, clipping_range: float, accountant: str = "skellam",
    mode: str = "distributed", batch_size: int = 0, local_epochs: int = 0,
) -> DPPlan:
    """A distributed-DP plan: one full-batch step per round, Skellam noise in the sum
    calibrated so that ``rounds`` rounds spend at most ``epsilon`` at ``delta``
    (:mod:`common.privacy.distributed`). ``batch_size`` and ``local_epochs`` are accepted
    (the settings of a local plan) and unused: the step takes every training slide."""
    from common.privacy.distributed import calibrate_sigma

    if n_train < 1:
        raise ConfigError("site has no training slides: nothing to train on")
    if delta >= 1.0 / n_train:
        raise ConfigError(
            f"delta: {delta:g} is not below 1/n = 1/{n_train} (n training slides at this "
            f"site); use delta < {1.0 / n_train:.2g}")
    l2, l1 = distributed_sensitivity(dict(
        dim=dim, lr=lr, max_grad_norm=max_grad_norm, max_weight=max_weight,
        quantization_range=quantization_range, clipping_range=clipping_range))
    sigma = calibrate_sigma(epsilon, delta, rounds, l2, l1, max_noise_multiplier)
    if sigma >= max_noise_multiplier:
        log.warning("budget epsilon=%g needs a noise multiplier above max-noise-multiplier %g "
                    "over %d rounds: training with %g, so the budget runs out early",
                    epsilon, max_noise_multiplier, rounds, max_noise_multiplier)
    return DPPlan(sample_rate=1.0, steps_per_round=1, noise_multiplier=float(sigma),
                  max_grad_norm=max_grad_norm, epsilon_budget=epsilon, delta=delta,
                  accountant="skellam", planned_rounds=rounds, mode="distributed",
                  l2_sensitivity=l2, l1_sensitivity=l1)


def plan_layout(n_train: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """The sampling rate and steps per round of Opacus' Poisson loader over ``n_train``."""
    batches = math.ceil(n_train / batch_size)
    return 1.0 / batches, local_epochs * batches


class SiteAccountant:
    """A site's privacy accountant, persistent across rounds (an Opacus accountant inside)."""

    def __init__(self, mechanism: str = "rdp", state: dict[str, Any] | None = None) -> None:
        self.mechanism = mechanism
        # Skellam entries are composed by :func:`history_epsilon`; Opacus' RDP accountant
        # only keeps them (it is the accountant Opacus' engine records DP-SGD steps in)
        self.accountant = create_accountant("rdp" if mechanism == "skellam" else mechanism)
        if state:
            self.accountant.load_state_dict({
                "history": [tuple(h) for h in state["history"]],
                "mechanism": self.accountant.mechanism(),
            })
        self.prior: list[tuple[float, ...]] = []
        """Steps of the site's *other* runs (the site's store sets them): they count
        towards its lifetime budget."""

    @property
    def history(self) -> list[tuple[float, ...]]:
        """``(noise_multiplier, sample_rate, steps)`` entries, as Opacus keeps them (and
        the Skellam entries of distributed DP, :meth:`DPPlan.entry`)."""
        return list(self.accountant.history)

    def record(self, plan: DPPlan, steps: int | None = None) -> None:
        """Record steps of ``plan`` taken outside Opacus' engine (a distributed round)."""
        self.accountant.history.append(plan.entry(steps))

    @property
    def steps(self) -> int:
        return sum(int(h[2]) for h in self.accountant.history)

    def epsilon(self, delta: float) -> float:
        """Cumulative epsilon at ``delta`` over every step taken so far."""
        return history_epsilon(self.history, delta, self.mechanism)

    def projected_epsilon(self, plan: DPPlan) -> float:
        """Epsilon after one more round of ``plan`` (the accountant itself is untouched)."""
        return history_epsilon(self.history + [plan.entry()], plan.delta, self.mechanism)

    def lifetime_epsilon(self, delta: float, plan: DPPlan | None = None) -> float:
        """Epsilon of everything the site has spent, in this run and every earlier one
        (plus one more round of ``plan`` when given)."""
        history = self.prior + self.history
        if plan is not None:
            history.append(plan.entry())
        return independent_epsilon(history, delta, self.mechanism)

    def check_next_round(self, plan: DPPlan, site: str,
                         lifetime_budget: float = math.inf) -> float:
        """Raise :class:`PrivacyBudgetExhausted` unless one more round fits the run's
        budget and the site's lifetime budget."""
        projected = self.projected_epsilon(plan)
        if not within_budget(projected, plan.epsilon_budget):
            raise PrivacyBudgetExhausted(
                f"{site}: next round would reach epsilon={projected:.3f} > budget "
                f"{plan.epsilon_budget:g} (spent {self.epsilon(plan.delta):.3f} at "
                f"delta={plan.delta:g}); not training"
            )
        if math.isfinite(lifetime_budget):
            lifetime = self.lifetime_epsilon(plan.delta, plan)
            if not within_budget(lifetime, lifetime_budget):
                raise PrivacyBudgetExhausted(
                    f"{site}: next round would bring the site's lifetime epsilon over all "
                    f"its runs to {lifetime:.3f} > its lifetime budget {lifetime_budget:g} "
                    f"at delta={plan.delta:g}; not training"
                )
        return projected

    def to_json(self) -> str:
        return json.dumps({"mechanism": self.mechanism,
                           "history": [list(h) for h in self.accountant.history]})

    @classmethod
    def from_json(cls, text: str | None, mechanism: str = "rdp") -> SiteAccountant:
        if not text:
            return cls(mechanism)
        data = json.loads(text)
        return cls(data.get("mechanism", mechanism), data)


def opacus_rdp_epsilon(history: list[tuple[float, ...]], delta: float) -> float:
    """Epsilon of a schedule from a fresh Opacus ``RDPAccountant`` (no PathFed cache in
    between), at :data:`RDP_ALPHAS`: what an auditor recomputes."""
    accountant = RDPAccountant()
    accountant.history = list(history)
    return float(accountant.get_epsilon(delta=delta, alphas=RDP_ALPHAS))


def make_private(module: Any, optimizer: Any, data_loader: Any, plan: DPPlan,
                 accountant: SiteAccountant, generator: Any, *, per_sample: str = "hooks",
                 noise: str = "seeded", seeded: bool = False) -> tuple[Any, Any, Any]:
    """Opacus' ``PrivacyEngine.make_private`` with the site's persistent accountant.

    Poisson sampling, per-sample clipping at ``plan.max_grad_norm`` and Gaussian noise at
    ``plan.noise_multiplier``. ``per_sample`` is ``"vmap"`` (the model computes its own
    per-sample gradients with ``torch.func``; Opacus' ``no_op`` mode) or ``"hooks"``.
    ``noise="csprng"`` draws the noise from :func:`use_csprng_noise`; ``seeded`` also
    seeds the Poisson sampler with ``generator``.
    """
    import warnings

    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        # Seeded noise is deliberate in simulations (`deterministic`); see docs/privacy.md.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        engine = PrivacyEngine(accountant=plan.accountant)
        engine.accountant = accountant.accountant  # the site's persistent accountant
        model, opt, loader = engine.make_private(
            module=module, optimizer=optimizer, data_loader=data_loader,
            noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
            poisson_sampling=True, noise_generator=generator,
            grad_sample_mode="no_op" if per_sample == "vmap" else "hooks",
        )
    if seeded:  # Opacus' loader builds its own sampler generator; seed it as well
        loader.batch_sampler.generator = generator
    if noise == "csprng":
        use_csprng_noise(opt)
    return model, opt, loader


def use_csprng_noise(optimizer: Any) -> None:
    """Make an Opacus ``DPOptimizer`` draw its Gaussian noise from a CSPRNG.

    The equivalent of Opacus' ``secure_mode`` (which needs the unmaintained
    ``torchcsprng``): the noise of every step comes from
    :class:`common.crypto.noise.SecureGaussian`; clipping and accounting stay Opacus'.
    Only the noise draw of :meth:`DPOptimizer.add_noise` changes.
    """
    import torch
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    from common.crypto.noise import SecureGaussian

    source = SecureGaussian()

    def add_noise() -> None:
        std = optimizer.noise_multiplier * optimizer.max_grad_norm
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            draw = source.normal(tuple(p.summed_grad.shape), std)
            noise = torch.from_numpy(draw).to(p.summed_grad.dtype)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise


def independent_epsilon(
    history: list[tuple[float, ...]], delta: float, mechanism: str = "rdp"
) -> float:
    """Recompute epsilon from a logged schedule with a fresh accountant (for audits)."""
    return history_epsilon([tuple(h) for h in history], delta, mechanism)


__all__ = ["BUDGET_SLACK", "RDP_ALPHAS", "SUBSTITUTION", "DPPlan", "SiteAccountant", "history_epsilon",
           "independent_epsilon", "make_private", "opacus_rdp_epsilon", "plan_distributed",
           "plan_site", "rdp_epsilon", "restore_plan", "substitution_rdp",
           "use_csprng_noise", "within_budget"]
