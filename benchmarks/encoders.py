"""Foundation-encoder throughput: patches/s of PathFed's encoder call against the bare
network, in one process.

For each encoder (random weights of its published architecture: no weights file is needed
to time it), three rates on the same batch:

- **bare fp32**: the network's forward pass alone on a float tensor already on the device,
  at its input size;
- **bare bf16** (CUDA): the same under bfloat16 autocast, what PathFed runs on a GPU;
- **PathFed**: :class:`common.features.TorchEncoder` on ``uint8`` patches in host memory at
  the slide's patch size (256 px): the transfer, the resize to 224, normalisation, the
  forward pass and the features back to the host.

``python -m benchmarks encoders [--encoders uni lunit-dino] [--device cuda] [--batch 64]``
"""

from __future__ import annotations

import argparse

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks import best


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks encoders")
    parser.add_argument("--encoders", nargs="+", default=["lunit-dino", "uni"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    from common.features import TorchEncoder
    from common.models.foundation import FOUNDATION, build_module, embed_fn

    cuda = args.device.startswith("cuda")
    table = Table(title=f"Foundation encoders on {args.device}, batches of {args.batch}, "
                  f"{args.patch_size}-px uint8 patches (best of {args.repeats})")
    for col in ("encoder", "params", "bare fp32 patches/s", "bare bf16 patches/s",
                "PathFed patches/s", "PathFed / bare (bf16 on CUDA)"):
        table.add_column(col, justify="right")
    rng = np.random.default_rng(0)
    patches = rng.integers(0, 256, (args.batch, args.patch_size, args.patch_size, 3), np.uint8)
    for name in args.encoders:
        arch = FOUNDATION[name]
        torch.manual_seed(0)
        module = build_module(arch).to(args.device)
        embed = embed_fn(arch, module)
        side = arch.resize.input
        x = torch.randn(args.batch, 3, side, side, device=args.device)

        def bare(bf16: bool, embed=embed, x=x) -> None:  # type: ignore[no-untyped-def]
            with torch.inference_mode(), torch.autocast(x.device.type, torch.bfloat16,
                                                         enabled=bf16):
                embed(x)
            _sync(args.device)

        bare(False)  # warm-up
        fp32 = args.batch / best(lambda: bare(False), args.repeats)
        bf16 = args.batch / best(lambda: bare(True), args.repeats) if cuda else float("nan")
        encoder = TorchEncoder(module, name, embed=embed, normalisation=arch.normalisation,
                               resize=arch.resize, batch_size=args.batch, device=args.device)
        encoder(patches[:2])
        ours = args.batch / best(lambda e=encoder: e(patches), args.repeats)  # type: ignore[misc]
        baseline = bf16 if cuda else fp32
        table.add_row(name, f"{sum(p.numel() for p in module.parameters()) / 1e6:.1f} M",
                      f"{fp32:,.1f}", "-" if not cuda else f"{bf16:,.1f}", f"{ours:,.1f}",
                      f"{ours / baseline:.2f}")
        del module, encoder
        if cuda:
            torch.cuda.empty_cache()
    Console().print(table)
    return 0
