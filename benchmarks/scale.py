"""Scale benchmark: peak memory and round time of ``pathfed simulate`` at 10, 50 and 100 sites.

Each federation is the real one (DP-SGD, SecAgg+, synthetic bags), run in a fresh process
whose whole process tree (the server, Ray and its site workers) is sampled for resident
memory every 0.2 s. Every round samples the same number of sites (``--per-round``, 10 by
default), so the sites *training at once* stay fixed while the number of sites grows: memory
should stay flat. The ratios are against the smallest federation, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss(root: int) -> tuple[int, int]:
    """Resident bytes of ``root`` and of ``root`` with all its descendants (Linux /proc)."""
    tree, total, stack = _children(), 0, [root]
    while stack:
        pid = stack.pop()
        total += _rss(pid)
        stack.extend(tree.get(pid, []))
    return _rss(root), total


def measure(sites: int, per_round: int, rounds: int, work: Path) -> dict[str, float]:
    """Run one federation in a child process; its peak memory and seconds per round."""
    out = work / f"run-{sites}"
    cmd = [sys.executable, "-m", "benchmarks.scale", "--one", str(sites), "--per-round",
           str(per_round), "--rounds", str(rounds), "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_main = peak_tree = 0
    while proc.poll() is None:
        main, total = tree_rss(proc.pid)
        peak_main, peak_tree = max(peak_main, main), max(peak_tree, total)
        time.sleep(0.2)
    if proc.returncode != 0:
        raise RuntimeError(f"{sites} sites: federation failed:\n{proc.stderr.read()[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"peak_tree": peak_tree, "peak_main": peak_main,
            "s_per_round": summary["wall_time_s"] / rounds}


def _one(sites: int, per_round: int, rounds: int, out: str) -> None:
    from common.config import FederationConfig
    from simulations.simulate import simulate

    cfg = FederationConfig(sites=sites, rounds=rounds, fraction_fit=min(1.0, per_round / sites),
                           synthetic_bags=60, out=out)
    simulate(cfg)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks scale")
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--per-round", type=int, default=10, help="sites sampled each round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        _one(args.one, args.per_round, args.rounds, args.out)
        return 0
    table = Table(title=f"Simulation scale: {args.per_round} sites train per round, "
                        f"{args.rounds} rounds, DP + SecAgg+")
    for col in ("sites", "peak RSS, all processes", "ratio", "peak RSS, server process",
                "ratio", "s/round", "ratio"):
        table.add_column(col, justify="right")
    base: dict[str, float] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for sites in args.sites:
            m = measure(sites, args.per_round, args.rounds, Path(tmp))
            base = base or m
            table.add_row(
                str(sites), f"{m['peak_tree'] / 2**20:,.0f} MiB",
                f"{m['peak_tree'] / base['peak_tree']:.2f}x",
                f"{m['peak_main'] / 2**20:,.0f} MiB",
                f"{m['peak_main'] / base['peak_main']:.2f}x",
                f"{m['s_per_round']:.1f}", f"{m['s_per_round'] / base['s_per_round']:.2f}x")
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
