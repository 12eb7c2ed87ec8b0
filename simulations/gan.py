"""How good are a federated DP GAN's patches, per epsilon, and do they help the patch CNN?

    python -m simulations.gan fid --data ../shared/data/ucsb-breast --out results/gan
        [--epsilons 1,3,8,none] [--rounds 20] [--set KEY=VALUE ...]
    python -m simulations.gan augment --data ../shared/data/ucsb-breast --out results/gan
        [--epsilon 8] [--folds 5] [--synthetic 8] [--cnn-no-dp] [--cnn-set KEY=VALUE ...]

``fid``: ``dp-gan`` (``configs/ucsb-gan.toml``) is trained over the 5 hospitals (in process,
every UCSB image's 32-px patches, per-slide DP-SGD for the discriminator) once per
epsilon, and 2,000 patches are drawn from each released generator. The table is the
Frechet distance between the real and the synthetic patches in the feature space of a
fixed encoder (``color-texture``: 21 colour, stain and texture statistics, with no
weights, so nothing of the data shapes it; an FID-style score, not Inception's FID), per
class and overall, beside the distance between two halves of the real patches (the
floor) and of the generator at initialisation (the ceiling).

``augment``: on each fold of the paper protocol the GAN is trained on the fold's training
images only, and each hospital adds ``--synthetic`` generated pseudo-slides per class (16
patches each) to its training set (they are post-processing: public for the accountant);
the residual patch CNN (``configs/ucsb-patch-cnn.toml``) is trained with and without them,
with DP at ``--epsilon`` (``--cnn-no-dp``: without; ``--cnn-set`` changes its settings),
and tested on the fold's images (image AUC from the patches' mean log-odds, patch AUC).
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
    protocol_arguments,
    train_inprocess,
    write_fold,
)

GAN_CONFIG = Path(__file__).parent / "configs" / "ucsb-gan.toml"
DRAWN = 2000


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of ``a`` and ``b``."""
    from scipy import linalg

    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * np.real(root)))


def draw(gan: Any, labels: np.ndarray, seed: int) -> np.ndarray:
    """``uint8[n, P, P, 3]`` patches of the generator for ``labels``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, len(labels), 500):
            y = torch.from_numpy(labels[start:start + 500])
            z = torch.randn(len(y), gan.generator.latent, generator=gen)
            pixels = gan.generator.pixels(z, y).permute(0, 2, 3, 1).numpy()
            out.append((pixels * 255).round().astype(np.uint8))
    return np.concatenate(out)


def _gan(cfg: FederationConfig, weights: list[np.ndarray] | None) -> Any:
    from common.models import build_model, parse_model_options
    from common.training import set_weights

    import torch

    torch.manual_seed(cfg.seed)
    gan = build_model(cfg.model, patch_size=cfg.patch_size,
                      **parse_model_options(cfg.model, cfg.model_options))
    if weights is not None:
        set_weights(gan, weights)
    gan.eval()
    return gan


def _base(args: argparse.Namespace) -> dict[str, Any]:
    settings = {**load_config_file(GAN_CONFIG), "sites": HOSPITALS}
    if getattr(args, "rounds", None):
        settings["rounds"] = args.rounds
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        settings[key.strip()] = value.strip()
    return settings


def fid(args: argparse.Namespace) -> str:
    from common.features import color_texture

    emb = embed(args.data, args.out, 32, "")
    everything = np.ones(len(emb.labels), bool)
    folder = args.out / "folds" / "all"
    write_fold(emb, ~everything, folder)  # every image trains (the test side is empty)
    real = {c: np.concatenate([b for b, y in zip(emb.bags, emb.labels) if y == c])
            for c in (0, 1)}
    rng = np.random.default_rng(0)
    feats = {c: color_texture(real[c][rng.permutation(len(real[c]))[:DRAWN]]) for c in real}
    labels = np.arange(DRAWN) % 2
    rows: list[dict[str, Any]] = []
    sheet = {"real": np.concatenate([real[c][rng.permutation(len(real[c]))[:8]]
                                     for c in (0, 1)])}
    halves = {c: np.array_split(color_texture(real[c]), 2) for c in real}
    floor = {c: frechet_distance(*halves[c]) for c in real}
    rows.append({"setting": "real vs real (two halves of the patches)", "epsilon": None,
                 "fd": {str(c): floor[c] for c in real}})
    for eps in [None if e == "none" else float(e) for e in args.epsilons.split(",")]:
        cfg = FederationConfig.from_mapping(
            {**_base(args), "dp": eps is not None, "epsilon": eps or 8.0,
             "data": str(folder)}, "--set")
        start = time.perf_counter()
        weights, spent = train_inprocess(cfg, [folder / f"site-{h}.npz"
                                               for h in range(HOSPITALS)])
        drawn = draw(_gan(cfg, weights), labels, seed=1)
        sheet["no DP" if eps is None else f"epsilon {eps:g}"] = np.concatenate(
            [drawn[labels == c][:8] for c in (0, 1)])
        fd = {str(c): frechet_distance(feats[c], color_texture(drawn[labels == c]))
              for c in (0, 1)}
        rows.append({"setting": f"dp-gan, {'no DP' if eps is None else f'epsilon {eps:g}'}",
                     "epsilon": eps, "spent": max(spent.values()) if spent else 0.0,
                     "fd": fd, "seconds": round(time.perf_counter() - start, 1)})
        if eps is None:  # the same generator before any training: the ceiling
            start_fd = {str(c): frechet_distance(
                feats[c], color_texture(draw(_gan(cfg, None), labels, 1)[labels == c]))
                for c in (0, 1)}
            rows.insert(1, {"setting": "generator at initialisation", "epsilon": None,
                            "fd": start_fd})
    lines = ["| generator | epsilon spent (max over sites) | FD benign | FD malignant | "
             "FD mean |", "|---|---|---|---|---|"]
    for r in rows:
        spent_text = f"{r['spent']:.2f}" if r.get("spent") else "-"
        fd_mean = float(np.mean(list(r["fd"].values())))
        lines.append(f"| {r['setting']} | {spent_text} | {r['fd']['0']:.4f} | "
                     f"{r['fd']['1']:.4f} | {fd_mean:.4f} |")
    (args.out / "fid.json").write_text(json.dumps(rows, indent=1))
    _plot(args.out, rows)
    _samples(args.out / "samples.png", sheet)
    return "\n".join(lines)


def _samples(path: Path, sheet: dict[str, np.ndarray]) -> None:
    """One row of 16 patches (8 benign, then 8 malignant) per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sheet), 1, figsize=(8, 0.75 * len(sheet) + 0.3))
    for ax, (name, patches) in zip(np.atleast_1d(axes), sheet.items()):
        ax.imshow(np.concatenate(list(patches), axis=1))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("8 benign, then 8 malignant patches (32 px)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot(out: Path, rows: list[dict[str, Any]]) -> None:
    """The mean Frechet distance of each generator, as bars (``fid.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    names = [r["setting"] for r in rows]
    ax.barh(names, [float(np.mean(list(r["fd"].values()))) for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("Frechet distance to real patches (color-texture features)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(out / "fid.png", dpi=120)
    plt.close(fig)


def augment(args: argparse.Namespace) -> str:
    from common.data import load_site_file
    from common.data.bags import BagSet, SiteData, save_site_file
    from common.metrics import roc_auc
    from simulations.mixpatch import _score

    emb = embed(args.data, args.out, 32, "")
    cnn = {**load_config_file(PATCH_CONFIG), "sites": HOSPITALS,
           "dp": not args.cnn_no_dp, "epsilon": args.epsilon,
           **dict(item.partition("=")[::2] for item in args.cnn_set)}
    gan_settings = {**_base(args), "dp": True, "epsilon": args.epsilon}
    tests = cv_folds(emb.labels, args.folds, args.repeats, 0)
    got: dict[str, dict[str, list[Any]]] = {k: {"s": [], "y": [], "p": [], "py": []}
                                            for k in ("real", "real + synthetic")}
    for k, test in enumerate(tests):
        folder, extra = args.out / "folds" / "real", args.out / "folds" / "augmented"
        write_fold(emb, test, folder)
        files = [folder / f"site-{h}.npz" for h in range(HOSPITALS)]
        gan_cfg = FederationConfig.from_mapping({**gan_settings, "data": str(folder)})
        weights, _ = train_inprocess(gan_cfg, files)  # the GAN sees training images only
        gan = _gan(gan_cfg, weights)
        extra.mkdir(parents=True, exist_ok=True)
        for h, f in enumerate(files):
            site = load_site_file(f)
            labels = np.repeat([0, 1], args.synthetic)
            made = draw(gan, np.repeat(labels, 16), seed=1000 * k + h).reshape(
                len(labels), 16, 32, 32, 3)
            train = site.train
            more = BagSet(train.bags + tuple(made), np.concatenate([train.labels, labels]),
                          train.names + tuple(f"synthetic-{i}" for i in range(len(labels))))
            save_site_file(SiteData(site.name, more, site.val), extra / f.name)
        idx = np.flatnonzero(test)
        for name, where in (("real", folder), ("real + synthetic", extra)):
            cfg = FederationConfig.from_mapping({**cnn, "data": str(where)})
            w, _ = train_inprocess(cfg, [where / f.name for f in files])
            probs, scores = _score(cfg, w, [emb.bags[i] for i in idx])
            got[name]["s"].append(scores)
            got[name]["y"].append(emb.labels[idx])
            got[name]["p"] += probs
            got[name]["py"] += [np.full(len(p), emb.labels[i]) for p, i in zip(probs, idx)]
    lines = ["| patch CNN trained on | image AUC | patch AUC |", "|---|---|---|"]
    result = {}
    for name, g in got.items():
        result[name] = {"image_auc": roc_auc(np.concatenate(g["s"]), np.concatenate(g["y"])),
                        "patch_auc": roc_auc(np.concatenate(g["p"]), np.concatenate(g["py"]))}
        lines.append(f"| {name} | {result[name]['image_auc']:.3f} | "
                     f"{result[name]['patch_auc']:.3f} |")
    (args.out / "augment.json").write_text(json.dumps(
        {"epsilon": args.epsilon, "cnn_dp": not args.cnn_no_dp, "cnn_set": args.cnn_set,
         "folds": args.folds,
         "synthetic_per_class": args.synthetic, "results": result}, indent=1))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.gan",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["fid", "augment"])
    protocol_arguments(parser, "results/gan")
    parser.set_defaults(folds=5, repeats=1)
    parser.add_argument("--epsilons", default="1,3,8,none")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--synthetic", type=int, default=8,
                        help="generated pseudo-slides per class added to each hospital")
    parser.add_argument("--cnn-no-dp", action="store_true",
                        help="augment: train the patch CNN without DP (the GAN keeps it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--cnn-set", action="append", default=[], metavar="KEY=VALUE",
                        help="augment: a setting of the patch CNN (e.g. optimizer=adam)")
    args = parser.parse_args(argv)
    if bad := [item for item in args.cnn_set if "=" not in item]:
        parser.error(f"--cnn-set {bad[0]!r}: expected KEY=VALUE")
    logging.basicConfig(level=logging.WARNING)
    args.data = check_data(parser, args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    print(fid(args) if args.what == "fid" else augment(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
