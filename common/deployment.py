"""Process plumbing shared by the server and the sites for Flower's deployment engine.

No Flower import: these start Flower's own console scripts (``flower-superlink``,
``flower-supernode``, ``flwr``) as processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w

from common.crypto.consortium import Consortium
from common.errors import ConfigError, PathFedError

CONNECTION = "pathfed"
# No telemetry, no update checks, no dependency installs from the internet.
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
TASK_POLL_ENV, TASK_POLL = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.5"
STOCK_POLLS_ENV = "PATHFED_FLOWER_POLLS"
"""``1``: leave Flower's own poll intervals alone (the ServerApp's 3 s, the SuperNode's
3 s, the SuperExec's 1 s); ``python -m benchmarks deploy`` compares both."""
INSECURE_WARNING = (
    "\n!!! --insecure: NO TLS and NO site authentication. Model updates, keys and metrics "
    "travel in the clear and any machine can join. Use only on a closed test network. !!!\n"
)


def stock_polls() -> bool:
    """Whether :data:`STOCK_POLLS_ENV` asks for Flower's own poll intervals."""
    return os.environ.get(STOCK_POLLS_ENV, "").strip() == "1"


def console_script(name: str) -> str:
    """A console script installed beside this Python (the venv's, not the PATH's)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(consortium: Consortium | None = None, insecure: bool = False) -> dict[str, str]:
    """Environment for Flower's processes; with a consortium, a private FLWR_HOME whose
    config names the consortium's SuperLink (for ``flwr run`` and ``flwr supernode``) and
    holds the coordinator's Control API token (``credentials.yaml``, owner only), which
    ``server/superlink.py`` requires of every Control API call."""
    # Flower's processes start each other by name (flower-superexec, flwr-serverapp, ...):
    # put this Python's scripts first on PATH, as a venv's activation would.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, **FLOWER_ENV, "PATH": path}
    # Flower's SuperExec looks for a ServerApp or ClientApp to start every second by
    # default, and each exchange of a round waits for it; every 0.5 s (at 0.1 s its
    # polls cost more CPU than they save, measured on 2 cores)
    if not stock_polls():
        env.setdefault(TASK_POLL_ENV, TASK_POLL)
    if consortium is None:
        return env
    home = consortium.root / "flwr-home"
    home.mkdir(exist_ok=True)
    connection: dict[str, Any] = {"address": consortium.address}
    if insecure:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(consortium.ca_cert.resolve())
    (home / "config.toml").write_text(tomli_w.dumps(
        {"superlink": {"default": CONNECTION, CONNECTION: connection}}))
    if not insecure:
        _write_token(home, consortium)
    return {**env, "FLWR_HOME": str(home.resolve())}


def _write_token(home: Path, consortium: Consortium) -> None:
    """``FLWR_HOME/credentials.yaml``: the ``flwr`` CLI sends it as a bearer token."""
    import base64

    import yaml

    path = consortium.coordinator_token
    if not path.is_file():
        raise ConfigError(f"{consortium.root}: no coordinator token (coordinator.token); this "
                          "consortium was made by an older PathFed: create it again with "
                          "`pathfed consortium init` and re-enrol the sites")
    token = path.read_text().strip()

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    prefix = f"flower.account-auth.{consortium.address}"
    data = yaml.safe_dump({f"{prefix}.authn-type": b64("oidc"),
                           f"{prefix}.oidc-access-token": b64(token),
                           f"{prefix}.oidc-refresh-token": b64(token)})
    target = home / "credentials.yaml"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(data)


def wait_for_port(address: str, timeout: float = 60.0) -> None:
    """Return once something accepts TCP connections on ``host:port``."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.3)
    raise PathFedError(f"nothing answers on {address} after {timeout:.0f} s")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0,
                 sig: int = signal.SIGTERM) -> None:
    """Stop a process started in its own session, and its children."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
