"""Independent audit of a run folder: the ledger, every site's epsilon, every budget.

:func:`audit_run` trusts nothing a site or the server *says* about privacy: it verifies
the ledger's signatures and chain (:func:`common.ledger.verify_ledger`), then recomputes
each site's cumulative epsilon from the schedule the site signed, round by round
(noise multiplier, sampling rate, steps), with a fresh Opacus RDP accountant (orders
:data:`common.privacy.RDP_ALPHAS`) and a fresh PRV accountant, and compares:

* the claimed epsilon with the recomputation by the site's own accountant (relative
  tolerance ``1e-6`` for RDP, ``prv_tolerance`` absolute for PRV, whose numerical
  composition has an error bound of its own);
* every claimed and recomputed epsilon with the site's budget (above it: failure);
* PRV with RDP: PRV is the tighter accountant, so PRV above RDP + ``prv_tolerance`` is
  reported as a note (a numerical artefact or a misconfigured PRV), not a failure;
* what left the site: only a SecAgg+-masked update and scalar metrics. An unmasked update
  is a failure when the run's configuration promised SecAgg+, and a warning otherwise (DP
  still bounds the update, but the server saw it alone);
* that each site trained from the global model the server recorded, that every
  participant the server aggregated signed a record, and that ``config.json`` is the
  configuration the ledger started with.

The report is ``ok`` only when every check passes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from common.errors import DataError
from common.ledger import LEDGER_FILE, LedgerReport, config_hash, verify_ledger
from common.privacy import (
    SUBSTITUTION,
    history_epsilon,
    independent_epsilon,
    opacus_rdp_epsilon,
    within_budget,
)

log = logging.getLogger(__name__)

RDP_REL_TOLERANCE = 1e-6
PRV_TOLERANCE = 0.02
"""Absolute epsilon tolerance of PRV comparisons (Opacus' PRV ``eps_error`` is 0.01)."""
SCALAR_TYPES = {"int", "float", "bool", "str"}


@dataclass
class SiteAudit:
    """The audit of one site."""

    site: str
    rounds_trained: list[int] = field(default_factory=list)
    dp: bool = True
    accountant: str | None = None
    privacy_unit: str | None = None
    dp_mode: str = "local"
    """``local`` (DP-SGD at the site) or ``distributed`` (Skellam shares summed by SecAgg+;
    its RDP is then the Skellam bound's)."""
    claimed: float | None = None
    rdp: float | None = None
    prv: float | None = None
    budget: float | None = None
    delta: float | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    """Per trained round: ``round``, ``claimed`` and ``rdp`` cumulative epsilon."""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def unit_label(self) -> str:
        """The privacy unit, and the DP mode when it is distributed."""
        unit = self.privacy_unit or "-"
        return f"{unit}, distributed" if self.dp_mode == "distributed" else unit

    @property
    def verdict(self) -> str:
        if self.problems:
            return "FAIL"
        if not self.dp:
            return "no DP"
        return "ok"


@dataclass
class AuditReport:
    """What :func:`audit_run` found; ``ok`` only when everything verifies."""

    run_dir: Path
    ledger: LedgerReport
    sites: list[SiteAudit] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    """The server-round records, in round order."""
    config: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    """Run-level problems (ledger, configuration, server records)."""
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def all_problems(self) -> list[str]:
        return self.problems + [f"{s.site}: {p}" for s in self.sites for p in s.problems]

    @property
    def ok(self) -> bool:
        return not self.all_problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir), "ok": self.ok, "problems": self.all_problems,
            "warnings": self.warnings, "notes": self.notes + self.ledger.notes
            + [f"{s.site}: {n}" for s in self.sites for n in s.notes],
            "keys_pinned": self.ledger.keys_pinned,
            "sites": [asdict(s) | {"verdict": s.verdict} for s in self.sites],
            "rounds": self.rounds,
        }


def _close(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def _against_config(name: str, records: list[dict[str, Any]], audit: SiteAudit,
                    report: AuditReport) -> None:
    """The budget, delta and rounds the run was configured with, not the site's claims."""
    config = report.config
    if not config:
        return
    from common.config import parse_site_values

    try:
        budget: float | None = float(cast(Any, parse_site_values(
            str(config.get("site-epsilon", ""))).get(name, config.get("epsilon"))))
    except (TypeError, ValueError):
        budget = None
    if budget is not None and audit.budget is not None and not _close(
            float(audit.budget), budget, 1e-12):
        audit.problems.append(f"claims a budget of {audit.budget:g}; the run's configuration "
                              f"gives it {budget:g}")
    if budget is not None:
        audit.budget = budget
    delta = config.get("delta")
    if isinstance(delta, (int, float)) and audit.delta is not None and not _close(
            float(audit.delta), float(delta), 1e-12):
        audit.problems.append(f"claims delta {audit.delta:g}; the run's configuration has "
                              f"{float(delta):g}")
    rounds = config.get("rounds")
    late = [r.get("round") for r in records if isinstance(rounds, int)
            and isinstance(r.get("round"), int) and not 1 <= r["round"] <= rounds]
    if late:
        audit.problems.append(f"records for round(s) {late} outside the {rounds} configured")
    seeded = sorted({str(r.get("noise")) for r in records
                     if str(r.get("noise") or "").startswith("seeded")})
    if seeded:
        report.warnings.append(f"{name}: DP noise was {seeded[0]}: anyone who knows the seed "
                               "can remove it; a deployment must draw noise from a CSPRNG")


def _check_shares(server_rounds: list[dict[str, Any]], report: AuditReport) -> None:
    """Summarise each round's SecAgg+ share settings; flag thresholds that are no majority."""
    settings: dict[tuple[int, int, int, int], list[int]] = {}
    for rec in server_rounds:
        shares = rec.get("secagg_shares")
        if not isinstance(shares, dict):
            continue
        try:
            key = (int(shares["sites"]), int(shares["shares"]), int(shares["threshold"]),
                   int(shares["tolerated_dropouts"]))
        except (KeyError, TypeError, ValueError):
            report.problems.append(f"round {rec.get('round')}: malformed secagg_shares {shares}")
            continue
        settings.setdefault(key, []).append(int(rec.get("round", 0)))
        if 2 * key[2] <= key[1]:
            report.warnings.append(
                f"round {rec.get('round')}: SecAgg+ threshold {key[2]} of {key[1]} shares is "
                "no majority: a server that lies about who dropped out can rebuild both "
                "secrets of a site, and so its update")
    for (sites, k, t, tolerated), rounds in sorted(settings.items(), key=lambda kv: kv[1]):
        report.notes.append(
            f"SecAgg+ in round(s) {_ranges(rounds)}: {sites} sites, each site's keys shared "
            f"among {k} (itself included), {t} rebuild one; any {tolerated} could drop out")


def _ranges(rounds: list[int]) -> str:
    """``1-3, 5`` for [1, 2, 3, 5]."""
    out: list[str] = []
    for r in sorted(rounds):
        if out and r == int(out[-1].split("-")[-1]) + 1:
            out[-1] = f"{out[-1].split('-')[0]}-{r}"
        else:
            out.append(str(r))
    return ", ".join(out)


def _check_end(run_dir: Path, report: AuditReport, server_rounds: list[dict[str, Any]]) -> None:
    """The run-end record against ``summary.json``, and every checkpoint's hash."""
    from common.runs import sha256_file

    for rec in server_rounds:
        name = rec.get("checkpoint")
        if not name:
            continue
        path = run_dir / str(name)
        if not path.is_file():
            report.problems.append(f"round {rec.get('round')}: checkpoint {name} is missing")
        elif sha256_file(path) != rec.get("checkpoint_sha256"):
            report.problems.append(f"round {rec.get('round')}: {name} is not the checkpoint "
                                   "the server recorded (replaced or altered)")
    ends = report.ledger.records("run-end")
    if not ends:
        return  # verify_ledger reports the run as incomplete
    end = ends[-1]["record"]
    with_model = [r for r in server_rounds if r.get("aggregate") is not None]
    if end.get("rounds") != len(with_model):
        report.problems.append(f"run-end counts {end.get('rounds')} rounds with a model; the "
                               f"ledger records {len(with_model)}")
    if server_rounds and end.get("global_model") != server_rounds[-1].get("global_model"):
        report.problems.append("run-end names a final model that is not the last round's")
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        report.problems.append(f"{summary_file}: missing; the run-end record names one")
        return
    try:
        summary = json.loads(summary_file.read_text())
    except ValueError:
        report.problems.append(f"{summary_file}: not valid JSON")
        return
    if config_hash(summary) != end.get("summary_hash"):
        report.problems.append(f"{summary_file}: differs from the summary the server signed "
                               "at the end of the run (edited after the run?)")
    _check_release(run_dir, summary, end, report)
    claimed = summary.get("epsilon") if isinstance(summary.get("epsilon"), dict) else {}
    for site in report.sites:
        value = claimed.get(site.site)
        if site.rdp is not None and isinstance(value, (int, float)) and value + 1e-9 < (
                site.rdp if site.accountant != "prv" else (site.prv or 0.0)) * (1 - 1e-6):
            report.problems.append(f"{summary_file}: reports epsilon {value:.4g} for "
                                   f"{site.site}; its ledger gives {site.rdp:.4g}")


def _check_release(run_dir: Path, summary: dict[str, Any], end: dict[str, Any],
                   report: AuditReport) -> None:
    """The released ``model.npz``: the bytes the signed summary names, holding the final
    global model the ledger's run-end record names."""
    import hashlib
    import io

    import numpy as np

    from common.crypto.sealed import SUFFIX
    from common.ledger import hash_arrays
    from common.release import split_card

    name = summary.get("model_file")
    if not name:
        return
    path = run_dir / str(name)
    if not path.is_file():
        report.problems.append(f"{path}: the released model the summary names is missing")
        return
    if path.name.endswith(SUFFIX):
        report.notes.append(f"{path.name} is sealed: its hash and weights are checkable "
                            "after `pathfed checkpoint decrypt`")
        return
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != summary.get("model_file_sha256"):
        report.problems.append(f"{path}: not the released model the server signed "
                               "(replaced or altered after the run)")
        return
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        weights, _ = split_card({k: z[k] for k in z.files}, str(path))
    if hash_arrays(list(weights.values())) != end.get("global_model"):
        report.problems.append(f"{path}: its weights are not the final global model the "
                               "ledger records")


def _distributed_entry(rec: dict[str, Any], entry: tuple[float, ...], config: dict[str, Any],
                       audit: SiteAudit) -> tuple[float, ...] | None:
    """A distributed-DP round's Skellam entry, its sensitivities recomputed from the run's
    configuration and the model's trainable coordinates (None, with the problem, when the
    record does not hold up)."""
    from common.privacy.distributed import integer_sensitivity

    rnd = rec.get("round")
    try:
        dim = int(rec["dim"])
        l2, l1 = float(rec["l2_sensitivity"]), float(rec["l1_sensitivity"])
        sites, share = int(rec["noise_sites"]), float(rec["share_variance"])
    except (KeyError, TypeError, ValueError):
        audit.problems.append(f"round {rnd}: a distributed-DP record without its noise "
                              "(dim, sensitivities, noise_sites, share_variance)")
        return None
    if entry[1] != 1.0 or entry[2] != 1:
        audit.problems.append(f"round {rnd}: distributed DP takes one full-batch step per "
                              f"round; the record has rate {entry[1]:g}, {entry[2]} steps")
        return None
    coordinates = int(rec.get("bytes_sent") or 0) // 8  # float64 values under SecAgg+
    if not 0 < dim <= coordinates:
        audit.problems.append(f"round {rnd}: trains {dim} coordinates, sends {coordinates}")
        return None
    if config:
        from common.checks import update_bound
        from common.config import FederationConfig

        try:
            cfg = FederationConfig.from_mapping(config, "config.json")
        except Exception as err:  # noqa: BLE001 (a config the audit cannot rebuild)
            audit.problems.append(f"the run's configuration does not validate ({err})")
            return None
        need_l2, need_l1 = integer_sensitivity(
            dim, lr=cfg.lr, max_grad_norm=cfg.max_grad_norm,
            max_weight=float(cfg.secagg_max_weight),
            quantization_range=cfg.secagg_quantization_range,
            clipping_range=update_bound(cfg))
        if l2 < need_l2 * (1 - 1e-12) or l1 < need_l1 * (1 - 1e-12):
            audit.problems.append(f"round {rnd}: sensitivities {l2:.6g} (L2), {l1:.6g} (L1) "
                                  f"are below the {need_l2:.6g}, {need_l1:.6g} its settings give")
            return None
    if sites < 2:
        audit.problems.append(f"round {rnd}: shares sized for a sum of {sites} site(s)")
        return None
    if share * sites < (entry[0] * l2) ** 2 * (1 - 1e-9):
        audit.problems.append(
            f"round {rnd}: {sites} shares of variance {share:.6g} sum to less than the "
            f"{(entry[0] * l2) ** 2:.6g} its noise multiplier {entry[0]:g} needs")
        return None
    return (entry[0], 1.0, 1, l2, l1)


def _audit_site(name: str, entries: list[dict[str, Any]], report: AuditReport,
                globals_before: dict[int, str], participants: dict[int, set[str]]) -> SiteAudit:
    audit = SiteAudit(site=name)
    records = sorted((e["record"] for e in entries), key=lambda r: r.get("round", 0))
    rounds = [r.get("round") for r in records]
    if len(set(rounds)) != len(rounds):
        audit.problems.append(f"more than one record for round(s) "
                              f"{sorted({r for r in rounds if rounds.count(r) > 1})}")
    audit.rounds_trained = [int(r) for r in rounds if isinstance(r, int)]
    last = records[-1]
    audit.dp = bool(last.get("dp"))
    audit.accountant = last.get("accountant")
    audit.privacy_unit = last.get("privacy_unit")
    audit.budget, audit.delta = last.get("epsilon_budget"), last.get("delta")
    _against_config(name, records, audit, report)
    secagg_promised = bool(report.config.get("secagg", True))
    unmasked: list[Any] = []
    for rec in records:
        rnd = rec.get("round")
        sent = rec.get("sent") or {}
        if sent.get("update") != "secagg+-masked":
            unmasked.append(rnd)
            if secagg_promised:
                audit.problems.append(
                    f"round {rnd}: update left the site as {sent.get('update')!r}, not "
                    "SecAgg+-masked, although the run's configuration promised SecAgg+")
        bad = {k: t for k, t in (sent.get("metrics") or {}).items() if t not in SCALAR_TYPES}
        if bad:
            audit.problems.append(f"round {rnd}: non-scalar metrics left the site: {bad}")
        expected = globals_before.get(rnd) if isinstance(rnd, int) else None
        if expected is not None and rec.get("received_model") != expected:
            audit.problems.append(f"round {rnd}: trained from a model that is not the global "
                                  "model the server recorded before this round")
        if isinstance(rnd, int) and rnd in participants and name not in participants[rnd]:
            audit.notes.append(f"round {rnd}: trained (and spent privacy) but the server did "
                               "not aggregate its update")
        for key in ("delta", "epsilon_budget", "accountant", "privacy_unit"):
            if rec.get(key) != last.get(key):
                audit.problems.append(f"round {rnd}: {key} {rec.get(key)!r} differs from the "
                                      f"last round's {last.get(key)!r}")
    if unmasked and not secagg_promised:
        report.warnings.append(
            f"{name}: updates of round(s) {', '.join(map(str, unmasked))} left the site "
            "unmasked (secagg = false: DP bounds each update, but the server saw it alone)")
    if not audit.dp:
        audit.problems.append("trained without differential privacy: there is no epsilon to "
                              "verify (run with dp = true)")
        return audit
    history: list[tuple[float, ...]] = []
    distributed = any(rec.get("dp_mode") == "distributed" for rec in records)
    audit.dp_mode = "distributed" if distributed else "local"
    for rec in records:
        try:
            entry: tuple[float, ...] = (float(rec["noise_multiplier"]),
                                        float(rec["sample_rate"]), int(rec["steps"]))
        except (KeyError, TypeError, ValueError):
            audit.problems.append(f"round {rec.get('round')}: no complete DP schedule "
                                  "(noise_multiplier, sample_rate, steps)")
            return audit
        if not (entry[0] > 0 and 0 < entry[1] <= 1 and entry[2] >= 0):
            audit.problems.append(f"round {rec.get('round')}: impossible DP schedule {entry}")
            return audit
        if distributed:
            skellam = _distributed_entry(rec, entry, report.config, audit)
            if skellam is None:
                return audit
            entry = skellam
        elif rec.get("adjacency") == "substitution":
            entry = (*entry, SUBSTITUTION)
        elif report.config.get("mixpatch") is True:
            audit.problems.append(
                f"round {rec.get('round')}: the run mixes slides (mixpatch), but the record "
                "accounts its steps as one slide's addition or removal, not as the "
                "substitution of a mixing group")
            return audit
        history.append(entry)
        claimed = rec.get("epsilon")
        point = {"round": rec.get("round"), "claimed": claimed,
                 "rdp": history_epsilon(history, float(audit.delta or 0))}
        if audit.accountant == "prv" and not distributed and len(entry) == 3:
            try:
                point["prv"] = history_epsilon(history, float(audit.delta or 0), "prv")
            except (ValueError, RuntimeError):
                pass  # reported with the final PRV value below
        audit.curve.append(point)
    delta = float(audit.delta or 0.0)
    n = int(last.get("n_samples") or 0)
    if not 0 < delta < 1:
        audit.problems.append(f"delta {audit.delta!r} is not in (0, 1)")
        return audit
    if n and delta >= 1.0 / n:
        audit.problems.append(f"delta {delta:g} is not below 1/n = 1/{n}: the guarantee is void "
                              f"for a dataset of {n} {audit.privacy_unit}s")
    substitution = any(len(entry) == 4 for entry in history)
    if distributed:
        # the Skellam bound, composed in RDP (no PathFed cache); PRV has no Skellam form
        audit.rdp = history_epsilon(history, delta)
        audit.notes.append(f"distributed DP: {last.get('trust')}")
    elif substitution:
        # the weak triangle inequality over Opacus' RDP; PRV has no substitution form
        audit.rdp = history_epsilon(history, delta)
        audit.notes.append(f"DP samples are {last.get('dp_samples')}")
    else:
        # The final values come from fresh Opacus accountants (no PathFed cache in between).
        audit.rdp = opacus_rdp_epsilon(history, delta)
        try:
            audit.prv = independent_epsilon(history, delta, "prv")
        except (ValueError, RuntimeError) as err:  # PRV refuses some extreme schedules
            audit.notes.append(f"PRV accountant could not compose this schedule ({err})")
    audit.claimed = last.get("epsilon")
    mech = "rdp" if distributed or substitution else (audit.accountant or "rdp")
    recomputed = audit.rdp if mech == "rdp" else audit.prv
    for point in audit.curve:
        c = point["claimed"]
        if c is None:
            audit.problems.append(f"round {point['round']}: no claimed epsilon")
        elif mech == "rdp" and not _close(float(c), point["rdp"], RDP_REL_TOLERANCE):
            audit.problems.append(
                f"round {point['round']}: claimed epsilon {c:.6g} but its schedule gives "
                f"{point['rdp']:.6g} (RDP, relative tolerance {RDP_REL_TOLERANCE:g})")
        elif mech == "prv" and "prv" in point and abs(float(c) - point["prv"]) > PRV_TOLERANCE:
            audit.problems.append(
                f"round {point['round']}: claimed epsilon {c:.6g} but its schedule gives "
                f"{point['prv']:.6g} (PRV, tolerance {PRV_TOLERANCE:g})")
    if mech == "prv" and not all("prv" in p for p in audit.curve) and (
            audit.claimed is not None and audit.prv is not None
            and abs(float(audit.claimed) - audit.prv) > PRV_TOLERANCE):
        audit.problems.append(f"claimed epsilon {audit.claimed:.4g} but its schedule gives "
                              f"{audit.prv:.4g} (PRV, tolerance {PRV_TOLERANCE:g})")
    budget = audit.budget
    if budget is None:
        audit.problems.append("no epsilon budget recorded")
    else:
        for label, value in (("claimed", audit.claimed), (f"recomputed ({mech})", recomputed)):
            if value is not None and not within_budget(float(value), float(budget)):
                audit.problems.append(f"{label} epsilon {float(value):.4g} exceeds the budget "
                                      f"{float(budget):g}")
    if audit.prv is not None and audit.prv > audit.rdp + PRV_TOLERANCE:
        audit.notes.append(f"PRV {audit.prv:.4g} above RDP {audit.rdp:.4g}: PRV should be "
                           "tighter; informational")
    if audit.privacy_unit == "slide":
        audit.notes.append("privacy unit is the slide: a patient with k slides is protected at "
                           "about k x epsilon (group privacy)")
    return audit


def audit_run(run_dir: str | Path,
              trusted_keys: dict[str, str] | None = None) -> AuditReport:
    """Audit ``run_dir`` (its ``ledger.jsonl`` and ``config.json``); see the module doc.

    Args:
        run_dir: a run folder with ``ledger.jsonl``.
        trusted_keys: signer name -> public PEM of the consortium (``server`` and every
            site); None trusts the keys in the ledger's run-start record (and says so).

    Raise :class:`DataError` when the folder or its ledger is missing.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run folder not found")
    ledger_path = run_dir / LEDGER_FILE
    if not ledger_path.is_file():
        raise DataError(f"{ledger_path}: no privacy ledger in this run folder (runs made "
                        "before the ledger existed cannot be audited)")
    ledger = verify_ledger(ledger_path, trusted_keys)
    report = AuditReport(run_dir=run_dir, ledger=ledger)
    report.problems.extend(str(p) for p in ledger.problems)
    starts = ledger.records("run-start")
    if starts:
        start = starts[0]["record"]
        report.config = dict(start.get("config") or {})
        if config_hash(report.config) != start.get("config_hash"):
            report.problems.append("run-start: its config does not match its config_hash")
        config_file = run_dir / "config.json"
        if config_file.is_file():
            on_disk = json.loads(config_file.read_text())
            if config_hash(on_disk) != start.get("config_hash"):
                report.problems.append(f"{config_file}: differs from the configuration the "
                                       "ledger started with (edited after the run?)")
        else:
            report.notes.append(f"{config_file} not found; using the ledger's configuration")
    server_rounds = sorted((e["record"] for e in ledger.records("server-round")),
                           key=lambda r: r.get("round", 0))
    report.rounds = server_rounds
    # The global model each round started from: the initial model, then each round's result.
    globals_before: dict[int, str] = {}
    current = starts[0]["record"].get("initial_model") if starts else None
    last_round = 0
    for rec in server_rounds:
        rnd = int(rec.get("round", 0))
        for r in range(last_round + 1, rnd + 1):
            if current is not None:
                globals_before[r] = current
        current, last_round = rec.get("global_model"), rnd
        if rec.get("secure_aggregation") != bool(report.config.get("secagg", True)):
            report.problems.append(f"round {rnd}: secure aggregation "
                                   f"{'on' if rec.get('secure_aggregation') else 'off'}, but "
                                   f"the configuration says secagg = {report.config.get('secagg')}")
    _check_shares(server_rounds, report)
    participants = {int(r.get("round", 0)): set(r.get("participants") or [])
                    for r in server_rounds}
    by_site: dict[str, list[dict[str, Any]]] = {}
    for entry in ledger.records("site-round"):
        by_site.setdefault(str(entry["record"].get("site")), []).append(entry)
    signed_rounds = {(s, e["record"].get("round")) for s, es in by_site.items() for e in es}
    for rnd, names in participants.items():
        for name in sorted(names):
            if (name, rnd) not in signed_rounds:
                report.problems.append(f"round {rnd}: the server aggregated {name} but the "
                                       "ledger holds no signed record of it (unaccounted update)")
    for name in sorted(by_site):
        report.sites.append(_audit_site(name, by_site[name], report, globals_before,
                                        participants))
    presented = set((starts[0]["record"].get("keys") or {}) if starts else {}) - {
        starts[0]["record"].get("server") if starts else None}
    for name in sorted(presented - set(by_site)):
        report.sites.append(SiteAudit(site=name, dp=bool(report.config.get("dp", True)),
                                      notes=["never trained (no site-round record)"]))
    _check_end(run_dir, report, server_rounds)
    for site in report.sites:
        if site.rdp is not None:
            log.info("%s: claimed %s, RDP %.4f, PRV %s, budget %s -> %s", site.site,
                     site.claimed, site.rdp, site.prv, site.budget, site.verdict)
    return report


__all__ = ["AuditReport", "SiteAudit", "audit_run"]
