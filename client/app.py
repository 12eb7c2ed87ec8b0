"""Flower ClientApp: a hospital trains locally with DP-SGD and reports to the server.

Thin by design: messages are translated into calls of :class:`common.site.Site`. The site's
accountant state is kept in the node's Flower context between rounds (and, in deployment,
also on disk), never re-created.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp

from client.secagg import secaggplus_mod
from common.config import FederationConfig
from common.runs import atomic_write

if TYPE_CHECKING:
    from common.site import Site

log = logging.getLogger(__name__)
# Flower's SecAgg+ mod logs every protocol stage at DEBUG; keep a site's log readable.
logging.getLogger("flwr").setLevel(logging.INFO)

STATE_KEY = "pathfed-site"


def _state_file(context: Context, cfg: FederationConfig) -> Path | None:
    """Where a deployed site keeps its state on disk (it outlives any process)."""
    folder = context.node_config.get("state-dir")
    if not folder:
        return None
    return Path(str(folder)) / f"site-state-{cfg.run_id or 'default'}.json"


def _site(context: Context, config: dict[str, Any]) -> Site:
    # torch and Opacus load here, not at import: in deployment every message starts a
    # fresh ClientApp process, and three of SecAgg+'s four stages need no model.
    from common.site import Site

    cfg = FederationConfig.from_mapping(
        {k: v for k, v in config.items() if k != "server-round"}, "server config"
    )
    node = context.node_config
    index = int(node.get("partition-id", 0))
    name = str(node["site-name"]) if "site-name" in node else None
    data = str(node["data-path"]) if "data-path" in node else None
    record = context.state.config_records.get(STATE_KEY)
    state = json.loads(str(record["state"])) if record else None
    path = _state_file(context, cfg)
    if path is not None and path.is_file():
        state = json.loads(path.read_text())  # the disk copy survives restarts
    return Site(cfg, index, name=name, data=data, state=state)


def _ledger_key(context: Context, site: Site) -> Path | None:
    """The site's ledger signing key: its own (deployment) or the simulation's."""
    own = context.node_config.get("ledger-key")
    if own:
        return Path(str(own))
    if site.cfg.keys:
        path = Path(site.cfg.keys) / "sites" / f"{site.name}.key"
        if path.is_file():
            return path
    return None


def _save(context: Context, site: Site) -> None:
    text = json.dumps(site.state())
    context.state.config_records[STATE_KEY] = ConfigRecord({"state": text})
    path = _state_file(context, site.cfg)
    if path is not None:
        atomic_write(path, text.encode())


class HospitalClient(NumPyClient):
    """Translates Flower's fit/evaluate calls into one site's local work."""

    def __init__(self, context: Context) -> None:
        self.context = context

    def fit(self, parameters: list, config: dict[str, Any]) -> tuple[list, int, dict]:
        import torch

        torch.set_num_threads(1)
        site = _site(self.context, config)
        server_round = int(config.get("server-round", 0))
        report = site.train(parameters, server_round)
        key = _ledger_key(self.context, site)
        if key is not None:
            from common.ledger import LEDGER_METRIC

            report.metrics[LEDGER_METRIC] = site.signed_record(report, parameters,
                                                               server_round, key)
        _save(self.context, site)
        return report.update, report.n_samples, report.metrics

    def evaluate(self, parameters: list, config: dict[str, Any]) -> tuple[float, int, dict]:
        site = _site(self.context, config)
        counts, metrics = site.evaluate(parameters)
        return float(counts.loss) if counts.n else 0.0, counts.n, metrics


def client_fn(context: Context) -> Client:
    return HospitalClient(context).to_client()


def make_client_app(secagg: bool = True) -> ClientApp:
    """The ClientApp, with Flower's SecAgg+ mod (hardened masks) when ``secagg``."""
    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secagg else [])


# SecAgg+'s mod passes plain (non-SecAgg) train messages straight through, so the
# app used by `flwr run` and by deployments can always carry it.
app = make_client_app(secagg=True)
