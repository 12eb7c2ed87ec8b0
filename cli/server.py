"""``pathfed server start`` and ``pathfed run``: the consortium's SuperLink and a federated
run submitted to it by the coordinator. See docs/deploy.md."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from cli._shared import settings, wait

log = logging.getLogger("pathfed")


def add_parser(sub: Any) -> None:
    """Register ``server`` and ``run``."""
    server = sub.add_parser("server", help="run the consortium's SuperLink")
    vsub = server.add_subparsers(dest="action", required=True, metavar="ACTION")
    vstart = vsub.add_parser("start", help="start the SuperLink (stays in the foreground)")
    vstart.add_argument("--consortium", required=True, metavar="DIR",
                        help="the consortium folder (certificates, allow-list, keys)")
    vstart.add_argument("--insecure", action="store_true", help="NO TLS, NO authentication")
    vstart.set_defaults(func=_cmd_server_start)

    run = sub.add_parser(
        "run", help="run the federation on the consortium's sites",
        description="Build and sign the consortium's Flower app, submit it to the running "
        "SuperLink with the coordinator's token (`flwr run`), stream its log, and check "
        "the run folder it writes on the server. Exit 0 only when a global model was "
        "trained. Sites decide their own noise and lifetime budget (see docs/deploy.md).")
    run.add_argument("--consortium", required=True, metavar="DIR",
                     help="the consortium folder (holds the coordinator's token)")
    run.add_argument("--config", metavar="FILE", help="TOML settings (as for simulate); "
                     "give the sites' data settings (encoder, patch size)")
    run.add_argument("--out", metavar="RUN_DIR",
                     help="run folder on the server machine (default runs/<timestamp>)")
    run.add_argument("--rounds", type=int, metavar="R", help="federated rounds")
    run.add_argument("--resume", action="store_true", help="continue RUN_DIR after a restart")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="any other setting, e.g. --set epsilon=3 (repeatable)")
    run.add_argument("--insecure", action="store_true", help="NO TLS, NO authentication")
    run.set_defaults(func=_cmd_run)


def _cmd_server_start(args: argparse.Namespace) -> int:
    from server.deploy import start_server

    proc = start_server(args.consortium, insecure=args.insecure)
    log.info("server: SuperLink started (pid %d); Ctrl-C to stop", proc.pid)
    return wait(proc, "server")


def _cmd_run(args: argparse.Namespace) -> int:
    from common.crypto.consortium import Consortium
    from common.runs import default_run_dir
    from server.deploy import submit_run

    cfg = settings(args.config, args.set, {"rounds": args.rounds, "out": args.out})
    consortium = Consortium(Path(args.consortium))
    out = Path(cfg.out or default_run_dir()).resolve()
    sites = len(consortium.allowed_sites()) or cfg.sites
    # Deployed sites draw DP noise from the OS unless told otherwise explicitly.
    seeded = any(item.split("=", 1)[0].strip() == "deterministic" for item in args.set)
    cfg = cfg.model_copy(update={"out": str(out), "run_id": cfg.run_id or out.name,
                                 "sites": sites, "resume": args.resume,
                                 "deterministic": cfg.deterministic and seeded,
                                 "keys": cfg.keys or str(consortium.ledger_keys.resolve())})
    rc = submit_run(consortium.root, cfg, insecure=args.insecure)
    summary = out / "summary.json"
    if rc != 0:
        return rc
    if not summary.is_file():
        log.error("the run wrote no %s: the server app did not finish (see the server log)",
                  summary)
        return 1
    result = json.loads(summary.read_text())
    if not result.get("rounds_with_model"):
        log.error("no round produced a global model: %s", result.get("error")
                  or "every site's update failed or was rejected (see the server log)")
        return 1
    print(f"results: {summary}, metrics.jsonl, checkpoints/")
    return 0
