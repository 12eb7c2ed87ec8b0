"""The server's side of a federated run, without Flower: one engine for every run.

:class:`RoundBook` keeps the global model and everything the server records. It checks
each reply (:mod:`common.checks`), forms the weighted mean, applies an accepted
aggregate, and writes the checkpoint, the ledger's server records, the metric records
and ``summary.json``. Two drivers call it:

- :class:`server.strategy.PathFedStrategy`, the Flower strategy, for simulated and
  deployed runs (with or without SecAgg+);
- :func:`common.fedavg.run_inprocess`, a fast in-process loop over
  :class:`common.site.Site` objects (paper table, membership-inference shadows).

Every number of either comes through the same checks and records, with the same keys.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.checks import (
    count_problem,
    eval_counts,
    train_metrics_problem,
    update_bound,
    update_problem,
)
from common.config import FederationConfig
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
from common.runs import RunFolder, json_safe, sha256_file
from common.scaffold import Scaffold
from common.server_opt import ServerOptimizer

log = logging.getLogger(__name__)

NDArrays = list[np.ndarray]
LAST_K = 3
"""Rounds the summary's steadier AUC averages over."""


class FederationAborted(PathFedError):
    """No site could train in the first round: going on would train nothing."""


def plan_line(n: int, metrics: Mapping[str, Any]) -> str:
    """What a site's first reply says about its training and privacy plan, in words."""
    text = f"trains on {n} samples, {metrics.get('steps', '?')} steps per round"
    if metrics.get("dp_mode") == "distributed":
        text += (f"; distributed DP: a share of Skellam noise (multiplier "
                 f"{float(metrics['noise_multiplier']):.3g} in a sum of at least "
                 f"{metrics.get('noise_sites')} sites), clipping "
                 f"{float(metrics['max_grad_norm']):g}, budget epsilon "
                 f"{float(metrics['epsilon_budget']):g} (spent {float(metrics['epsilon']):.3g} "
                 "in its first round)")
    elif "noise_multiplier" in metrics:
        text += (f"; DP-SGD with noise multiplier {float(metrics['noise_multiplier']):.3g}, "
                 f"sampling rate {float(metrics['sample_rate']):.3g}, clipping "
                 f"{float(metrics['max_grad_norm']):g}, budget epsilon "
                 f"{float(metrics['epsilon_budget']):g} (spent {float(metrics['epsilon']):.3g} "
                 "in its first round)")
    else:
        text += "; no DP"
    return text


def weighted_mean(updates: Sequence[tuple[NDArrays, int]]) -> NDArrays:
    """Weighted average of updates, weights = training samples (Flower's FedAvg)."""
    total = sum(n for _, n in updates)
    mean = [np.zeros(np.shape(a), np.float64) for a in updates[0][0]]
    for update, n in updates:
        for acc, value in zip(mean, update):
            acc += np.asarray(value, np.float64) * n
    return [acc / total for acc in mean]


class RoundBook:
    """The global model and the server's records of one run.

    Args:
        cfg: the run's configuration.
        names: the model's parameter names (checkpoint keys).
        weights: the global model to start from (initial, or a resumed checkpoint).
        run: the run folder (checkpoints, metrics, summary); None records nothing on disk.
        ledger: the privacy ledger, or None.
        round_offset: rounds done before (a resumed run).
    """

    def __init__(self, cfg: FederationConfig, names: list[str], weights: Sequence[np.ndarray],
                 run: RunFolder | None, ledger: Ledger | None = None,
                 round_offset: int = 0) -> None:
        self.cfg = cfg
        self.names = names
        self.global_weights = [np.asarray(w) for w in weights]
        self.shapes = [tuple(w.shape) for w in self.global_weights]
        self.run = run
        self.ledger = ledger
        self.round_offset = round_offset
        self.secagg = cfg.secagg
        """Whether replies carry only the SecAgg+ aggregate."""
        self.bound = update_bound(cfg)
        """The value bound of any honest update, and so of any (weighted mean) aggregate."""
        self.declared: dict[str, int] = {}
        """Each site's number of training samples, as it declared in its first reply."""
        self.asked: dict[int, list[str]] = {}
        self.skipped: dict[int, dict[str, str]] = {}
        self.rejected: dict[int, dict[str, str]] = {}
        self.secagg_shares: dict[int, dict[str, int]] = {}
        """Each round's SecAgg+ share settings, as the server's workflow ran them."""
        self.round_fit: dict[int, dict[str, Any]] = {}
        self.exhausted: dict[str, str] = {}
        """Sites whose budget cannot pay for another round (name -> reason)."""
        self.epsilon: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.last_round = round_offset
        self.models = 0
        """Rounds of this run (this process) that produced a global model."""
        self.failures: list[str] = []
        """Why sites failed (fit, SecAgg+ or evaluate), in order."""
        self.features: dict[str, str] = {}
        """How each site says its features were made (for the released model's card)."""
        self.started = time.perf_counter()
        self.server_opt = ServerOptimizer.from_config(cfg)
        """How an accepted aggregate becomes the next global model (FedAvg by default)."""
        self.scaffold = (Scaffold(cfg.lr, cfg.sites, cfg.local_epochs, cfg.batch_size)
                         if cfg.scaffold else None)
        """SCAFFOLD's server control variate, updated from each aggregate."""
        if self.stateful and run is not None and round_offset:
            self._restore_server_opt(round_offset)

    @property
    def stateful(self) -> bool:
        """Whether the server keeps state beside the model (moments, control variate)."""
        return self.server_opt.stateful or self.scaffold is not None

    def control(self) -> NDArrays | None:
        """The SCAFFOLD control variate to send with a training message, or None."""
        return self.scaffold.ensure(self.shapes) if self.scaffold is not None else None

    def _restore_server_opt(self, done: int) -> None:
        """Continue a resumed run with the server optimiser's moments of round ``done``."""
        assert self.run is not None
        path = self.run.server_state_path(done)
        if path is None:
            log.warning("resuming after round %d: no %s state of that round was saved; its "
                        "moments start from zero", done, self.server_opt.name)
            return
        from common.runs import load_checkpoint

        arrays = load_checkpoint(path, self.run.checkpoint_key, self.run.run_id)
        self.server_opt.load_state(arrays)
        if self.scaffold is not None:
            self.scaffold.load_state(arrays)

    # ---- a round's training ------------------------------------------------------------
    def start_round(self, server_round: int, asked: Sequence[str]) -> None:
        """Record who was asked to train in ``server_round``."""
        self.asked[server_round] = list(asked)
        self.skipped.setdefault(server_round, {})
        self.rejected.setdefault(server_round, {})
        self.last_round = server_round

    def skip(self, server_round: int, site: str, reason: str) -> None:
        self.skipped.setdefault(server_round, {})[site] = reason

    def check(self, site: str, server_round: int, n: Any, metrics: Mapping[str, Any],
              update: NDArrays | None) -> str | None:
        """Why a site's reply must be rejected, or None. A verified ledger record is
        appended first, so a rejected update's privacy spend is still on record.
        ``update`` is None under SecAgg+ (each reply then carries only the aggregate)."""
        problem = train_metrics_problem(metrics, self.cfg.dp)
        if problem:
            return problem
        record = None
        if self.ledger is not None:
            try:
                signed = decode_signed(metrics)
                if signed.get("signer") != site:
                    raise LedgerError(f"signed by {signed.get('signer')!r}, not by {site}")
                self.ledger.append(signed, server_round)
                record = signed["record"]
            except (LedgerError, ValueError, TypeError) as err:
                return f"its ledger record does not verify ({err})"
        problem = count_problem(site, n, self.declared, self.cfg.secagg_max_weight)
        if problem:
            return problem
        if record is not None and record.get("n_samples") != n:
            return f"reply weighted {n} samples, its signed record says {record.get('n_samples')}"
        if update is not None:
            problem = update_problem(update, self.shapes, self.bound)
            if problem:
                return problem
            if record is not None and record.get("update") != hash_arrays(update):
                return "update is not the one its signed ledger record names"
        return None

    def reject(self, server_round: int, site: str, reason: str) -> None:
        log.warning("round %d: update of %s rejected: %s", server_round, site, reason)
        self.rejected.setdefault(server_round, {})[site] = f"update rejected: {reason}"

    def fail(self, server_round: int, reasons: Sequence[str]) -> None:
        """Sites whose training failed (an exception at the site, a dropout)."""
        for reason in reasons:
            log.warning("round %d: a site failed: %s", server_round, reason)
        self.failures.extend(reasons)

    def first_round(self, server_round: int) -> bool:
        return self.models == 0 and server_round == self.round_offset + 1

    def apply(self, server_round: int, accepted: Sequence[tuple[str, int, Mapping[str, Any]]],
              mean_update: NDArrays | None, failed: int = 0) -> bool:
        """Apply the round's aggregate (the weighted mean of the accepted updates) and
        record it; whether the round produced a new global model."""
        record: dict[str, Any] = {"trained": [], "failed": failed, "sites": {}}
        self.round_fit[server_round] = record
        if not accepted or mean_update is None:
            log.warning("round %d: no accepted update; the global model is unchanged",
                        server_round)
            self._ledger_round(server_round, [], None)
            return False
        problem = update_problem(mean_update, self.shapes, self.aggregate_bound(accepted))
        if problem:
            names = ", ".join(site for site, _, _ in accepted)
            log.warning("round %d: aggregate of %s rejected: %s; the global model is "
                        "unchanged", server_round, names, problem)
            for site, _, _ in accepted:
                self.rejected.setdefault(server_round, {})[site] = (
                    f"aggregate rejected: {problem}")
            self._ledger_round(server_round, [], None)
            return False
        self.global_weights = self.server_opt.step(self.global_weights, mean_update)
        if self.scaffold is not None:
            self.scaffold.step(mean_update, [int(n) for _, n, _ in accepted])
        for site, n, metrics in accepted:
            if site not in self.declared:
                log.info("%s: %s", site, plan_line(int(n), metrics))
            self.declared.setdefault(site, int(n))
            record["trained"].append(site)
            record["sites"][site] = {k: v for k, v in metrics.items()
                                     if k not in ("site", LEDGER_METRIC)}
            record["sites"][site]["n_train"] = int(n)
            if "epsilon" in metrics:
                self.epsilon[site] = float(metrics["epsilon"])
            if metrics.get("can_train_next", True) is False:
                self.exhausted[site] = "its next round would exceed its privacy budget"
        path = None
        if self.run is not None:
            if self.stateful:  # before the checkpoint that a resume starts from
                arrays = self.server_opt.state_arrays()
                if self.scaffold is not None:
                    arrays.update(self.scaffold.state_arrays())
                self.run.save_server_state(server_round, arrays)
            path = self.run.save_checkpoint(server_round, self.names, self.global_weights)
            record["checkpoint"] = str(path.relative_to(self.run.path))
        self.models += 1
        self._ledger_round(server_round, record["trained"], mean_update, path)
        return True

    def aggregate_bound(self, accepted: Sequence[tuple[str, int, Mapping[str, Any]]]) -> float:
        """The bound an honest aggregate obeys: an honest update's, and with distributed DP
        also :data:`~common.privacy.distributed.NOISE_SIGMAS` standard deviations of the
        noise the accepted sites' shares put in the mean (their declared variances)."""
        if not (self.cfg.dp and self.cfg.dp_mode == "distributed"):
            return self.bound
        from common.privacy.distributed import NOISE_SIGMAS, aggregate_noise_std

        shares = [(int(n), float(m.get("share_variance", 0.0))) for _, n, m in accepted]
        return self.bound + NOISE_SIGMAS * aggregate_noise_std(
            shares, max_weight=float(self.cfg.secagg_max_weight),
            quantization_range=self.cfg.secagg_quantization_range,
            clipping_range=self.bound)

    def _ledger_round(self, server_round: int, participants: list[str],
                      aggregate: NDArrays | None, checkpoint: Path | None = None) -> None:
        """The server's record of the round: who contributed, who dropped out and why."""
        if self.ledger is None:
            return
        dropouts = dict(self.skipped.get(server_round, {}))
        dropouts.update(self.rejected.get(server_round, {}))
        for site in self.asked.get(server_round, []):
            if site not in participants and site not in dropouts:
                dropouts[site] = "asked to train; no update arrived (dropped out or failed)"
        from common.crypto import MASK_GENERATOR

        run_path = self.run.path if self.run is not None else None
        self.ledger.append_server(server_round_record(
            server_round=server_round, participants=participants, dropouts=dropouts,
            aggregate=aggregate, global_weights=self.global_weights, secagg=self.secagg,
            mask_generator=MASK_GENERATOR if self.secagg else None,
            secagg_shares=self.secagg_shares.get(server_round) if self.secagg else None,
            checkpoint=str(checkpoint.relative_to(run_path)) if checkpoint and run_path
            else None,
            checkpoint_sha256=sha256_file(checkpoint) if checkpoint else None))

    # ---- a round's evaluation ----------------------------------------------------------
    def evaluate(self, server_round: int, replies: Sequence[tuple[str, Mapping[str, Any]]],
                 reasons: Sequence[str] = ()) -> dict[str, Any]:
        """Pool the sites' evaluation counts; write the round's metric records and log line.

        Raises :class:`FederationAborted` when the first round produced no model and no
        site could even evaluate (going on would train nothing).
        """
        for reason in sorted(set(reasons)):
            log.warning("round %d: a site failed to evaluate: %s", server_round, reason)
        if not replies and reasons and self.first_round(server_round):
            first = (self.failures or list(reasons))[0]
            raise FederationAborted(f"round {server_round}: no site could train or evaluate "
                                    f"the model; first failure: {first}")
        fit = self.round_fit.get(server_round, {"trained": [], "failed": 0, "sites": {}})
        total = EvalCounts()
        records = []
        for site, metrics in replies:
            counts, problem = eval_counts(metrics)
            if counts is None:
                log.warning("round %d: evaluation of %s ignored: %s", server_round, site,
                            problem)
                continue
            total = total + counts
            self._note_features(site, metrics.get("features"))
            eps = float(metrics.get("epsilon", 0.0))
            self.epsilon[site] = eps
            if self.cfg.dp and metrics.get("can_train_next", True) is False:
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
        losses = [(fit["sites"][s]["train_loss"], fit["sites"][s]["n_train"])
                  for s in fit["trained"] if _finite(fit["sites"][s].get("train_loss"))]
        train_loss = (float(np.average([x for x, _ in losses], weights=[n for _, n in losses]))
                      if losses else math.nan)
        threshold, calibrated = total.calibrated()
        summary = {
            "round": server_round, "site": "global", "sites_trained": len(fit["trained"]),
            "sites": len(records), "train_loss": train_loss, "val_loss": total.loss,
            "val_auc": total.auc, "val_accuracy": total.accuracy,
            "val_balanced_accuracy": total.balanced_accuracy,
            "val_threshold": threshold, "val_balanced_accuracy_calibrated": calibrated,
            "epsilon": dict(sorted(self.epsilon.items())),
            # the pooled score histograms (already the server's): ROC and calibration plots
            "val_hist_pos": total.hist_pos, "val_hist_neg": total.hist_neg,
            # seconds since this server process started the run: the rounds' pace
            "elapsed_s": round(time.perf_counter() - self.started, 3),
        }
        if self.run is not None:
            self.run.append_metrics(records + [summary])
        self.history.append(summary)
        eps_text = " ".join(f"{s}={e:.2f}" for s, e in sorted(self.epsilon.items()))
        loss = f" | train loss {train_loss:.4f}" if losses else ""
        log.info("round %d | sites trained %d/%d%s | val AUC %.3f | acc %.3f | eps %s",
                 server_round, len(fit["trained"]), len(records), loss, total.auc,
                 total.accuracy, eps_text if self.cfg.dp else "(no DP)")
        return summary

    def _note_features(self, site: str, features: Any) -> None:
        if not isinstance(features, str) or not features or len(features) > 500:
            return
        if site not in self.features:
            others = {f for s, f in self.features.items() if s != site}
            if others and features not in others:
                log.warning("%s made its features otherwise than the other sites (%s, "
                            "against %s): a model trained on both fits neither well; "
                            "prepare every site's slides with the same settings", site,
                            features, sorted(others)[0])
        self.features[site] = features

    def release(self) -> tuple[Path, str] | None:
        """Write ``model.npz`` (the last global model and its card, sealed like the
        checkpoints); ``(path, sha256)``, or None without a run folder or a model."""
        if self.run is None or not self.models or not self.history:
            return None
        from collections import Counter

        from common.release import RELEASE, card_for_round, release_bytes
        from common.site import model_kind, model_kwargs

        kwargs = model_kwargs(self.cfg) if model_kind(self.cfg) != "patches" else {}
        last = self.history[-1]
        made = Counter(self.features.values()).most_common(1)
        card = card_for_round(
            self.cfg, model_kind(self.cfg), int(kwargs.get("in_dim", 0)),
            int(kwargs.get("children", 0)), made[0][0] if made else "unknown",
            float(last.get("val_threshold") or 0.0), self.last_round,
            last.get("val_auc") if _finite(last.get("val_auc")) else None)
        data = release_bytes(self.names, self.global_weights, card)
        return self.run.save_release(RELEASE, data), hashlib.sha256(data).hexdigest()

    # ---- the end ------------------------------------------------------------------------
    def finish(self, done_before: int = 0, error: str | None = None,
               **extra: Any) -> dict[str, Any]:
        """The run's summary: signed into the ledger's run-end record, written to
        ``summary.json``; ``done_before`` rounds with a model came before (a resumed run)."""
        last = self.history[-1] if self.history else {}
        models = done_before + self.models
        cfg = self.cfg
        latest = self.run.latest_checkpoint() if self.run is not None else None
        try:
            released = self.release()
        except (PathFedError, OSError, ValueError) as err:  # the run's records come first
            log.warning("no released model.npz: %s", err)
            released = None
        recent = [h["val_auc"] for h in self.history[-LAST_K:]
                  if _finite(h.get("val_auc"))]
        summary = json_safe({
            "rounds": len(self.history), "rounds_planned": cfg.rounds,
            "rounds_with_model": models,
            "auc": last.get("val_auc"), "accuracy": last.get("val_accuracy"),
            "balanced_accuracy": last.get("val_balanced_accuracy"),
            # the headline, steadier than one round: mean and spread of the last rounds
            f"auc_last{LAST_K}_mean": float(np.mean(recent)) if recent else None,
            f"auc_last{LAST_K}_sd": float(np.std(recent)) if recent else None,
            "threshold": last.get("val_threshold"),
            "balanced_accuracy_calibrated": last.get("val_balanced_accuracy_calibrated"),
            "val_loss": last.get("val_loss"),
            "epsilon": dict(sorted(self.epsilon.items())), "delta": cfg.delta,
            "dp": cfg.dp, "secagg": self.secagg, "sites": cfg.sites, "model": cfg.model,
            "data": cfg.data or "synthetic", "seed": cfg.seed, "run_id": cfg.run_id,
            "exhausted_sites": self.exhausted,
            "wall_time_s": round(time.perf_counter() - self.started, 2),
            "checkpoint": str(latest[1].relative_to(self.run.path))
            if latest and self.run is not None else None,
            "checkpoints_encrypted": bool(self.run and self.run.checkpoint_key),
            "model_file": str(released[0].relative_to(self.run.path))
            if released and self.run is not None else None,
            "model_file_sha256": released[1] if released else None,
            "error": error, **extra,
        })
        if self.ledger is not None:
            self.ledger.end(rounds=models, last_round=self.last_round,
                            global_weights=self.global_weights, summary=summary)
        if self.run is not None:
            self.run.write_json("summary.json", summary)
        if not models:
            log.error("no round produced a global model; see the warnings above")
        return dict(summary)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(
        float(value))


__all__ = ["FederationAborted", "RoundBook", "weighted_mean"]
