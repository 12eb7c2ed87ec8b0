"""Flower's deployed Grid, answering as soon as the sites do.

Flower 1.42's ``HttpGrid.send_and_receive`` (the ServerApp's grid under the deployment
engine) pushes the messages, then checks for replies every 3 s, a constant of its code.
Every exchange of a round (SecAgg+'s four stages, evaluation) waits for it: on average
1.5-3 s each, 7-15 s a round for nothing. :class:`PromptGrid` is the one seam: the same
push and the same pulls through the wrapped grid, checked every 0.05 s at first and less
often as the wait grows (at most every ``max_interval`` seconds), so a long training
round does not flood the SuperLink. Everything else is the wrapped grid's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_INTERVAL = 0.05
MAX_INTERVAL = 0.5


class PromptGrid(Grid):
    """``grid`` with replies pulled promptly (see the module's text)."""

    def __init__(self, grid: Grid, max_interval: float = MAX_INTERVAL) -> None:
        self.grid = grid
        self.max_interval = max_interval

    # ---- the wrapped grid's own ------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    # ---- the seam ---------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; return the replies that came within ``timeout`` seconds
        (None: wait for all of them), as Flower's does."""
        waiting = set(self.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        interval = FIRST_INTERVAL
        while timeout is None or time.time() < end:
            pulled = list(self.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not waiting:
                break
            # replies come in bunches: look again soon after one arrives
            interval = FIRST_INTERVAL if pulled else interval
            pause = interval if timeout is None else min(interval, max(0.0, end - time.time()))
            time.sleep(pause)
            interval = min(self.max_interval, interval * 1.5)
        return replies


def prompt(grid: Grid) -> Grid:
    """``grid`` wrapped in :class:`PromptGrid` when it is the deployment engine's (the
    simulation's in-memory grid already checks every 0.1 s), unless
    ``PATHFED_FLOWER_POLLS=1`` asks for Flower's own."""
    from flwr.superlink.grid.http_grid import HttpGrid

    from common.deployment import stock_polls

    return PromptGrid(grid) if isinstance(grid, HttpGrid) and not stock_polls() else grid
