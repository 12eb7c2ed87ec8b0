"""Encryption of global checkpoints at rest: AES-256-GCM (``cryptography``).

A sealed file is ``MAGIC | 12-byte nonce | ciphertext+tag``; the file's name is bound in
as associated data, so a checkpoint renamed to another round does not decrypt either.
The key (32 bytes, hex) comes from a file or from ``PATHFED_CHECKPOINT_KEY``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.errors import ConfigError, DataError

MAGIC = b"PATHFED-AESGCM-1\n"
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
    if os.environ.get(KEY_ENV):
        return parse_key(os.environ[KEY_ENV], KEY_ENV)
    return None


def seal(data: bytes, key: bytes, name: str) -> bytes:
    nonce = os.urandom(12)
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, data, name.encode())


def unseal(blob: bytes, key: bytes, name: str, source: str) -> bytes:
    """Decrypt; a wrong key, a tampered or renamed file gives a clear error."""
    if not blob.startswith(MAGIC):
        raise DataError(f"{source}: not an encrypted PathFed checkpoint")
    nonce = blob[len(MAGIC): len(MAGIC) + 12]
    try:
        return AESGCM(key).decrypt(nonce, blob[len(MAGIC) + 12:], name.encode())
    except InvalidTag:
        raise DataError(
            f"{source}: cannot decrypt: wrong checkpoint key, or the file was altered or renamed"
        ) from None
