"""A site's privacy state: every run's accountant, kept by the site, on its own disk.

The accountant belongs to the site, not to a run: ``STATE_DIR/site-state.json`` holds the
Opacus accountant history of every run the site ever trained in, so a new run id does not
reset what the site has spent (its *lifetime* epsilon composes all of them), and a resumed
run continues its own accountant exactly. The file is written atomically and fsynced
before an update leaves the site (:meth:`SiteStore.save`).

It also keeps the site's last reply of each run (update, metrics, signed ledger record) so
that a server which restarts and asks for the same round from the same global model gets
the same reply again: re-sending an already released update costs no privacy, re-training
would.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RUN_ID
from common.errors import ConfigError, DataError
from common.runs import atomic_write

log = logging.getLogger(__name__)

STATE_FILE = "site-state.json"
VERSION = 2
DEFAULT_RUN = "default"


def run_key(run_id: str) -> str:
    """The key of a run in the state file (``run-id``, validated; ``default`` when empty)."""
    if not run_id:
        return DEFAULT_RUN
    if not RUN_ID.match(run_id):
        raise ConfigError(f"run-id: {run_id!r} must be letters, digits, '.', '_' or '-' "
                          "(at most 128, no path separators)")
    return run_id


class SiteStore:
    """The privacy state of one site (a file, or in memory for a Flower context).

    Args:
        site: the site's name; a state folder of another site is refused.
        folder: the site's state folder, or None to keep the state in memory only
            (``text`` is then what :meth:`dumps` returned before).
    """

    def __init__(self, site: str, folder: str | Path | None = None,
                 text: str | None = None) -> None:
        self.site = site
        self.folder = Path(folder) if folder is not None else None
        self.data: dict[str, Any] = {"version": VERSION, "site": site, "runs": {}}
        if self.folder is not None:
            path = self.folder / STATE_FILE
            if path.is_file():
                text = path.read_text(encoding="utf-8")
            else:
                self._migrate()
        if text:
            try:
                data = json.loads(text)
                runs = data["runs"]
                if not isinstance(runs, dict):
                    raise TypeError("runs is not an object")
            except (ValueError, KeyError, TypeError) as err:
                where = self.folder / STATE_FILE if self.folder else "site state"
                raise DataError(f"{where}: not a PathFed site state ({err}); it holds the "
                                "site's spent privacy budget: restore it from a backup "
                                "rather than deleting it") from None
            if data.get("site", site) != site:
                raise ConfigError(f"{self.folder}: the privacy state of site "
                                  f"{data.get('site')!r}, not of {site!r}; give each site "
                                  "its own state folder")
            self.data = {"version": VERSION, "site": site, "runs": runs}

    def _migrate(self) -> None:
        """Adopt per-run state files of PathFed 0.1 (``site-state-<run>.json``)."""
        assert self.folder is not None
        for old in sorted(self.folder.glob("site-state-*.json")):
            try:
                state = json.loads(old.read_text(encoding="utf-8"))
            except ValueError:
                continue
            self.data["runs"][old.stem.removeprefix("site-state-")] = {
                "accountant": state.get("accountant"), "ledger_prev": state.get("ledger_prev")}
            log.info("%s: adopted the privacy state of %s", self.folder, old.name)

    # ---- accountants -------------------------------------------------------------
    def run_state(self, run: str) -> dict[str, Any] | None:
        """What :meth:`common.site.Site.state` saved for ``run``, or None."""
        state = self.data["runs"].get(run)
        return dict(state) if state else None

    def prior_history(self, run: str) -> list[tuple[float, float, int]]:
        """The accountant histories of every *other* run this site trained in."""
        out: list[tuple[float, float, int]] = []
        for name, state in sorted(self.data["runs"].items()):
            if name == run or not state.get("accountant"):
                continue
            out.extend(tuple(h) for h in json.loads(state["accountant"]).get("history", []))
        return out

    # ---- the last reply of a run ----------------------------------------------------
    def _update_file(self, run: str) -> Path | None:
        if self.folder is None:
            return None
        digest = hashlib.sha256(run.encode()).hexdigest()[:16]
        return self.folder / f"last-update-{digest}.npz"

    def replay(self, run: str, server_round: int, received: str) -> dict[str, Any] | None:
        """The reply already sent for ``server_round`` of ``run`` from the global model
        hashed ``received``, or None: ``{"update", "n_samples", "metrics"}``."""
        last = (self.data["runs"].get(run) or {}).get("last")
        if not last or last.get("round") != server_round or last.get("received") != received:
            return None
        if self.folder is None:
            arrays = [np.asarray(a, dtype=d) for a, d in zip(last["update_inline"],
                                                             last["update_dtypes"])]
        else:
            path = self._update_file(run)
            if path is None or not path.is_file():
                return None
            with np.load(path, allow_pickle=False) as z:
                arrays = [z[f"a{i}"] for i in range(len(z.files))]
        return {"update": arrays, "n_samples": int(last["n_samples"]),
                "metrics": decode_metrics(last["metrics"])}

    def save(self, run: str, state: dict[str, Any], last: dict[str, Any] | None = None) -> None:
        """Record ``run``'s state (and its last reply); on disk, fsynced, before returning."""
        entry = dict(state)
        if last is not None:
            update = [np.asarray(u) for u in last["update"]]
            entry["last"] = {"round": int(last["round"]), "received": str(last["received"]),
                             "n_samples": int(last["n_samples"]),
                             "metrics": dict(last["metrics"])}
            path = self._update_file(run)
            if path is None:
                entry["last"]["update_inline"] = [u.tolist() for u in update]
                entry["last"]["update_dtypes"] = [u.dtype.str for u in update]
            else:
                buf = io.BytesIO()
                np.savez(buf, **{f"a{i}": u for i, u in enumerate(update)})  # type: ignore[arg-type]
                atomic_write(path, buf.getvalue())
        self.data["runs"][run] = entry
        if self.folder is not None:
            atomic_write(self.folder / STATE_FILE, self.dumps().encode())

    def dumps(self) -> str:
        return json.dumps(self.data, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"__bytes__": value.hex()}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in the site state")


def decode_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as :meth:`SiteStore.replay` stored them, with bytes restored."""
    return {k: bytes.fromhex(v["__bytes__"]) if isinstance(v, dict) and "__bytes__" in v else v
            for k, v in metrics.items()}


__all__ = ["DEFAULT_RUN", "STATE_FILE", "SiteStore", "decode_metrics", "run_key"]
