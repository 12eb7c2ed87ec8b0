"""Feature-extraction benchmark: patches/s of ``prepare`` with each encoder against the
encoder's forward pass alone on random patches of the same size, at the batch size where
that forward pass is fastest (``--batches``; the encoder's own batch size inside
``prepare`` is printed beside it).

``python -m benchmarks extract [--slide FILE] [--patch-size 64] [--encoders ...]``
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
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
    parser.add_argument("--workers", type=int, default=1, help="prepare's --workers")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where torch encoders run (cuda: GPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128, 256],
                        help="batch sizes of the forward pass alone; the fastest is the baseline")
    args = parser.parse_args(argv)

    from common.features import build_encoder
    from common.wsi.extract import prepare

    table = Table(title=f"Feature extraction, {args.patch_size} px patches at {args.mpp} µm/px, "
                  f"{args.workers} reading worker(s), {args.device} (best of {args.repeats})")
    for col in ("encoder", "dim", "forward alone patches/s", "at batch", "prepare patches/s",
                "encoder batch in prepare", "prepare / forward"):
        table.add_column(col, justify="right")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = slide_folder(args.slide, Path(tmp), args.synthetic)
        for name in args.encoders:
            encoder = build_encoder(name)
            module = getattr(encoder, "module", None)
            if module is not None:
                encoder.to(args.device)  # type: ignore[attr-defined]
            patches = rng.integers(0, 256, (max(args.batches), args.patch_size,
                                            args.patch_size, 3), np.uint8)
            rates = {}
            for size in args.batches:  # about 256 patches a timing, in batches of `size`
                calls = max(1, max(args.batches) // size)
                rates[size] = size * calls / best(
                    _forward_alone(encoder, patches[:size], args.device, calls), args.repeats)
            at, fwd_rate = max(rates.items(), key=lambda kv: kv[1])
            n_patches = [0]
            run = iter(range(10**6))

            def full(name: str = name) -> None:
                summary = prepare(folder, Path(tmp) / f"{name}-{next(run)}", mpp=args.mpp,
                                  patch_size=args.patch_size, encoder=name,
                                  workers=args.workers, progress=False, device=args.device)
                n_patches[0] = summary.n_patches

            secs = best(full, args.repeats)
            full_rate = n_patches[0] / secs
            table.add_row(name, str(encoder.dim), f"{fwd_rate:,.0f}", str(at),
                          f"{full_rate:,.0f}", str(getattr(encoder, "batch_size", "all")),
                          f"{full_rate / fwd_rate:.2f}")
    Console().print(table)
    return 0


def _forward_alone(encoder: object, patches: np.ndarray, device: str,
                   calls: int) -> Callable[[], object]:
    """``calls`` calls of the encoder's network on one batch, without reading, resizing or
    copying: a torch module on a float tensor already on ``device``; other encoders on the
    patches. Warmed up once."""
    module = getattr(encoder, "module", None)
    if module is None:
        def call() -> object:
            return [encoder(patches) for _ in range(calls)]  # type: ignore[operator]
    else:
        import torch

        x = torch.randn(len(patches), 3, patches.shape[1], patches.shape[2], device=device)

        def call() -> object:
            with torch.inference_mode():
                out = [module(x) for _ in range(calls)]
                if x.is_cuda:
                    torch.cuda.synchronize()
                return out
    call()
    return call
