"""PathFed's strategy: FedAvg of site updates, weighted by slides, with checks and records.

A small subclass of Flower's (legacy) ``FedAvg``, the strategy family that Flower's SecAgg+
workflow drives. Sites send *updates* (new minus received weights); with SecAgg+ the
strategy only ever sees their masked sum, unmasked as a weighted average. On top of
``FedAvg`` it: rejects non-finite, mis-shaped or (with DP) unaccounted updates; keeps a
global model that only changes by an accepted aggregate; stops asking sites whose budget
is spent; writes a checkpoint, metric records and one summary line per round.
"""

from __future__ import annotations

import logging
import math
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
from common.crypto import MASK_GENERATOR
from common.ledger import Ledger, LedgerError, decode_signed, server_round_record
from common.metrics import EvalCounts
from common.runs import RunFolder

log = logging.getLogger(__name__)


def _finite(arrays: list[np.ndarray]) -> bool:
    return all(np.isfinite(a).all() for a in arrays)


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
        self.names = names
        self.global_weights = [np.asarray(w) for w in weights]
        self.run = run
        self.exhausted: dict[str, str] = {}
        """Sites whose budget cannot pay for another round (name -> reason)."""
        self.node_site: dict[int, str] = {}
        self.round_fit: dict[int, dict[str, Any]] = {}
        self.history: list[dict[str, Any]] = []
        self.epsilon: dict[str, float] = {}
        self.round_offset = round_offset
        """Rounds done before this process started (a resumed run): Flower counts from 1."""
        self.ledger = ledger
        """The privacy ledger: every site's signed record and the server's, hash-chained."""
        self.asked: dict[int, dict[int, str]] = {}
        self.skipped: dict[int, dict[str, str]] = {}

    # ---- configuration sent to sites ----------------------------------------------
    def _config(self, server_round: int) -> dict[str, Scalar]:
        config: dict[str, Scalar] = {k: v for k, v in self.cfg.to_run_config().items()}
        config["server-round"] = server_round
        return config

    def _available(self, client_manager: ClientManager, server_round: int,
                   minimum: int) -> list[ClientProxy]:
        """Sites connected now: all of them before the first round, else at least ``minimum``.

        FedAvg would wait up to a day for ``min_available_clients``; a site that died must
        not stall the federation, so later rounds go on with whoever is there.
        """
        wanted = self.cfg.sites if server_round == 1 else minimum
        if not client_manager.wait_for(wanted, timeout=int(self.cfg.timeout)):
            log.warning("round %d: %d of %d sites connected after %.0f s; going on",
                        self._round(server_round), client_manager.num_available(), wanted,
                        self.cfg.timeout)
        return list(client_manager.all().values())

    def _round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        rnd = self._round(server_round)
        chosen = []
        self.skipped[rnd] = {}
        for proxy in self._available(client_manager, server_round, 2):
            site = self.node_site.get(proxy.node_id)
            if site in self.exhausted:
                log.info("round %d: %s not asked to train: %s", rnd, site, self.exhausted[site])
                self.skipped[rnd][site] = f"not asked: {self.exhausted[site]}"
                continue
            chosen.append(proxy)
        count = max(min(2, len(chosen)), round(self.cfg.fraction_fit * len(chosen)))
        chosen = sorted(chosen, key=lambda p: p.node_id)
        if count < len(chosen):
            rng = np.random.default_rng([self.cfg.seed, rnd])
            chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), count, replace=False))]
        self.asked[rnd] = {p.node_id: self.node_site.get(p.node_id, f"node-{p.node_id}")
                           for p in chosen}
        return [(p, FitIns(parameters, self._config(rnd))) for p in chosen]

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        ins = EvaluateIns(parameters, self._config(self._round(server_round)))
        return [(p, ins) for p in self._available(client_manager, server_round, 1)]

    # ---- aggregation ----------------------------------------------------------------
    def _check(self, proxy: ClientProxy, res: FitRes) -> str | None:
        """Why a reply must be rejected, or None."""
        update = parameters_to_ndarrays(res.parameters)
        shapes = [w.shape for w in self.global_weights]
        if [u.shape for u in update] != shapes:
            return "update has the wrong shapes"
        if not _finite(update):
            return "update is not finite"
        if res.num_examples <= 0:
            return "no training slides"
        if self.cfg.dp and not {"epsilon", "noise_multiplier", "steps"} <= set(res.metrics):
            return "update carries no privacy accounting"
        if self.ledger is not None:
            try:
                self.ledger.append(decode_signed(res.metrics))
            except (LedgerError, ValueError) as err:
                return f"its ledger record does not verify ({err})"
        return None

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        flower_round, server_round = server_round, self._round(server_round)
        for failure in failures:
            reason = failure[1] if isinstance(failure, tuple) else failure
            log.warning("round %d: a site failed: %s", server_round, reason)
        accepted = []
        for proxy, res in results:
            site = str(res.metrics.get("site", proxy.node_id))
            self.node_site[proxy.node_id] = site
            problem = self._check(proxy, res)
            if problem:
                log.warning("round %d: update of %s rejected: %s", server_round, site, problem)
                continue
            accepted.append((proxy, res))
        record: dict[str, Any] = {"trained": [], "failed": len(failures), "sites": {}}
        self.round_fit[server_round] = record
        if not accepted or (self.cfg.secagg and len(accepted) < len(results)):
            # With SecAgg+ every reply carries the same aggregate: one bad means all bad.
            log.warning("round %d: aggregate rejected; the global model is unchanged",
                        server_round)
            self._ledger_round(server_round, [], None)
            return None, {}
        aggregated, _ = super().aggregate_fit(flower_round, accepted, [])
        if aggregated is None:
            self._ledger_round(server_round, [], None)
            return None, {}
        mean_update = parameters_to_ndarrays(aggregated)
        self.global_weights = [w + u.astype(w.dtype) for w, u in zip(self.global_weights,
                                                                     mean_update)]
        for proxy, res in accepted:
            site = self.node_site[proxy.node_id]
            record["trained"].append(site)
            record["sites"][site] = {k: v for k, v in res.metrics.items() if k != "site"}
            record["sites"][site]["n_train"] = res.num_examples
            if "epsilon" in res.metrics:
                self.epsilon[site] = float(res.metrics["epsilon"])
            if not res.metrics.get("can_train_next", True):
                self.exhausted[site] = "its next round would exceed its privacy budget"
        self._ledger_round(server_round, record["trained"], mean_update)
        path = self.run.save_checkpoint(server_round, self.names, self.global_weights)
        record["checkpoint"] = str(path.relative_to(self.run.path))
        return ndarrays_to_parameters(self.global_weights), {}

    def _ledger_round(self, server_round: int, participants: list[str],
                      aggregate: list[np.ndarray] | None) -> None:
        """The server's record of the round: who contributed, who dropped out and why."""
        if self.ledger is None:
            return
        dropouts = dict(self.skipped.get(server_round, {}))
        for site in self.asked.get(server_round, {}).values():
            if site not in participants:
                dropouts[site] = "asked to train; no accepted update (dropped out or rejected)"
        self.ledger.append_server(server_round_record(
            server_round=server_round, participants=participants, dropouts=dropouts,
            aggregate=aggregate, global_weights=self.global_weights, secagg=self.cfg.secagg,
            mask_generator=MASK_GENERATOR if self.cfg.secagg else None))

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[Any]) -> tuple[float | None, dict[str, Scalar]]:
        server_round = self._round(server_round)
        fit = self.round_fit.get(server_round, {"trained": [], "failed": 0, "sites": {}})
        total = EvalCounts()
        records = []
        for proxy, res in results:
            site = str(res.metrics.get("site", proxy.node_id))
            self.node_site[proxy.node_id] = site
            counts = EvalCounts.from_metrics(res.metrics)
            total = total + counts
            eps = float(res.metrics.get("epsilon", 0.0))
            self.epsilon[site] = eps
            if self.cfg.dp and not res.metrics.get("can_train_next", True):
                self.exhausted.setdefault(site, "its next round would exceed its privacy budget")
            train = fit["sites"].get(site, {})
            records.append({
                "round": server_round, "site": site, "trained": site in fit["trained"],
                "train_loss": train.get("train_loss"), "n_train": train.get("n_train"),
                "steps": train.get("steps", 0), "noise_multiplier": train.get("noise_multiplier"),
                "sample_rate": train.get("sample_rate"), "val_n": counts.n,
                "val_loss": counts.loss, "val_auc": counts.auc, "val_accuracy": counts.accuracy,
                "val_balanced_accuracy": counts.balanced_accuracy, "epsilon": eps,
                "delta": self.cfg.delta, "secagg_clipped": train.get("secagg_clipped"),
            })
        losses = [fit["sites"][s]["train_loss"] for s in fit["trained"]
                  if fit["sites"][s].get("train_loss") is not None]
        weights = [fit["sites"][s]["n_train"] for s in fit["trained"]
                   if fit["sites"][s].get("train_loss") is not None]
        train_loss = float(np.average(losses, weights=weights)) if losses else math.nan
        summary = {
            "round": server_round, "site": "global", "sites_trained": len(fit["trained"]),
            "sites": len(results), "train_loss": train_loss, "val_loss": total.loss,
            "val_auc": total.auc, "val_accuracy": total.accuracy,
            "val_balanced_accuracy": total.balanced_accuracy,
            "epsilon": dict(sorted(self.epsilon.items())),
        }
        self.run.append_metrics(records + [summary])
        self.history.append(summary)
        eps = " ".join(f"{s}={e:.2f}" for s, e in sorted(self.epsilon.items()))
        log.info(
            "round %d | sites trained %d/%d | train loss %.4f | val AUC %.3f | acc %.3f | "
            "eps %s", server_round, len(fit["trained"]), len(results), train_loss, total.auc,
            total.accuracy, eps if self.cfg.dp else "(no DP)",
        )
        return (total.loss if total.n else None), {}
