"""Transfer to a new hospital whose stain differs: the released model, fine-tuned, or new.

    python -m simulations.transfer --out results/transfer [--epsilon 8] [--slides 32]

1. Three hospitals of generated slides (``simulations.wsi_demo``'s: half with a tumour focus)
   train gated attention-MIL in federation with DP at ``--epsilon`` each (10 rounds,
   in process) and release it;
2. a fourth hospital's slides are generated with another stain (haematoxylin and eosin
   scaled in optical density, as a different scanner and protocol would give), prepared
   with the same settings;
3. on that hospital's held-out split (the same slides for every row): the released model
   as it is, the model fine-tuned there (``pathfed finetune``: ``--rounds`` rounds of DP-SGD
   at the hospital's own ``--epsilon``), fine-tuned with ``--freeze`` layers fixed, and a
   model trained there alone from scratch with the same rounds and budget.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np

STAIN = (1.5, 1.25)
"""The new hospital's haematoxylin and eosin, as multiples of the others' (optical density)."""


def restain(image: np.ndarray, h: float, e: float) -> np.ndarray:
    """``image`` with its haematoxylin and eosin optical densities scaled by ``h`` and ``e``."""
    from common.wsi.stain import HED_FROM_RGB, RGB_FROM_HED, from_od, to_od

    hed = to_od(image) @ HED_FROM_RGB
    hed[..., 0] *= h
    hed[..., 1] *= e
    return from_od(hed @ RGB_FROM_HED)


def _restain_folder(folder: Path, h: float, e: float) -> None:
    from common.wsi.reader import open_slide
    from common.wsi.synthetic import write_pyramid_tiff

    for path in sorted(folder.glob("*.tif")):
        with open_slide(path) as reader:
            w, h0 = reader.dimensions
            image = reader.read_region((0, 0), 0, (w, h0))
        write_pyramid_tiff(path, restain(image, h, e), mpp=0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.transfer",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--slides", type=int, default=32, help="slides per hospital")
    parser.add_argument("--new-slides", type=int, help="the new hospital's slides (default "
                        "--slides)")
    parser.add_argument("--stain", default=f"{STAIN[0]},{STAIN[1]}", metavar="H,E",
                        help="the new hospital's haematoxylin and eosin optical densities as "
                        "multiples of the others'")
    parser.add_argument("--rounds", type=int, default=5, help="fine-tuning rounds")
    parser.add_argument("--freeze", default="embed", metavar="PREFIX[,PREFIX]",
                        help="a second fine-tuned row with these layers frozen (default: the "
                        "feature embedding; '' for none)")
    args = parser.parse_args(argv)
    stain = tuple(float(v) for v in args.stain.split(","))
    logging.basicConfig(level=logging.WARNING)
    from common.config import FederationConfig
    from common.fedavg import run_inprocess
    from common.finetune import finetune
    from common.site import Site
    from common.wsi.extract import prepare
    from simulations.wsi_demo import make_slides

    train = dict(batch_size=8, local_epochs=2, optimizer="adam", lr=0.01, dp=True,
                 epsilon=args.epsilon, secagg=False)
    base_slides = args.out / "base" / "slides"
    if not (base_slides / "labels.csv").is_file():
        make_slides(base_slides, 3, args.slides, size=(768, 512))
    prepare(base_slides, args.out / "base" / "features", mpp=1.0, patch_size=32,
            progress=False)
    base = args.out / "base" / "run"
    if not (base / "model.npz").is_file():
        run_inprocess(FederationConfig(sites=3, rounds=10, data=str(args.out / "base" /
                                                                    "features"), **train),
                      run_dir=base)
    new_slides = args.out / "new" / "slides"
    made = {"stain": list(stain), "slides": args.new_slides or args.slides}
    record = new_slides / "made.json"
    if (new_slides / "labels.csv").is_file() and (
            not record.is_file() or json.loads(record.read_text()) != made):
        raise SystemExit(f"{new_slides} holds slides made with other --stain or --new-slides "
                         f"settings; give another --out")
    if not (new_slides / "labels.csv").is_file():
        make_slides(new_slides, 1, made["slides"], size=(768, 512), seed=7)
        _restain_folder(new_slides, *stain)
        record.write_text(json.dumps(made))
    features = args.out / "new" / "features"
    prepare(new_slides, features, mpp=1.0, patch_size=32, progress=False)
    cfg = FederationConfig(data=str(features), rounds=args.rounds, **train)
    tuned = finetune(base, cfg, args.out / "new" / "finetuned")
    frozen = (finetune(base, cfg.model_copy(update={"freeze": args.freeze}),
                       args.out / "new" / "finetuned-frozen") if args.freeze else None)
    scratch_site = Site(cfg, 0, name="site-0", data=str(features))
    scratch = run_inprocess(cfg, [scratch_site], run_dir=args.out / "new" / "scratch")
    alone, _ = scratch_site.evaluate(scratch.weights)
    rows = {"released model, as it is": tuned.before,
            f"fine-tuned there ({args.rounds} rounds, DP at epsilon {args.epsilon:g})":
                tuned.after,
            **({f"fine-tuned there, {args.freeze} frozen": frozen.after} if frozen else {}),
            f"trained there alone from scratch ({args.rounds} rounds, DP at epsilon "
            f"{args.epsilon:g})": {
                "auc": float(alone.auc), "accuracy": float(alone.accuracy),
                "balanced_accuracy": float(alone.balanced_accuracy)}}
    n_val = len(scratch_site.data.val)
    (args.out / "transfer.json").write_text(json.dumps({"rows": rows, "val_slides": n_val,
                                                        "stain": stain}, indent=1))
    print(f"new hospital (stain H x{stain[0]:g}, E x{stain[1]:g}), {n_val} held-out slides:")
    print("| model | AUC | balanced accuracy |\n|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['auc']:.3f} | {r['balanced_accuracy']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
