"""Feature-extraction benchmark: patches/s of ``prepare`` with each encoder against the
encoder's forward pass alone on random patches of the same size.

``python -m benchmarks extract [--slide FILE] [--patch-size 64] [--encoders ...]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks import best
from benchmarks._slides import slide_folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks extract")
    parser.add_argument("--slide", help="slide file (default: the real CMU slide)")
    parser.add_argument("--synthetic", metavar="WxH", help="use a synthetic slide of this size")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--mpp", type=float, default=0.5)
    parser.add_argument("--encoders", nargs="+", default=["color-texture", "resnet-tiny"])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where torch encoders run (cuda: GPU)")
    args = parser.parse_args(argv)

    from common.features import build_encoder
    from common.wsi.extract import prepare

    table = Table(title=f"Feature extraction, {args.patch_size} px patches at {args.mpp} µm/px, "
                  f"{args.workers} reading worker(s), {args.device} (best of {args.repeats})")
    for col in ("encoder", "dim", "forward alone patches/s", "prepare patches/s",
                "prepare / forward"):
        table.add_column(col, justify="right")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = slide_folder(args.slide, Path(tmp), args.synthetic)
        for name in args.encoders:
            encoder = build_encoder(name)
            module = getattr(encoder, "module", None)
            if module is not None:
                encoder.to(args.device)  # type: ignore[attr-defined]
            batch = rng.integers(0, 256, (256, args.patch_size, args.patch_size, 3), np.uint8)
            forward_alone = encoder
            if module is not None:  # a torch encoder: the module on a random float tensor
                import torch

                x = torch.randn(len(batch), 3, args.patch_size, args.patch_size,
                                device=args.device)

                def forward_alone(_: object) -> object:
                    with torch.inference_mode():
                        out = module(x)
                        if x.is_cuda:
                            torch.cuda.synchronize()
                        return out

            forward_alone(batch[:8])  # warm-up
            forward = best(lambda: forward_alone(batch), args.repeats)
            n_patches = [0]
            run = iter(range(10**6))

            def full(name: str = name) -> None:
                summary = prepare(folder, Path(tmp) / f"{name}-{next(run)}", mpp=args.mpp,
                                  patch_size=args.patch_size, encoder=name,
                                  workers=args.workers, progress=False, device=args.device)
                n_patches[0] = summary.n_patches

            secs = best(full, args.repeats)
            fwd_rate, full_rate = len(batch) / forward, n_patches[0] / secs
            table.add_row(name, str(encoder.dim), f"{fwd_rate:,.0f}", f"{full_rate:,.0f}",
                          f"{full_rate / fwd_rate:.2f}")
    Console().print(table)
    return 0
