"""``pathfed simulate``: a federation of simulated hospitals on this machine."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from cli._shared import settings
from common.logs import setup_logging

log = logging.getLogger("pathfed")


def add_parser(sub: Any) -> None:
    """Register ``simulate``."""
    p = sub.add_parser(
        "simulate",
        help="run a simulated federation of hospitals on this machine",
        description="Run a federation of simulated hospitals (Flower simulation engine) with "
        "DP-SGD and SecAgg+. Without --data, sites train on synthetic bags generated here.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML file of settings (kebab-case keys)")
    p.add_argument("--data", metavar="DIR", help="folder of labelled images (labels.csv)")
    p.add_argument("--sites", type=int, metavar="N", help="number of hospitals")
    p.add_argument("--rounds", type=int, metavar="R", help="federated rounds")
    p.add_argument("--epsilon", type=float, metavar="E", help="per-site epsilon budget")
    p.add_argument("--delta", type=float, metavar="D", help="per-site delta")
    p.add_argument("--no-dp", action="store_true", help="train without differential privacy")
    p.add_argument("--no-secagg", action="store_true", help="aggregate without SecAgg+")
    p.add_argument("--seed", type=int, metavar="S", help="seed (same seed, same numbers)")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (default runs/<timestamp>)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting, e.g. --set local-epochs=2 (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true", help="show Flower's own log")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from common.runs import default_run_dir

    cfg = settings(args.config, args.set, {
        "data": args.data, "sites": args.sites, "rounds": args.rounds, "epsilon": args.epsilon,
        "delta": args.delta, "seed": args.seed, "out": args.out,
        "dp": False if args.no_dp else None, "secagg": False if args.no_secagg else None})
    if not cfg.out:
        cfg = cfg.model_copy(update={"out": str(default_run_dir())})
    setup_logging(args.verbose)
    from common.data.sources import check_source
    from common.models import model_spec

    check_source(cfg.data, cfg.sites, multiscale=model_spec(cfg.model).kind == "multiscale")
    from simulations.simulate import simulate

    start = time.perf_counter()
    summary = simulate(cfg, verbose=args.verbose)
    wall = time.perf_counter() - start
    if not summary.get("rounds_with_model"):
        log.error("no round produced a global model (%s); see the log above (run folder %s)",
                  summary.get("error") or "every update was rejected or failed", cfg.out)
        return 1
    eps = ", ".join(f"{k}={v:.3f}" for k, v in summary["epsilon"].items())
    auc = "undefined (validation slides of one class)" if summary.get("auc") is None \
        else f"{summary['auc']:.3f}"
    acc = "n/a" if summary.get("accuracy") is None else f"{summary['accuracy']:.3f}"
    steady = summary.get("auc_last3_mean")
    if steady is not None and summary.get("rounds", 0) >= 3:
        auc += f" (last 3 rounds {steady:.3f} +/- {summary['auc_last3_sd']:.3f})"
    calibrated = summary.get("balanced_accuracy_calibrated")
    if calibrated is not None:
        acc += (f", balanced accuracy {calibrated:.3f} at the validation-calibrated "
                f"threshold (logit {summary['threshold']:.2f})")
    print(f"done in {wall:.1f} s, {summary['rounds_with_model']} rounds: AUC {auc}, "
          f"accuracy {acc}"
          + (f", epsilon {eps} at delta {summary['delta']:g}" if summary["dp"] else ", no DP"))
    print(f"results: {Path(cfg.out) / 'summary.json'}, metrics.jsonl, checkpoints/")
    return 0
