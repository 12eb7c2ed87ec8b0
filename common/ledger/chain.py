"""The server's writer of the ledger: append-only, hash-chained, one fsync per line."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.crypto.signing import (
    SigningKey,
    canonical_json,
    fingerprint,
)
from common.ledger.records import (
    _CHAIN_DOMAIN,
    GENESIS,
    SERVER,
    LedgerError,
    _link_hash,
    check_signed,
    envelope_hash,
    record_problem,
    run_end_record,
    run_start_record,
    sign_record,
)
from common.ledger.verify import verify_ledger

log = logging.getLogger(__name__)


# ---- the chain ----------------------------------------------------------------------
class Ledger:
    """The server's writer of ``ledger.jsonl`` (append only, one fsync per line).

    Opening an existing ledger resumes it after verifying it (a ledger with problems is
    never appended to). The server accepts a site's record only if it verifies under the
    key that site presented at run start.

    Args:
        path: the ledger file, conventionally ``RUN_DIR/ledger.jsonl``.
        server_key: the server's signing key (keep it outside the run folder).
        server_name: the server's signer name.
    """

    def __init__(self, path: str | Path, server_key: SigningKey,
                 server_name: str = SERVER) -> None:
        self.path = Path(path)
        self.server_key = server_key
        self.server_name = server_name
        self.seq = 0
        self.prev = GENESIS
        self.keys: dict[str, str] = {}
        self.run = ""
        """Hash of the run-start line: the run's identity, sent to sites every round."""
        self.envelopes: set[str] = set()
        """Hashes of the site records already in the ledger (a resent one is not doubled)."""
        if self.path.exists() and self.path.stat().st_size:
            report = verify_ledger(self.path)
            if [p.kind for p in report.problems if p.kind != "incomplete"] == ["truncated"]:
                # The writer was killed mid-line: that record was never written. Drop the
                # partial line (its site re-sends the same signed record) and go on.
                data = self.path.read_bytes()
                keep = data[: data.rfind(b"\n") + 1]
                log.warning("%s: dropping an incomplete last line (%d bytes) left by a "
                            "killed run", self.path, len(data) - len(keep))
                with self.path.open("r+b") as fh:
                    fh.truncate(len(keep))
                    os.fsync(fh.fileno())
                report = verify_ledger(self.path)
            problems = [p for p in report.problems if p.kind != "incomplete"]
            if problems:
                raise LedgerError(f"{self.path}: cannot resume a ledger with problems: "
                                  + "; ".join(str(p) for p in problems))
            last = report.links[-1]
            self.seq, self.prev, self.keys = last["seq"] + 1, last["hash"], dict(report.keys)
            self.run = str(report.links[0]["hash"])
            self.envelopes = {envelope_hash(e) for e in report.records("site-round")}
            if report.records("run-end"):
                raise LedgerError(f"{self.path}: this run has ended (its ledger has a run-end "
                                  "record); start a new run in another folder")
            if self.keys.get(server_name) != server_key.public_pem():
                raise LedgerError(f"{self.path}: was started with another server key; use "
                                  "the key of that run or a new run folder")

    def start(self, config: Mapping[str, Any], site_keys: Mapping[str, str],
              initial_weights: Sequence[np.ndarray]) -> dict[str, Any]:
        """Append the ``run-start`` record (first line of a new ledger)."""
        if self.seq:
            raise LedgerError(f"{self.path}: already started ({self.seq} lines)")
        for name, pem in site_keys.items():
            fingerprint(pem)  # a malformed key fails here, naming nothing secret
        record = run_start_record(config, self.server_key, site_keys, initial_weights,
                                  self.server_name)
        link = self.append_server(record)
        self.keys = dict(record["keys"])
        self.run = str(link["hash"])
        return link

    def end(self, *, rounds: int, last_round: int, global_weights: Sequence[np.ndarray],
            summary: Mapping[str, Any]) -> dict[str, Any]:
        """Append the signed ``run-end`` record (nothing can follow it)."""
        return self.append_server(run_end_record(
            rounds=rounds, last_round=last_round, global_weights=global_weights,
            summary=summary, records=self.seq))

    def append_server(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Sign ``record`` with the server key and append it."""
        return self._write(sign_record(record, self.server_key, self.server_name))

    def append(self, signed: Mapping[str, Any], server_round: int | None = None
               ) -> dict[str, Any] | None:
        """Append a site's signed record after checking it; return the written link
        (None when this very record is already in the ledger: a resent reply).

        Raise :class:`LedgerError` when the signer is unknown, the signature does not
        verify, the record is not a ``site-round`` record of its signer, or it belongs to
        another run or (given ``server_round``) another round: a replayed record.
        """
        if not self.seq:
            raise LedgerError(f"{self.path}: call start() before appending site records")
        signer = str(signed.get("signer", ""))
        if signer == self.server_name or signer not in self.keys:
            raise LedgerError(f"record signed by unknown site {signer!r}; known sites: "
                              f"{', '.join(k for k in self.keys if k != self.server_name)}")
        problem = check_signed(signed, self.keys[signer])
        if problem:
            raise LedgerError(f"record of {signer} rejected: {problem}")
        record = signed["record"]
        shape = record_problem(record)
        if shape:
            raise LedgerError(f"record of {signer} rejected: malformed ({shape})")
        if record.get("kind") != "site-round" or record.get("site") != signer:
            raise LedgerError(f"record of {signer} rejected: not a site-round record of "
                              f"{signer} (kind {record.get('kind')!r}, site "
                              f"{record.get('site')!r})")
        if record.get("run") != self.run:
            raise LedgerError(f"record of {signer} rejected: it belongs to run "
                              f"{str(record.get('run'))[:16]}..., not to this run "
                              f"({self.run[:16]}...): a replayed record")
        if server_round is not None and record["round"] != server_round:
            raise LedgerError(f"record of {signer} rejected: it is for round "
                              f"{record['round']}, this is round {server_round}: a replayed "
                              "record")
        digest = envelope_hash(signed)
        if digest in self.envelopes:
            return None
        link = self._write(dict(signed))
        self.envelopes.add(digest)
        return link

    def _write(self, entry: dict[str, Any]) -> dict[str, Any]:
        link_hash = _link_hash(self.seq, self.prev, entry)
        link = {"seq": self.seq, "prev": self.prev, "entry": entry, "hash": link_hash,
                "server_signature": self.server_key.sign(_CHAIN_DOMAIN + link_hash.encode())}
        line = canonical_json(link) + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        self.seq, self.prev = self.seq + 1, link_hash
        return link


