"""Encryption of global checkpoints at rest: AES-256-GCM (``cryptography``).

A sealed file is ``MAGIC | 2-byte length | run id | 12-byte nonce | ciphertext+tag``. The
run id and the file's name (its round) are bound in as associated data, so a checkpoint
renamed to another round, or copied into another run, does not decrypt; the run id is
readable without the key (:func:`sealed_run`). The key (32 bytes, hex) comes from a file
or from ``PATHFED_CHECKPOINT_KEY``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.errors import ConfigError, DataError

MAGIC = b"PATHFED-AESGCM-2\n"
KEY_ENV = "PATHFED_CHECKPOINT_KEY"
KEY_FILE_ENV = "PATHFED_CHECKPOINT_KEY_FILE"
SUFFIX = ".enc"


def parse_key(text: str, source: str) -> bytes:
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{source}: checkpoint key must be 64 hex digits (32 bytes)")
    return key


def load_key(path: str | Path | None = None) -> bytes | None:
    """The checkpoint key from ``path``, else the environment, else None (no encryption)."""
    path = path or os.environ.get(KEY_FILE_ENV)
    if path:
        try:
            return parse_key(Path(path).read_text(), str(path))
        except FileNotFoundError:
            raise ConfigError(f"{path}: checkpoint key file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: is a folder; give the checkpoint key file "
                              "(consortium/checkpoint.key)") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot read the checkpoint key ({err})") from None
    if os.environ.get(KEY_ENV):
        return parse_key(os.environ[KEY_ENV], KEY_ENV)
    return None


def _associated(run: str, name: str) -> bytes:
    return run.encode() + b"\x00" + name.encode()


def seal(data: bytes, key: bytes, name: str, run: str = "") -> bytes:
    """Encrypt ``data``, binding the run id ``run`` and the file name ``name``."""
    nonce = os.urandom(12)
    header = len(run.encode()).to_bytes(2, "big") + run.encode()
    return MAGIC + header + nonce + AESGCM(key).encrypt(nonce, data, _associated(run, name))


def _split(blob: bytes, source: str) -> tuple[str, bytes, bytes]:
    if not blob.startswith(MAGIC):
        raise DataError(f"{source}: not an encrypted PathFed checkpoint")
    rest = blob[len(MAGIC):]
    size = int.from_bytes(rest[:2], "big")
    try:
        run = rest[2:2 + size].decode()
    except UnicodeDecodeError:
        raise DataError(f"{source}: damaged encrypted checkpoint (run id)") from None
    body = rest[2 + size:]
    return run, body[:12], body[12:]


def sealed_run(blob: bytes, source: str = "checkpoint") -> str:
    """The run id a sealed checkpoint says it belongs to (authenticated on decryption)."""
    return _split(blob, source)[0]


def unseal(blob: bytes, key: bytes, name: str, source: str, run: str | None = None) -> bytes:
    """Decrypt; a wrong key, a tampered or renamed file, or (given ``run``) a checkpoint of
    another run gives a clear error."""
    own, nonce, body = _split(blob, source)
    if run is not None and own != run:
        raise DataError(f"{source}: a checkpoint of run {own!r}, not of this run ({run!r})")
    try:
        return AESGCM(key).decrypt(nonce, body, _associated(own, name))
    except InvalidTag:
        raise DataError(
            f"{source}: cannot decrypt: wrong checkpoint key, or the file was altered, "
            "renamed or moved from another run"
        ) from None
