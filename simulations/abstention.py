"""Does MC dropout know when it is wrong? Accuracy at a coverage, on UCSB.

    python -m simulations.abstention --data ../shared/data/ucsb-breast --out results/abstention
        [--model gated-attention-mil] [--dropout 0.25] [--passes 20] [--coverage 0.9]
        [--setting central|federated] [--epsilon 8] [--folds 10 --repeats 5]

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
    base = FederationConfig.from_mapping(load_config_file(CONFIG), str(CONFIG))
    cfg = base.model_copy(update={
        "model": args.model, "model_options": f"dropout={args.dropout}",
        "dp": args.epsilon is not None, "epsilon": args.epsilon or base.epsilon})
    emb = embed(data, args.out, cfg.patch_size, cfg.encoder)
    pooled: dict[int, list[tuple[np.ndarray, ...]]] = {}
    for k, test in enumerate(cv_folds(emb.labels, args.folds, args.repeats, cfg.seed)):
        folder = args.out / "folds" / f"repeat{k // args.folds}-fold{k % args.folds}"
        write_fold(emb, test, folder)
        files = ([folder / "central.npz"] if args.setting == "central" else
                 [folder / f"site-{h}.npz" for h in range(HOSPITALS)])
        weights, _ = train_inprocess(cfg.model_copy(update={"data": str(folder)}), files)
        model = build_model(cfg.model, **model_kwargs(cfg, emb.bags[0].shape[1]))
        set_weights(model, weights)
        idx = np.flatnonzero(test)
        *inputs, labels_t = BagSet(tuple(emb.bags[i] for i in idx), emb.labels[idx],
                                   tuple(emb.names[i] for i in idx)).to_dataset().tensors
        model.eval()
        with torch.no_grad():
            plain = torch.sigmoid(model.scores(*inputs)).double().numpy()  # type: ignore[operator]
        mc = mc_dropout(model, tuple(inputs), passes=args.passes, seed=k)
        pooled.setdefault(k // args.folds, []).append(
            (labels_t.numpy() > 0.5, plain, mc.probability, mc.uncertainty))
    rows: dict[str, list[float]] = {"no abstention": [], "confidence (distance of p from 0.5)": [],
                                    f"MC dropout ({args.passes} passes)": []}
    for parts in pooled.values():  # every image of a repeat, tested by its fold's model
        labels, plain, prob, spread = (np.concatenate(x) for x in zip(*parts))
        keys = list(rows)
        rows[keys[0]].append(float(((plain > 0.5) == labels).mean()))
        rows[keys[1]].append(accuracy_at_coverage(plain, -np.abs(plain - 0.5), labels,
                                                  args.coverage))
        rows[keys[2]].append(accuracy_at_coverage(prob, spread, labels, args.coverage))
    dp = f"DP at epsilon {args.epsilon:g}" if args.epsilon is not None else "no DP"
    lines = [f"{args.model} (dropout {args.dropout:g}), {args.setting}, {dp}: test accuracy "
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
