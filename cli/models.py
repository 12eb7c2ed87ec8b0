"""``pathfed models``: the models PathFed trains and the encoders ``prepare`` uses."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``models``."""
    p = sub.add_parser("models", help="list the models (with kind and options) and encoders",
                       description="List every registered model (its kind: bags of "
                       "features, multi-scale bags of regions or image patches, and its "
                       "options) and every patch encoder.")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from common.features import ENCODERS, IMAGENET_MEAN, TIMM
    from common.models import MODELS

    models = {name: {"kind": spec.kind, "trains": spec.trains, "summary": spec.summary,
                     "options": spec.options,
                     "choices": {k: list(v) for k, v in spec.choices.items()}}
              for name, spec in sorted(MODELS.items())}
    encoders = {name: spec.describe() for name, spec in sorted(ENCODERS.items())}
    encoders["timm:ARCH"] = TIMM.describe()
    if args.json:
        print(json.dumps({"models": models, "encoders": encoders}, indent=2))
        return 0
    print("models (--set model=NAME --set model-options=NAME=VALUE,...):")
    for name, m in models.items():
        options = ", ".join(f"{k}={v}" for k, v in m["options"].items()) or "-"
        print(f"  {name:<22} {m['kind']:<10} {m['summary']}  [options: {options}]")
    print("encoders (pathfed prepare --encoder NAME, --set encoder=NAME):")
    for name, e in encoders.items():
        norm = ("raw pixels" if not e["normalisation"] else "ImageNet mean/std"
                if tuple(e["normalisation"]["mean"]) == IMAGENET_MEAN else "its own mean/std")
        size = {"any": "any patch size", "weights": "patch size of its weights"}.get(
            str(e["input_size"]), f"{e['input_size']} px")
        if "preprocess" in e:
            size += f", {e['preprocess']}"
        dim = f"{e['dim']}-d" if e["dim"] else "size from weights"
        print(f"  {name:<22} {e['summary']}\n  {'':<22} [weights: {e['weights']}; {dim}; "
              f"{size}; {norm}]")
    return 0
