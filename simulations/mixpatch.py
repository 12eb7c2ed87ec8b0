"""Does MixPatch calibrate the seed's patch CNN under DP? ECE and AUC on UCSB patches.

    python -m simulations.mixpatch --data ../shared/data/ucsb-breast --out results/mixpatch
        [--epsilon 8 | --no-dp] [--folds 5 --repeats 1] [--set KEY=VALUE ...]

The residual patch CNN (``configs/ucsb-patch-cnn.toml``: 32-px patches, slide labels) is
trained on each fold of the paper protocol, federated over the 5 hospitals with per-slide
DP-SGD at ``--epsilon``, twice: plainly and with ``mixpatch = true`` (the same settings
otherwise; ``--set`` changes both, e.g. ``--set mixpatch-ratio=0.25``). Every patch of
every test image is scored (its label is its image's); the table gives, pooled over the
folds, the patch-level expected calibration error (15 bins), the patch-level AUC, and the
image-level AUC and ECE (the image's score is its patches' mean log-odds), and the
reliability diagram of the patches is saved beside it (``reliability.png``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.config import FederationConfig, load_config_file
from simulations.paper import (
    HOSPITALS,
    PATCH_CONFIG,
    check_data,
    cv_folds,
    embed,
    image_tensor,
    protocol_arguments,
    train_inprocess,
    write_fold,
)

BINS = 15


def _score(cfg: FederationConfig, weights: list[np.ndarray], bags: list[np.ndarray]
           ) -> tuple[list[np.ndarray], np.ndarray]:
    """Each image's patch probabilities of the positive class, and its score (mean
    log-odds of its patches)."""
    import torch

    from common.models import build_model
    from common.site import model_kwargs
    from common.training import set_weights

    model = build_model(cfg.model, **model_kwargs(cfg, None))
    set_weights(model, weights)
    model.eval()
    probs, scores = [], []
    with torch.no_grad():
        for bag in bags:
            logits = model(image_tensor(bag))[0]  # [N, 2]
            probs.append(torch.softmax(logits, -1)[:, 1].double().numpy())
            scores.append(float((logits[:, 1] - logits[:, 0]).mean()))
    return probs, np.array(scores)


def summarise(patch_p: np.ndarray, patch_y: np.ndarray, image_s: np.ndarray,
              image_y: np.ndarray) -> dict[str, float]:
    from common.metrics import expected_calibration_error, roc_auc

    image_p = 1 / (1 + np.exp(-image_s))
    return {"patch_ece": expected_calibration_error(patch_p, patch_y, BINS),
            "patch_auc": roc_auc(patch_p, patch_y),
            "image_auc": roc_auc(image_s, image_y),
            "image_ece": expected_calibration_error(image_p, image_y, BINS),
            "patches": len(patch_p), "images": len(image_s)}


def reliability(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path,
                title: str) -> None:
    """Reliability diagrams of patch probabilities, one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hist) = plt.subplots(1, 2, figsize=(8.5, 3.8))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect")
    edges = np.linspace(0, 1, BINS + 1)
    for label, (p, y) in curves.items():
        which = np.minimum((p * BINS).astype(int), BINS - 1)
        n = np.bincount(which, minlength=BINS)
        keep = n > 0
        mean_p = np.bincount(which, p, minlength=BINS)[keep] / n[keep]
        frac = np.bincount(which, y, minlength=BINS)[keep] / n[keep]
        ax.plot(mean_p, frac, marker="o", label=label)
        hist.hist(p, bins=edges, histtype="step", label=label)
    ax.set(xlabel="predicted probability (patch)", ylabel="fraction positive",
           title="Reliability (15 bins)", xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=7, loc="upper left")
    hist.set(xlabel="predicted probability (patch)", ylabel="patches", yscale="log",
             title="Confidence")
    hist.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.mixpatch",
                                     description=__doc__.split("\n\n")[0])
    protocol_arguments(parser, "results/mixpatch")
    parser.set_defaults(folds=5, repeats=1)
    parser.add_argument("--epsilon", type=float, default=8.0, help="DP budget per hospital")
    parser.add_argument("--no-dp", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = check_data(parser, args.data)
    from rich.progress import Progress

    settings = {**load_config_file(PATCH_CONFIG), "sites": HOSPITALS,
                "dp": not args.no_dp, "epsilon": args.epsilon}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        settings[key.strip()] = value.strip()
    configs = {name: FederationConfig.from_mapping({**settings, "mixpatch": mix}, "--set")
               for name, mix in (("plain", False), ("MixPatch", True))}
    base = configs["plain"]
    emb = embed(data, args.out, base.patch_size, "")
    tests = cv_folds(emb.labels, args.folds, args.repeats, base.seed)
    pooled: dict[str, dict[str, list[Any]]] = {
        name: {"patch_p": [], "patch_y": [], "image_s": [], "image_y": [], "epsilon": []}
        for name in configs}
    start = time.perf_counter()
    with Progress(transient=True) as bar:
        task = bar.add_task("folds", total=len(tests) * len(configs))
        for k, test in enumerate(tests):
            folder = args.out / "folds" / "patches"  # image patches are large: rewritten
            write_fold(emb, test, folder)
            idx = np.flatnonzero(test)
            bags = [emb.bags[i] for i in idx]
            for name, cfg in configs.items():
                files = [folder / f"site-{h}.npz" for h in range(HOSPITALS)]
                weights, eps = train_inprocess(cfg.model_copy(update={"data": str(folder)}),
                                               files)
                probs, scores = _score(cfg, weights, bags)
                got = pooled[name]
                got["patch_p"] += probs
                got["patch_y"] += [np.full(len(p), emb.labels[i]) for p, i in zip(probs, idx)]
                got["image_s"].append(scores)
                got["image_y"].append(emb.labels[idx])
                got["epsilon"].append(max(eps.values()) if eps else 0.0)
                bar.advance(task)
    rows, curves = {}, {}
    for name, got in pooled.items():
        p, y = np.concatenate(got["patch_p"]), np.concatenate(got["patch_y"])
        rows[name] = {**summarise(p, y, np.concatenate(got["image_s"]),
                                  np.concatenate(got["image_y"])),
                      "epsilon_max": float(max(got["epsilon"]))}
        curves[name] = (p, y)
    dp = f"DP at epsilon {args.epsilon:g} per hospital" if not args.no_dp else "no DP"
    title = (f"residual patch CNN, 5 hospitals in FedAvg, {dp}; {args.folds}-fold x "
             f"{args.repeats}, UCSB test patches")
    args.out.mkdir(parents=True, exist_ok=True)
    reliability(curves, args.out / "reliability.png", title)
    mix = configs["MixPatch"]
    lines = [f"{title}; MixPatch: grid {mix.mixpatch_grid}, ratio {mix.mixpatch_ratio:g}, "
             f"group {mix.mixpatch_group}", "",
             "| training | patch ECE (15 bins) | patch AUC | image AUC | image ECE | "
             "epsilon (max over sites) |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {r['patch_ece']:.3f} | {r['patch_auc']:.3f} | {r['image_auc']:.3f} "
              f"| {r['image_ece']:.3f} | {r['epsilon_max']:.2f} |" for name, r in rows.items()]
    text = "\n".join(lines)
    (args.out / "mixpatch.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
         "configs": {n: c.to_run_config() for n, c in configs.items()},
         "wall_s": round(time.perf_counter() - start, 1)}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
