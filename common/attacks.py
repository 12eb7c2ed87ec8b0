"""Empirical privacy audit: membership inference against the federation's global model.

What it does (:func:`membership_audit`):

1. Builds ``K`` *canary slides*: bags whose instances sit in a tight cluster far from the
   data (``canary_shift`` standard deviations along a random direction), each with a
   random label, so a model can learn, and memorise, each one.
2. Trains ``M`` small federations with the run's configuration (sites, rounds, local
   epochs, optimizer, learning rate, and the same DP plan through
   :class:`common.site.Site`, or no DP) by in-process FedAvg (:func:`common.fedavg.
   run_inprocess`, no SecAgg+: the sum is the same). In federation ``k`` a random half of
   the canaries is inserted into site-0's training data (members); the other half is
   held out (non-members). Each federation draws its own initial model, sampling and noise.
3. Attacks each final global model in turn, the others serving as its shadow models:
   the *loss-threshold attack* (Yeom et al., 2018: low loss means member) and the
   *likelihood-ratio attack* (LiRA, Carlini et al., 2022: online, with a fixed variance,
   on the logit-scaled confidence ``y * logit``).
4. Reports the attack AUC, the TPR at low FPR and an empirical epsilon lower bound: a
   threshold is chosen on half of the target models, then on the other half
   ``eps >= max(ln((TPR - delta) / FPR), ln((TNR - delta) / FNR))`` with one-sided
   Clopper-Pearson bounds (TPR, TNR from below, FPR, FNR from above) at the given joint
   confidence.

What it does not show: a low lower bound is no proof of privacy (a stronger attack may do
better); the canaries in one model are not independent trials, so the bound is the usual
heuristic of multi-canary audits, not a certified one; the attack runs its own small
federations, not the run's own global model (whose training data the auditor does not
hold). A lower bound above the claimed epsilon, however, means the DP implementation or
its accounting is wrong.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import FederationConfig
from common.data import BagSet, SiteData, load_site, save_site_file
from common.fedavg import run_inprocess
from common.metrics import roc_auc
from common.models import build_model
from common.privacy import SiteAccountant
from common.site import Site
from common.training import NDArrays, set_weights

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttackSettings:
    """How much work the membership-inference audit does."""

    models: int = 16
    """Federations trained (each is the target once, the others are its shadows)."""
    canaries: int = 32
    """Canary slides; each federation holds a random half of them at site-0."""
    canary_instances: int = 16
    canary_shift: float = 4.0
    """Distance of a canary's instances from the data mean, in standard deviations."""
    bags_per_site: int | None = None
    """Synthetic bags per site for the attack federations (None: the run's setting)."""
    fpr_levels: tuple[float, ...] = (0.01, 0.05)
    confidence: float = 0.95
    seed: int = 0


@dataclass
class AttackResult:
    """One attack's success over all (target model, canary) pairs."""

    name: str
    auc: float
    tpr_at_fpr: dict[float, float | None]
    """TPR at each FPR level; None where there are too few non-members to measure it."""
    epsilon_lower_bound: float
    bound_detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class MembershipAudit:
    """What the membership-inference audit found, next to the claimed epsilon."""

    dp: bool
    claimed_epsilon: float | None
    """Epsilon site-0 of the attack federations claimed (its accountant, same plan)."""
    run_claimed_epsilon: float | None
    delta: float
    results: list[AttackResult]
    models: int
    canaries: int
    members: int
    non_members: int
    fpr_levels: tuple[float, ...]
    confidence: float
    wall_s: float
    description: str

    @property
    def problems(self) -> list[str]:
        if not self.dp or self.claimed_epsilon is None:
            return []
        return [f"{r.name}: empirical epsilon lower bound {r.epsilon_lower_bound:.3f} exceeds "
                f"the claimed epsilon {self.claimed_epsilon:.3f}: the DP training or its "
                "accounting is broken" for r in self.results
                if r.epsilon_lower_bound > self.claimed_epsilon]

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        parts = [f"{r.name}: AUC {r.auc:.3f}, " + ", ".join(
            f"TPR@{f:g} {('-' if v is None else f'{v:.3f}')}" for f, v in r.tpr_at_fpr.items())
            + f", eps >= {r.epsilon_lower_bound:.3f}" for r in self.results]
        claim = (f"claimed epsilon {self.claimed_epsilon:.3f}" if self.dp and
                 self.claimed_epsilon is not None else "no DP (no claim)")
        return (f"membership inference ({self.models} models, {self.canaries} canaries, "
                f"{self.wall_s:.0f} s): " + "; ".join(parts) + f"; {claim}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"], out["problems"] = self.ok, self.problems
        return out


# ---- statistics ---------------------------------------------------------------------
def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
            + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


def _bisect(f: Callable[[float], float], target: float, increasing: bool) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided Clopper-Pearson bounds ``(lower, upper)`` of a binomial proportion.

    Each holds with probability ``1 - alpha`` (the exact beta quantiles
    ``Beta(alpha; k, n-k+1)`` and ``Beta(1-alpha; k+1, n-k)``).
    """
    if n <= 0:
        return 0.0, 1.0
    # lower: the p with P(X >= k | p) = alpha, i.e. 1 - cdf(k-1) = alpha
    lower = 0.0 if k == 0 else _bisect(lambda p: 1.0 - _binom_cdf(k - 1, n, p), alpha, True)
    # upper: the p with P(X <= k | p) = alpha (cdf decreases in p)
    upper = 1.0 if k == n else _bisect(lambda p: _binom_cdf(k, n, p), alpha, False)
    return lower, upper


def epsilon_lower_bound(tp: int, fn: int, fp: int, tn: int, delta: float,
                        confidence: float = 0.95) -> float:
    """Epsilon any (epsilon, delta)-DP mechanism must have to allow this attack outcome.

    From the hypothesis-testing view of DP, ``TPR <= e^eps FPR + delta`` and
    ``TNR <= e^eps FNR + delta``; the rates are replaced by Clopper-Pearson bounds that
    hold jointly with probability ``confidence`` (union bound over the four).
    """
    alpha = (1.0 - confidence) / 4
    tpr_lo, _ = clopper_pearson(tp, tp + fn, alpha)
    _, fpr_hi = clopper_pearson(fp, fp + tn, alpha)
    tnr_lo, _ = clopper_pearson(tn, fp + tn, alpha)
    _, fnr_hi = clopper_pearson(fn, tp + fn, alpha)
    best = 0.0
    for num, den in ((tpr_lo - delta, fpr_hi), (tnr_lo - delta, fnr_hi)):
        if num > 0 and den > 0:
            best = max(best, math.log(num / den))
    return best


def tpr_at_fpr(scores: np.ndarray, members: np.ndarray, fpr: float) -> float | None:
    """Largest TPR with an FPR of at most ``fpr``; None with fewer than 1/fpr non-members."""
    neg = np.sort(scores[~members])[::-1]
    if len(neg) * fpr < 1:
        return None
    allowed = int(math.floor(fpr * len(neg)))  # false positives allowed
    # threshold strictly above the (allowed+1)-th highest non-member score
    thr = neg[allowed] if allowed < len(neg) else -np.inf
    return float((scores[members] > thr).mean())


def _counts(scores: np.ndarray, members: np.ndarray, thr: float) -> tuple[int, int, int, int]:
    guess = scores >= thr
    return (int((guess & members).sum()), int((~guess & members).sum()),
            int((guess & ~members).sum()), int((~guess & ~members).sum()))


def _lower_bound(scores: np.ndarray, members: np.ndarray, select: np.ndarray, delta: float,
                 confidence: float) -> tuple[float, dict[str, Any]]:
    """Threshold chosen on ``select`` pairs, bound computed on the others."""
    s_scores, s_members = scores[select], members[select]
    candidates = np.unique(s_scores)
    if len(candidates) > 200:
        candidates = np.quantile(s_scores, np.linspace(0, 1, 201))
    best_thr, best = float(candidates[0]), -1.0
    for thr in candidates:
        value = epsilon_lower_bound(*_counts(s_scores, s_members, float(thr)), delta, confidence)
        if value > best:
            best, best_thr = value, float(thr)
    tp, fn, fp, tn = _counts(scores[~select], members[~select], best_thr)
    eps = epsilon_lower_bound(tp, fn, fp, tn, delta, confidence)
    return eps, {"threshold": best_thr, "tp": tp, "fn": fn, "fp": fp, "tn": tn}


# ---- canaries and federations -------------------------------------------------------
def make_canaries(reference: BagSet, settings: AttackSettings) -> BagSet:
    """``settings.canaries`` unusual but learnable bags, scaled to ``reference``'s data."""
    rng = np.random.default_rng([settings.seed, 0xCA4A])
    instances = np.concatenate(reference.bags)
    mu, sd = instances.mean(0), instances.std(0) + 1e-6
    dim = reference.dim
    bags, labels = [], []
    for _ in range(settings.canaries):
        u = rng.normal(size=dim)
        u /= np.linalg.norm(u)
        z = rng.normal(scale=0.3, size=(settings.canary_instances, dim))
        bags.append((mu + sd * (settings.canary_shift * u + z)).astype(np.float32))
        labels.append(int(rng.integers(0, 2)))
    names = tuple(f"canary-{i:03d}" for i in range(settings.canaries))
    return BagSet(tuple(bags), np.array(labels, dtype=np.int64), names)


def _with(train: BagSet, extra: BagSet, picks: np.ndarray) -> BagSet:
    idx = np.flatnonzero(picks)
    return BagSet(train.bags + tuple(extra.bags[i] for i in idx),
                  np.concatenate([train.labels, extra.labels[idx]]),
                  train.names + tuple(extra.names[i] for i in idx))


@torch.no_grad()
def _confidences(cfg: FederationConfig, weights: NDArrays, canaries: BagSet) -> np.ndarray:
    """Logit-scaled confidence in the true label, ``y * logit`` with y in {-1, +1}."""
    model = build_model(cfg.model, in_dim=canaries.dim)
    set_weights(model, weights)
    model.eval()
    features, mask, labels = canaries.to_dataset().tensors
    logits = model(features, mask).logits.numpy().astype(np.float64)
    return np.where(labels.numpy() > 0.5, logits, -logits)


def _lira(conf: np.ndarray, member: np.ndarray, target: int) -> np.ndarray:
    """LiRA online scores of model ``target``'s canaries, the other models as shadows."""
    shadows = np.arange(conf.shape[0]) != target
    sc, sm = conf[shadows], member[shadows]
    with np.errstate(invalid="ignore"):
        n_in, n_out = sm.sum(0), (~sm).sum(0)
        mu_in = np.where(n_in > 0, (sc * sm).sum(0) / np.maximum(n_in, 1), np.nan)
        mu_out = np.where(n_out > 0, (sc * ~sm).sum(0) / np.maximum(n_out, 1), np.nan)
    # Fixed (global) variances: few shadows per canary (Carlini et al., Sec. VI-B).
    var_in = np.nanvar(np.where(sm, sc - mu_in, np.nan)) + 1e-6
    var_out = np.nanvar(np.where(~sm, sc - mu_out, np.nan)) + 1e-6
    x = conf[target]
    mu_in = np.where(np.isnan(mu_in), mu_out, mu_in)
    mu_out = np.where(np.isnan(mu_out), mu_in, mu_out)
    return (-(x - mu_in) ** 2 / (2 * var_in) - 0.5 * math.log(var_in)
            + (x - mu_out) ** 2 / (2 * var_out) + 0.5 * math.log(var_out))


def membership_audit(
    cfg: FederationConfig,
    settings: AttackSettings = AttackSettings(),
    run_claimed_epsilon: float | None = None,
) -> MembershipAudit:
    """Run the membership-inference audit for ``cfg`` (see the module doc)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster than several
    try:
        return _membership_audit(cfg, settings, run_claimed_epsilon)
    finally:
        torch.set_num_threads(threads)


def _membership_audit(cfg: FederationConfig, settings: AttackSettings,
                      run_claimed_epsilon: float | None) -> MembershipAudit:
    start = time.perf_counter()
    if settings.models < 4 or settings.canaries < 4:
        raise ValueError("membership audit needs 4 models and 4 canaries at least")
    update: dict[str, Any] = {"secagg": False, "out": ""}
    if settings.bags_per_site:
        update["synthetic_bags"] = settings.bags_per_site
    cfg = cfg.model_copy(update=update)
    sites_data = [load_site(i, cfg.sites, cfg.data, cfg.seed, cfg.val_fraction,
                            cfg.synthetic_bags, cfg.patch_size, cfg.encoder)
                  for i in range(cfg.sites)]
    canaries = make_canaries(sites_data[0].train, settings)
    rng = np.random.default_rng([settings.seed, 0x1A])
    half = settings.canaries // 2
    member = np.zeros((settings.models, settings.canaries), dtype=bool)
    for k in range(settings.models):
        member[k, rng.permutation(settings.canaries)[:half]] = True
    with tempfile.TemporaryDirectory(prefix="pathfed-attack-") as tmp:
        # Sites are built (and their DP plans calibrated) once: site-0's plan is for its
        # data plus `half` canaries, which every federation gives it.
        sites = []
        for i, data in enumerate(sites_data):
            train = _with(data.train, canaries, member[0]) if i == 0 else data.train
            path = save_site_file(SiteData(data.name, train, data.val), Path(tmp) / f"{i}.npz")
            sites.append(Site(cfg, i, name=data.name, data=str(path)))
    conf = np.zeros((settings.models, settings.canaries))
    claimed = None
    for k in range(settings.models):
        cfg_k = cfg.model_copy(update={"seed": cfg.seed * 100_003 + settings.seed * 1009 + k + 1})
        for site in sites:
            # A fresh federation: new accountant, new seeds; site-0 holds this model's canaries.
            site.cfg = cfg_k
            site.accountant = SiteAccountant(cfg.accountant)
        sites[0].train_set = _with(sites_data[0].train, canaries, member[k])
        sites[0].max_instances = max(sites[0].max_instances, settings.canary_instances)
        result = run_inprocess(cfg_k, sites, evaluate=False)
        conf[k] = _confidences(cfg, result.weights, canaries)
        claimed = sites[0].epsilon if cfg.dp else None
        log.info("membership audit: model %d/%d trained", k + 1, settings.models)
    targets = np.arange(settings.models)
    select = np.repeat(targets % 2 == 0, settings.canaries)  # threshold chosen on even targets
    members = member.reshape(-1)
    results = []
    lira = np.concatenate([_lira(conf, member, int(t)) for t in targets])
    for name, scores in (("loss threshold (Yeom)", conf.reshape(-1)),
                         ("LiRA (online, fixed variance)", lira)):
        eps, detail = _lower_bound(scores, members, select, cfg.delta, settings.confidence)
        results.append(AttackResult(
            name=name, auc=roc_auc(scores, members),
            tpr_at_fpr={f: tpr_at_fpr(scores, members, f) for f in settings.fpr_levels},
            epsilon_lower_bound=eps, bound_detail=detail))
    wall = time.perf_counter() - start
    description = (
        f"{settings.models} in-process FedAvg federations with this run's configuration "
        f"({cfg.sites} sites, {cfg.rounds} rounds, {cfg.local_epochs} local epoch(s), "
        f"{'DP-SGD with the same plan' if cfg.dp else 'no DP'}; synthetic-bags "
        f"{cfg.synthetic_bags}); {settings.canaries} canary slides (instances "
        f"{settings.canary_shift:g} SD from the data along a random direction, random "
        f"label), a random half inserted at {sites[0].name} in each federation. Each final "
        "global model is attacked with the others as shadow models. The lower bound uses a "
        "threshold chosen on half the targets and Clopper-Pearson bounds on the other half "
        f"({settings.confidence:.0%} joint confidence); canaries of one model are not "
        "independent trials, so it is a heuristic bound.")
    return MembershipAudit(
        dp=cfg.dp, claimed_epsilon=claimed, run_claimed_epsilon=run_claimed_epsilon,
        delta=cfg.delta, results=results, models=settings.models, canaries=settings.canaries,
        members=int(members.sum()), non_members=int((~members).sum()),
        fpr_levels=settings.fpr_levels, confidence=settings.confidence, wall_s=wall,
        description=description)


__all__ = ["AttackResult", "AttackSettings", "MembershipAudit", "clopper_pearson",
           "epsilon_lower_bound", "make_canaries", "membership_audit", "tpr_at_fpr"]
