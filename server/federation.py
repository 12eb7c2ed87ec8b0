"""One federated run on the server: build the strategy and workflow, run, summarise."""

from __future__ import annotations

import logging
from pathlib import Path
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


def run_keys(cfg: FederationConfig, run: RunFolder, grid: Grid) -> FederationConfig:
    """``cfg`` with ledger keys: its own, or (``flwr run .``, Flower's local simulation,
    which passes none) keys made for this run beside the run folder, as ``pathfed
    simulate`` makes them, so that every run keeps a ledger to audit. A deployment passes
    the consortium's keys (``pathfed run``); its sites sign with their own keys only."""
    if cfg.keys:
        return cfg
    from common.ledger import make_key_folder

    try:
        nodes = len(list(grid.get_node_ids()))
    except Exception:  # a grid that cannot list its nodes yet
        nodes = 0
    folder = make_key_folder(Path(f"{str(run.path).rstrip('/')}.keys"),
                             [f"site-{i}" for i in range(max(cfg.sites, nodes))])
    log.info("no ledger keys given (`keys`): this simulation's ledger is signed with keys "
             "made for it in %s", folder)
    return cfg.model_copy(update={"keys": str(folder.resolve())})


def open_ledger(cfg: FederationConfig, run: RunFolder, weights: list[Any]) -> Ledger:
    """The run's privacy ledger (``RUN_DIR/ledger.jsonl``), started or resumed."""
    server_key, site_keys = server_keys(cfg.keys)
    ledger = Ledger(run.path / LEDGER_FILE, server_key)
    if ledger.seq == 0:
        ledger.start(cfg.to_run_config(), site_keys, weights)
    log.info("privacy ledger: %s (%d site keys)", ledger.path, len(site_keys))
    return ledger


def _recorded_checkpoint(run: RunFolder, cfg: FederationConfig) -> tuple[int, Any] | None:
    """The last checkpoint the ledger recorded. A checkpoint written just before the
    server was killed, before its ledger record, is set aside: the run resumes before it
    (the sites re-send the replies they already released for that round)."""
    from common.ledger import verify_ledger

    latest = run.latest_checkpoint()
    path = run.path / LEDGER_FILE
    if latest is None or not cfg.keys or not path.is_file():
        return latest
    from common.runs import sha256_file

    recorded = {r["record"]["round"]: r["record"].get("checkpoint_sha256")
                for r in verify_ledger(path).records("server-round")}
    while latest is not None and recorded.get(latest[0]) != sha256_file(latest[1]):
        orphan = latest[1].with_name(latest[1].name + ".unrecorded")
        latest[1].replace(orphan)
        log.warning("%s has no ledger record (the server stopped while writing it); set "
                    "aside as %s, resuming from the round before", latest[1].name, orphan.name)
        latest = run.latest_checkpoint()
    return latest


def run_federation(grid: Grid, context: Context, cfg: FederationConfig) -> dict[str, Any]:
    """Run ``cfg.rounds`` rounds over the sites ``grid`` reaches; write the run folder."""
    key = load_key()
    run = RunFolder(cfg.out or default_run_dir(), checkpoint_key=key, run_id=cfg.run_id)
    cfg = run_keys(cfg, run, grid)
    model = initial_model(cfg)
    names = list(model.state_dict().keys())
    weights, done, history = get_weights(model), 0, []
    latest = _recorded_checkpoint(run, cfg)
    if latest and not cfg.resume:
        raise ConfigError(f"{run.path}: holds checkpoints of an earlier run; resume it "
                          "(`resume = true`, `pathfed run --resume`) or choose another out")
    if latest and cfg.resume:
        done, path = latest
        saved = load_checkpoint(path, key, cfg.run_id)
        weights = [saved[name] for name in names]
        # a run killed between its first checkpoint and its first evaluation has none
        recorded = read_metrics(run.path) if (run.path / "metrics.jsonl").is_file() else []
        history = [r for r in recorded if r["site"] == "global" and r["round"] <= done]
        log.info("resuming %s after round %d (checkpoint %s)", run.path, done, path.name)
    if not done:  # a resumed run keeps the configuration its ledger was started with
        run.write_json("config.json", cfg.to_run_config())
    ledger = open_ledger(cfg, run, weights)
    strategy = PathFedStrategy(cfg, names, weights, run, round_offset=done, ledger=ledger)
    strategy.book.history = history
    if history:
        strategy.book.epsilon = dict(history[-1]["epsilon"])
    legacy = LegacyContext(context=context,
                           config=ServerConfig(num_rounds=max(0, cfg.rounds - done)),
                           strategy=strategy)
    fit_workflow = make_secagg_workflow(cfg) if cfg.secagg else None
    log.info("PathFed: %d sites x %d rounds, model %s, DP %s, SecAgg+ %s, checkpoints %s, "
             "run folder %s", cfg.sites, cfg.rounds, cfg.model,
             f"on (epsilon={cfg.epsilon:g}, delta={cfg.delta:g})" if cfg.dp else "OFF",
             "on" if cfg.secagg else "OFF", "AES-256-GCM" if key else "plain", run.path)
    log.info("round %d: waiting for the sites, which load their data and plan their "
             "privacy first (the first round takes longest)", done + 1)
    error = None
    try:
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
    except FederationAborted as err:
        error = str(err)
        log.error("federation stopped: %s", err)
    summary = strategy.book.finish(done_before=done, error=error)
    log.info("results in %s (summary.json, metrics.jsonl, checkpoints/)", run.path)
    return summary

