"""Ed25519 signing keys of the consortium (server and sites), and canonical JSON.

Everything here uses the ``cryptography`` package; nothing is hand-rolled. A key's
*fingerprint* is the SHA-256 of its raw 32-byte public key, in hex. Private keys are stored
as unencrypted PKCS#8 PEM in files of mode 0600 and are never logged; public keys travel as
SubjectPublicKeyInfo PEM strings.

Canonical JSON (:func:`canonical_json`) is what every signature and every hash in the
privacy ledger is computed over: sorted keys, no whitespace, ASCII only, floats as Python's
shortest round-tripping ``repr``; NaN and infinities are refused, because JSON cannot carry
them and a signature over a lossy encoding would not verify after a round trip.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def _plain(value: Any, where: str = "$") -> Any:
    """A JSON-native copy of ``value``; raise ``ValueError`` naming what cannot be encoded."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: key {key!r} is not a string")
            out[key] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where}: {value} cannot be signed (JSON has no NaN/inf); "
                             "record null instead")
        return value
    raise ValueError(f"{where}: {type(value).__name__} is not JSON (str, int, float, bool, "
                     "None, list, dict)")


def canonical_json(value: Any) -> bytes:
    """Canonical JSON bytes of ``value`` (sorted keys, no whitespace, floats as ``repr``)."""
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _public_from_pem(pem: str, source: str = "public key") -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, TypeError, UnicodeEncodeError) as err:
        raise ConfigError(f"{source}: not a PEM public key ({err})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{source}: not an Ed25519 key ({type(key).__name__}); "
                          "create one with SigningKey.generate()")
    return key


def fingerprint(public_pem: str) -> str:
    """SHA-256 (hex) of the raw 32-byte Ed25519 public key in ``public_pem``."""
    raw = _public_from_pem(public_pem).public_bytes(serialization.Encoding.Raw,
                                                    serialization.PublicFormat.Raw)
    return sha256_hex(raw)


def verify_signature(public_pem: str, data: bytes, signature: str) -> bool:
    """Whether ``signature`` (base64) is a valid Ed25519 signature of ``data``."""
    try:
        sig = base64.b64decode(signature.encode("ascii"), validate=True)
        _public_from_pem(public_pem).verify(sig, data)
    except (InvalidSignature, binascii.Error, ValueError, UnicodeEncodeError, AttributeError):
        return False
    return True


class SigningKey:
    """An Ed25519 private key: a site's or the server's identity in the privacy ledger.

    Create one with :meth:`generate`, keep it with :meth:`save` (mode 0600) and
    :meth:`load`. Share :meth:`public_pem` with the consortium (``NAME.pub.pem``).
    ``repr`` never shows key material.
    """

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh key from the operating system's generator."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> SigningKey:
        """Read a private key written by :meth:`save`; warn if others can read the file."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: signing key not found; create it with "
                            "SigningKey.generate().save(path)") from None
        if os.name == "posix" and path.stat().st_mode & 0o077:
            log.warning("%s: private key readable by others; run chmod 600 %s", path, path)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as err:
            raise DataError(f"{path}: not an unencrypted PEM private key ({err})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise DataError(f"{path}: not an Ed25519 key ({type(key).__name__})")
        return cls(key)

    def save(self, path: str | Path) -> Path:
        """Write the private key as PEM, atomically, readable by its owner only (0600)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = self._key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return path

    def public_pem(self) -> str:
        """The public key as SubjectPublicKeyInfo PEM text."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode("ascii")

    def save_public(self, path: str | Path) -> Path:
        """Write the public key (the file the consortium shares, ``NAME.pub.pem``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.public_pem(), encoding="ascii")
        return path

    def fingerprint(self) -> str:
        return fingerprint(self.public_pem())

    def sign(self, data: bytes) -> str:
        """Ed25519 signature of ``data``, base64."""
        return base64.b64encode(self._key.sign(data)).decode("ascii")

    def __repr__(self) -> str:
        return f"SigningKey(fingerprint={self.fingerprint()[:16]}...)"


def load_public_keys(folder: str | Path) -> dict[str, str]:
    """Trusted public keys from ``folder``: ``NAME.pub.pem`` (or ``NAME.pem``) -> ``NAME``.

    Raise :class:`DataError` when the folder is missing, holds no key or a file is not an
    Ed25519 public key.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: keys folder not found (expected NAME.pub.pem files)")
    keys: dict[str, str] = {}
    for path in sorted(folder.glob("*.pem")):
        name = path.name.removesuffix(".pem").removesuffix(".pub")
        pem = path.read_text(encoding="ascii", errors="replace")
        if "PRIVATE KEY" in pem:
            raise DataError(f"{path}: a private key in the trusted keys folder; keep only "
                            "public keys (NAME.pub.pem) there")
        try:
            _public_from_pem(pem, str(path))
        except ConfigError as err:
            raise DataError(str(err)) from None
        keys[name] = pem
    if not keys:
        raise DataError(f"{folder}: no public keys (expected NAME.pub.pem files)")
    return keys


__all__ = ["SigningKey", "canonical_json", "fingerprint", "load_public_keys", "sha256_hex",
           "verify_signature"]
