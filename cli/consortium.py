"""``pathfed consortium init`` and ``pathfed site enroll|remove|start``: the consortium's
keys (coordinator) and a hospital's SuperNode (at the hospital). See docs/deploy.md."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from cli._shared import wait

log = logging.getLogger("pathfed")


def add_parser(sub: Any) -> None:
    """Register ``consortium`` and ``site``."""
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


def _cmd_site_start(args: argparse.Namespace) -> int:
    from client.deploy import start_site

    proc = start_site(args.consortium, args.name, args.data, args.state, insecure=args.insecure,
                      lifetime_epsilon=args.lifetime_epsilon, seeded_noise=args.seeded_noise)
    log.info("site %s: SuperNode started (pid %d); Ctrl-C to stop", args.name, proc.pid)
    return wait(proc, f"site {args.name}")
