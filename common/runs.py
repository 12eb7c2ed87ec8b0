"""The run folder: what a federated run leaves behind for people and auditors.

``config.json`` (the validated configuration), ``metrics.jsonl`` (one record per round and
site, plus one ``global`` record per round), ``checkpoints/round-NNN.npz`` (the global model
after each round) and ``summary.json``. Every file is written atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from common.crypto.sealed import SUFFIX, load_key, seal, unseal
from common.errors import DataError


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


def json_safe(value: Any) -> Any:
    """JSON-safe: NaN and inf become null, numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``path`` whole or not at all, and make it durable (file and folder fsynced).

    The file is owner-only (0600, as ``mkstemp`` makes it) unless ``mode`` says otherwise
    (e.g. 0o644 for a report meant to be shared)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


class RunFolder:
    """Writer of one run folder."""

    def __init__(self, path: str | Path, checkpoint_key: bytes | None = None,
                 run_id: str = "") -> None:
        self.path = Path(path)
        self.checkpoint_key = checkpoint_key
        self.run_id = run_id
        """Bound into every sealed checkpoint: another run's checkpoint does not decrypt."""
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "checkpoints").mkdir(exist_ok=True)

    def write_json(self, name: str, data: dict[str, Any]) -> Path:
        target = self.path / name
        atomic_write(target, (json.dumps(json_safe(data), indent=2) + "\n").encode())
        return target

    def append_metrics(self, records: list[dict[str, Any]]) -> None:
        with (self.path / "metrics.jsonl").open("a", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(json_safe(record)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def save_checkpoint(self, server_round: int, names: list[str],
                        weights: list[np.ndarray]) -> Path:
        """Write the global model of ``server_round``; AES-GCM sealed when a key is set."""
        return self._save_npz(checkpoint_name(server_round), dict(zip(names, weights)))

    def _save_npz(self, name: str, arrays: dict[str, np.ndarray]) -> Path:
        import io

        buf = io.BytesIO()
        np.savez(buf, **arrays)  # type: ignore[arg-type]
        if self.checkpoint_key is None:
            target = self.path / "checkpoints" / name
            atomic_write(target, buf.getvalue())
        else:
            target = self.path / "checkpoints" / (name + SUFFIX)
            atomic_write(target, seal(buf.getvalue(), self.checkpoint_key, name, self.run_id))
        return target

    def save_server_state(self, server_round: int, arrays: dict[str, np.ndarray]) -> Path:
        """Write the server optimiser's state after ``server_round`` (sealed like the
        checkpoints), so that a resumed run continues its moments."""
        return self._save_npz(f"server-opt-{server_round:03d}.npz", arrays)

    def server_state_path(self, server_round: int) -> Path | None:
        """The server optimiser's saved state after ``server_round``, if any."""
        for suffix in ("", SUFFIX):
            path = self.path / "checkpoints" / f"server-opt-{server_round:03d}.npz{suffix}"
            if path.is_file():
                return path
        return None

    def save_release(self, name: str, data: bytes) -> Path:
        """Write a released model's bytes beside the checkpoints (sealed like them); the
        hash of what was written is the caller's (``data``, before sealing)."""
        if self.checkpoint_key is None:
            target = self.path / name
            atomic_write(target, data)
        else:
            target = self.path / (name + SUFFIX)
            atomic_write(target, seal(data, self.checkpoint_key, name, self.run_id))
        return target

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        """The last round with a checkpoint, and its file (by round number, not by name:
        ``round-1000`` comes after ``round-999``)."""
        found = []
        for path in self.path.glob("checkpoints/round-*.npz*"):
            match = CHECKPOINT.fullmatch(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return max(found) if found else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of ``RUN_DIR/metrics.jsonl``."""
    with (Path(path) / "metrics.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


CHECKPOINT = re.compile(r"round-(\d+)\.npz(?:\.enc)?")


def checkpoint_name(server_round: int) -> str:
    return f"round-{server_round:03d}.npz"


def load_checkpoint(path: str | Path, key: bytes | None = None,
                    run_id: str | None = None) -> dict[str, np.ndarray]:
    """A global checkpoint's arrays by name; sealed files need the consortium's key (and,
    given ``run_id``, must belong to that run)."""
    import io

    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    if path.name.endswith(SUFFIX):
        key = key or load_key()
        if key is None:
            raise DataError(f"{path}: encrypted checkpoint; give the key (--key-file or "
                            "PATHFED_CHECKPOINT_KEY)")
        data = unseal(data, key, path.name[: -len(SUFFIX)], str(path), run_id)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError) as err:
        raise DataError(f"{path}: not a PathFed checkpoint ({err})") from None


def sha256_file(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
