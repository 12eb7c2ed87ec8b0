"""The in-process runner: :class:`common.site.Site` objects in one loop, no Flower.

The fast path for the paper table and the membership-inference audit's many shadow
federations. It drives the same engine as the Flower strategy
(:class:`common.rounds.RoundBook`: the reply checks, the weighted mean, checkpoints, the
ledger's records, metric records and ``summary.json``) and the same site code
(:meth:`common.site.Site.round`: training, signing, the privacy state), so its numbers go
through every check a real run's do. Only SecAgg+'s masks are missing: updates are
averaged in the clear, and the ledger says so (``"sent": {"update": "plain"}``,
``secagg = false``). With distributed DP the aggregate is SecAgg+'s own arithmetic
(:func:`common.crypto.quantize.secure_sum`: weighting, quantisation, the sites' noise
shares, the modular sum); the masks, which cancel in that sum, are left out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.checks import update_bound
from common.config import FederationConfig
from common.crypto.quantize import secure_sum
from common.crypto.signing import SigningKey
from common.ledger import LEDGER_FILE, Ledger
from common.privacy.distributed import min_sites
from common.rounds import RoundBook, weighted_mean
from common.runs import RunFolder
from common.site import Site, initial_model
from common.training import NDArrays, get_weights

log = logging.getLogger(__name__)


@dataclass
class FederationResult:
    """The global model after the last round and what happened on the way."""

    weights: NDArrays
    epsilon: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


def run_inprocess(
    cfg: FederationConfig,
    sites: list[Site] | None = None,
    *,
    run_dir: str | Path | None = None,
    server_key: SigningKey | None = None,
    site_keys: dict[str, SigningKey] | None = None,
    evaluate: bool = True,
) -> FederationResult:
    """Run ``cfg.rounds`` rounds of FedAvg over ``sites`` (default: ``cfg.sites`` sites).

    With ``run_dir`` the run folder is written as a Flower run's is (``config.json``,
    ``metrics.jsonl``, ``checkpoints/``, ``summary.json``, ``ledger.jsonl``), the ledger
    signed with ``server_key`` and ``site_keys`` (generated when not given). Sites whose
    budget is spent are not asked to train and are recorded as such.
    """
    distributed = cfg.dp and cfg.dp_mode == "distributed"
    if cfg.secagg and not distributed:
        cfg = cfg.model_copy(update={"secagg": False})  # updates are averaged in the clear
    sites = sites or [Site(cfg, i) for i in range(cfg.sites)]
    model = initial_model(cfg)
    names = list(model.state_dict().keys())
    weights = [w.astype(np.float32) for w in get_weights(model)]
    run = RunFolder(run_dir, run_id=cfg.run_id) if run_dir is not None else None
    ledger: Ledger | None = None
    if run is not None:
        run.write_json("config.json", cfg.to_run_config())
        server_key = server_key or SigningKey.generate()
        site_keys = site_keys or {s.name: SigningKey.generate() for s in sites}
        ledger = Ledger(run.path / LEDGER_FILE, server_key)
        ledger.start(cfg.to_run_config(), {s.name: site_keys[s.name].public_pem()
                                           for s in sites}, weights)
    book = RoundBook(cfg, names, weights, run, ledger)
    for rnd in range(1, cfg.rounds + 1):
        received = [w.copy() for w in book.global_weights]
        asked = []
        for site in sites:
            if site.name in book.exhausted or not site.can_train():
                book.skip(rnd, site.name, "not asked: its next round would exceed its "
                          "privacy budget")
            else:
                asked.append(site)
        book.start_round(rnd, [s.name for s in asked])
        accepted, updates, shares = [], [], []
        in_sum = min_sites(len(asked), cfg.secagg_dropout) if distributed else None
        for site in asked:
            report = site.round(received, rnd, site_keys[site.name] if site_keys else None,
                                ledger.run if ledger else None, in_sum, book.control())
            problem = book.check(site.name, rnd, report.n_samples, report.metrics,
                                 report.update)
            if problem:
                book.reject(rnd, site.name, problem)
                continue
            accepted.append((site.name, report.n_samples, report.metrics))
            updates.append((report.update, report.n_samples))
            shares.append(report.noise_share)
        book.apply(rnd, accepted, _aggregate(cfg, updates, shares, in_sum))
        if evaluate:
            book.evaluate(rnd, [(site.name, site.evaluate(book.global_weights)[1])
                                for site in sites])
    for site in sites:
        book.epsilon[site.name] = site.epsilon
    summary = book.finish(engine="in-process FedAvg (common.fedavg)") if run else {}
    return FederationResult(book.global_weights, dict(book.epsilon), book.history, summary)


def _aggregate(cfg: FederationConfig, updates: list[tuple[NDArrays, int]],
               shares: list[Any], in_sum: int | None) -> NDArrays | None:
    """The round's aggregate: the weighted mean, or with distributed DP the noisy mean
    SecAgg+ would unmask (:func:`common.crypto.quantize.secure_sum`; its masks cancel)."""
    if not updates:
        return None
    if in_sum is None:
        return weighted_mean(updates)
    if len(updates) < in_sum:
        log.warning("%d sites sent updates; their noise shares are sized for a sum of %d at "
                    "least, so none is summed this round", len(updates), in_sum)
        return None
    return secure_sum([(u, n, s) for (u, n), s in zip(updates, shares)],
                      clipping_range=update_bound(cfg),
                      quantization_range=cfg.secagg_quantization_range,
                      max_weight=float(cfg.secagg_max_weight))


__all__ = ["FederationResult", "run_inprocess"]
