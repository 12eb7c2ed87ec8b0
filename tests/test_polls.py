"""PathFed's poll seams around Flower's deployment engine (the real runs: test_deploy.py).

The ServerApp's grid (``server/grid.py``) and the SuperNode's idle sleep
(``client/supernode.py``) only change how often Flower asks; these check that they ask
promptly, return exactly what Flower's loop would, keep its timeout, and fit the
installed Flower.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pytest
from flwr.serverapp import Grid

from client.supernode import PromptClock, install, poll_interval
from common.deployment import STOCK_POLLS_ENV, TASK_POLL_ENV, flower_env
from common.errors import ConfigError
from server.grid import PromptGrid, prompt


class SitesThatAnswerLate(Grid):
    """A grid whose sites reply to message ``i`` after ``delays[i]`` seconds."""

    def __init__(self, delays: list[float]) -> None:
        self.delays = delays
        self.pulls = 0
        self.sent = 0.0

    def set_run(self, run: Any) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Any:
        return "run"

    def create_message(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return range(len(self.delays))

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        self.sent = time.monotonic()
        self.answered: set[str] = set()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        self.pulls += 1
        now = time.monotonic() - self.sent
        ready = [m for m in message_ids if m not in self.answered
                 and self.delays[int(m[1:])] <= now]
        self.answered.update(ready)
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=m)) for m in ready]

    def send_and_receive(self, messages: Iterable[Any], *,
                         timeout: float | None = None) -> Iterable[Any]:
        raise AssertionError("the seam must not fall back to the wrapped loop")


def _replies(out: Iterable[Any]) -> list[str]:
    return sorted(m.metadata.reply_to_message_id for m in out)


def test_prompt_grid_returns_every_reply_as_soon_as_the_last_arrives() -> None:
    grid = SitesThatAnswerLate([0.05, 0.3, 0.6])
    start = time.monotonic()
    out = PromptGrid(grid).send_and_receive(["a", "b", "c"])
    took = time.monotonic() - start
    assert _replies(out) == ["m0", "m1", "m2"]
    assert took < 1.2  # Flower's own loop sleeps 3 s between checks
    assert grid.pulls < 40  # and the checks thin out while nothing comes


def test_prompt_grid_keeps_the_timeout_and_returns_what_came() -> None:
    grid = SitesThatAnswerLate([0.05, 5.0])
    start = time.monotonic()
    out = PromptGrid(grid).send_and_receive(["a", "b"], timeout=0.5)
    took = time.monotonic() - start
    assert _replies(out) == ["m0"]
    assert 0.45 < took < 1.0


def test_prompt_grid_checks_no_more_often_than_it_must_on_a_long_wait() -> None:
    grid = SitesThatAnswerLate([2.0])
    PromptGrid(grid, max_interval=0.5).send_and_receive(["a"])
    assert grid.pulls <= 12  # 0.05 s growing to 0.5 s: ~10 checks in 2 s, not 40


def test_only_the_deployment_grid_is_wrapped_and_flowers_polls_can_be_asked_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.superlink.grid.http_grid import HttpGrid

    http = HttpGrid("127.0.0.1:1", insecure=True, token="t")  # connects on first use only
    monkeypatch.delenv(STOCK_POLLS_ENV, raising=False)
    monkeypatch.delenv(TASK_POLL_ENV, raising=False)
    wrapped = prompt(http)
    assert isinstance(wrapped, PromptGrid) and wrapped.grid is http
    other = SitesThatAnswerLate([0.0])
    assert prompt(other) is other
    assert flower_env()[TASK_POLL_ENV] == "0.5"
    monkeypatch.setenv(STOCK_POLLS_ENV, "1")  # Flower's own intervals, everywhere
    assert prompt(http) is http
    assert TASK_POLL_ENV not in flower_env()
    monkeypatch.setenv(STOCK_POLLS_ENV, "0")
    monkeypatch.setenv(TASK_POLL_ENV, "2")  # an operator's own setting wins
    assert flower_env()[TASK_POLL_ENV] == "2"


def test_supernode_seam_caps_the_idle_sleep_of_flowers_loop() -> None:
    import time as real_time

    module = importlib.import_module("flwr.supernode.start_client_internal")
    try:
        patched = install(0.05)
        assert isinstance(patched.time, PromptClock)
        start = real_time.monotonic()
        patched.time.sleep(3)  # Flower's idle wait
        assert real_time.monotonic() - start < 0.5
        assert patched.time.time() == pytest.approx(real_time.time(), abs=1)
        install(0.05)  # installing twice is harmless
    finally:
        module.time = real_time  # type: ignore[attr-defined]


def test_supernode_poll_interval_is_checked() -> None:
    assert poll_interval({}) == 0.5
    assert poll_interval({"PATHFED_SUPERNODE_POLL": "1"}) == 1.0
    for bad in ("0", "fast", "10", "nan"):
        with pytest.raises(ConfigError, match="PATHFED_SUPERNODE_POLL"):
            poll_interval({"PATHFED_SUPERNODE_POLL": bad})


def test_a_bad_poll_setting_stops_the_site_with_a_clear_message(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from client.supernode import main

    monkeypatch.delenv("PATHFED_FLOWER_POLLS", raising=False)
    monkeypatch.setenv("PATHFED_SUPERNODE_POLL", "soon")
    assert main(["--help-is-never-reached"]) == 2
    assert "PATHFED_SUPERNODE_POLL: 'soon' must be seconds" in capsys.readouterr().err


def test_sites_start_flowers_supernode_through_the_seam(tmp_path: Any) -> None:
    import json

    from client.deploy import supernode_command

    (tmp_path / "site.json").write_text(json.dumps({"name": "a", "superlink": "h:1"}))
    cmd = supernode_command(tmp_path, "a", str(tmp_path), tmp_path, insecure=True)
    assert cmd[1:3] == ["-m", "client.supernode"] and "--superlink" in cmd


def test_an_app_bundle_with_a_comma_in_a_file_name_is_refused(tmp_path) -> None:
    """Flower lists a FAB's files as CSV lines: a comma in a name fails every install
    (exit code 201, found when paper rows named files after 'hidden_dim=8,attention_dim=4')."""
    import zipfile

    from server.superlink import _check_fab_names

    for name, files in (("ok.fab", ["server/app.py", "docs/results/a=1+2.json"]),
                        ("bad.fab", ["server/app.py", "docs/results/a=1,2.json"])):
        with zipfile.ZipFile(tmp_path / name, "w") as bundle:
            for member in files:
                bundle.writestr(member, "x")
    _check_fab_names(tmp_path / "ok.fab")
    with pytest.raises(RuntimeError, match="'docs/results/a=1,2.json'.*rename it"):
        _check_fab_names(tmp_path / "bad.fab")
