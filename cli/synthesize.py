"""``pathfed synthesize``: patches drawn from a run's released DP GAN."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``synthesize``."""
    p = sub.add_parser(
        "synthesize", help="draw image patches from a run's DP GAN (model = dp-gan)",
        description="Draw N patches from the generator a `dp-gan` run released (RUN or "
        "RUN/model.npz) and write them to OUT as PNG files with a labels.csv "
        "(image,label), half benign and half malignant unless --label is given. The "
        "generator learnt only through the DP discriminator: drawing costs no privacy.")
    p.add_argument("run", metavar="RUN")
    p.add_argument("--n", type=int, required=True, metavar="N", help="patches to write")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--label", choices=["benign", "malignant"])
    p.add_argument("--seed", type=int, default=0, help="the draw's seed (default 0)")
    p.add_argument("--key-file", metavar="KEY", help="key of an encrypted model")
    p.set_defaults(func=_cmd_synthesize)


def _cmd_synthesize(args: argparse.Namespace) -> int:
    from common.crypto.sealed import load_key
    from common.synthesize import synthesize

    written = synthesize(args.run, args.n, args.out, args.label, args.seed,
                         load_key(args.key_file) if args.key_file else None)
    print(f"{len(written)} patches written to {args.out} (labels.csv lists them)")
    return 0
