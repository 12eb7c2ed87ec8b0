"""Flower ServerApp: parse the run config, then run PathFed's federation.

``flwr run .`` uses the module-level ``app``; ``pathfed simulate`` builds one with
:func:`make_server_app` around an already validated configuration.
"""

from __future__ import annotations

import logging
import os
import sys

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import FederationConfig
from server.federation import run_federation
from server.grid import prompt

LOG_LEVEL_ENV = "PATHFED_LOG_LEVEL"
"""``DEBUG`` in the server's environment also streams Flower's debug lines (each SecAgg+
stage, each message) to ``flwr run``, for troubleshooting a deployment."""


def _show_pathfed_log() -> None:
    """PathFed's lines (one per round) on stdout, which Flower streams to `flwr run`.

    Under `pathfed simulate` the CLI has configured logging already; leave it alone.
    """
    if logging.getLogger().handlers:
        return
    debug = os.environ.get(LOG_LEVEL_ENV, "").strip().upper() == "DEBUG"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    for name in ("server", "common"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.DEBUG if debug else logging.INFO)
        logger.addHandler(handler)
        logger.propagate = False
    if debug:  # Flower's own handler prints INFO and up; its DEBUG lines only here
        flower = logging.StreamHandler(sys.stdout)
        flower.addFilter(lambda record: record.levelno < logging.INFO)
        flower.setFormatter(handler.formatter)
        logging.getLogger("flwr").addHandler(flower)


def make_server_app(cfg: FederationConfig | None = None) -> ServerApp:
    """A ServerApp running ``cfg``, or the run config it is given when ``cfg`` is None."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _show_pathfed_log()
        config = cfg or FederationConfig.from_mapping(context.run_config, "run config")
        run_federation(prompt(grid), context, config)

    return server_app


app = make_server_app()
