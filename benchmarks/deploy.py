"""Deployed round against simulated round: ``python -m benchmarks deploy``.

The same federation (3 sites of synthetic bags, DP-SGD, SecAgg+, the default model) runs
twice in this one command:

- **simulated**: ``pathfed simulate``'s engine (Ray, one process);
- **deployed**: a real consortium on 127.0.0.1, as ``tests/test_deploy.py`` starts it:
  ``flower-superlink`` with TLS and SuperNode authentication, one ``flower-supernode`` per
  site, the consortium's signed app submitted with ``flwr run``.

Each run's ``metrics.jsonl`` stamps every round with the seconds since the server started
it (``elapsed_s``). The table gives the first round (sites load their data and plan their
privacy) and the mean of the later rounds, and the deployed/simulated ratio of each.
The deployment runs twice: with Flower's own poll intervals (``PATHFED_FLOWER_POLLS=1``:
the ServerApp checks for replies every 3 s, an idle SuperNode every 3 s, the SuperExec
every 1 s) and with PathFed's (``server/grid.py``, ``client/supernode.py``,
``common/deployment.py``). While it runs, every process under the SuperLink and the
SuperNodes is sampled for CPU time (Linux ``/proc``), so the table also shows where a
round's CPU goes: Flower starts one ClientApp process per message.
``--insecure`` adds a run without TLS and authentication, to show what they cost.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _paces(run: Path) -> tuple[float, float]:
    """First round's seconds and the mean seconds of the later rounds."""
    from common.runs import read_metrics

    stamps = [r["elapsed_s"] for r in read_metrics(run) if r["site"] == "global"]
    if len(stamps) < 2:
        raise RuntimeError(f"{run}: {len(stamps)} round(s) recorded; need at least 2")
    return stamps[0], (stamps[-1] - stamps[0]) / (len(stamps) - 1)


def _config(work: Path, name: str, sites: int, rounds: int, **extra: Any) -> Any:
    from common.config import FederationConfig

    return FederationConfig(sites=sites, rounds=rounds, out=str(work / name), run_id=name,
                            seed=3, synthetic_bags=80, timeout=120, **extra)


def simulated(work: Path, sites: int, rounds: int) -> tuple[float, float]:
    """Run the federation in Flower's simulation engine, in a child process."""
    cfg = _config(work, "simulated", sites, rounds)
    config = work / "simulated.json"
    config.write_text(json.dumps(cfg.to_run_config()))
    subprocess.run([sys.executable, "-m", "benchmarks.deploy", "--simulate-config",
                    str(config)], check=True, stdout=subprocess.DEVNULL)
    return _paces(work / "simulated")


KINDS = (("flwr-clientapp", "ClientApps"), ("flwr-serverapp", "ServerApp"),
         ("server.superlink", "SuperLink"), ("flower-superlink", "SuperLink"),
         ("client.supernode", "SuperNodes"), ("flower-supernode", "SuperNodes"),
         ("superexec", "SuperExecs"))
"""Process kinds by their command line, the first match wins (the SuperLink's names a
SuperExec secret file)."""


class CpuSampler(threading.Thread):
    """CPU seconds of every process under ``roots`` (and how many), by kind."""

    def __init__(self, roots: list[int]) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.seen: dict[int, tuple[str, float]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        from benchmarks.scale import _children

        tick = os.sysconf("SC_CLK_TCK")
        while not self.done.wait(0.1):
            tree, stack = _children(), list(self.roots)
            while stack:
                pid = stack.pop()
                stack.extend(tree.get(pid, []))
                try:
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                kind = next((k for key, k in KINDS if key.encode() in cmd), "other")
                if not cmd.strip() and pid in self.seen:  # exited, not yet reaped
                    kind = self.seen[pid][0]
                self.seen[pid] = (kind, (int(stat[11]) + int(stat[12])) / tick)

    def totals(self) -> dict[str, tuple[float, int]]:
        self.done.set()
        self.join()
        out: dict[str, tuple[float, int]] = {}
        for kind, cpu in self.seen.values():
            total, count = out.get(kind, (0.0, 0))
            out[kind] = (total + cpu, count + 1)
        return out


def deployed(work: Path, sites: int, rounds: int, insecure: bool, stock: bool,
             ) -> tuple[tuple[float, float], dict[str, tuple[float, int]]]:
    """Run the federation on a consortium of real Flower processes on 127.0.0.1; its
    paces and the CPU its processes used, by kind."""
    from client.deploy import start_site
    from common.crypto.consortium import enroll_site, init_consortium
    from common.data import save_site_file
    from common.data.synthetic import synthetic_site
    from common.deployment import STOCK_POLLS_ENV, free_port, stop_process
    from server.deploy import run_command, start_server

    os.environ[STOCK_POLLS_ENV] = "1" if stock else "0"
    root = work / (("insecure" if insecure else "tls") + ("-flower-polls" if stock else ""))
    consortium = init_consortium(root / "consortium", ["127.0.0.1", "localhost"],
                                 port=free_port())
    names = [f"site{i}" for i in range(sites)]
    data = {}
    for index, name in enumerate(names):
        enroll_site(consortium.root, name)
        data[name] = save_site_file(synthetic_site(index, seed=3, n_bags=80),
                                    root / f"{name}.npz")
    cfg = _config(root, "run", sites, rounds, keys=str(consortium.ledger_keys))
    logs = root / "logs"
    logs.mkdir()
    procs = {"server": start_server(consortium.root, insecure, log_file=logs / "server.log")}
    try:
        for name in names:
            procs[name] = start_site(consortium.root, name, data[name], insecure=insecure,
                                     log_file=logs / f"{name}.log")
        cmd, env, overrides = run_command(consortium.root, cfg, insecure)
        sampler = CpuSampler([p.pid for p in procs.values()])
        sampler.start()
        with (logs / "run.log").open("w") as out:
            rc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=120 + 120 * rounds).returncode
        cpu = sampler.totals()
        overrides.unlink(missing_ok=True)
        if rc != 0:
            raise RuntimeError(f"flwr run exited {rc}; see {logs / 'run.log'}")
        return _paces(root / "run"), cpu
    finally:
        os.environ.pop(STOCK_POLLS_ENV, None)
        for proc in procs.values():
            stop_process(proc)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks deploy")
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (at least 2)")
    parser.add_argument("--insecure", action="store_true",
                        help="also run the deployment without TLS and node authentication")
    parser.add_argument("--keep", help="keep the runs and logs in this folder")
    parser.add_argument("--simulate-config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.simulate_config:
        from common.config import FederationConfig
        from simulations.simulate import simulate

        simulate(FederationConfig.from_mapping(
            json.loads(Path(args.simulate_config).read_text()), args.simulate_config))
        return 0
    if args.rounds < 2:
        parser.error("--rounds: at least 2 (the first round is reported on its own)")
    runs = [("deployed, Flower's polls", False, True), ("deployed, PathFed's polls", False, False)]
    if args.insecure:
        runs.append(("deployed, PathFed's polls, no TLS, no auth", True, False))
    rows: list[tuple[str, tuple[float, float], float, dict[str, tuple[float, int]]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        rows.append(("simulated", simulated(work, args.sites, args.rounds),
                     time.perf_counter() - start, {}))
        for name, insecure, stock in runs:
            start = time.perf_counter()
            paces, cpu = deployed(work, args.sites, args.rounds, insecure, stock)
            rows.append((name, paces, time.perf_counter() - start, cpu))
    table = Table(title=f"{args.sites} sites x {args.rounds} rounds, DP-SGD + SecAgg+, one "
                        f"machine of {os.cpu_count()} CPUs: deployed against simulated")
    for col in ("engine", "first round s", "ratio", "later rounds s/round", "ratio",
                "whole command s"):
        table.add_column(col, justify="right")
    (first0, later0) = rows[0][1]
    for name, (first, later), total, _ in rows:
        table.add_row(name, f"{first:.1f}", f"{first / first0:.2f}x", f"{later:.1f}",
                      f"{later / later0:.2f}x", f"{total:.0f}")
    Console().print(table)
    kinds = sorted({k for *_, cpu in rows for k in cpu})
    cpu_table = Table(title=f"CPU seconds per round of the deployed runs, over {args.rounds} "
                            "rounds (processes of each kind in the whole run)")
    cpu_table.add_column("engine", justify="right")
    for kind in kinds:
        cpu_table.add_column(kind, justify="right")
    for name, _, _, cpu in rows[1:]:
        cpu_table.add_row(name, *(
            f"{cpu[k][0] / args.rounds:.1f} ({cpu[k][1]})" if k in cpu
            else "-" for k in kinds))
    Console().print(cpu_table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
