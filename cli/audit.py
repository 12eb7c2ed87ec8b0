"""``pathfed audit RUN_DIR``: verify a run's privacy ledger and recompute every epsilon.

Prints one table row per site (rounds trained, claimed epsilon, RDP and PRV recomputed,
budget, verdict) and the problems, and writes a self-contained HTML report (plots embedded
as PNG). ``--attack`` adds an empirical membership-inference audit
(:mod:`common.attacks`). Exit 0 when everything verifies, 1 with the reasons otherwise,
2 for bad input (no run folder, no ledger, bad keys folder).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from common.errors import DataError, PathFedError

log = logging.getLogger(__name__)


def add_parser(sub: Any) -> None:
    """Register ``audit`` on the ``pathfed`` sub-command parser ``sub``."""
    p = sub.add_parser(
        "audit",
        help="verify a run's privacy ledger and recompute every site's epsilon",
        description="Verify RUN_DIR/ledger.jsonl (signatures, hash chain), recompute each "
        "site's epsilon from its signed schedule with Opacus' RDP and PRV accountants, check "
        "budgets and what left each site. Exit 0 when everything verifies, 1 otherwise.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder holding ledger.jsonl")
    p.add_argument("--report", metavar="FILE.html",
                   help="HTML report to write (default RUN_DIR/audit.html)")
    p.add_argument("--keys", metavar="DIR",
                   help="trusted public keys, NAME.pub.pem for the server and every site "
                   "(default: trust the keys in the ledger's run-start record)")
    p.add_argument("--attack", action="store_true",
                   help="also run an empirical membership-inference audit (loss threshold "
                   "and LiRA) on a small federation with the run's configuration")
    p.add_argument("--attack-models", type=int, default=16, metavar="N",
                   help="models trained for the attack (target and shadows; default 16)")
    p.add_argument("--attack-canaries", type=int, default=32, metavar="K",
                   help="canary slides (half inserted per model; default 32)")
    p.add_argument("--attack-bags", type=int, default=0, metavar="B",
                   help="synthetic bags per site in the attack federation (default: the "
                   "run's synthetic-bags)")
    p.add_argument("--json", metavar="FILE", help="also write the findings as JSON")
    p.set_defaults(func=_cmd_audit)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _cmd_audit(args: argparse.Namespace) -> int:
    from common.crypto.signing import load_public_keys
    from common.errors import ConfigError, DataError
    from common.ledger import LEDGER_FILE

    run_dir = Path(args.run_dir)
    # Bad input fails before the heavy imports (torch, Opacus).
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: run folder not found")
    if not (run_dir / LEDGER_FILE).is_file():
        found = "" if not (run_dir / "summary.json").is_file() else (
            " (it has a summary.json: a run by a PathFed version older than 0.1, whose "
            "`flwr run` kept no ledger; runs now always keep one)")
        raise DataError(f"{run_dir / LEDGER_FILE}: no privacy ledger in this run folder"
                        f"{found}; give the RUN_DIR of a `pathfed simulate`, `pathfed run` or "
                        "`flwr run` run (the folder holding ledger.jsonl)")
    trusted = load_public_keys(args.keys) if args.keys else None
    if args.attack and (args.attack_models < 4 or args.attack_canaries < 4):
        raise ConfigError("--attack-models and --attack-canaries: need 4 at least")
    from common.audit import audit_run

    report = audit_run(run_dir, trusted)
    attack = None
    if args.attack:
        from common.attacks import AttackSettings, membership_audit
        from common.config import FederationConfig

        if not report.config:
            raise DataError(f"{run_dir}: the ledger has no configuration to attack")
        cfg = FederationConfig.from_mapping(report.config, f"{run_dir} configuration")
        settings = AttackSettings(models=args.attack_models, canaries=args.attack_canaries,
                                  bags_per_site=args.attack_bags or None)
        claimed = max((s.claimed for s in report.sites if s.claimed is not None),
                      default=None)
        attack = membership_audit(cfg, settings, run_claimed_epsilon=claimed)
    _print(report, attack)
    target = Path(args.report) if args.report else run_dir / "audit.html"
    from common.runs import atomic_write

    atomic_write(target, render_html(report, attack).encode("utf-8"), mode=0o644)  # shared
    print(f"report: {target}")
    if args.json:
        data = report.to_dict() | ({"attack": attack.to_dict()} if attack else {})
        atomic_write(Path(args.json), (json.dumps(data, indent=2) + "\n").encode(), mode=0o644)
    ok = report.ok and (attack is None or attack.ok)
    return 0 if ok else 1


def _print(report: Any, attack: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, width=120)
    table = Table(title=f"Privacy audit of {report.run_dir}")
    for col in ("site", "rounds trained", "unit", "claimed eps", "RDP recomputed",
                "PRV recomputed", "budget", "delta", "verdict"):
        table.add_column(col, justify="left" if col in ("site", "unit", "verdict") else "right")
    for s in report.sites:
        style = {"ok": "green", "FAIL": "bold red"}.get(s.verdict, "yellow")
        table.add_row(s.site, str(len(s.rounds_trained)), s.unit_label,
                      _fmt(s.claimed), _fmt(s.rdp), _fmt(s.prv), _fmt(s.budget, 2),
                      _fmt(s.delta, 8).rstrip("0") if s.delta else "-",
                      f"[{style}]{s.verdict}[/]")
    console.print(table)
    keys = "pinned to --keys" if report.ledger.keys_pinned else "as presented in the ledger"
    console.print(f"ledger: {len(report.ledger.links)} lines, "
                  f"{'verified' if report.ledger.ok else 'PROBLEMS'}; keys {keys}",
                  markup=False)
    if attack is not None:
        console.print(attack.summary(), markup=False)
    for text in report.warnings:
        console.print(f"warning: {text}", style="yellow", markup=False)
    problems = report.all_problems + (attack.problems if attack is not None else [])
    for text in problems:
        console.print(f"problem: {text}", style="red", markup=False)
    verdict = "everything verifies" if not problems else f"{len(problems)} problem(s)"
    console.print(f"audit: {verdict}", style="green" if not problems else "bold red",
                  markup=False)


# ---- HTML report --------------------------------------------------------------------
def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _plots(report: Any) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out: list[tuple[str, str]] = []
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for s in report.sites:
        if not s.curve:
            continue
        rounds = [p["round"] for p in s.curve]
        line, = ax.plot(rounds, [p["rdp"] for p in s.curve], marker="o", label=f"{s.site} (RDP)")
        claimed = [p["claimed"] if p["claimed"] is not None else math.nan for p in s.curve]
        ax.plot(rounds, claimed, "x", color=line.get_color(), markersize=9,
                label=f"{s.site} claimed")
        if s.budget is not None:
            ax.axhline(s.budget, color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set(xlabel="round", ylabel="cumulative epsilon",
           title="Epsilon per site (dashed: budget)")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if ax.lines:
        ax.legend(fontsize=7)
    out.append(("Epsilon per site and round", _png(fig)))

    metrics_path = report.run_dir / "metrics.jsonl"
    if metrics_path.is_file():
        from common.runs import read_metrics

        glob = [r for r in read_metrics(report.run_dir) if r.get("site") == "global"]
        if glob:
            fig, ax = plt.subplots(figsize=(6.5, 3.5))
            rounds = [r["round"] for r in glob]
            ax.plot(rounds, [r.get("train_loss") if r.get("train_loss") is not None else math.nan
                             for r in glob], marker="o", label="train loss")
            ax.set(xlabel="round", ylabel="train loss")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax2 = ax.twinx()
            ax2.plot(rounds, [r.get("val_auc") if r.get("val_auc") is not None else math.nan
                              for r in glob], marker="s", color="tab:green", label="val AUC")
            ax2.set(ylabel="pooled validation AUC", ylim=(0, 1))
            ax.set_title("Training loss and validation AUC (metrics.jsonl)")
            fig.legend(loc="lower left", fontsize=7)
            out.append(("Loss and AUC per round", _png(fig)))
        last = next((r for r in reversed(glob) if r.get("val_hist_pos")), None)
        if last is not None:
            out.append((f"Validation ROC and calibration (round {last['round']}, pooled "
                        "over the sites)", _png(_roc_calibration(last))))
    if report.rounds:
        names = sorted({s.site for s in report.sites}
                       | {n for r in report.rounds for n in r.get("participants", [])}
                       | {n for r in report.rounds for n in r.get("dropouts", {})})
        rounds = [r["round"] for r in report.rounds]
        grid = [[1.0 if n in r.get("participants", []) else
                 (0.5 if n in r.get("dropouts", {}) else 0.0) for r in report.rounds]
                for n in names]
        fig, ax = plt.subplots(figsize=(6.5, 0.5 + 0.35 * len(names)))
        ax.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1,
                  extent=(min(rounds) - 0.5, max(rounds) + 0.5, len(names) - 0.5, -0.5))
        ax.set_yticks(range(len(names)), names)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for x in rounds[:-1]:
            ax.axvline(x + 0.5, color="white", linewidth=1)
        ax.set(xlabel="round", title="Participation (dark: aggregated, light: dropped out)")
        out.append(("Participation per round", _png(fig)))
    return out


def _roc_calibration(record: dict[str, Any]) -> Any:
    import matplotlib.pyplot as plt

    from common.metrics import (
        auc_from_histograms,
        calibration_from_histograms,
        ece_from_histograms,
        roc_from_histograms,
    )

    pos, neg = record["val_hist_pos"], record["val_hist_neg"]
    fig, (roc, cal) = plt.subplots(1, 2, figsize=(8, 3.6))
    fpr, tpr = roc_from_histograms(pos, neg)
    roc.plot(fpr, tpr, drawstyle="steps-post", label=f"AUC {auc_from_histograms(pos, neg):.3f}")
    roc.plot([0, 1], [0, 1], ":", color="grey")
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC",
            xlim=(0, 1), ylim=(0, 1.01))
    roc.legend(loc="lower right", fontsize=8)
    mean_p, frac, n = calibration_from_histograms(pos, neg)
    cal.plot([0, 1], [0, 1], ":", color="grey", label="perfect")
    cal.plot(mean_p, frac, marker="o", label="model")
    for x, y, k in zip(mean_p, frac, n):
        cal.annotate(f"{int(k)}", (x, y), fontsize=6, xytext=(3, -8), textcoords="offset points")
    cal.set(xlabel="predicted probability", ylabel="fraction positive",
            title=f"Calibration (slides per bin; ECE {ece_from_histograms(pos, neg):.3f}, "
            "15 bins)", xlim=(0, 1), ylim=(0, 1.01))
    cal.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def validation_heatmaps(run_dir: Path, config: dict[str, Any], n: int = 3
                        ) -> list[tuple[str, str]]:
    """Heatmaps of the released model on a few of site-0's validation slides, when the
    run's data (prepared slides or labelled images) is at hand (a simulation); none
    otherwise."""
    import tempfile

    from common.config import FederationConfig
    from common.data.sources import detect_source, load_site
    from common.predict import predict

    cfg = FederationConfig.from_mapping(config, f"{run_dir} configuration")
    try:
        source = detect_source(cfg.data)
    except DataError:
        return []
    if source.kind not in ("features", "images") or not (run_dir / "model.npz").is_file():
        return []
    names = load_site(0, cfg.sites, cfg.data, cfg.seed, cfg.val_fraction).val.names[:n]
    quiet = logging.getLogger("common.predict")
    level = quiet.level
    quiet.setLevel(logging.WARNING)  # the report, not a line per slide
    with tempfile.TemporaryDirectory() as tmp:
        try:
            summary = predict(cfg.data, run_dir, tmp, progress=False, only=frozenset(names))
        finally:
            quiet.setLevel(level)
        out = []
        for row in summary.rows:
            png = Path(tmp) / "heatmaps" / f"{Path(row.slide).stem}.png"
            if row.status == "done" and png.is_file():
                out.append((f"Validation slide {row.slide} (site-0): p = {row.probability:.3f}",
                            base64.b64encode(png.read_bytes()).decode("ascii")))
        return out


def render_html(report: Any, attack: Any = None) -> str:
    """The audit as one self-contained HTML page (inline CSS, plots as base64 PNG)."""
    e = html.escape
    problems = report.all_problems + (attack.problems if attack is not None else [])
    ok = not problems
    rows = "".join(
        f"<tr><td>{e(s.site)}</td><td>{len(s.rounds_trained)}</td>"
        f"<td>{e(s.unit_label)}</td><td>{_fmt(s.claimed)}</td><td>{_fmt(s.rdp)}</td>"
        f"<td>{_fmt(s.prv)}</td><td>{_fmt(s.budget, 2)}</td><td>{e(_fmt(s.delta, 8))}</td>"
        f"<td class='{'ok' if s.verdict == 'ok' else 'bad'}'>{e(s.verdict)}</td></tr>"
        for s in report.sites)

    def items(title: str, texts: list[str], cls: str) -> str:
        if not texts:
            return ""
        lis = "".join(f"<li>{e(t)}</li>" for t in texts)
        return f"<h2>{e(title)}</h2><ul class='{cls}'>{lis}</ul>"

    notes = report.notes + report.ledger.notes + [f"{s.site}: {n}" for s in report.sites
                                                  for n in s.notes]
    attack_html = ""
    if attack is not None:
        arows = "".join(
            f"<tr><td>{e(r.name)}</td><td>{r.auc:.3f}</td>"
            + "".join(f"<td>{_fmt(r.tpr_at_fpr.get(f))}</td>" for f in attack.fpr_levels)
            + f"<td>{_fmt(r.epsilon_lower_bound, 3)}</td></tr>" for r in attack.results)
        heads = "".join(f"<th>TPR at FPR {f:g}</th>" for f in attack.fpr_levels)
        attack_html = (
            "<h2>Empirical membership-inference audit</h2>"
            f"<p>{e(attack.description)}</p><table><tr><th>attack</th><th>AUC</th>{heads}"
            f"<th>empirical epsilon lower bound ({attack.confidence:.0%})</th></tr>{arows}"
            f"</table><p>{e(attack.summary())}</p>")
    figures = _plots(report)
    if report.config:
        try:
            figures += validation_heatmaps(report.run_dir, report.config)
        except (PathFedError, OSError, ValueError) as err:  # the audit stands without them
            notes = notes + [f"no validation heatmaps: {err}"]
    plots = "".join(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,"
                    f"{png}'>" for title, png in figures)
    keys = ("pinned to the auditor's trusted keys" if report.ledger.keys_pinned
            else "as presented in the ledger's run-start record (not pinned)")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>PathFed privacy audit</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.ok {{ color: #17752a; font-weight: bold; }} .bad {{ color: #b00020; font-weight: bold; }}
ul.bad li {{ color: #b00020; }} ul.warn li {{ color: #8a6100; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>PathFed privacy audit</h1>
<p>Run folder: <code>{e(str(report.run_dir))}</code><br>
Ledger: {len(report.ledger.links)} lines, keys {e(keys)}.<br>
Verdict: <span class="{'ok' if ok else 'bad'}">{'everything verifies' if ok else
                                                 f'{len(problems)} problem(s)'}</span></p>
<table><tr><th>site</th><th>rounds trained</th><th>unit</th><th>claimed epsilon</th>
<th>RDP recomputed</th><th>PRV recomputed</th><th>budget</th><th>delta</th><th>verdict</th></tr>
{rows}</table>
{items("Problems", problems, "bad")}
{items("Warnings", report.warnings, "warn")}
{items("Notes", notes, "note")}
{attack_html}
{plots}
</body></html>
"""


__all__ = ["add_parser", "render_html"]
