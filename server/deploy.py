"""The consortium server: Flower's SuperLink with TLS and SuperNode authentication.

PathFed writes no transport of its own: ``pathfed server start`` runs Flower's
``flower-superlink`` (through :mod:`server.superlink`, which admits only the coordinator's
token on the Control API and serves the consortium's signed app) with the consortium's
certificate, ``--enable-supernode-auth`` and an authenticated SuperExec, then registers
every allow-listed site key with ``flwr supernode register``. ``pathfed run`` builds and
signs the app, then submits the federation with ``flwr run @pathfed/pathfed==VERSION``
over the same TLS connection.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from pathlib import Path

import tomli_w

from common.config import FederationConfig
from common.crypto.consortium import Consortium
from common.crypto.sealed import KEY_FILE_ENV
from common.deployment import (
    CONNECTION,
    INSECURE_WARNING,
    console_script,
    flower_env,
    stop_process,
    wait_for_port,
)
from common.errors import ConfigError, PathFedError

log = logging.getLogger(__name__)

def superlink_command(consortium: Consortium, insecure: bool = False) -> list[str]:
    settings = consortium.settings
    host = settings.get("bind", settings["server_hosts"][0])
    common = ["--host", host, "--port", str(settings["port"]), "--database",
              str((consortium.root / "superlink.db").resolve()),
              "--disable-runtime-dependency-installation"]
    if insecure:
        return [console_script("flower-superlink"), *common, "--insecure"]
    for path in (consortium.coordinator_digest, consortium.superexec_secret):
        if not path.is_file():
            raise ConfigError(f"{consortium.root}: {path.name} missing; this consortium was "
                              "made by an older PathFed: create it again with `pathfed "
                              "consortium init` and re-enrol the sites")
    return [sys.executable, "-m", "server.superlink", *common,
            "--ssl-ca-certfile", str(consortium.ca_cert),
            "--ssl-certfile", str(consortium.server_cert),
            "--ssl-keyfile", str(consortium.server_key), "--enable-supernode-auth",
            "--isolation", "process",
            "--superexec-auth-secret-file", str(consortium.superexec_secret.resolve())]


def server_env(consortium: Consortium, insecure: bool = False) -> dict[str, str]:
    """The SuperLink's environment: the token digest, the app store, the SuperExec."""
    from server.superlink import APP_STORE_ENV, SUPEREXEC_ENV, TOKEN_DIGEST_ENV

    env = flower_env(consortium, insecure)
    env[KEY_FILE_ENV] = str(consortium.checkpoint_key.resolve())
    if not insecure:
        env[TOKEN_DIGEST_ENV] = str(consortium.coordinator_digest.resolve())
        env[APP_STORE_ENV] = str(consortium.app_store.resolve())
        env[SUPEREXEC_ENV] = "1"
    return env


def register_sites(consortium: Consortium, env: dict[str, str]) -> list[str]:
    """Register every allow-listed site key with the running SuperLink."""
    registered = []
    for name in consortium.allowed_sites():
        key = consortium.allow_list / f"{name}.pub"
        result = subprocess.run(
            [console_script("flwr"), "supernode", "register", str(key), CONNECTION,
             "--name", name], env=env, capture_output=True, text=True, timeout=120)
        text = result.stdout + result.stderr
        if result.returncode != 0 and "already" not in text.lower():
            raise PathFedError(f"could not register site {name}: {text.strip()[-500:]}")
        registered.append(name)
    return registered


def start_server(root: str | Path, insecure: bool = False,
                 log_file: str | Path | None = None) -> subprocess.Popen[bytes]:
    """Start the SuperLink and register the allow-listed sites; return the process."""
    consortium = Consortium(Path(root))
    if insecure:
        log.warning(INSECURE_WARNING)
    env = server_env(consortium, insecure)
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 (owned by the child)
    proc = subprocess.Popen(superlink_command(consortium, insecure), env=env,
                            stdout=out or None, stderr=subprocess.STDOUT if out else None,
                            start_new_session=True)
    try:
        wait_for_port(consortium.address)
        if not insecure:
            names = register_sites(consortium, env)
            log.info("SuperLink on %s (TLS, SuperNode authentication); sites allowed: %s",
                     consortium.address, ", ".join(names) or "none yet")
    except BaseException:
        stop_process(proc)
        raise
    return proc


def project_dir() -> Path:
    """The Flower app folder (holding pyproject.toml with [tool.flwr.app])."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(f"{root}: no pyproject.toml; `pathfed run` needs a source checkout "
                          "of PathFed (pip install -e .)")
    return root


def run_command(root: str | Path, cfg: FederationConfig, insecure: bool = False,
                ) -> tuple[list[str], dict[str, str], Path]:
    """The ``flwr run`` command (and its environment) that submits ``cfg`` to the
    consortium's SuperLink; the caller removes the returned overrides file."""
    consortium = Consortium(Path(root))
    env = flower_env(consortium, insecure)
    if insecure:  # a closed test network: the local app folder, unsigned
        app = str(project_dir())
    else:
        from server.superlink import publish_app

        app = publish_app(project_dir(), consortium.app_store, consortium.app_signing_key,
                          consortium.root / "flwr-home" / "build")
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as fh:
        fh.write(tomli_w.dumps(cfg.to_run_config()))
    cmd = [console_script("flwr"), "run", app, CONNECTION, "--run-config", fh.name, "--stream"]
    return cmd, env, Path(fh.name)


def submit_run(root: str | Path, cfg: FederationConfig, insecure: bool = False,
               timeout: float | None = None) -> int:
    """Submit the federation with ``flwr run`` and stream its log; the exit status."""
    cmd, env, overrides = run_command(root, cfg, insecure)
    try:
        return subprocess.run(cmd, env=env, timeout=timeout).returncode
    finally:
        overrides.unlink(missing_ok=True)
