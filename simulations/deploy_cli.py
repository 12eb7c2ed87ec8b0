"""``pathfed consortium|site|server|run|checkpoint``: a real consortium over Flower's
deployment engine (SuperLink, SuperNodes, TLS, SuperNode authentication).

The commands a hospital runs are in ``docs/deploy.md``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from common.errors import ConfigError, DataError

log = logging.getLogger("pathfed")


def _check_out(out: str) -> None:
    """An output file path must not be a folder, and its folder must exist."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out: {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise ConfigError(f"--out: folder {path.parent} does not exist")


def add_parsers(sub: Any) -> None:
    consortium = sub.add_parser("consortium", help="create a consortium (CA, server certificate)")
    csub = consortium.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = csub.add_parser("init", help="create the consortium folder")
    init.add_argument("dir", metavar="DIR")
    init.add_argument("--server-host", action="append", required=True, metavar="HOST",
                      help="name or IP the sites use to reach the server (repeatable)")
    init.add_argument("--port", type=int, default=9091, help="SuperLink port (default 9091)")
    init.set_defaults(func=_cmd_init)

    site = sub.add_parser("site", help="enrol, start or remove a hospital site")
    ssub = site.add_subparsers(dest="action", required=True, metavar="ACTION")
    enroll = ssub.add_parser("enroll", help="make a site's keys and allow-list it")
    enroll.add_argument("name", metavar="NAME")
    enroll.add_argument("--consortium", required=True, metavar="DIR")
    enroll.set_defaults(func=_cmd_enroll)
    remove = ssub.add_parser("remove", help="take a site off the allow-list")
    remove.add_argument("name", metavar="NAME")
    remove.add_argument("--consortium", required=True, metavar="DIR")
    remove.set_defaults(func=_cmd_remove)
    start = ssub.add_parser("start", help="run the site's SuperNode (stays in the foreground)")
    start.add_argument("name", metavar="NAME")
    start.add_argument("--consortium", required=True, metavar="DIR",
                       help="the consortium folder, or the site folder copied from it")
    start.add_argument("--data", required=True, metavar="DATA_DIR",
                       help="the site's data: labelled images, prepared features or a site file")
    start.add_argument("--state", metavar="DIR", help="where the site keeps its privacy state")
    start.add_argument("--lifetime-epsilon", type=float, default=30.0, metavar="E",
                       help="the most epsilon this site spends over all runs (default 30)")
    start.add_argument("--seeded-noise", action="store_true",
                       help="reproducible DP noise (tests only: it can be removed by anyone "
                       "who knows the seed)")
    start.add_argument("--insecure", action="store_true", help="NO TLS, NO authentication")
    start.set_defaults(func=_cmd_site_start)

    server = sub.add_parser("server", help="run the consortium's SuperLink")
    vsub = server.add_subparsers(dest="action", required=True, metavar="ACTION")
    vstart = vsub.add_parser("start", help="start the SuperLink (stays in the foreground)")
    vstart.add_argument("--consortium", required=True, metavar="DIR")
    vstart.add_argument("--insecure", action="store_true", help="NO TLS, NO authentication")
    vstart.set_defaults(func=_cmd_server_start)

    run = sub.add_parser("run", help="run the federation on the consortium's sites")
    run.add_argument("--consortium", required=True, metavar="DIR")
    run.add_argument("--config", metavar="FILE", help="TOML settings (as for simulate)")
    run.add_argument("--out", metavar="RUN_DIR", help="run folder on the server machine")
    run.add_argument("--rounds", type=int, metavar="R")
    run.add_argument("--resume", action="store_true", help="continue RUN_DIR after a restart")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--insecure", action="store_true", help="NO TLS, NO authentication")
    run.set_defaults(func=_cmd_run)

    ckpt = sub.add_parser("checkpoint", help="decrypt a released global model")
    ksub = ckpt.add_subparsers(dest="action", required=True, metavar="ACTION")
    dec = ksub.add_parser("decrypt", help="decrypt an encrypted checkpoint to .npz")
    dec.add_argument("file", metavar="FILE")
    dec.add_argument("--key-file", required=True, metavar="KEY")
    dec.add_argument("--out", required=True, metavar="OUT.npz")
    dec.set_defaults(func=_cmd_decrypt)
    exp = ksub.add_parser("export", help="a checkpoint as a PyTorch state dict (.pt), e.g. "
                          "a federated patch CNN for `pathfed prepare --encoder patch-cnn`")
    exp.add_argument("file", metavar="FILE")
    exp.add_argument("--key-file", metavar="KEY", help="for encrypted checkpoints")
    exp.add_argument("--out", required=True, metavar="OUT.pt")
    exp.set_defaults(func=_cmd_export)


def _cmd_init(args: argparse.Namespace) -> int:
    from common.crypto.consortium import init_consortium

    c = init_consortium(args.dir, args.server_host, port=args.port)
    print(f"consortium created in {c.root} (server {c.address})\n"
          f"keep {c.root / 'ca.key'} offline once sites are enrolled; "
          f"give hospitals nothing from here but their site folder")
    return 0


def _cmd_enroll(args: argparse.Namespace) -> int:
    from common.crypto.consortium import enroll_site

    folder = enroll_site(args.consortium, args.name)
    print(f"site {args.name} enrolled; its public key is on the allow-list.\n"
          f"Copy {folder} to the site's machine (it holds the site's private key: use a "
          f"secure channel). If the server is running, restart it to admit the site.\n"
          f"At the site: pathfed site start {args.name} --consortium <that folder> "
          f"--data <data>")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    from common.crypto.consortium import remove_site

    remove_site(args.consortium, args.name)
    print(f"site {args.name} removed from the allow-list")
    return 0


def _wait(proc: Any, what: str) -> int:
    from common.deployment import stop_process

    def _stop(signum: int, _frame: object) -> None:
        stop_process(proc)
        sys.exit(0)

    signal.signal(signal.SIGTERM, _stop)
    try:
        return int(proc.wait())
    except KeyboardInterrupt:
        log.info("stopping %s", what)
        stop_process(proc)
        return 0


def _cmd_site_start(args: argparse.Namespace) -> int:
    from client.deploy import start_site

    proc = start_site(args.consortium, args.name, args.data, args.state, insecure=args.insecure,
                      lifetime_epsilon=args.lifetime_epsilon, seeded_noise=args.seeded_noise)
    log.info("site %s: SuperNode started (pid %d); Ctrl-C to stop", args.name, proc.pid)
    return _wait(proc, f"site {args.name}")


def _cmd_server_start(args: argparse.Namespace) -> int:
    from server.deploy import start_server

    proc = start_server(args.consortium, insecure=args.insecure)
    log.info("server: SuperLink started (pid %d); Ctrl-C to stop", proc.pid)
    return _wait(proc, "server")


def _cmd_run(args: argparse.Namespace) -> int:
    from common.crypto.consortium import Consortium
    from common.runs import default_run_dir
    from server.deploy import submit_run
    from simulations.cli import simulate_config

    args.data = args.sites = args.epsilon = args.delta = args.seed = None
    args.no_dp = args.no_secagg = False
    cfg = simulate_config(args)
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
    import json

    result = json.loads(summary.read_text())
    if not result.get("rounds_with_model"):
        log.error("no round produced a global model: %s", result.get("error")
                  or "every site's update failed or was rejected (see the server log)")
        return 1
    print(f"results: {summary}, metrics.jsonl, checkpoints/")
    return 0


def _cmd_decrypt(args: argparse.Namespace) -> int:
    import numpy as np

    from common.crypto.sealed import load_key
    from common.runs import load_checkpoint

    from common.crypto.sealed import MAGIC, SUFFIX, sealed_run

    path = Path(args.file)
    key = load_key(args.key_file)
    try:
        head = path.read_bytes()[: len(MAGIC) + 260]
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder; give a checkpoint file") from None
    if not path.name.endswith(SUFFIX) or not head.startswith(MAGIC):
        raise DataError(f"{path}: not an encrypted checkpoint (nothing to decrypt); "
                        "load it as it is, without --key-file")
    arrays = load_checkpoint(path, key)
    _check_out(args.out)
    np.savez(args.out, **arrays)
    print(f"decrypted {len(arrays)} arrays of run {sealed_run(head, str(path))!r} to {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import torch

    from common.crypto.sealed import load_key
    from common.runs import load_checkpoint

    arrays = load_checkpoint(args.file, load_key(args.key_file) if args.key_file else None)
    _check_out(args.out)
    torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, args.out)
    print(f"wrote {len(arrays)} tensors to {args.out}")
    return 0
