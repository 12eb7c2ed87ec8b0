"""The paper table: UCSB breast under Ilse et al. (2018)'s protocol, centrally and federated.

One command per row (each writes ``OUT/ROW.json``), then one that gathers the table::

    python -m simulations.paper central   --data ../shared/data/ucsb-breast --out results/paper
    python -m simulations.paper hospitals --data ../shared/data/ucsb-breast --out results/paper
    python -m simulations.paper federated --data ../shared/data/ucsb-breast --out results/paper
    python -m simulations.paper dp --epsilon 3 --data ../shared/data/ucsb-breast --out results/paper
    python -m simulations.paper dp-secagg --epsilon 3 --data ../shared/data/ucsb-breast \
        --out results/paper
    python -m simulations.paper table --out results/paper --results docs/RESULTS.md

Protocol (Ilse et al. 2018): each 896 x 768 image is one bag of non-overlapping 32 x 32
patches; a patch with 75 % or more white pixels is discarded; stratified 10-fold
cross-validation repeated 5 times with fresh shuffles (as the authors' group's released
breast code does); accuracy and AUC on the held-out fold, reported as mean and standard
deviation over all folds of all repeats.
Patches are embedded once with a fixed encoder (``color-texture`` by default; the paper
trains a CNN end to end), and every row trains gated attention-MIL on the same folds:

- ``central``: one site holds every training image;
- ``hospitals``: each of 5 hospitals (whole ``tma_group`` s, as ``pathfed simulate``
  forms them) trains alone on its training images; all are tested on the whole fold;
- ``federated``: the 5 hospitals in FedAvg (``common.fedavg``, in process), no DP;
- ``dp``: the same with DP-SGD at ``--epsilon`` per hospital (slide-level, delta 1e-5);
- ``dp-secagg``: ``dp`` through Flower's simulation engine and SecAgg+ workflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import FederationConfig, load_config_file
from common.data.bags import BagSet, SiteData, save_site_file

log = logging.getLogger(__name__)

CONFIG = Path(__file__).parent / "configs" / "ucsb-paper.toml"
PATCH_CONFIG = Path(__file__).parent / "configs" / "ucsb-patch-cnn.toml"
ROWS = ("central", "hospitals", "federated", "dp", "dp-secagg")
HOSPITALS = 5

# Ilse, Tomczak and Welling, ICML 2018, breast cancer results (mean ± the paper's error
# term); see docs/RESULTS.md for what could and could not be checked against the paper here.
PAPER = {
    "Ilse et al. 2018, attention-MIL, CNN trained end to end (paper)": {
        "accuracy": (0.745, 0.018), "auc": (0.775, 0.016)},
    "Ilse et al. 2018, gated attention-MIL, CNN trained end to end (paper)": {
        "accuracy": (0.755, 0.016), "auc": (0.799, 0.020)},
}


@dataclass(frozen=True)
class Embedded:
    """Every image as one bag of patch features, with its label and hospital."""

    bags: list[np.ndarray]
    labels: np.ndarray
    names: list[str]
    hospital: np.ndarray
    children: int = 0
    """Children per region of multi-scale bags (:mod:`common.data.multiscale`); 0 else."""


def embed(data: Path, out: Path, patch_size: int, encoder: str,
          multiscale: bool = False, stain: str = "none") -> Embedded:
    """Embed the images once (cached in ``out``) and place them in 5 hospitals; with
    ``multiscale``, as bags of regions, with ``stain``, stain-normalised first
    (:func:`common.data.images.embed_images`)."""
    from common.data.images import CONTEXT_FACTOR, assign_sites, embed_images, read_labels

    items = read_labels(data)
    hospital_of = {item.path.name: h
                   for h, site in enumerate(assign_sites(items, HOSPITALS)) for item in site}
    children = CONTEXT_FACTOR ** 2 if multiscale else 0
    scales = f"-regions{CONTEXT_FACTOR}x" if multiscale else ""
    scales += f"-{stain}" if stain != "none" else ""
    cache = out / f"bags-{encoder}-{patch_size}px{scales}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as z:
            lengths, names = z["lengths"], [str(n) for n in z["names"]]
            bags = list(np.split(z["features"], np.cumsum(lengths)[:-1]))
            labels = z["labels"]
    else:
        bags, kept, _ = embed_images(items, patch_size, encoder, multiscale, stain)
        names = [item.path.name for item in kept]
        labels = np.array([item.label for item in kept], dtype=np.int64)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(cache, features=np.concatenate(bags),
                 lengths=np.array([len(b) for b in bags]), names=np.array(names), labels=labels)
    return Embedded(bags, labels, names, np.array([hospital_of[n] for n in names]), children)


def image_tensor(patches: np.ndarray) -> Any:
    """``float32[1, N, 3, P, P]``: one image's patches scaled as a patch model trains on."""
    import torch

    from common.predict import _normalised

    return torch.from_numpy(_normalised(np.asarray(patches, dtype=np.uint8))[None])


def cv_folds(labels: np.ndarray, folds: int, repeats: int, seed: int) -> list[np.ndarray]:
    """Test masks of stratified ``folds``-fold cross-validation, ``repeats`` times."""
    out = []
    for repeat in range(repeats):
        rng = np.random.default_rng([seed, repeat])
        fold_of = np.empty(len(labels), dtype=np.int64)
        for label in np.unique(labels):
            idx = np.flatnonzero(labels == label)
            rng.shuffle(idx)
            fold_of[idx] = (np.arange(len(idx)) + rng.integers(folds)) % folds
        out += [fold_of == f for f in range(folds)]
    return out


def _bagset(emb: Embedded, sel: np.ndarray) -> BagSet:
    idx = np.flatnonzero(sel)
    return BagSet(tuple(emb.bags[i] for i in idx), emb.labels[idx],
                  tuple(emb.names[i] for i in idx), children=emb.children)


def write_fold(emb: Embedded, test: np.ndarray, folder: Path) -> None:
    """``site-H.npz`` per hospital (train: its training images, val: its test images) and
    ``central.npz`` (all training images, the whole fold to validate)."""
    folder.mkdir(parents=True, exist_ok=True)
    for h in range(HOSPITALS):
        mine = emb.hospital == h
        save_site_file(SiteData(f"site-{h}", _bagset(emb, mine & ~test),
                                _bagset(emb, mine & test)), folder / f"site-{h}.npz")
    save_site_file(SiteData("central", _bagset(emb, ~test), _bagset(emb, test)),
                   folder / "central.npz")


def test_metrics(cfg: FederationConfig, weights: list[np.ndarray], emb: Embedded,
                 test: np.ndarray) -> dict[str, float]:
    """Exact accuracy (threshold 0.5) and AUC of ``weights`` on the test fold."""
    import torch

    from common.metrics import roc_auc
    from common.models import build_model
    from common.site import model_kwargs
    from common.training import set_weights

    bagset = _bagset(emb, test)
    model = build_model(cfg.model, **model_kwargs(cfg, bagset.layout))
    set_weights(model, weights)
    data = bagset.to_dataset()
    with torch.no_grad():
        model.eval()
        *inputs, labels = data.tensors
        scores = model.scores(*inputs).numpy()
    labels = labels.numpy()
    return {"accuracy": float(((scores > 0) == (labels > 0.5)).mean()),
            "auc": roc_auc(scores, labels)}


def train_inprocess(cfg: FederationConfig, files: list[Path]) -> tuple[list[np.ndarray],
                                                                       dict[str, float]]:
    """FedAvg over the given site files (one file: local training); final weights, epsilons."""
    from common.data import load_site_file
    from common.fedavg import run_inprocess
    from common.site import Site

    trained = [f for f in files if len(load_site_file(f).train)]
    if not trained:
        raise RuntimeError(f"{files[0].parent}: no site has a training image in this fold")
    if len(trained) < len(files):
        log.warning("%s: %d site(s) have no training image in this fold and sit it out",
                    files[0].parent.name, len(files) - len(trained))
    sites = [Site(cfg, i, name=f.stem, data=str(f)) for i, f in enumerate(trained)]
    result = run_inprocess(cfg, sites, evaluate=False)
    return result.weights, dict(result.epsilon)


PARALLEL_FROM = 20
"""Rows of at least this many trainings run them in one process per core (starting the
processes costs a few seconds: not worth it for a handful of folds)."""


def _train_all(jobs: list[tuple[FederationConfig, list[Path]]]
               ) -> Iterator[tuple[list[np.ndarray], dict[str, float]]]:
    """:func:`train_inprocess` of each job, in order: in this process for a few, else in
    one spawned process per core, each with one torch thread (the folds are independent
    and every training is seeded by its configuration, so the results are the same)."""
    import os

    workers = min(os.cpu_count() or 1, len(jobs))
    if len(jobs) < PARALLEL_FROM or workers < 2:
        yield from (train_inprocess(cfg, files) for cfg, files in jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        yield from pool.map(train_inprocess, *zip(*jobs))


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def train_flower(cfg: FederationConfig, folder: Path, run: Path) -> tuple[list[np.ndarray],
                                                                          dict[str, float]]:
    """The federation through Flower's simulation engine; the last global checkpoint.

    A fold whose run already finished with the same configuration is reused, so an
    interrupted row picks up where it stopped; an unfinished one is started again.
    """
    import shutil

    from common.runs import RunFolder, load_checkpoint
    from simulations.simulate import simulate

    cfg = cfg.model_copy(update={"data": str(folder), "sites": HOSPITALS, "out": str(run)})
    done = run / "summary.json"

    def settings(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if k not in ("keys", "run-id")}  # by simulate()

    same = (run / "config.json").is_file() and settings(json.loads(
        (run / "config.json").read_text())) == settings(json.loads(json.dumps(
            cfg.to_run_config())))
    if done.is_file() and same:
        summary = json.loads(done.read_text())
    else:
        shutil.rmtree(run, ignore_errors=True)
        summary = simulate(cfg)
    latest = RunFolder(run).latest_checkpoint()
    if latest is None:
        raise RuntimeError(f"{run}: the federation wrote no checkpoint")
    arrays = load_checkpoint(latest[1])
    return list(arrays.values()), dict(summary["epsilon"])


def run_row(row: str, data: Path, out: Path, cfg: FederationConfig, folds: int, repeats: int,
            epsilon: float | None, overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """Train and test ``row`` on every fold; the per-fold results. ``overrides``: settings
    that change this row from the table's configuration (``--set``: a strategy, the DP
    mode), named in the row's file, label and command."""
    from rich.progress import Progress

    from common.site import model_kind

    emb = embed(data, out, cfg.patch_size, cfg.encoder, model_kind(cfg) == "multiscale",
                cfg.stain_normalize)
    tests = cv_folds(emb.labels, folds, repeats, cfg.seed)
    dp = row in ("dp", "dp-secagg")
    cfg = cfg.model_copy(update={
        "dp": dp, "secagg": row == "dp-secagg", "sites": HOSPITALS,
        **({"epsilon": float(epsilon)} if dp and epsilon is not None else {})})
    overrides = dict(overrides or {})
    if overrides:
        # distributed DP is SecAgg+'s arithmetic: the in-process runner computes its sum
        secagg = {"secagg": True} if overrides.get("dp-mode") == "distributed" else {}
        cfg = FederationConfig.from_mapping({**cfg.to_run_config(), **secagg, **overrides},
                                            "--set")
    # no commas in file names: Flower's app bundle lists its files as CSV lines
    name = (f"{row}-eps{cfg.epsilon:g}" if dp else row) + "".join(
        f"-{k}={v}" for k, v in sorted(overrides.items())).replace(",", "+")
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    jobs: list[tuple[int, int | None, FederationConfig, list[Path]]] = []
    for k, test in enumerate(tests):
        folder = out / "folds" / f"repeat{k // folds}-fold{k % folds}"
        write_fold(emb, test, folder)
        fold_cfg = cfg.model_copy(update={"data": str(folder)})
        if row == "hospitals":
            jobs += [(k, h, fold_cfg, [folder / f"site-{h}.npz"]) for h in range(HOSPITALS)
                     if (emb.hospital[~test] == h).any()]  # else nothing to train on
        elif row == "central":
            jobs.append((k, None, fold_cfg, [folder / "central.npz"]))
        else:
            jobs.append((k, None, fold_cfg, [folder / f"site-{h}.npz" for h in range(HOSPITALS)]))
    with Progress(transient=True) as bar:
        task = bar.add_task(name, total=len(jobs))
        trained: Iterator[tuple[list[np.ndarray], dict[str, float]]]
        if row == "dp-secagg":  # Flower's simulation engine uses every core itself
            trained = (train_flower(c, Path(c.data), out / "runs" / name / Path(c.data).name)
                            for _, _, c, _ in jobs)
        else:
            trained = _train_all([(c, f) for _, _, c, f in jobs])
        for (k, h, fold_cfg, _), (weights, eps) in zip(jobs, trained):
            test = tests[k]
            where = {"repeat": k // folds, "fold": k % folds, "n_test": int(test.sum()),
                     **({"hospital": h} if h is not None else {})}
            metrics = test_metrics(fold_cfg, weights, emb, test)
            results.append({**where, **metrics, **({} if row == "hospitals" else
                                                   {"epsilon": eps if dp else None})})
            bar.advance(task)
    summary = {"row": row, "name": name, "dp": dp, "secagg": row == "dp-secagg",
               "epsilon": cfg.epsilon if dp else None, "delta": cfg.delta if dp else None,
               "folds": folds, "repeats": repeats, "encoder": cfg.encoder,
               "patch_size": cfg.patch_size, "config": cfg.to_run_config(),
               "engine": "Flower simulation + SecAgg+" if row == "dp-secagg" else (
                   "in-process, SecAgg+'s modular sum (common.crypto.quantize.secure_sum)"
                   if cfg.secagg else "in-process FedAvg"),
               "overrides": overrides,
               "wall_s": round(time.perf_counter() - start, 1), "results": results,
               **_mean_std(results)}
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    return summary


def _mean_std(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sd over all test folds (and hospitals); sd of the repeats' means."""
    out: dict[str, Any] = {}
    for metric in ("accuracy", "auc"):
        ok = [r for r in results if not math.isnan(r[metric])]
        values = np.array([r[metric] for r in ok])
        out[metric] = [float(values.mean()), float(values.std(ddof=1)) if len(values) > 1
                       else 0.0]
        means = [np.mean([r[metric] for r in ok if r["repeat"] == k])
                 for k in sorted({r["repeat"] for r in ok})]
        out[f"{metric}_repeat_sd"] = float(np.std(means, ddof=1)) if len(means) > 1 else 0.0
    return out


LABELS = {"central": "Central (one site, all training images)",
          "hospitals": "Each hospital alone (mean of 5)",
          "federated": "Federated, 5 hospitals (FedAvg, no DP)"}


def _label(summary: dict[str, Any]) -> str:
    overrides = dict(summary.get("overrides") or {})
    mode = overrides.pop("dp-mode", "local")
    strategy = {"fedavg": "FedAvg", "fedavgm": "FedAvgM", "fedadam": "FedAdam",
                "fedyogi": "FedYogi", "fedadagrad": "FedAdagrad"}[
        overrides.pop("server-optimizer", "fedavg")]
    if "prox-mu" in overrides:
        strategy = f"FedProx (mu {overrides.pop('prox-mu')})" if strategy == "FedAvg" else (
            f"{strategy} + FedProx (mu {overrides.pop('prox-mu')})")
    extra = "".join(f", {k} {v}" for k, v in sorted(overrides.items()))
    if summary["dp"]:
        engine = " + SecAgg+ (Flower)" if summary["secagg"] else ""
        kind = "distributed DP" if mode == "distributed" else "local DP"
        if mode != "distributed" and (summary.get("config") or {}).get("accountant") == "rdp":
            kind += " (RDP accountant)"  # rows made before PRV was the default
        return (f"Federated ({strategy}) + {kind}, eps {summary['epsilon']:g} per "
                f"hospital{engine}{extra}")
    if summary["row"] == "federated":
        return f"Federated, 5 hospitals ({strategy}, no DP){extra}"
    return LABELS[summary["row"]] + extra


def table(out: Path, results_md: Path | None) -> str:
    """The markdown table of every row in ``out``, the paper's numbers first; the plot."""
    rows = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    order = {r: i for i, r in enumerate(ROWS)}
    rows.sort(key=lambda s: (order[s["row"]], s["epsilon"] or 0,
                             json.dumps(s.get("overrides") or {}, sort_keys=True)))
    lines = ["| setting | accuracy | AUC | sd of repeat means (acc / AUC) | folds x repeats "
             "| command |", "|---|---|---|---|---|---|"]
    for label, m in PAPER.items():
        lines.append(f"| {label} | {m['accuracy'][0]:.3f} ± {m['accuracy'][1]:.3f} | "
                     f"{m['auc'][0]:.3f} ± {m['auc'][1]:.3f} | | | |")
    for s in rows:
        eps = f" --epsilon {s['epsilon']:g}" if s["dp"] else ""
        eps += "".join(f" --set {k}={v}" for k, v in sorted((s.get("overrides") or {}).items()))
        lines.append(
            f"| {_label(s)} | {s['accuracy'][0]:.3f} ± {s['accuracy'][1]:.3f} | "
            f"{s['auc'][0]:.3f} ± {s['auc'][1]:.3f} | {s['accuracy_repeat_sd']:.3f} / "
            f"{s['auc_repeat_sd']:.3f} | {s['folds']} x {s['repeats']} | "
            f"`python -m simulations.paper {s['row']}{eps}` |")
        if s["row"] == "hospitals":
            for h in sorted({r["hospital"] for r in s["results"]}):
                one = _mean_std([r for r in s["results"] if r["hospital"] == h])
                lines.append(
                    f"| &nbsp;&nbsp;hospital {h} alone | {one['accuracy'][0]:.3f} ± "
                    f"{one['accuracy'][1]:.3f} | {one['auc'][0]:.3f} ± {one['auc'][1]:.3f} | "
                    f"{one['accuracy_repeat_sd']:.3f} / {one['auc_repeat_sd']:.3f} | | |")
    text = "\n".join(lines)
    _plot(rows, out / "auc-vs-epsilon.png")
    if results_md is not None:
        _splice(results_md, text)
    return text


def _series(summary: dict[str, Any]) -> str:
    """A DP row's curve in the plot: its mode, strategy and engine (all but epsilon)."""
    overrides = dict(summary.get("overrides") or {})
    kind = "distributed DP" if overrides.pop("dp-mode", "local") == "distributed" else "local DP"
    engine = " + SecAgg+ (Flower)" if summary["secagg"] else ""
    strategy = overrides.pop("server-optimizer", "fedavg")
    if overrides.pop("prox-mu", None) is not None:
        strategy += " + FedProx"
    for tuning in ("rounds", "server-lr", "server-momentum"):  # the same series, tuned
        overrides.pop(tuning, None)
    extra = "".join(f", {k} {v}" for k, v in sorted(overrides.items()))
    return f"{kind}, {strategy}{engine}{extra}"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    series = sorted({_series(s) for s in rows if s["dp"]})
    markers = "osD^v<>p*h"
    for i, name in enumerate(series):
        pts = sorted((s["epsilon"], s["auc"][0], s["auc_repeat_sd"]) for s in rows
                     if s["dp"] and _series(s) == name)
        shift = 1.0 + 0.04 * (i - (len(series) - 1) / 2)
        ax.errorbar([p[0] * shift for p in pts], [p[1] for p in pts],
                    yerr=[p[2] for p in pts], marker=markers[i % len(markers)], capsize=3,
                    label=name)
    colours = {"central": "k", "hospitals": "tab:red", "federated": "tab:green"}
    for s in rows:
        if not s["dp"] and not s.get("overrides"):
            ax.axhline(s["auc"][0], linestyle="--", linewidth=1, label=LABELS[s["row"]],
                       color=colours[s["row"]])
    best = max((s for s in rows if s["row"] == "federated"), key=lambda s: s["auc"][0],
               default=None)
    if best is not None and best.get("overrides"):
        ax.axhline(best["auc"][0], linestyle="-.", linewidth=1, color="tab:olive",
                   label=f"{_label(best)} (best federated)")
    gated = PAPER["Ilse et al. 2018, gated attention-MIL, CNN trained end to end (paper)"]
    ax.axhline(gated["auc"][0], linestyle=":", color="tab:purple", linewidth=1,
               label="Ilse et al. 2018, gated attention (paper, central)")
    ax.axhline(0.5, color="grey", linewidth=0.5)
    ax.set_xscale("log")
    eps = sorted({s["epsilon"] for s in rows if s["dp"]})
    ax.set_xticks(eps, [f"{e:g}" for e in eps])
    ax.minorticks_off()
    ax.set_xlabel("epsilon per hospital (delta 1e-5, one image = one DP sample)")
    ax.set_ylabel("test AUC (bars: sd of repeat means)")
    ax.set_title("UCSB breast, gated attention-MIL, 5 hospitals")
    ax.set_ylim(0.25, 0.95)
    ax.legend(fontsize=6, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


START, END = "<!-- paper-table:start -->", "<!-- paper-table:end -->"


def _splice(path: Path, text: str) -> None:
    doc = path.read_text()
    if START not in doc or END not in doc:
        raise SystemExit(f"{path}: no {START} ... {END} block to replace")
    head, rest = doc.split(START, 1)
    path.write_text(f"{head}{START}\n{text}\n{END}{rest.split(END, 1)[1]}")


def protocol_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """The options every table of this protocol takes (data, output, folds, results)."""
    parser.add_argument("--data", type=Path, help="UCSB breast folder (labels.csv)")
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, help="markdown file whose table to replace")


def check_data(parser: argparse.ArgumentParser, data: Path | None) -> Path:
    if data is None or not (data / "labels.csv").is_file():
        parser.error("--data: a folder with labels.csv (the UCSB breast set) is needed")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.paper",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("row", choices=[*ROWS, "table"])
    protocol_arguments(parser, "results/paper")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--epsilon", type=float, help="per-hospital budget (dp rows)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting that changes this row (repeatable), e.g. --set "
                        "dp-mode=distributed --set server-optimizer=fedadam")
    parser.add_argument("--stain-normalize", choices=["none", "macenko", "reinhard"],
                        help="stain-normalise every patch before the encoder (default: the "
                        "config's, none)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.row == "table":
        print(table(args.out, args.results))
        return 0
    check_data(parser, args.data)
    cfg = FederationConfig.from_mapping(load_config_file(args.config), str(args.config))
    if args.stain_normalize:
        cfg = cfg.model_copy(update={"stain_normalize": args.stain_normalize})
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = value.strip()
    summary = run_row(args.row, args.data, args.out, cfg, args.folds, args.repeats,
                      args.epsilon, overrides)
    print(f"{_label(summary)}: accuracy {summary['accuracy'][0]:.3f} ± "
          f"{summary['accuracy'][1]:.3f}, AUC {summary['auc'][0]:.3f} ± "
          f"{summary['auc'][1]:.3f} ({len(summary['results'])} runs, {summary['wall_s']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
