"""Does MC dropout know when it is wrong? Accuracy at a coverage, on UCSB.

    python -m simulations.abstention --data ../shared/data/ucsb-breast --out results/abstention
        [--model gated-attention-mil] [--dropout 0.25] [--passes 20] [--coverage 0.9]
        [--setting central|federated] [--epsilon 8] [--folds 10 --repeats 5]
    python -m simulations.abstention --model residual-patch-cnn --data ... --out ...

A patch model (the seed's residual CNN, ``configs/ucsb-patch-cnn.toml``, trained on the
images' 32-px patches) scores each test image over all its patches and adds a third
ranking: test-time augmentation (``--passes`` random 90-degree rotations and flips, the
spread of the probability), beside MC dropout over its own dropout layer.

The model (built with ``--dropout``) is trained on each fold of the paper protocol
(``configs/ucsb-paper.toml``; centrally or federated over 5 hospitals, with DP when
``--epsilon`` is given) and scores its test images twice: once plainly, ranking them by
the distance of the probability from 0.5, and with MC dropout (``--passes`` passes),
ranking them by the spread of the probability. Each ranking keeps the ``--coverage``
most confident test images of a repeat; the table is their accuracy, mean and sd over
the repeats (each image is tested once per repeat), and the accuracy with no abstention.
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np

from common.config import FederationConfig, load_config_file
from simulations.paper import (
    CONFIG,
    HOSPITALS,
    PATCH_CONFIG,
    check_data,
    cv_folds,
    embed,
    protocol_arguments,
    train_inprocess,
    write_fold,
)


def main(argv: list[str] | None = None) -> int:
    import torch

    from common.data import BagSet
    from common.models import build_model
    from common.site import model_kwargs
    from common.training import set_weights
    from common.uncertainty import accuracy_at_coverage, mc_dropout

    parser = argparse.ArgumentParser(prog="python -m simulations.abstention",
                                     description=__doc__.split("\n\n")[0])
    protocol_arguments(parser, "results/abstention")
    parser.add_argument("--model", default="gated-attention-mil")
    parser.add_argument("--dropout", type=float, default=0.25)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--coverage", type=float, default=0.9)
    parser.add_argument("--setting", choices=["central", "federated"], default="central")
    parser.add_argument("--epsilon", type=float, help="DP budget per site (no DP when absent)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    data = check_data(parser, args.data)
    from common.models import model_spec
    from common.uncertainty import augmented

    patches = model_spec(args.model).kind == "patches"
    config = PATCH_CONFIG if patches else CONFIG
    base = FederationConfig.from_mapping(load_config_file(config), str(config))
    cfg = base.model_copy(update={
        "model": args.model, "sites": HOSPITALS,
        # the seed's CNN keeps its own dropout (0.5); MIL models take --dropout
        "model_options": (f"dropout={args.dropout}"
                          if "dropout" in model_spec(args.model).options else ""),
        "dp": args.epsilon is not None, "epsilon": args.epsilon or base.epsilon})
    emb = embed(data, args.out, cfg.patch_size, "" if patches else cfg.encoder)
    pooled: dict[int, list[tuple[np.ndarray, ...]]] = {}
    for k, test in enumerate(cv_folds(emb.labels, args.folds, args.repeats, cfg.seed)):
        # image patches are large: one folder, rewritten every fold
        folder = (args.out / "folds" / ("patches" if patches else
                                        f"repeat{k // args.folds}-fold{k % args.folds}"))
        write_fold(emb, test, folder)
        files = ([folder / "central.npz"] if args.setting == "central" else
                 [folder / f"site-{h}.npz" for h in range(HOSPITALS)])
        weights, _ = train_inprocess(cfg.model_copy(update={"data": str(folder)}), files)
        model = build_model(cfg.model, **model_kwargs(
            cfg, None if patches else emb.bags[0].shape[1]))
        set_weights(model, weights)
        idx = np.flatnonzero(test)
        model.eval()
        if patches:  # every patch of each image, one image at a time
            from simulations.paper import image_tensor

            per_image = [image_tensor(emb.bags[i]) for i in idx]
            with torch.no_grad():
                plain = np.array([float(torch.sigmoid(model.scores(x))[0])  # type: ignore[operator]
                                  for x in per_image])
            mcs = [mc_dropout(model, (x,), passes=args.passes, seed=k) for x in per_image]
            ttas = [augmented(model, x, passes=args.passes, seed=k) for x in per_image]
            mc_p = np.concatenate([m.probability for m in mcs])
            mc_u = np.concatenate([m.uncertainty for m in mcs])
            tta = (np.concatenate([t.probability for t in ttas]),
                   np.concatenate([t.uncertainty for t in ttas]))
            labels_np = emb.labels[idx] > 0
        else:
            *inputs, labels_t = BagSet(tuple(emb.bags[i] for i in idx), emb.labels[idx],
                                       tuple(emb.names[i] for i in idx)).to_dataset().tensors
            with torch.no_grad():
                plain = torch.sigmoid(model.scores(*inputs)).double().numpy()  # type: ignore[operator]
            mc = mc_dropout(model, tuple(inputs), passes=args.passes, seed=k)
            mc_p, mc_u = mc.probability, mc.uncertainty
            tta = (np.full(len(idx), np.nan), np.full(len(idx), np.nan))
            labels_np = labels_t.numpy() > 0.5
        pooled.setdefault(k // args.folds, []).append(
            (labels_np, plain, mc_p, mc_u, *tta))
    rows: dict[str, list[float]] = {"no abstention": [], "confidence (distance of p from 0.5)": [],
                                    f"MC dropout ({args.passes} passes)": []}
    if patches:
        rows[f"test-time augmentation ({args.passes} rotations/flips)"] = []
    for parts in pooled.values():  # every image of a repeat, tested by its fold's model
        labels, plain, prob, spread, tta_p, tta_u = (np.concatenate(x) for x in zip(*parts))
        keys = list(rows)
        rows[keys[0]].append(float(((plain > 0.5) == labels).mean()))
        rows[keys[1]].append(accuracy_at_coverage(plain, -np.abs(plain - 0.5), labels,
                                                  args.coverage))
        rows[keys[2]].append(accuracy_at_coverage(prob, spread, labels, args.coverage))
        if patches:
            rows[keys[3]].append(accuracy_at_coverage(tta_p, tta_u, labels, args.coverage))
    dp = f"DP at epsilon {args.epsilon:g}" if args.epsilon is not None else "no DP"
    drop = "its own dropout 0.5" if patches else f"dropout {args.dropout:g}"
    lines = [f"{args.model} ({drop}), {args.setting}, {dp}: test accuracy "
             f"of the {100 * args.coverage:.0f} % most confident images of each repeat "
             f"({args.folds}-fold cross-validation x {args.repeats})", "",
             "| ranking | accuracy (mean ± sd over repeats) |", "|---|---|"]
    lines += [f"| {name} | {np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f} |"
              for name, v in rows.items()]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "abstention.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "accuracy": rows}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
