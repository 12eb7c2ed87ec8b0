"""PathFed's Flower strategy: Flower's messages in, :class:`common.rounds.RoundBook` calls out.

A small subclass of Flower's (legacy) ``FedAvg``, the strategy family that Flower's SecAgg+
workflow drives. Sites send *updates* (new minus received weights); with SecAgg+ the
strategy only ever sees their masked sum, unmasked as a weighted average. Everything the
server decides and records (the checks of :mod:`common.checks`, the weighted mean, the
global model, checkpoints, the ledger's server records, metric records, the summary) is
the Flower-free :class:`~common.rounds.RoundBook`, which the in-process runner
(:func:`common.fedavg.run_inprocess`) drives too. This module only picks the sites of a
round and translates Flower's types.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg

from common.config import FederationConfig
from common.ledger import Ledger
from common.privacy.distributed import min_sites
from common.rounds import FederationAborted, RoundBook, weighted_mean
from common.runs import RunFolder
from common.scaffold import CONTROL_KEY, encode

log = logging.getLogger(__name__)

__all__ = ["FederationAborted", "PathFedStrategy", "failure_reason"]


def failure_reason(failure: Any) -> str:
    """One line from a failed reply: the last ``SomeError: message`` line of its text."""
    text = str(failure[1] if isinstance(failure, tuple) else failure)
    found = re.findall(r"(?m)^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Exhausted)): (.+)$", text)
    if found:
        kind, message = found[-1]
        return f"{kind}: {message.strip()}"[:500]
    return " ".join(text.split())[-500:]


class PathFedStrategy(FedAvg):
    """FedAvg over site updates with validation, budgets, checkpoints and run records."""

    def __init__(self, cfg: FederationConfig, names: list[str], weights: list[np.ndarray],
                 run: RunFolder, round_offset: int = 0, ledger: Ledger | None = None) -> None:
        super().__init__(
            fraction_fit=cfg.fraction_fit, fraction_evaluate=1.0,
            min_fit_clients=2, min_evaluate_clients=1, min_available_clients=cfg.sites,
            initial_parameters=ndarrays_to_parameters(weights), accept_failures=True,
            # Site metrics are recorded per site below, never averaged blindly.
            fit_metrics_aggregation_fn=lambda _: {},
            evaluate_metrics_aggregation_fn=lambda _: {},
        )
        self.cfg = cfg
        self.book = RoundBook(cfg, names, weights, run, ledger, round_offset)
        """The run's records; ``book.round_offset``: rounds done before this process
        started (a resumed run), since Flower counts from 1."""
        self.node_site: dict[int, str] = {}
        """Flower node id -> the site's name (fixed at the node's first reply)."""

    # ---- configuration sent to sites ----------------------------------------------
    def _config(self, server_round: int) -> dict[str, Scalar]:
        config: dict[str, Scalar] = {k: v for k, v in self.cfg.to_run_config().items()}
        config["server-round"] = server_round
        if self.book.ledger is not None:
            config["ledger-run"] = self.book.ledger.run
        return config

    def _available(self, client_manager: ClientManager, server_round: int,
                   minimum: int) -> list[ClientProxy]:
        """Sites connected now: all of them before the first round, else at least ``minimum``.

        FedAvg would wait up to a day for ``min_available_clients``; a site that died must
        not stall the federation, so later rounds go on with whoever is there.
        """
        wanted = self.cfg.sites if server_round == 1 else minimum
        connected = client_manager.num_available()
        if connected < wanted and server_round == 1:
            log.warning("round %d: %d of the %d sites (`sites`) are connected; waiting up to "
                        "%.0f s (`timeout`) for the others. Under `flwr run`'s simulation give "
                        "`--federation-config num-supernodes=%d`, or `--run-config sites=%d`",
                        self._round(server_round), connected, wanted, self.cfg.timeout,
                        wanted, max(connected, 2))
        if not client_manager.wait_for(wanted, timeout=int(self.cfg.timeout)):
            log.warning("round %d: %d of %d sites connected after %.0f s; going on",
                        self._round(server_round), client_manager.num_available(), wanted,
                        self.cfg.timeout)
        return list(client_manager.all().values())

    def _round(self, server_round: int) -> int:
        return server_round + self.book.round_offset

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        rnd = self._round(server_round)
        book = self.book
        chosen = []
        for proxy in self._available(client_manager, server_round, 2):
            site = self.node_site.get(proxy.node_id)
            if site in book.exhausted:
                log.info("round %d: %s not asked to train: %s", rnd, site, book.exhausted[site])
                book.skip(rnd, site, f"not asked: {book.exhausted[site]}")
                continue
            chosen.append(proxy)
        count = max(min(2, len(chosen)), round(self.cfg.fraction_fit * len(chosen)))
        chosen = sorted(chosen, key=lambda p: p.node_id)
        if count < len(chosen):
            rng = np.random.default_rng([self.cfg.seed, rnd])
            chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), count, replace=False))]
        book.start_round(rnd, [self.node_site.get(p.node_id, f"node-{p.node_id}")
                               for p in chosen])
        config = self._config(rnd)
        if self.cfg.dp and self.cfg.dp_mode == "distributed":
            # every site sizes its noise share for the fewest sites the sum may hold;
            # server/secagg.py refuses to unmask a sum of fewer
            config["dp-min-sites"] = min_sites(len(chosen), self.cfg.secagg_dropout)
        control = book.control()
        if control is not None:
            config[CONTROL_KEY] = encode(control)
        return [(p, FitIns(parameters, config)) for p in chosen]

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        ins = EvaluateIns(parameters, self._config(self._round(server_round)))
        return [(p, ins) for p in self._available(client_manager, server_round, 1)]

    # ---- aggregation ----------------------------------------------------------------
    def _site_of(self, proxy: ClientProxy, metrics: Any) -> tuple[str, str | None]:
        """The site a reply comes from, and why it cannot be believed (or None)."""
        claimed = metrics.get("site") if hasattr(metrics, "get") else None
        name = claimed if isinstance(claimed, str) and claimed else f"node-{proxy.node_id}"
        known = self.node_site.get(proxy.node_id)
        if known is not None and known != name:
            return known, f"node {proxy.node_id} is {known} but its reply says {name!r}"
        others = [n for n, s in self.node_site.items() if s == name and n != proxy.node_id]
        if others:
            return f"node-{proxy.node_id}", (f"claims to be {name}, which is node "
                                             f"{others[0]}")
        self.node_site[proxy.node_id] = name
        return name, None

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round = self._round(server_round)
        book = self.book
        reasons = [failure_reason(f) for f in failures]
        book.fail(server_round, reasons)
        book.rejected.setdefault(server_round, {})
        accepted, updates = [], []
        for proxy, res in results:
            site, problem = self._site_of(proxy, res.metrics)
            update = None
            if not problem and not self.cfg.secagg:
                try:
                    update = parameters_to_ndarrays(res.parameters)
                except Exception as err:  # noqa: BLE001 (any undecodable payload is rejected)
                    problem = f"update cannot be decoded ({err.__class__.__name__})"
            problem = problem or book.check(site, server_round, res.num_examples,
                                            res.metrics, update)
            if problem:
                book.reject(server_round, site, problem)
                continue
            accepted.append((site, int(res.num_examples), dict(res.metrics)))
            updates.append((update, int(res.num_examples)))
        # sites asked before their names were known (round 1) are named now
        book.asked[server_round] = [self._named(a) for a in book.asked.get(server_round, [])]
        if not accepted and failures and not results and book.first_round(server_round):
            raise FederationAborted(f"round {server_round}: every site failed, nothing was "
                                    f"trained; first failure: {reasons[0]}")
        mean = None
        if accepted and self.cfg.secagg:
            if len(accepted) == len(results):  # each reply carries the same aggregate
                try:
                    mean = parameters_to_ndarrays(results[0][1].parameters)
                except Exception:  # noqa: BLE001
                    mean = None
            else:  # one bad reply means the (shared) aggregate is bad too
                log.warning("round %d: a SecAgg+ reply was rejected, so is the aggregate",
                            server_round)
                accepted = []
        elif accepted:
            mean = weighted_mean([(u, n) for u, n in updates if u is not None])
        if not book.apply(server_round, accepted, mean, failed=len(failures)):
            return None, {}
        return ndarrays_to_parameters(book.global_weights), {}

    def _named(self, site: str) -> str:
        if site.startswith("node-") and site[5:].isdigit():
            return self.node_site.get(int(site[5:]), site)
        return site

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[Any]) -> tuple[float | None, dict[str, Scalar]]:
        server_round = self._round(server_round)
        replies = []
        for proxy, res in results:
            site, problem = self._site_of(proxy, res.metrics)
            if problem:
                log.warning("round %d: evaluation of %s ignored: %s", server_round, site,
                            problem)
                continue
            replies.append((site, res.metrics))
        summary = self.book.evaluate(server_round, replies,
                                     [failure_reason(f) for f in failures])
        loss = summary["val_loss"]
        return (float(loss) if summary["sites"] and np.isfinite(loss) else None), {}
