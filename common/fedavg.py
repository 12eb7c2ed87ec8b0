"""FedAvg of :class:`common.site.Site` objects in one process, with a privacy ledger.

Used by the membership-inference audit (many small federations) and by tests; it is also
the reference for wiring the ledger into the Flower apps: each site signs a ``site-round``
record of what it sent, the server checks and chains it, then appends its ``server-round``
record. Aggregation is the same weighted average as :class:`server.strategy.PathFedStrategy`
(weights = training samples) but without SecAgg+: updates are summed in the clear, and the
ledger says so (``"sent": {"update": "plain"}``), so runs made here have ``secagg = false``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.checks import update_bound, update_problem
from common.config import FederationConfig
from common.crypto.signing import SigningKey
from common.ledger import (
    LEDGER_FILE,
    Ledger,
    envelope_hash,
    server_round_record,
    sign_record,
    site_round_record,
)
from common.metrics import EvalCounts
from common.runs import RunFolder, json_safe, sha256_file
from common.site import Site, initial_model
from common.training import NDArrays, get_weights

log = logging.getLogger(__name__)


@dataclass
class FederationResult:
    """The global model after the last round and what happened on the way."""

    weights: NDArrays
    epsilon: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def fedavg(reports: list[tuple[NDArrays, int]]) -> NDArrays:
    """Weighted average of updates, weights = training samples (as Flower's FedAvg)."""
    total = sum(n for _, n in reports)
    return [sum(u[i].astype(np.float64) * n for u, n in reports) / total
            for i in range(len(reports[0][0]))]


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

    With ``run_dir`` the run folder is written like a Flower run's (``config.json``,
    ``metrics.jsonl``, ``checkpoints/``, ``summary.json``) plus ``ledger.jsonl``, signed
    with ``server_key`` and ``site_keys`` (generated when not given; their public keys are
    in the ledger's run-start record). Sites whose budget is spent are not asked to train
    and are recorded as dropouts.
    """
    if cfg.secagg:
        cfg = cfg.model_copy(update={"secagg": False})  # updates are summed in the clear
    sites = sites or [Site(cfg, i) for i in range(cfg.sites)]
    model = initial_model(cfg)
    names = list(model.state_dict().keys())
    weights = [w.astype(np.float32) for w in get_weights(model)]
    run = RunFolder(run_dir) if run_dir is not None else None
    ledger: Ledger | None = None
    last_record: dict[str, str] = {}
    if run is not None:
        run.write_json("config.json", cfg.to_run_config())
        server_key = server_key or SigningKey.generate()
        site_keys = site_keys or {s.name: SigningKey.generate() for s in sites}
        ledger = Ledger(run.path / LEDGER_FILE, server_key)
        ledger.start(cfg.to_run_config(), {s.name: site_keys[s.name].public_pem()
                                           for s in sites}, weights)
    result = FederationResult(weights)
    bound, shapes, models = update_bound(cfg), [w.shape for w in weights], 0
    for rnd in range(1, cfg.rounds + 1):
        received = [w.copy() for w in weights]
        reports, dropouts, fit = [], {}, {}
        for site in sites:
            if not site.can_train():
                dropouts[site.name] = "privacy budget exhausted"
                continue
            report = site.train(received, rnd)
            if ledger is not None and site_keys is not None:
                record = site_round_record(
                    report, received, server_round=rnd, site=site.name, plan=site.plan,
                    accountant=cfg.accountant, privacy_unit=site.privacy_unit,
                    secagg=False, previous=last_record.get(site.name), run=ledger.run,
                    noise=site.noise_source)
                signed = sign_record(record, site_keys[site.name], site.name)
                last_record[site.name] = envelope_hash(signed)
                ledger.append(signed, rnd)
            problem = update_problem(report.update, shapes, bound)
            if problem:
                dropouts[site.name] = f"update rejected: {problem}"
                continue
            reports.append((report.update, report.n_samples))
            fit[site.name] = report.metrics
        aggregate = fedavg(reports) if reports else None
        models += aggregate is not None
        if aggregate is not None:
            weights = [(w + a).astype(w.dtype) for w, a in zip(weights, aggregate)]
        for site in sites:
            result.epsilon[site.name] = site.epsilon
        path = run.save_checkpoint(rnd, names, weights) if run is not None else None
        if ledger is not None:
            ledger.append_server(server_round_record(
                server_round=rnd, participants=list(fit), dropouts=dropouts,
                aggregate=aggregate, global_weights=weights, secagg=False,
                checkpoint=str(path.relative_to(run.path)) if path and run else None,
                checkpoint_sha256=sha256_file(path) if path else None))
        if run is not None and evaluate:
            result.history.append(_evaluate_round(run, sites, weights, rnd, fit, cfg))
    result.weights = weights
    if run is not None:
        last = result.history[-1] if result.history else {}
        summary = json_safe({
            "rounds": cfg.rounds, "auc": last.get("val_auc"), "accuracy":
            last.get("val_accuracy"), "epsilon": result.epsilon, "delta": cfg.delta,
            "dp": cfg.dp, "secagg": False, "engine": "in-process FedAvg (common.fedavg)",
        })
        if ledger is not None:
            ledger.end(rounds=models, last_round=cfg.rounds, global_weights=weights,
                       summary=summary)
        run.write_json("summary.json", summary)
    return result


def _evaluate_round(run: RunFolder, sites: list[Site], weights: NDArrays, rnd: int,
                    fit: dict[str, dict[str, Any]], cfg: FederationConfig) -> dict[str, Any]:
    """Metric records in the shape :class:`server.strategy.PathFedStrategy` writes."""
    total, records = EvalCounts(), []
    for site in sites:
        counts, _ = site.evaluate(weights)
        total = total + counts
        train = fit.get(site.name, {})
        records.append({
            "round": rnd, "site": site.name, "trained": site.name in fit,
            "train_loss": train.get("train_loss"), "n_train": train.get("n_train"),
            "steps": train.get("steps", 0), "noise_multiplier": train.get("noise_multiplier"),
            "sample_rate": train.get("sample_rate"), "val_n": counts.n,
            "val_loss": counts.loss, "val_auc": counts.auc, "val_accuracy": counts.accuracy,
            "val_balanced_accuracy": counts.balanced_accuracy, "epsilon": site.epsilon,
            "delta": cfg.delta,
        })
    losses = [(f["train_loss"], f["n_train"]) for f in fit.values()
              if f.get("train_loss") is not None and math.isfinite(f["train_loss"])]
    summary = {
        "round": rnd, "site": "global", "sites_trained": len(fit), "sites": len(sites),
        "train_loss": (float(np.average([x for x, _ in losses], weights=[n for _, n in losses]))
                       if losses else math.nan),
        "val_loss": total.loss, "val_auc": total.auc, "val_accuracy": total.accuracy,
        "val_balanced_accuracy": total.balanced_accuracy,
        "epsilon": {s.name: s.epsilon for s in sites},
    }
    run.append_metrics(records + [summary])
    return summary


__all__ = ["FederationResult", "fedavg", "run_inprocess"]
