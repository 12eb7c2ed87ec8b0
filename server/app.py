"""Flower ServerApp: parse the run config, then run PathFed's federation.

``flwr run .`` uses the module-level ``app``; ``pathfed simulate`` builds one with
:func:`make_server_app` around an already validated configuration.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import FederationConfig
from server.federation import run_federation


def make_server_app(cfg: FederationConfig | None = None) -> ServerApp:
    """A ServerApp running ``cfg``, or the run config it is given when ``cfg`` is None."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format="%(message)s")
        config = cfg or FederationConfig.from_mapping(context.run_config, "run config")
        run_federation(grid, context, config)

    return server_app


app = make_server_app()
