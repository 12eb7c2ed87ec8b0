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
import sys
from pathlib import Path
from typing import Any

from common.deployment import INSECURE_WARNING, flower_env, free_port
from common.errors import ConfigError

log = logging.getLogger(__name__)


def site_folder(path: str | Path, name: str) -> Path:
    """The site's folder: given directly (copied to the site), or inside the consortium."""
    from common.crypto.consortium import check_site_name

    check_site_name(name)
    path = Path(path)
    for candidate in (path, path / "sites" / name):
        if (candidate / "site.json").is_file():
            try:
                own = json.loads((candidate / "site.json").read_text()).get("name")
            except ValueError:
                raise ConfigError(f"{candidate / 'site.json'}: not valid JSON; copy the site "
                                  "folder from the consortium again") from None
            if own != name:
                raise ConfigError(f"{candidate}: the folder of site {own!r}, not of {name!r}; "
                                  f"start it as `pathfed site start {own} ...`, or give "
                                  f"{name}'s own folder")
            return candidate
    raise ConfigError(f"{path}: no site folder of {name!r} (site.json); enrol the site with "
                      f"`pathfed site enroll {name} --consortium DIR` and copy DIR/sites/{name}")


DEFAULT_LIFETIME_EPSILON = 30.0
"""A site's default lifetime budget over all its runs (the default run budget is 8)."""


def supernode_command(folder: Path, name: str, data: str, state_dir: Path,
                      insecure: bool = False, lifetime_epsilon: float = DEFAULT_LIFETIME_EPSILON,
                      seeded_noise: bool = False) -> list[str]:
    import math

    if not math.isfinite(lifetime_epsilon) or lifetime_epsilon <= 0:
        raise ConfigError(f"--lifetime-epsilon: {lifetime_epsilon!r} must be a positive number")
    address = json.loads((folder / "site.json").read_text())["superlink"]
    for text, what in ((data, "--data"), (str(state_dir.resolve()), "--state")):
        if '"' in text or "\\" in text:
            raise ConfigError(f"{what}: {text!r}: paths with quotes or backslashes cannot be "
                              "passed to Flower's node config; rename the folder")
    node_config = (f'site-name="{name}" data-path="{data}" '
                   f'state-dir="{state_dir.resolve()}" lifetime-epsilon={lifetime_epsilon!r} '
                   f'deterministic-noise={"true" if seeded_noise else "false"}')
    if (folder / "ledger.key").is_file():
        node_config += f' ledger-key="{(folder / "ledger.key").resolve()}"'
    # Flower's flower-supernode, with its idle poll shortened (client/supernode.py)
    cmd = [sys.executable, "-m", "client.supernode", "--superlink", address,
           "--node-config", node_config, "--port", str(free_port()), "--max-wait-time", "3600"]
    if insecure:
        return [*cmd, "--insecure"]
    trusted = folder / "trusted-entities.yaml"
    if not trusted.is_file():
        raise ConfigError(f"{folder}: no trusted-entities.yaml (the consortium's app-signing "
                          "key); copy the site folder from the consortium again")
    return [*cmd, "--root-certificates", str(folder / "ca.crt"),
            "--auth-supernode-private-key", str(folder / "supernode.key"),
            "--trusted-entities", str(trusted)]


def start_site(path: str | Path, name: str, data: str | Path,
               state_dir: str | Path | None = None, insecure: bool = False,
               log_file: str | Path | None = None,
               lifetime_epsilon: float = DEFAULT_LIFETIME_EPSILON,
               seeded_noise: bool = False) -> subprocess.Popen[Any]:
    """Start the site's SuperNode; return the process (it runs until stopped).

    ``path`` is the site's folder or the consortium folder; ``data`` the site's own data
    (a labelled image folder, prepared features or a site file); the site's privacy state
    (its accountant over all its runs) is kept in ``state_dir`` (default: the site folder's
    ``state/``); ``lifetime_epsilon`` caps what the site spends over all runs together;
    ``seeded_noise`` makes its DP noise reproducible (tests only: anyone who knows the
    seed can remove it).
    """
    folder = site_folder(path, name)
    from common.data.sources import check_source

    check_source(str(data), 1)  # the site's own data, checked (and described) once here
    state = Path(state_dir) if state_dir else folder / "state"
    state.mkdir(parents=True, exist_ok=True)
    if insecure:
        log.warning(INSECURE_WARNING)
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 (owned by the child)
    return subprocess.Popen(
        supernode_command(folder, name, str(Path(data).resolve()), state, insecure,
                          lifetime_epsilon, seeded_noise),
        env=flower_env(), stdout=out or None, stderr=subprocess.STDOUT if out else None,
        start_new_session=True)
