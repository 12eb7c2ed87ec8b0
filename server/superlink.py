"""PathFed's one seam around Flower's SuperLink: who may start a run, and which app.

Flower 1.42 serves the Fleet, Control and Runtime APIs on one port. Its open-source
build admits every Control API call (its only account plugin allows all; OIDC is in
Flower Enterprise), and SuperNodes only verify an app's signature when it comes from
Flower Hub. ``python -m server.superlink ARGS`` runs Flower's own ``flower-superlink``
entry point with ARGS after two swaps, and nothing else:

1. **Control API**: Flower's account-auth hook (``ControlAuthnPlugin``, called on every
   ``/v1/control/*`` request with the ``Authorization: Bearer`` token) gets
   :class:`CoordinatorTokenPlugin`, which admits only the consortium coordinator's token
   (its SHA-256 is in ``PATHFED_COORDINATOR_TOKEN_SHA256_FILE``). Everyone else's
   ``flwr run``, ``flwr ls`` or ``flwr supernode register`` gets 401 and the server logs
   ``PathFed: Control API call refused``. The ``flwr`` CLI sends the token from
   ``FLWR_HOME/credentials.yaml`` (:func:`common.deployment.flower_env`).
2. **Signed app**: ``flwr run @pathfed/pathfed==VERSION`` takes the app (FAB) and its
   Ed25519 signature from the consortium's app store (``PATHFED_APP_STORE``; written by
   ``pathfed run``, :func:`publish_app`) instead of Flower Hub, in the format Flower Hub
   uses. SuperNodes started with ``--trusted-entities`` verify it and refuse anything
   else (a local app folder, an unsigned or foreign-signed FAB).

The Runtime API on the same port hands a run's ServerApp task to whoever asks first in
Flower's default ``--isolation subprocess``; PathFed's server therefore runs Flower's
``--isolation process`` with a SuperExec shared secret (``--superexec-auth-secret-file``),
and this launcher starts ``flower-superexec`` with the same secret once the port is up
(``PATHFED_SUPEREXEC=1``). Everything here is checked against Flower's internals at start
(:func:`check_flower_internals`): the ``flwr`` pin is ``<1.43`` for that reason.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import hashlib
import hmac
import importlib
import inspect
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from logging import INFO, WARNING
from pathlib import Path

import flwr
from flwr.common.constant import (
    ACCESS_TOKEN_KEY,
    NOOP_ACCOUNT_NAME,
    NOOP_FLWR_AID,
    REFRESH_TOKEN_KEY,
)
from flwr.common.logger import log
from flwr.supercore.auth.typing import AccountAuthCredentials, AccountAuthLoginDetails, AccountInfo
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.superlink.auth_plugin import ControlAuthnPlugin

from common.crypto.consortium import APP_KEY_ID

FLOWER_SERIES = "1.42."
TOKEN_DIGEST_ENV = "PATHFED_COORDINATOR_TOKEN_SHA256_FILE"
APP_STORE_ENV = "PATHFED_APP_STORE"
SUPEREXEC_ENV = "PATHFED_SUPEREXEC"

_cli = importlib.import_module("flwr.superlink.cli.flower_superlink")
_handlers = importlib.import_module("flwr.superlink.servicer.control.control_handlers")


def check_flower_internals() -> None:
    """Fail loudly if the Flower internals this seam swaps have moved."""
    problems = []
    if not flwr.__version__.startswith(FLOWER_SERIES):
        problems.append(f"flwr {flwr.__version__} installed, seam written for {FLOWER_SERIES}x")
    if not callable(getattr(_cli, "load_control_authn_plugin", None)):
        problems.append("flower_superlink.load_control_authn_plugin is gone")
    remote = getattr(_handlers, "_get_remote_fab", None)
    if remote is None or list(inspect.signature(remote).parameters) != ["fleet_api_type",
                                                                         "app_spec"]:
        problems.append("control_handlers._get_remote_fab is gone or changed")
    if not callable(getattr(_handlers, "_format_verification", None)):
        problems.append("control_handlers._format_verification is gone")
    if problems:
        raise RuntimeError("PathFed's SuperLink seam (server/superlink.py) no longer fits "
                           "Flower: " + "; ".join(problems) + ". Re-check it before "
                           "changing the flwr pin.")


def _get(metadata: Sequence[tuple[str, str | bytes]], key: str) -> str | None:
    for name, value in metadata:
        if name == key:
            return value.decode() if isinstance(value, bytes) else value
    return None


class CoordinatorTokenPlugin(ControlAuthnPlugin):
    """Admit a Control API call only with the coordinator's bearer token."""

    def __init__(self, token_sha256_hex: str) -> None:  # noqa: D107 (no super: abstract)
        self._digest = bytes.fromhex(token_sha256_hex.strip())
        if len(self._digest) != 32:
            raise ValueError("the coordinator token digest must be SHA-256 hex")

    def _ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(
            hashlib.sha256(token.encode()).digest(), self._digest)

    @staticmethod
    def _account() -> AccountInfo:
        # Flower's federation manager only knows its no-op account: keep it.
        return AccountInfo(flwr_aid=NOOP_FLWR_AID, account_name=NOOP_ACCOUNT_NAME)

    def get_login_details(self) -> AccountAuthLoginDetails | None:
        return None  # no interactive `flwr login`: the token is provisioned at init

    def validate_tokens_in_metadata(self, metadata: Sequence[tuple[str, str | bytes]]
                                    ) -> tuple[bool, AccountInfo | None]:
        if self._ok(_get(metadata, ACCESS_TOKEN_KEY)):
            return True, self._account()
        log(WARNING, "PathFed: Control API call refused (no valid coordinator token)")
        return False, None

    def get_auth_tokens(self, device_code: str) -> AccountAuthCredentials | None:
        raise FlowerError(ApiErrorCode.NO_ACCOUNT_AUTH,
                          "PathFed: login is not offered; the coordinator holds the token")

    def refresh_tokens(self, metadata: Sequence[tuple[str, str | bytes]]
                       ) -> tuple[Sequence[tuple[str, str | bytes]] | None, AccountInfo | None]:
        token = _get(metadata, REFRESH_TOKEN_KEY)
        if self._ok(token):  # the CLI refreshes once after a 401: hand the token back
            assert token is not None
            return [(ACCESS_TOKEN_KEY, token), (REFRESH_TOKEN_KEY, token)], self._account()
        log(WARNING, "PathFed: Control API token refresh refused")
        return None, None


# ---- the consortium's signed app ---------------------------------------------------------
def app_stem(app_spec: str) -> str:
    """File stem of ``@publisher/name==version`` in the app store."""
    from flwr.supercore.utils import parse_app_spec

    app_id, version = parse_app_spec(app_spec)
    if version is None:
        raise FlowerError(ApiErrorCode.INVALID_APP_SPEC,
                          f"{app_spec}: give the version (@publisher/name==x.y.z)")
    return f"{app_id[1:].replace('/', '__')}__{version}"


def _local_fab(fleet_api_type: str | None, app_spec: str) -> tuple[bytes, dict[str, str], None]:
    """Flower's ``_get_remote_fab`` for the consortium's app store (no Flower Hub)."""
    root = Path(os.environ[APP_STORE_ENV])
    stem = app_stem(app_spec)
    fab, sig = root / f"{stem}.fab", root / f"{stem}.fab.sig.json"
    if not fab.is_file():
        raise FlowerError(ApiErrorCode.FAB_DOWNLOAD_FAILURE,
                          f"{app_spec}: not in the consortium's app store")
    content = fab.read_bytes()
    verifications = {"valid_license": ""}  # unsigned: SuperNodes with trusted entities refuse
    if sig.is_file():
        verifications = _handlers._format_verification(json.loads(sig.read_text()))
    log(INFO, "PathFed: %s from the app store (sha256 %s, signed by %s)", app_spec,
        hashlib.sha256(content).hexdigest()[:12],
        [k for k in verifications if k != "valid_license"] or "nobody")
    return content, verifications, None


def publish_app(project: Path, store: Path, signing_key: Path, workdir: Path) -> str:
    """Build the Flower app in ``project``, sign it, put it in ``store``; its app spec.

    The signature is Flower Hub's: Ed25519 over the 8-byte big-endian signing time and the
    FAB's SHA-256, base64url without padding.
    """
    import tomllib

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    meta = tomllib.loads((project / "pyproject.toml").read_text())
    spec = (f"@{meta['tool']['flwr']['app']['publisher']}/{meta['project']['name']}=="
            f"{meta['project']['version']}")
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("*.fab"):
        old.unlink()
    from common.deployment import console_script, flower_env

    result = subprocess.run([console_script("flwr"), "build", "--app", str(project)],
                            cwd=workdir, env={**flower_env(), "FLWR_HOME": str(workdir)},
                            capture_output=True, text=True, timeout=300)
    built = sorted(workdir.glob("*.fab"))
    if result.returncode != 0 or not built:
        raise RuntimeError(f"flwr build failed: {(result.stdout + result.stderr)[-800:]}")
    content = built[0].read_bytes()
    _check_fab_names(built[0])
    key = serialization.load_ssh_private_key(signing_key.read_bytes(), password=None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{signing_key}: not an Ed25519 key")
    signed_at = int(time.time())
    signature = key.sign(create_message_to_sign(hashlib.sha256(content).digest(), signed_at))
    store.mkdir(parents=True, exist_ok=True)
    stem = app_stem(spec)
    (store / f"{stem}.fab").write_bytes(content)
    (store / f"{stem}.fab.sig.json").write_text(json.dumps([{
        "public_key_id": APP_KEY_ID, "signed_at": signed_at,
        "signature": base64.urlsafe_b64encode(signature).rstrip(b"=").decode()}]))
    return spec


def _check_fab_names(fab: Path) -> None:
    """Refuse a FAB holding a file whose name has a comma: Flower lists the FAB's files
    as ``path,sha256,size`` lines and every install of it fails (exit code 201)."""
    import zipfile

    with zipfile.ZipFile(fab) as bundle:
        bad = [name for name in bundle.namelist() if "," in name]
    if bad:
        raise RuntimeError(f"the Flower app would bundle {bad[0]!r} (and {len(bad) - 1} "
                           "more): a comma in a file name breaks Flower's install of the "
                           "app; rename it (or ignore it in .gitignore)")


# ---- the launcher ---------------------------------------------------------------------------
def _start_superexec(argv: list[str]) -> None:
    """Start ``flower-superexec`` (same secret, same CA) once the SuperLink listens."""
    parser = argparse.ArgumentParser(add_help=False)
    for flag in ("--host", "--port", "--ssl-ca-certfile", "--superexec-auth-secret-file"):
        parser.add_argument(flag)
    known, _ = parser.parse_known_args(argv)
    if not (known.port and known.superexec_auth_secret_file):
        raise SystemExit(f"{SUPEREXEC_ENV}=1 needs --port and --superexec-auth-secret-file")
    from common.deployment import console_script, wait_for_port

    address = f"{known.host or '127.0.0.1'}:{known.port}"

    def run() -> None:
        wait_for_port(address, timeout=120)
        cmd = [console_script("flower-superexec"), "--runtime-api-address", address,
               "--superexec-auth-secret-file", known.superexec_auth_secret_file]
        cmd += (["--root-certificates", known.ssl_ca_certfile] if known.ssl_ca_certfile
                else ["--insecure"])
        proc = subprocess.Popen(cmd)  # same process group: stopped with the SuperLink
        atexit.register(proc.terminate)
        log(INFO, "PathFed: SuperExec started (pid %d), authenticated by shared secret",
            proc.pid)

    threading.Thread(target=run, daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    check_flower_internals()
    digest_file = os.environ.get(TOKEN_DIGEST_ENV)
    if not digest_file:
        raise SystemExit(f"{TOKEN_DIGEST_ENV} is not set: refusing to start a SuperLink whose "
                         "Control API anyone could use")
    plugin = CoordinatorTokenPlugin(Path(digest_file).read_text())
    setattr(_cli, "load_control_authn_plugin", lambda: plugin)  # noqa: B010 (the seam)
    log(INFO, "PathFed: Control API restricted to the coordinator's token")
    if os.environ.get(APP_STORE_ENV):
        setattr(_handlers, "_get_remote_fab", _local_fab)  # noqa: B010 (the seam)
        log(INFO, "PathFed: apps come from the consortium's app store %s",
            os.environ[APP_STORE_ENV])
    if os.environ.get(SUPEREXEC_ENV) == "1":
        _start_superexec(argv)
    sys.argv = ["flower-superlink", *argv]
    _cli.flower_superlink()


if __name__ == "__main__":
    main()
