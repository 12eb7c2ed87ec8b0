"""One federated run on the server: build the strategy and workflow, run, summarise."""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid

from common.config import FederationConfig
from common.crypto.sealed import load_key
from common.errors import ConfigError
from common.ledger import LEDGER_FILE, Ledger, server_keys
from common.runs import RunFolder, default_run_dir, load_checkpoint, read_metrics
from common.site import initial_model
from common.training import get_weights
from server.secagg import make_secagg_workflow
from server.strategy import FederationAborted, PathFedStrategy

log = logging.getLogger(__name__)


def open_ledger(cfg: FederationConfig, run: RunFolder, weights: list[Any]) -> Ledger | None:
    """The run's privacy ledger (``RUN_DIR/ledger.jsonl``), started or resumed."""
    if not cfg.keys:
        log.warning("no ledger keys (`keys`): this run keeps no privacy ledger to audit")
        return None
    server_key, site_keys = server_keys(cfg.keys)
    ledger = Ledger(run.path / LEDGER_FILE, server_key)
    if ledger.seq == 0:
        ledger.start(cfg.to_run_config(), site_keys, weights)
    log.info("privacy ledger: %s (%d site keys)", ledger.path, len(site_keys))
    return ledger


def run_federation(grid: Grid, context: Context, cfg: FederationConfig) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds over the sites ``grid`` reaches; write the run folder."""
    key = load_key()
    run = RunFolder(cfg.out or default_run_dir(), checkpoint_key=key, run_id=cfg.run_id)
    model = initial_model(cfg)
    names = list(model.state_dict().keys())
    weights, done, history = get_weights(model), 0, []
    latest = run.latest_checkpoint()
    if latest and not cfg.resume:
        raise ConfigError(f"{run.path}: holds checkpoints of an earlier run; resume it "
                          "(`resume = true`, `pathfed run --resume`) or choose another out")
    if latest and cfg.resume:
        done, path = latest
        saved = load_checkpoint(path, key, cfg.run_id)
        weights = [saved[name] for name in names]
        history = [r for r in read_metrics(run.path)
                   if r["site"] == "global" and r["round"] <= done]
        log.info("resuming %s after round %d (checkpoint %s)", run.path, done, path.name)
    if not done:  # a resumed run keeps the configuration its ledger was started with
        run.write_json("config.json", cfg.to_run_config())
    ledger = open_ledger(cfg, run, weights)
    strategy = PathFedStrategy(cfg, names, weights, run, round_offset=done, ledger=ledger)
    strategy.history = history
    if history:
        strategy.epsilon = dict(history[-1]["epsilon"])
    legacy = LegacyContext(context=context,
                           config=ServerConfig(num_rounds=max(0, cfg.rounds - done)),
                           strategy=strategy)
    fit_workflow = make_secagg_workflow(cfg) if cfg.secagg else None
    log.info("PathFed: %d sites x %d rounds, model %s, DP %s, SecAgg+ %s, checkpoints %s, "
             "run folder %s", cfg.sites, cfg.rounds, cfg.model,
             f"on (epsilon={cfg.epsilon:g}, delta={cfg.delta:g})" if cfg.dp else "OFF",
             "on" if cfg.secagg else "OFF", "AES-256-GCM" if key else "plain", run.path)
    start = time.perf_counter()
    error = None
    try:
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    except FederationAborted as err:
        error = str(err)
        log.error("federation stopped: %s", err)
    last = strategy.history[-1] if strategy.history else {}
    models = done + strategy.models
    summary = {
        "rounds": len(strategy.history), "rounds_planned": cfg.rounds,
        "rounds_with_model": models,
        "auc": last.get("val_auc"), "accuracy": last.get("val_accuracy"),
        "balanced_accuracy": last.get("val_balanced_accuracy"),
        "val_loss": last.get("val_loss"),
        "epsilon": dict(sorted(strategy.epsilon.items())), "delta": cfg.delta,
        "dp": cfg.dp, "secagg": cfg.secagg, "sites": cfg.sites, "model": cfg.model,
        "data": cfg.data or "synthetic", "seed": cfg.seed, "run_id": cfg.run_id,
        "exhausted_sites": strategy.exhausted,
        "wall_time_s": round(time.perf_counter() - start, 2),
        "checkpoint": str(latest[1].relative_to(run.path))
        if (latest := run.latest_checkpoint()) else None,
        "checkpoints_encrypted": key is not None,
        "error": error,
    }
    if ledger is not None:
        ledger.end(rounds=models, last_round=strategy.last_round,
                   global_weights=strategy.global_weights, summary=_jsonable(summary))
    run.write_json("summary.json", summary)
    if not models:
        log.error("no round produced a global model; see the warnings above (run folder %s)",
                  run.path)
    log.info("results in %s (summary.json, metrics.jsonl, checkpoints/)", run.path)
    return summary


def _jsonable(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary as ``summary.json`` will hold it (NaN as null), for its ledger hash."""
    import json

    from common.runs import json_safe

    return dict(json.loads(json.dumps(json_safe(summary))))
