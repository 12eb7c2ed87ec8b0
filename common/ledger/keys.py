"""Ledger key folders: ``server.key``, ``public/NAME.pub.pem``, ``sites/NAME.key``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from common.crypto.signing import (
    SigningKey,
    load_public_keys,
)
from common.ledger.records import SERVER

# ---- key folders ----------------------------------------------------------------------
SERVER_KEY_FILE = "server.key"
PUBLIC_DIR = "public"
SITE_KEYS_DIR = "sites"


def server_key_path(folder: str | Path) -> Path:
    """The server's private ledger key in a key folder."""
    return Path(folder) / SERVER_KEY_FILE


def public_key_path(folder: str | Path, name: str) -> Path:
    """``name``'s public ledger key (the server's is ``server``) in a key folder."""
    return Path(folder) / PUBLIC_DIR / f"{name}.pub.pem"


def site_key_path(folder: str | Path, name: str) -> Path:
    """A simulated site's private ledger key in a key folder (deployed sites keep theirs
    in their own site folder)."""
    return Path(folder) / SITE_KEYS_DIR / f"{name}.key"


def make_key_folder(folder: str | Path, sites: Sequence[str],
                    with_site_keys: bool = True) -> Path:
    """A ledger key folder: ``server.key``, ``public/NAME.pub.pem`` for the server and every
    site, and (simulations only) the sites' private keys in ``sites/NAME.key``.

    Existing keys are kept, so a folder can be extended with new sites.
    """
    folder = Path(folder)
    server = server_key_path(folder)
    if not server.exists():
        key = SigningKey.generate()
        key.save(server)
        key.save_public(public_key_path(folder, SERVER))
    for name in sites:
        private = site_key_path(folder, name)
        if with_site_keys and not private.exists():
            key = SigningKey.generate()
            key.save(private)
            key.save_public(public_key_path(folder, name))
    return folder


def server_keys(folder: str | Path) -> tuple[SigningKey, dict[str, str]]:
    """The server's signing key and the sites' public keys of a ledger key folder."""
    folder = Path(folder)
    public = load_public_keys(folder / PUBLIC_DIR)
    public.pop(SERVER, None)
    return SigningKey.load(server_key_path(folder)), public

