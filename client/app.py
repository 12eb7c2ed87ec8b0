"""Flower ClientApp: a hospital trains locally with DP-SGD and reports to the server.

Thin by design: messages are translated into calls of :class:`common.site.Site`. The site's
privacy state (:class:`common.privacy.store.SiteStore`: every run's accountant) is kept on
the site's disk (deployment: the node config's ``state-dir``; ``pathfed simulate``: beside
the run folder), or in the node's Flower context under ``flwr run .``; never re-created.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context
from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp

from client.secagg import in_secure_round, secaggplus_mod
from common.config import FederationConfig
from common.crypto.quantize import pending_share
from common.scaffold import CONTROL_KEY

if TYPE_CHECKING:
    from common.site import Site

log = logging.getLogger(__name__)
# Flower's SecAgg+ mod logs every protocol stage at DEBUG; keep a site's log readable.
logging.getLogger("flwr").setLevel(logging.INFO)

STATE_KEY = "pathfed-site"
SERVER_KEYS = ("server-round", "ledger-run", "dp-min-sites", CONTROL_KEY)
"""Per-round keys of the server's config that are not settings of the federation."""


def _flag(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


def _site(context: Context, config: dict[str, Any], state_root: Path | None = None) -> Site:
    # torch and Opacus load here, not at import: in deployment every message starts a
    # fresh ClientApp process, and three of SecAgg+'s four stages need no model.
    from common.privacy.store import SiteStore
    from common.site import Site

    cfg = FederationConfig.from_mapping(
        {k: v for k, v in config.items() if k not in SERVER_KEYS}, "server config"
    )
    node = context.node_config
    index = int(node.get("partition-id", 0))
    name = str(node["site-name"]) if "site-name" in node else f"site-{index}"
    data = str(node["data-path"]) if "data-path" in node else None
    deployed = "site-name" in node
    if deployed:
        # A deployed site decides its own noise: a CSPRNG unless its own node config
        # asks for seeded noise; what the server sends (`deterministic`) is ignored.
        noise = "seeded" if _flag(node.get("deterministic-noise", "false")) else "csprng"
        if cfg.deterministic and noise == "csprng":
            log.info("%s: the server asked for seeded noise; this site draws its noise from "
                     "a CSPRNG (set deterministic-noise in its node config to change that)",
                     name)
    else:
        noise = "seeded" if cfg.deterministic else "csprng"
    folder = node.get("state-dir")
    if folder:
        store = SiteStore(name, Path(str(folder)))
    elif state_root is not None:
        store = SiteStore(name, state_root / name)
    else:  # `flwr run .` simulation: the node's Flower context keeps the state
        record = context.state.config_records.get(STATE_KEY)
        store = SiteStore(name, text=str(record["state"]) if record else None)
    lifetime = float(node.get("lifetime-epsilon", math.inf))
    return Site(cfg, index, name=name, data=data, store=store, lifetime_budget=lifetime,
                noise=noise)


def _control(config: dict[str, Any], parameters: list[Any], site: str) -> Any:
    """The server's SCAFFOLD control variate in a training message, or None."""
    if CONTROL_KEY not in config:
        return None
    from common.errors import PathFedError
    from common.scaffold import decode

    try:
        return decode(bytes(config[CONTROL_KEY]), [tuple(p.shape) for p in parameters],
                      f"{site}: the server's {CONTROL_KEY}")
    except (ValueError, TypeError) as err:
        raise PathFedError(str(err)) from None


def _ledger_key(context: Context, site: Site) -> Path | None:
    """The site's ledger signing key: its own (deployment) or the simulation's.

    A deployed site (``site-name`` in its node config) signs with its own key only,
    never with a key at a path the server names."""
    own = context.node_config.get("ledger-key")
    if own:
        return Path(str(own))
    if "site-name" in context.node_config:
        return None
    if site.cfg.keys:
        from common.ledger import site_key_path

        path = site_key_path(site.cfg.keys, site.name)
        if path.is_file():
            return path
    return None


class HospitalClient(NumPyClient):
    """Translates Flower's fit/evaluate calls into one site's local work."""

    def __init__(self, context: Context, state_root: Path | None = None) -> None:
        self.context = context
        self.state_root = state_root

    def fit(self, parameters: list[Any], config: dict[str, Any]
            ) -> tuple[list[Any], int, dict[str, Any]]:
        import torch

        torch.set_num_threads(1)
        site = _site(self.context, config, self.state_root)
        distributed = site.plan is not None and site.plan.distributed
        if distributed and not in_secure_round.get():
            raise RuntimeError(f"{site.name}: distributed DP sends updates through SecAgg+ "
                               "only; this training message has no SecAgg+ stage")
        report = site.round(parameters, int(config.get("server-round", 0)),
                            _ledger_key(self.context, site),
                            str(config["ledger-run"]) if "ledger-run" in config else None,
                            int(config["dp-min-sites"]) if "dp-min-sites" in config else None,
                            _control(config, parameters, site.name))
        if report.noise_share is not None:
            pending_share.set(report.noise_share)  # the SecAgg+ quantiser adds it
        if site.store is not None and site.store.folder is None:
            self.context.state.config_records[STATE_KEY] = ConfigRecord(
                {"state": site.store.dumps()})
        return report.update, report.n_samples, report.metrics

    def evaluate(self, parameters: list[Any], config: dict[str, Any]
                 ) -> tuple[float, int, dict[str, Any]]:
        import torch

        torch.set_num_threads(1)  # as in fit: sites share their machine's cores
        site = _site(self.context, config, self.state_root)
        counts, metrics = site.evaluate(parameters)
        return float(counts.loss) if counts.n else 0.0, counts.n, metrics


def make_client_app(secagg: bool = True, state_root: str | Path | None = None) -> ClientApp:
    """The ClientApp, with Flower's SecAgg+ mod (hardened masks) when ``secagg``.

    ``state_root``: where simulated sites keep their privacy state (``NAME/`` each), so a
    killed and resumed simulation continues every accountant; deployed sites use the
    ``state-dir`` of their node config.
    """
    root = Path(state_root) if state_root is not None else None

    def client_fn(context: Context) -> Client:
        return HospitalClient(context, root).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secagg else [])


# SecAgg+'s mod passes plain (non-SecAgg) train messages straight through, so the
# app used by `flwr run` and by deployments can always carry it.
app = make_client_app(secagg=True)
