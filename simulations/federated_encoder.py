"""A consortium trains its encoder in federation, then its MIL model on the features.

    python -m simulations.federated_encoder --data ../shared/data/ucsb-breast --out runs/fe

1. ``residual-patch-cnn`` (the seed's CNN) trained in federation with DP-SGD and SecAgg+
   on patches labelled with their slide's label (``configs/ucsb-patch-cnn.toml``);
2. its last global checkpoint exported as the ``patch-cnn`` encoder's weights;
3. ``pathfed prepare`` of the images with that encoder (one HDF5 per image);
4. gated attention-MIL trained in federation on those features (``configs/ucsb.toml``).

Both federations spend their own budget: a site's total is the sum of the two epsilons
(basic composition), reported at the end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.config import FederationConfig, load_config_file

CONFIGS = Path(__file__).parent / "configs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.federated_encoder")
    parser.add_argument("--data", required=True, help="labelled image folder (labels.csv)")
    parser.add_argument("--out", required=True, help="folder for the three steps' outputs")
    parser.add_argument("--no-dp", action="store_true")
    args = parser.parse_args(argv)
    from common.logs import setup_logging

    setup_logging(verbose=False)
    import torch

    from common.runs import load_checkpoint
    from common.wsi.extract import prepare
    from simulations.simulate import simulate

    out = Path(args.out)
    dp = {"dp": False} if args.no_dp else {}
    cnn_cfg = FederationConfig.from_mapping(
        {**load_config_file(CONFIGS / "ucsb-patch-cnn.toml"), "data": args.data,
         "out": str(out / "patch-cnn"), **dp})
    cnn = simulate(cnn_cfg)
    arrays = load_checkpoint(out / "patch-cnn" / cnn["checkpoint"])
    weights = out / "patch-cnn.pt"
    torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, weights)
    features = out / "features"
    prepare(args.data, features, mpp=0.5, patch_size=cnn_cfg.patch_size, encoder="patch-cnn",
            weights=weights, slide_mpp=0.5, progress=False)
    mil_cfg = FederationConfig.from_mapping(
        {**load_config_file(CONFIGS / "ucsb.toml"), "data": str(features),
         "out": str(out / "mil"), **dp})
    mil = simulate(mil_cfg)
    total = {site: cnn["epsilon"].get(site, 0.0) + eps for site, eps in mil["epsilon"].items()}
    result = {"patch_cnn": {k: cnn[k] for k in ("auc", "accuracy", "epsilon")},
              "mil": {k: mil[k] for k in ("auc", "accuracy", "epsilon")},
              "epsilon_total": total, "delta_total": cnn["delta"] + mil["delta"]}
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
