"""Secure aggregation benchmark.

1. Round cost: wall time per round and bytes each site uploads per round, SecAgg+ against
   plain FedAvg in the same run, at 3, 10 and 30 sites for 1M and 10M parameters; bytes are
   divided by the float32 size of the update (sites send fixed updates: aggregation only).
2. Mask expansion throughput: PathFed's ChaCha20 generator against Flower's stock
   ``pseudo_rand_gen``, same sizes, same run (best of ``--repeats``).
3. Round time of a real PathFed federation (DP training on synthetic bags) without SecAgg+,
   with Flower's stock masks (``PATHFED_SECAGG_MASKS=flower-stock``) and with PathFed's
   hardened masks, at 3 and 10 sites.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

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


def round_cost(site_counts: list[int], sizes: list[int], rounds: int,
               num_shares: float, dropout: float) -> Table:
    from benchmarks._rounds import run
    from common.crypto import choose_shares

    shares = (f"secagg-num-shares {num_shares:g}" if num_shares
              else f"shares chosen for secagg-dropout {dropout:g}")
    table = Table(title=f"SecAgg+ vs plain FedAvg, per round (rounds 2-{rounds}; sites send "
                        f"fixed float32 updates; {shares})")
    for col in ("sites", "params", "shares / threshold", "plain s/round", "SecAgg+ s/round",
                "time SecAgg+ / plain", "plain bytes / float32", "SecAgg+ bytes / float32"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            for sites in site_counts:
                plain = run(sites, n, rounds, False, Path(tmp))
                secure = run(sites, n, rounds, True, Path(tmp), num_shares, dropout)
                choice = choose_shares(sites, dropout, num_shares)
                table.add_row(
                    str(sites), f"{n / 1e6:g}M", f"{choice.shares} / {choice.threshold}",
                    f"{plain['s_per_round']:.2f}",
                    f"{secure['s_per_round']:.2f}",
                    f"{secure['s_per_round'] / plain['s_per_round']:.2f}x",
                    f"{plain['bytes_per_site_round'] / (4 * n):.3f}x",
                    f"{secure['bytes_per_site_round'] / (4 * n):.3f}x")
    return table


def round_times(site_counts: list[int], rounds: int) -> Table:
    """Real PathFed federations (DP training on synthetic bags): SecAgg+ off, SecAgg+ with
    Flower's stock masks, SecAgg+ with PathFed's hardened masks."""
    import logging

    from common.config import FederationConfig
    from common.crypto import MASKS_ENV
    from simulations.simulate import simulate

    logging.basicConfig(level=logging.WARNING)
    table = Table(title=f"PathFed federation (DP, synthetic bags), s/round over {rounds} rounds")
    for col in ("sites", "plain FedAvg", "SecAgg+, stock masks", "SecAgg+, hardened masks",
                "hardened / stock", "hardened / plain"):
        table.add_column(col, justify="right")
    for sites in site_counts:
        per_round = {}
        for variant in ("off", "flower-stock", "chacha20"):
            os.environ[MASKS_ENV] = "chacha20" if variant == "off" else variant
            with tempfile.TemporaryDirectory() as tmp:
                cfg = FederationConfig(sites=sites, rounds=rounds, synthetic_bags=120,
                                       secagg=variant != "off", out=os.path.join(tmp, "run"))
                summary = simulate(cfg)
            per_round[variant] = summary["wall_time_s"] / rounds
        os.environ.pop(MASKS_ENV, None)
        table.add_row(str(sites), f"{per_round['off']:.2f}", f"{per_round['flower-stock']:.2f}",
                      f"{per_round['chacha20']:.2f}",
                      f"{per_round['chacha20'] / per_round['flower-stock']:.2f}x",
                      f"{per_round['chacha20'] / per_round['off']:.2f}x")
    return table


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks secagg")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 30])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-shares", type=float, default=0.0,
                        help="secagg-num-shares: 0 (chosen from --dropout), a fraction of the "
                             "sites, or a count > 2")
    parser.add_argument("--dropout", type=float, default=0.2, help="secagg-dropout")
    parser.add_argument("--skip-cost", action="store_true", help="no SecAgg+ vs plain table")
    parser.add_argument("--skip-masks", action="store_true", help="no hardened vs stock tables")
    args = parser.parse_args(argv)
    console = Console()
    if not args.skip_cost:
        console.print(round_cost(args.sites, args.sizes, args.rounds, args.num_shares,
                                 args.dropout))
    if not args.skip_masks:
        console.print(mask_throughput(args.sizes, args.repeats))
        console.print(round_times([s for s in args.sites if s <= 10], args.rounds))
    return 0
