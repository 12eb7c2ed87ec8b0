"""PathFed's strategy: FedAvg of site updates, weighted by slides, with checks and records.

A small subclass of Flower's (legacy) ``FedAvg``, the strategy family that Flower's SecAgg+
workflow drives. Sites send *updates* (new minus received weights); with SecAgg+ the
strategy only ever sees their masked sum, unmasked as a weighted average. On top of
``FedAvg`` it: rejects replies that fail :mod:`common.checks` (shapes, finiteness, the
value bound every honest update obeys, example counts, malformed metrics) or whose
ledger record is not of this run and round; rejects a SecAgg+ aggregate beyond the
bound; keeps a global model that only changes by an accepted aggregate; stops asking
sites whose budget is spent; writes a checkpoint, metric records and one summary line
per round.
"""

from __future__ import annotations

import logging
import math
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

from common.checks import (
    count_problem,
    eval_counts,
    train_metrics_problem,
    update_bound,
    update_problem,
)
from common.config import FederationConfig
from common.crypto import MASK_GENERATOR
from common.errors import PathFedError
from common.ledger import (
    LEDGER_METRIC,
    Ledger,
    LedgerError,
    decode_signed,
    hash_arrays,
    server_round_record,
)
from common.metrics import EvalCounts
from common.runs import RunFolder, sha256_file

log = logging.getLogger(__name__)


class FederationAborted(PathFedError):
    """No site could train in the first round: going on would train nothing."""


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
        self.asked: dict[int, list[int]] = {}
        self.skipped: dict[int, dict[str, str]] = {}
        self.rejected: dict[int, dict[str, str]] = {}
        self.declared: dict[str, int] = {}
        """Each site's number of training samples, as it declared in its first reply."""
        self.bound = update_bound(cfg)
        """The value bound of any honest update, and so of any (weighted mean) aggregate."""
        self.shapes = [tuple(w.shape) for w in self.global_weights]
        self.last_round = round_offset
        self.models = 0
        """Rounds of this process that produced a global model."""
        self.failures: list[str] = []
        """Why sites failed in this process's first round (fit, SecAgg+ or evaluate)."""

    # ---- configuration sent to sites ----------------------------------------------
    def _config(self, server_round: int) -> dict[str, Scalar]:
        config: dict[str, Scalar] = {k: v for k, v in self.cfg.to_run_config().items()}
        config["server-round"] = server_round
        if self.ledger is not None:
            config["ledger-run"] = self.ledger.run
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
        self.asked[rnd] = [p.node_id for p in chosen]
        self.last_round = rnd
        return [(p, FitIns(parameters, self._config(rnd))) for p in chosen]

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

    def _check(self, site: str, server_round: int, res: FitRes) -> str | None:
        """Why a reply must be rejected, or None. A verified ledger record is appended
        first, so a rejected update's privacy spend is still on record."""
        problem = train_metrics_problem(res.metrics, self.cfg.dp)
        if problem:
            return problem
        record = None
        if self.ledger is not None:
            try:
                signed = decode_signed(res.metrics)
                if signed.get("signer") != site:
                    raise LedgerError(f"signed by {signed.get('signer')!r}, not by {site}")
                self.ledger.append(signed, server_round)
                record = signed["record"]
            except (LedgerError, ValueError, TypeError) as err:
                return f"its ledger record does not verify ({err})"
        problem = count_problem(site, res.num_examples, self.declared, self.cfg.secagg_max_weight)
        if problem:
            return problem
        if record is not None and record.get("n_samples") != res.num_examples:
            return (f"reply weighted {res.num_examples} samples, its signed record says "
                    f"{record.get('n_samples')}")
        if not self.cfg.secagg:  # with SecAgg+ each reply carries only the aggregate
            try:
                update = parameters_to_ndarrays(res.parameters)
            except Exception as err:  # noqa: BLE001 (any undecodable payload is rejected)
                return f"update cannot be decoded ({err.__class__.__name__})"
            problem = update_problem(update, self.shapes, self.bound)
            if problem:
                return problem
            if record is not None and record.get("update") != hash_arrays(update):
                return "update is not the one its signed ledger record names"
        return None

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[Any]) -> tuple[Parameters | None, dict[str, Scalar]]:
        flower_round, server_round = server_round, self._round(server_round)
        reasons = [failure_reason(f) for f in failures]
        for reason in reasons:
            log.warning("round %d: a site failed: %s", server_round, reason)
        self.failures.extend(reasons)
        accepted = []
        rejected = self.rejected.setdefault(server_round, {})
        for proxy, res in results:
            site, problem = self._site_of(proxy, res.metrics)
            problem = problem or self._check(site, server_round, res)
            if problem:
                log.warning("round %d: update of %s rejected: %s", server_round, site, problem)
                rejected[site] = f"update rejected: {problem}"
                continue
            accepted.append((proxy, res))
        record: dict[str, Any] = {"trained": [], "failed": len(failures), "sites": {}}
        self.round_fit[server_round] = record
        if not accepted and failures and not results and self.models == 0 \
                and server_round == self.round_offset + 1:
            raise FederationAborted(
                f"round {server_round}: every site failed, nothing was trained; first "
                f"failure: {reasons[0]}")
        if not accepted or (self.cfg.secagg and len(accepted) < len(results)):
            # With SecAgg+ every reply carries the same aggregate: one bad means all bad.
            log.warning("round %d: aggregate rejected; the global model is unchanged",
                        server_round)
            self._ledger_round(server_round, [], None)
            return None, {}
        if self.cfg.secagg:
            try:
                mean_update = parameters_to_ndarrays(accepted[0][1].parameters)
            except Exception as err:  # noqa: BLE001
                mean_update, problem = [], f"cannot be decoded ({err.__class__.__name__})"
            else:
                problem = update_problem(mean_update, self.shapes, self.bound)
            if problem:
                log.warning("round %d: SecAgg+ aggregate of %s rejected: %s; the global model "
                            "is unchanged", server_round,
                            ", ".join(self.node_site[p.node_id] for p, _ in accepted), problem)
                for proxy, _ in accepted:
                    rejected[self.node_site[proxy.node_id]] = f"aggregate rejected: {problem}"
                self._ledger_round(server_round, [], None)
                return None, {}
        else:
            aggregated, _ = super().aggregate_fit(flower_round, accepted, [])
            if aggregated is None:
                self._ledger_round(server_round, [], None)
                return None, {}
            mean_update = parameters_to_ndarrays(aggregated)
        self.global_weights = [w + u.astype(w.dtype) for w, u in zip(self.global_weights,
                                                                     mean_update)]
        for proxy, res in accepted:
            site = self.node_site[proxy.node_id]
            self.declared.setdefault(site, int(res.num_examples))
            record["trained"].append(site)
            record["sites"][site] = {k: v for k, v in res.metrics.items()
                                     if k not in ("site", LEDGER_METRIC)}
            record["sites"][site]["n_train"] = res.num_examples
            if "epsilon" in res.metrics:
                self.epsilon[site] = float(res.metrics["epsilon"])
            if not res.metrics.get("can_train_next", True):
                self.exhausted[site] = "its next round would exceed its privacy budget"
        path = self.run.save_checkpoint(server_round, self.names, self.global_weights)
        record["checkpoint"] = str(path.relative_to(self.run.path))
        self.models += 1
        self._ledger_round(server_round, record["trained"], mean_update, path)
        return ndarrays_to_parameters(self.global_weights), {}

    def _ledger_round(self, server_round: int, participants: list[str],
                      aggregate: list[np.ndarray] | None, checkpoint: Any = None) -> None:
        """The server's record of the round: who contributed, who dropped out and why."""
        if self.ledger is None:
            return
        dropouts = dict(self.skipped.get(server_round, {}))
        dropouts.update(self.rejected.get(server_round, {}))
        for node in self.asked.get(server_round, []):
            site = self.node_site.get(node, f"node-{node}")
            if site not in participants and site not in dropouts:
                dropouts[site] = "asked to train; no update arrived (dropped out or failed)"
        self.ledger.append_server(server_round_record(
            server_round=server_round, participants=participants, dropouts=dropouts,
            aggregate=aggregate, global_weights=self.global_weights, secagg=self.cfg.secagg,
            mask_generator=MASK_GENERATOR if self.cfg.secagg else None,
            checkpoint=str(checkpoint.relative_to(self.run.path)) if checkpoint else None,
            checkpoint_sha256=sha256_file(checkpoint) if checkpoint else None))

    def aggregate_evaluate(self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]],
                           failures: list[Any]) -> tuple[float | None, dict[str, Scalar]]:
        server_round = self._round(server_round)
        reasons = [failure_reason(f) for f in failures]
        for reason in sorted(set(reasons)):
            log.warning("round %d: a site failed to evaluate: %s", server_round, reason)
        if (not results and reasons and self.models == 0
                and server_round == self.round_offset + 1):
            first = (self.failures or reasons)[0]
            raise FederationAborted(f"round {server_round}: no site could train or evaluate "
                                    f"the model; first failure: {first}")
        fit = self.round_fit.get(server_round, {"trained": [], "failed": 0, "sites": {}})
        total = EvalCounts()
        records = []
        for proxy, res in results:
            site, problem = self._site_of(proxy, res.metrics)
            counts, problem = (None, problem) if problem else eval_counts(res.metrics)
            if counts is None:
                log.warning("round %d: evaluation of %s ignored: %s", server_round, site,
                            problem)
                continue
            total = total + counts
            eps = float(res.metrics.get("epsilon", 0.0))
            self.epsilon[site] = eps
            if self.cfg.dp and res.metrics.get("can_train_next", True) is False:
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
        loss = f" | train loss {train_loss:.4f}" if losses else ""
        log.info(
            "round %d | sites trained %d/%d%s | val AUC %.3f | acc %.3f | eps %s",
            server_round, len(fit["trained"]), len(results), loss, total.auc,
            total.accuracy, eps if self.cfg.dp else "(no DP)",
        )
        return (total.loss if total.n else None), {}
