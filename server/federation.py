"""One federated run on the server: build the strategy and workflow, run, summarise."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid

from common.config import FederationConfig
from common.runs import RunFolder, default_run_dir
from common.site import initial_model
from common.training import get_weights
from server.secagg import make_secagg_workflow
from server.strategy import PathFedStrategy

log = logging.getLogger(__name__)


def run_federation(grid: Grid, context: Context, cfg: FederationConfig) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds over the sites ``grid`` reaches; write the run folder."""
    run = RunFolder(cfg.out or default_run_dir())
    run.write_json("config.json", cfg.to_run_config())
    model = initial_model(cfg)
    names = list(model.state_dict().keys())
    strategy = PathFedStrategy(cfg, names, get_weights(model), run)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=cfg.rounds),
                           strategy=strategy)
    fit_workflow = make_secagg_workflow(cfg) if cfg.secagg else None
    log.info("PathFed: %d sites x %d rounds, model %s, DP %s, SecAgg+ %s, run folder %s",
             cfg.sites, cfg.rounds, cfg.model,
             f"on (epsilon={cfg.epsilon:g}, delta={cfg.delta:g})" if cfg.dp else "OFF",
             "on" if cfg.secagg else "OFF", run.path)
    start = time.perf_counter()
    DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    last = strategy.history[-1] if strategy.history else {}
    summary = {
        "rounds": len(strategy.history), "rounds_planned": cfg.rounds,
        "auc": last.get("val_auc"), "accuracy": last.get("val_accuracy"),
        "balanced_accuracy": last.get("val_balanced_accuracy"),
        "val_loss": last.get("val_loss"),
        "epsilon": dict(sorted(strategy.epsilon.items())), "delta": cfg.delta,
        "dp": cfg.dp, "secagg": cfg.secagg, "sites": cfg.sites, "model": cfg.model,
        "data": cfg.data or "synthetic", "seed": cfg.seed,
        "exhausted_sites": strategy.exhausted,
        "wall_time_s": round(time.perf_counter() - start, 2),
        "checkpoint": str(Path("checkpoints") / f"round-{len(strategy.history):03d}.npz"),
    }
    run.write_json("summary.json", summary)
    log.info("results in %s (summary.json, metrics.jsonl, checkpoints/)", run.path)
    return summary
