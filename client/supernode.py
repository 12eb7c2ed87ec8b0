"""``flower-supernode``, with a prompt idle poll: ``python -m client.supernode ARGS``.

Flower 1.42's SuperNode asks the SuperLink for a message, and when there is none sleeps
3 s, a constant of its code (``start_client_internal``). A round has five exchanges per
site (SecAgg+'s four stages and evaluation), and each one's message usually arrives while
the site sleeps: 1.5-3 s of every exchange, 7-15 s a round. This seam is the only
change: the sleeps of that one module are capped at ``PATHFED_SUPERNODE_POLL`` seconds
(0.5 by default; its waits for the ClientApp's reply, 0.5 s in Flower, are capped too).
Everything else, arguments included, is Flower's own ``flower-supernode``
(``PATHFED_FLOWER_POLLS=1`` leaves even the sleeps alone).
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import time
from types import ModuleType
from typing import Any

import flwr

POLL_ENV = "PATHFED_SUPERNODE_POLL"
DEFAULT_POLL = 0.5
FLOWER_SERIES = "1.42."


class PromptClock:
    """The ``time`` module, with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def poll_interval(environ: dict[str, str] | os._Environ[str] = os.environ) -> float:
    """``PATHFED_SUPERNODE_POLL`` as seconds (0.01-3), or the default."""
    from common.errors import ConfigError

    raw = environ.get(POLL_ENV, "").strip()
    if not raw:
        return DEFAULT_POLL
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.01 <= value <= 3.0:
        raise ConfigError(f"{POLL_ENV}: {raw!r} must be seconds between 0.01 and 3 "
                          f"(default {DEFAULT_POLL})")
    return value


def install(cap: float) -> ModuleType:
    """Cap the sleeps of Flower's SuperNode loop; the patched module."""
    module = importlib.import_module("flwr.supernode.start_client_internal")
    problems = []
    if not flwr.__version__.startswith(FLOWER_SERIES):
        problems.append(f"flwr {flwr.__version__} installed, seam written for {FLOWER_SERIES}x")
    if getattr(module, "time", None) is not time and not isinstance(
            getattr(module, "time", None), PromptClock):
        problems.append("flwr.supernode.start_client_internal no longer uses `time`")
    if problems:
        raise RuntimeError("PathFed's SuperNode poll seam does not fit this Flower: "
                           + "; ".join(problems))
    module.time = PromptClock(cap)  # type: ignore[attr-defined]
    return module


def main(argv: list[str] | None = None) -> int:
    from flwr.supernode.cli import flower_supernode

    from common.deployment import stock_polls
    from common.errors import ConfigError

    if not stock_polls():
        try:
            install(poll_interval())
        except ConfigError as err:
            print(f"pathfed site: {err}", file=sys.stderr)
            return 2
    sys.argv = ["flower-supernode", *(sys.argv[1:] if argv is None else argv)]
    flower_supernode()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
