"""How PathFed's command lines and scripts log: one line per event a person reads.

Libraries never decide this (Opacus' import-time ``basicConfig`` is undone in
:mod:`common.privacy`); the application calls :func:`setup_logging` once.
"""

from __future__ import annotations

import logging
import sys

QUIET = ("flwr", "ray", "filelock", "alembic", "sqlalchemy")
"""Chatty libraries shown at WARNING unless ``verbose``: Flower, Ray, and the database
migrations of Flower's state (alembic, SQLAlchemy)."""


def setup_logging(verbose: bool) -> None:
    """Log INFO and up to stderr (rich on a terminal, one plain line each elsewhere);
    the chatty libraries of :data:`QUIET` at WARNING unless ``verbose``."""
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, show_level=verbose, markup=False,
                              log_time_format="[%X]")
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:  # logs and pipes: one unwrapped line per record, greppable
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    # Flower and Ray are chatty; PathFed prints one line per round.
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


__all__ = ["QUIET", "setup_logging"]
