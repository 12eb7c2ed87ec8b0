"""Secure aggregation benchmark.

1. Mask expansion throughput: PathFed's ChaCha20 generator against Flower's stock
   ``pseudo_rand_gen``, same sizes, same run (best of ``--repeats``).
2. Round time of a simulated federation with hardened masks against the same federation
   with Flower's stock masks (``PATHFED_SECAGG_MASKS=flower-stock``), at 3 and 10 sites.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from rich.console import Console
from rich.table import Table

from benchmarks import best


def mask_throughput(sizes: list[int], repeats: int) -> Table:
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    from common.crypto import expand_masks

    table = Table(title="SecAgg+ mask expansion (values/s, best of %d)" % repeats)
    for col in ("values", "Flower stock", "PathFed ChaCha20", "ours / stock time"):
        table.add_column(col, justify="right")
    seed = os.urandom(44)
    for n in sizes:
        stock = best(lambda: pseudo_rand_gen(seed, 2**32, [(n,)]), repeats)
        ours = best(lambda: expand_masks(seed, 2**32, [(n,)]), repeats)
        table.add_row(f"{n:,}", f"{n / stock:,.0f}", f"{n / ours:,.0f}", f"{ours / stock:.2f}x")
    return table


def round_times(site_counts: list[int], rounds: int) -> Table:
    import logging

    from common.config import FederationConfig
    from common.crypto import MASKS_ENV
    from simulations.simulate import simulate

    logging.basicConfig(level=logging.WARNING)
    table = Table(title=f"SecAgg+ round time, hardened vs stock masks ({rounds} rounds)")
    for col in ("sites", "stock s/round", "hardened s/round", "hardened / stock"):
        table.add_column(col, justify="right")
    for sites in site_counts:
        per_round = {}
        for masks in ("flower-stock", "chacha20"):
            os.environ[MASKS_ENV] = masks
            with tempfile.TemporaryDirectory() as tmp:
                cfg = FederationConfig(sites=sites, rounds=rounds, synthetic_bags=120,
                                       out=os.path.join(tmp, "run"))
                summary = simulate(cfg)
            per_round[masks] = summary["wall_time_s"] / rounds
        os.environ.pop(MASKS_ENV, None)
        table.add_row(str(sites), f"{per_round['flower-stock']:.2f}",
                      f"{per_round['chacha20']:.2f}",
                      f"{per_round['chacha20'] / per_round['flower-stock']:.2f}x")
    return table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks secagg")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-rounds", action="store_true", help="mask throughput only")
    args = parser.parse_args(argv)
    console = Console()
    console.print(mask_throughput(args.sizes, args.repeats))
    if not args.skip_rounds:
        console.print(round_times(args.sites, args.rounds))
    return 0
