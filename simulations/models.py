"""The model zoo on UCSB under the paper table's protocol: one row per model and setting.

    python -m simulations.models --data ../shared/data/ucsb-breast --out results/models
        [--models all] [--rows central federated dp [dp-secagg]] [--epsilon 8]
        [--folds 10 --repeats 5]
    python -m simulations.models table --out results/models --results docs/RESULTS.md

Every bag model of the registry (kinds ``bags`` and ``multiscale``) is trained with the settings of
``configs/ucsb-paper.toml`` (only the model changes) on the same cross-validation folds
as ``simulations.paper``: centrally, federated over 5 hospitals, and federated with DP at
``--epsilon`` per hospital, through the one engine (``common.fedavg.run_inprocess``:
the product's reply checks, aggregation and records). Rows are kept per model in
``OUT/MODEL/ROW.json``; ``table`` writes the markdown table between the
``<!-- models-table:start/end -->`` markers of ``--results``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from common.config import FederationConfig, load_config_file
from simulations.paper import CONFIG, check_data, protocol_arguments, run_row

ROWS = ("central", "federated", "dp", "dp-secagg")
DEFAULT_ROWS = ROWS[:3]
"""``dp-secagg`` (the DP federation through Flower and SecAgg+) costs about 25 min per
model at 50 folds: asked for by name."""
START, END = "<!-- models-table:start -->", "<!-- models-table:end -->"


def _cell(summary: dict[str, Any], metric: str) -> str:
    mean, sd = summary[metric]
    return f"{mean:.3f} ± {sd:.3f}"


def table(out: Path, results_md: Path | None) -> str:
    """One line per model: accuracy and AUC of each row, folds x repeats, the best."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(out.glob("*/*.json")):
        summary = json.loads(path.read_text())
        rows.setdefault(path.parent.name, {})[summary["row"]] = summary
    dp_eps = {s["epsilon"] for r in rows.values() for s in r.values() if s["dp"]}
    eps = f" (eps {', '.join(f'{e:g}' for e in sorted(dp_eps))})" if dp_eps else ""
    lines = [f"| model | central AUC | federated AUC | federated + DP{eps} AUC | DP + SecAgg+ "
             "AUC | central acc | federated acc | federated + DP acc | folds x repeats |",
             "|---|---|---|---|---|---|---|---|---|"]
    def rank(model: str) -> tuple[int, float]:  # best DP row first; models without it last
        r = rows[model]
        return ("dp" not in r, -r["dp"]["auc"][0] if "dp" in r else 0.0)

    for model in sorted(rows, key=rank):
        r = rows[model]
        runs = {f"{s['folds']} x {s['repeats']}" for s in r.values()}
        cells = [(_cell(r[row], "auc") if row in r else "") for row in ROWS]
        cells += [(_cell(r[row], "accuracy") if row in r else "") for row in DEFAULT_ROWS]
        lines.append(f"| `{model}` | " + " | ".join(cells) + f" | {', '.join(sorted(runs))} |")
    text = "\n".join(lines)
    _plot(rows, sorted(rows, key=rank), out / "models.png")
    if results_md is not None:
        doc = results_md.read_text()
        if START not in doc or END not in doc:
            raise SystemExit(f"{results_md}: no {START} ... {END} block to replace")
        head, rest = doc.split(START, 1)
        results_md.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")
    return text


def _plot(rows: dict[str, dict[str, dict[str, Any]]], order: list[str], path: Path) -> None:
    """AUC of every model and row, with the standard error of each mean over folds."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(ROWS)
    labels = {"central": "central", "federated": "federated", "dp": "federated + DP",
              "dp-secagg": "DP + SecAgg+"}
    for j, row in enumerate(ROWS):
        xs, ys, errs = [], [], []
        for i, model in enumerate(order):
            summary = rows[model].get(row)
            if summary is not None:
                mean, sd = summary["auc"]
                xs.append(i + (j - 1.5) * width)
                ys.append(mean)
                errs.append(sd / math.sqrt(max(1, len(summary["results"]))))
        if xs:
            ax.bar(xs, ys, width, yerr=errs, capsize=2, label=labels[row])
    ax.axhline(0.5, color="grey", linewidth=0.6)
    def tick(model: str) -> str:  # the models not run to all folds say how far
        runs = {f"{r['folds']} x {r['repeats']}" for r in rows[model].values()}
        return model if runs == {"10 x 5"} else f"{model} ({', '.join(sorted(runs))})"

    ax.set_xticks(range(len(order)), [tick(m) for m in order], rotation=30, ha="right",
                  fontsize=8)
    ax.set_ylabel("test AUC (bars: standard error over folds)")
    ax.set_ylim(0.3, 0.95)
    ax.set_title("UCSB breast, every MIL model (sorted by the DP row)")
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from common.models import models_of_kind
    from common.models.base import BAG_KINDS

    parser = argparse.ArgumentParser(prog="python -m simulations.models",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=["run", "table"], default="run")
    protocol_arguments(parser, "results/models")
    parser.add_argument("--models", nargs="+", default=["all"],
                        help="model names, or all (every bag model)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(DEFAULT_ROWS))
    parser.add_argument("--epsilon", type=float, default=8.0, help="per-hospital budget (dp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "table":
        print(table(args.out, args.results))
        return 0
    data = check_data(parser, args.data)
    known = models_of_kind(*BAG_KINDS)
    names = known if args.models == ["all"] else args.models
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"--models: {', '.join(unknown)}: not a bag model; known: "
                     f"{', '.join(known)}")
    base = FederationConfig.from_mapping(load_config_file(CONFIG), str(CONFIG))
    for name in names:
        cfg = base.model_copy(update={"model": name})
        for row in args.rows:
            summary = run_row(row, data, args.out / name, cfg, args.folds, args.repeats,
                              args.epsilon)
            print(f"{name} {row}: accuracy {_cell(summary, 'accuracy')}, AUC "
                  f"{_cell(summary, 'auc')} ({len(summary['results'])} runs, "
                  f"{summary['wall_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
