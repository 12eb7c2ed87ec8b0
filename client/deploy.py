"""A hospital's site: Flower's SuperNode, authenticated with the site's enrolled key.

``pathfed site start NAME --consortium DIR --data DATA_DIR`` runs ``flower-supernode``
against the consortium's SuperLink over TLS (the consortium CA verifies the server) with
the site's private key for SuperNode authentication. The data path, the site's name and
its state folder travel as node config: they stay on the site's machine and are never
sent to the server.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from common.deployment import INSECURE_WARNING, console_script, flower_env, free_port
from common.errors import ConfigError

log = logging.getLogger(__name__)


def site_folder(path: str | Path, name: str) -> Path:
    """The site's folder: given directly (copied to the site), or inside the consortium."""
    path = Path(path)
    for candidate in (path, path / "sites" / name):
        if (candidate / "site.json").is_file():
            return candidate
    raise ConfigError(f"{path}: no site folder of {name!r} (site.json); enrol the site with "
                      f"`pathfed site enroll {name} --consortium DIR` and copy DIR/sites/{name}")


def supernode_command(folder: Path, name: str, data: str, state_dir: Path,
                      insecure: bool = False) -> list[str]:
    address = json.loads((folder / "site.json").read_text())["superlink"]
    node_config = (f'site-name="{name}" data-path="{data}" '
                   f'state-dir="{state_dir.resolve()}"')
    if (folder / "ledger.key").is_file():
        node_config += f' ledger-key="{(folder / "ledger.key").resolve()}"'
    cmd = [console_script("flower-supernode"), "--superlink", address,
           "--node-config", node_config, "--port", str(free_port()), "--max-wait-time", "3600"]
    if insecure:
        return [*cmd, "--insecure"]
    return [*cmd, "--root-certificates", str(folder / "ca.crt"),
            "--auth-supernode-private-key", str(folder / "supernode.key")]


def start_site(path: str | Path, name: str, data: str | Path,
               state_dir: str | Path | None = None, insecure: bool = False,
               log_file: str | Path | None = None) -> subprocess.Popen[Any]:
    """Start the site's SuperNode; return the process (it runs until stopped).

    ``path`` is the site's folder or the consortium folder; ``data`` the site's own data
    (a labelled image folder, prepared features or a site file); the site's privacy state
    (its accountant) is kept in ``state_dir`` (default: the site folder's ``state/``).
    """
    folder = site_folder(path, name)
    if not Path(data).exists():
        raise ConfigError(f"--data: {data} not found")
    state = Path(state_dir) if state_dir else folder / "state"
    state.mkdir(parents=True, exist_ok=True)
    if insecure:
        log.warning(INSECURE_WARNING)
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 (owned by the child)
    return subprocess.Popen(
        supernode_command(folder, name, str(Path(data).resolve()), state, insecure),
        env=flower_env(), stdout=out or None, stderr=subprocess.STDOUT if out else None,
        start_new_session=True)
