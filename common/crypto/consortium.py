"""Consortium keys: a certificate authority, the server's TLS certificate, site keys.

The one entry into consortium key material. Everything is made with ``cryptography``:

```
CONSORTIUM/
  consortium.json         server address(es) and port, list of sites
  ca.crt, ca.key          consortium CA (key 0600; keep it offline once sites are enrolled)
  server.crt, server.key  SuperLink TLS certificate (SANs: every --server-host) and key
  checkpoint.key          AES-256-GCM key of the encrypted global checkpoints (0600)
  coordinator.token       the coordinator's Control API token (0600): only its holder
                          starts runs; coordinator.token.sha256 is what the server checks
  superexec.secret        shared secret of the SuperLink and its SuperExec (0600)
  app-signing.key         Ed25519 key that signs the consortium's Flower app (0600);
                          trusted-entities.yaml holds its public key for the sites
  apps/                   the signed app (FAB) that runs are started with
  allow-list/NAME.pub     OpenSSH public keys of the sites allowed to connect
  ledger/                 privacy-ledger keys: server.key (0600), public/NAME.pub.pem
  sites/NAME/             what a site takes home: supernode.key and ledger.key (0600),
                          supernode.pub, ca.crt, trusted-entities.yaml, site.json
```

Private keys are written with mode 0600 and never logged.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.crypto.signing import SigningKey
from common.errors import ConfigError
from common.ledger import SERVER, public_key_path, server_key_path

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
RESERVED_NAMES = frozenset({"server", "global", "default"})
"""Names a site cannot take: the server's ledger key, the global metric record."""
HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def check_site_name(name: str) -> str:
    """``name`` if it is a valid site name, else :class:`ConfigError` saying why."""
    if not isinstance(name, str) or not SITE_NAME.match(name) or ".." in name:
        raise ConfigError(f"site name {name!r}: use letters, digits, '.', '_' or '-' "
                          "(at most 63, starting with a letter or digit; no '/' or '..')")
    if name.lower() in RESERVED_NAMES:
        raise ConfigError(f"site name {name!r} is reserved (taken by the server or the "
                          f"federation's records: {', '.join(sorted(RESERVED_NAMES))})")
    return name


def check_host(host: str) -> str:
    """A server host name or IP address the sites can use, else :class:`ConfigError`."""
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not host or not host.isascii() or not HOST_NAME.match(host):
        raise ConfigError(f"--server-host: {host!r} is not a host name or IP address "
                          "(ASCII letters, digits, '-' and '.'; e.g. fl.example.org)")
    return host


def check_port(port: int) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"--port: {port!r} is not a TCP port (1-65535)")
    return port
DEFAULT_PORT = 9091
CERT_DAYS = 825


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only, before any byte is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


@dataclass(frozen=True)
class Consortium:
    """Paths and settings of a consortium folder."""

    root: Path

    @property
    def settings(self) -> dict[str, Any]:
        path = self.root / "consortium.json"
        if not path.is_file():
            raise ConfigError(
                f"{self.root}: not a consortium folder (no consortium.json); create one with "
                "`pathfed consortium init DIR --server-host HOST`"
            )
        return dict(json.loads(path.read_text()))

    @property
    def address(self) -> str:
        s = self.settings
        return f"{s['server_hosts'][0]}:{s['port']}"

    ca_cert = property(lambda self: self.root / "ca.crt")
    coordinator_token = property(lambda self: self.root / "coordinator.token")
    coordinator_digest = property(lambda self: self.root / "coordinator.token.sha256")
    superexec_secret = property(lambda self: self.root / "superexec.secret")
    app_signing_key = property(lambda self: self.root / "app-signing.key")
    trusted_entities = property(lambda self: self.root / "trusted-entities.yaml")
    app_store = property(lambda self: self.root / "apps")
    server_cert = property(lambda self: self.root / "server.crt")
    server_key = property(lambda self: self.root / "server.key")
    checkpoint_key = property(lambda self: self.root / "checkpoint.key")
    ledger_keys = property(lambda self: self.root / "ledger")
    allow_list = property(lambda self: self.root / "allow-list")

    def site_dir(self, name: str) -> Path:
        return self.root / "sites" / name

    def allowed_sites(self) -> list[str]:
        return sorted(p.stem for p in self.allow_list.glob("*.pub"))


def init_consortium(root: str | Path, server_hosts: list[str],
                    port: int = DEFAULT_PORT, name: str = "PathFed consortium") -> Consortium:
    """Create the CA, the server certificate (SANs: ``server_hosts``) and the allow-list."""
    root = Path(root)
    if (root / "consortium.json").exists():
        raise ConfigError(f"{root}: already a consortium folder; choose another DIR")
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: is a file; choose a folder for the consortium")
    if not server_hosts:
        raise ConfigError("--server-host: give the name or IP the sites use to reach the server")
    server_hosts = [check_host(h) for h in server_hosts]
    check_port(port)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_hosts[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in server_hosts]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    root.mkdir(parents=True, exist_ok=True)
    _write_private(root / "ca.key", _pem_key(ca_key))
    (root / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(root / "server.key", _pem_key(server_key))
    (root / "server.crt").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(root / "checkpoint.key", os.urandom(32).hex().encode() + b"\n")
    _make_access_keys(root)
    (root / "allow-list").mkdir(exist_ok=True)
    ledger_key = SigningKey.generate()
    ledger_key.save(server_key_path(root / "ledger"))
    ledger_key.save_public(public_key_path(root / "ledger", SERVER))
    (root / "consortium.json").write_text(json.dumps(
        {"name": name, "server_hosts": list(server_hosts), "port": port}, indent=2) + "\n")
    return Consortium(root)


APP_KEY_ID = "fpk_pathfed"


def _make_access_keys(root: Path) -> None:
    """Who may start runs (the coordinator's token) and which app sites run (signing key)."""
    import hashlib

    from cryptography.hazmat.primitives.asymmetric import ed25519

    token = os.urandom(32).hex()
    _write_private(root / "coordinator.token", token.encode() + b"\n")
    (root / "coordinator.token.sha256").write_text(
        hashlib.sha256(token.encode()).hexdigest() + "\n")
    _write_private(root / "superexec.secret", os.urandom(32))
    key = ed25519.Ed25519PrivateKey.generate()
    _write_private(root / "app-signing.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH).decode()
    (root / "trusted-entities.yaml").write_text(
        "# The consortium's app-signing key: this site's SuperNode runs only apps it signed.\n"
        f'{APP_KEY_ID}: "{public} pathfed-consortium"\n')


def enroll_site(root: str | Path, name: str) -> Path:
    """Make a site's SuperNode key pair, allow-list its public key; return its folder."""
    consortium = Consortium(Path(root))
    consortium.settings  # noqa: B018  (raises a clear error if not a consortium)
    check_site_name(name)
    if (consortium.allow_list / f"{name}.pub").exists():
        raise ConfigError(f"site {name!r} is already enrolled in {consortium.root}")
    key = ec.generate_private_key(ec.SECP384R1())
    site_dir = consortium.site_dir(name)
    _write_private(site_dir / "supernode.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    (site_dir / "supernode.pub").write_bytes(public + b"\n")
    shutil.copyfile(consortium.ca_cert, site_dir / "ca.crt")
    shutil.copyfile(consortium.trusted_entities, site_dir / "trusted-entities.yaml")
    ledger_key = SigningKey.generate()  # signs the site's privacy-ledger records
    ledger_key.save(site_dir / "ledger.key")
    ledger_key.save_public(public_key_path(consortium.ledger_keys, name))
    (site_dir / "site.json").write_text(json.dumps(
        {"name": name, "superlink": consortium.address}, indent=2) + "\n")
    consortium.allow_list.mkdir(exist_ok=True)
    (consortium.allow_list / f"{name}.pub").write_bytes(public + b"\n")
    return site_dir


def remove_site(root: str | Path, name: str) -> None:
    """Take a site off the allow-list (the server unregisters it at its next start)."""
    consortium = Consortium(Path(root))
    check_site_name(name)
    path = consortium.allow_list / f"{name}.pub"
    if not path.exists():
        raise ConfigError(f"site {name!r} is not enrolled in {root}")
    path.unlink()
    public_key_path(consortium.ledger_keys, name).unlink(missing_ok=True)
