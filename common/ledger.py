"""The privacy ledger: what left each site, what it cost, signed and hash-chained.

``RUN_DIR/ledger.jsonl`` is an append-only JSON-lines file, PathFed's own channel for
privacy facts (never a log line). Each line is one *link*::

    {"seq": 3, "prev": "<hash of link 2>", "entry": {...}, "hash": "...",
     "server_signature": "..."}

``hash`` is the SHA-256 of the canonical JSON of ``{"seq", "prev", "entry"}`` and the server
signs it (Ed25519), so a changed, removed, reordered or truncated line is caught by
:func:`verify_ledger`. Every ``entry`` is a *signed record*, ``{"record", "signer", "key",
"signature"}`` (:func:`sign_record`): sites sign their own ``site-round`` records before
they leave the hospital, so the server can chain them but cannot alter them; the server
signs its ``run-start`` and ``server-round`` records the same way. A site's records also
carry ``site_prev``, the hash of its previous signed record, so even a server that re-chains
the file cannot drop one of a site's rounds unnoticed.

Data flow (see :class:`Ledger` for the server side):

1. Run start, server: ``ledger = Ledger(run_dir / "ledger.jsonl", server_key)`` then
   ``ledger.start(config, site_keys, initial_weights)`` with every site's public key.
2. Each round, each site, after :meth:`common.site.Site.train`:
   ``record = site_round_record(report, received_weights, ...)``;
   ``signed = sign_record(record, site_key, site_name)``; send
   ``encode_signed(signed)`` as the string metric :data:`LEDGER_METRIC` and keep
   ``envelope_hash(signed)`` in the site's state for the next round's ``previous``.
3. Each round, server: ``ledger.append(decode_signed(metrics))`` for each accepted reply
   (it raises :class:`LedgerError` on a bad signature: reject that reply), then
   ``ledger.append_server(server_round_record(...))`` after aggregation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from common.crypto.signing import (
    SigningKey,
    canonical_json,
    fingerprint,
    load_public_keys,
    sha256_hex,
    verify_signature,
)
from common.errors import ConfigError, PathFedError

log = logging.getLogger(__name__)

LEDGER_FILE = "ledger.jsonl"
LEDGER_METRIC = "ledger_record"
"""Name of the string metric that carries a site's signed record to the server."""
SERVER = "server"
"""Signer name of the server in the ledger and in a trusted keys folder."""
GENESIS = "0" * 64
"""``prev`` of the first link."""
PrivacyUnit = Literal["slide", "patient"]

_RECORD_DOMAIN = b"pathfed-ledger-record-v1\n"
_CHAIN_DOMAIN = b"pathfed-ledger-chain-v1\n"


class LedgerError(PathFedError, ValueError):
    """A ledger cannot be written or a record cannot be accepted; the message says why."""


# ---- hashing ------------------------------------------------------------------------
def hash_arrays(arrays: Sequence[np.ndarray]) -> str:
    """Deterministic SHA-256 (hex) of a list of arrays: dtype, shape and little-endian bytes.

    The same weights hash the same on every machine, whatever their memory layout.
    """
    h = hashlib.sha256(b"pathfed-arrays-v1")
    h.update(len(arrays).to_bytes(8, "little"))
    for array in arrays:
        a = np.ascontiguousarray(array)
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        header = json.dumps([a.dtype.str, list(a.shape)]).encode()
        h.update(len(header).to_bytes(8, "little") + header)
        h.update(a.tobytes())
    return h.hexdigest()


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a run's configuration (as in ``config.json``)."""
    return sha256_hex(canonical_json(dict(config)))


def envelope_hash(signed: Mapping[str, Any]) -> str:
    """SHA-256 of a signed record; a site's next record names it as ``site_prev``."""
    return sha256_hex(canonical_json(dict(signed)))


# ---- signed records -----------------------------------------------------------------
def _record_payload(record: Mapping[str, Any], signer: str, key: str) -> bytes:
    return _RECORD_DOMAIN + canonical_json({"record": record, "signer": signer, "key": key})


def sign_record(record: Mapping[str, Any], key: SigningKey, signer: str) -> dict[str, Any]:
    """``{"record", "signer", "key", "signature"}``: ``record`` signed by ``signer``.

    The Ed25519 signature covers the canonical JSON of the record, the signer's name and
    the key's fingerprint, so none of them can be swapped.
    """
    record = json.loads(canonical_json(record))  # JSON-native and encodable, or ValueError
    fp = key.fingerprint()
    return {"record": record, "signer": signer, "key": fp,
            "signature": key.sign(_record_payload(record, signer, fp))}


def check_signed(signed: Mapping[str, Any], public_pem: str) -> str | None:
    """Why ``signed`` does not verify under ``public_pem``, or None when it does."""
    if not isinstance(signed, Mapping) or not {"record", "signer", "key", "signature"} <= set(
            signed):
        return "not a signed record (needs record, signer, key, signature)"
    try:
        expected = fingerprint(public_pem)
    except ConfigError as err:
        return f"the key of {signed['signer']} is unusable ({err})"
    if signed["key"] != expected:
        return (f"signed with key {str(signed['key'])[:16]}..., not {signed['signer']}'s "
                f"key {expected[:16]}...")
    try:
        payload = _record_payload(signed["record"], str(signed["signer"]), str(signed["key"]))
    except ValueError as err:
        return f"record cannot be encoded ({err})"
    if not verify_signature(public_pem, payload, str(signed["signature"])):
        return f"signature of {signed['signer']} does not verify (record changed)"
    return None


def encode_signed(signed: Mapping[str, Any]) -> str:
    """A signed record as one string, to travel as the Flower metric :data:`LEDGER_METRIC`."""
    return canonical_json(dict(signed)).decode("ascii")


def decode_signed(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The signed record in a reply's metrics; :class:`LedgerError` if absent or malformed."""
    text = metrics.get(LEDGER_METRIC)
    if not isinstance(text, str):
        raise LedgerError(f"reply carries no {LEDGER_METRIC!r} string metric: the site did not "
                          "sign a ledger record for this round")
    try:
        signed = json.loads(text)
    except json.JSONDecodeError as err:
        raise LedgerError(f"{LEDGER_METRIC!r} metric is not JSON ({err})") from None
    if not isinstance(signed, dict):
        raise LedgerError(f"{LEDGER_METRIC!r} metric is not a signed record")
    return signed


# ---- record builders ----------------------------------------------------------------
def _scalar_type(value: Any) -> str:
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, bytes):
        return "bytes"
    return type(value).__name__


def site_round_record(
    report: Any,
    received: Sequence[np.ndarray],
    *,
    server_round: int,
    site: str,
    plan: Any | None,
    accountant: str = "rdp",
    privacy_unit: PrivacyUnit = "slide",
    secagg: bool = True,
    mask_generator: str | None = None,
    bytes_sent: int | None = None,
    previous: str | None = None,
    run: str | None = None,
    noise: str | None = None,
) -> dict[str, Any]:
    """A site's ``site-round`` record, built from what :meth:`Site.train` returned.

    Args:
        report: the round's :class:`common.site.SiteReport` (update, n_samples, metrics).
        received: the global weights the site received and trained from.
        server_round: the round number.
        site: the site's name (its signer name in the ledger).
        plan: the site's :class:`common.privacy.DPPlan`, or None without DP.
        accountant: the site's accountant mechanism (``rdp`` or ``prv``).
        privacy_unit: what one DP sample is (``slide`` or ``patient``).
        secagg: whether the update left the site masked by SecAgg+.
        mask_generator: the SecAgg+ mask generator in use
            (:data:`common.crypto.MASK_GENERATOR`).
        bytes_sent: bytes of the update as sent; defaults to the raw update's size (the
            SecAgg+ vector is quantised to the same number of values).
        previous: :func:`envelope_hash` of the site's previous signed record, None in its
            first round.
        run: the run the record belongs to (the hash of the ledger's run-start line, which
            the server sends with every round); the server refuses records of other runs.
        noise: where the site's DP noise came from (a CSPRNG, or seeded: reproducible).
    """
    metrics = dict(report.metrics)
    metrics.pop(LEDGER_METRIC, None)
    epsilon = metrics.get("epsilon")
    dp = plan is not None
    p: Any = plan
    return {
        "kind": "site-round",
        "round": int(server_round),
        "site": site,
        "received_model": hash_arrays(received),
        "update": hash_arrays(report.update),
        "dp": dp,
        "accountant": accountant if dp else None,
        "sample_rate": float(p.sample_rate) if dp else None,
        "noise_multiplier": float(p.noise_multiplier) if dp else None,
        "max_grad_norm": float(p.max_grad_norm) if dp else None,
        "steps": int(metrics.get("steps", 0)),
        "epsilon": float(epsilon) if dp and epsilon is not None else None,
        "delta": float(p.delta) if dp else None,
        "epsilon_budget": float(p.epsilon_budget) if dp else None,
        "n_samples": int(report.n_samples),
        "privacy_unit": privacy_unit,
        "bytes_sent": int(bytes_sent if bytes_sent is not None
                          else sum(np.asarray(u).nbytes for u in report.update)),
        "sent": {"update": "secagg+-masked" if secagg else "plain",
                 "metrics": {k: _scalar_type(v) for k, v in sorted(metrics.items())}},
        "mask_generator": mask_generator if secagg else None,
        "site_prev": previous,
        "run": run,
        "noise": noise,
    }


def server_round_record(
    *,
    server_round: int,
    participants: Sequence[str],
    dropouts: Mapping[str, str],
    aggregate: Sequence[np.ndarray] | None,
    global_weights: Sequence[np.ndarray],
    secagg: bool,
    mask_generator: str | None = None,
    checkpoint: str | None = None,
    checkpoint_sha256: str | None = None,
) -> dict[str, Any]:
    """The server's ``server-round`` record, written after aggregation.

    Args:
        participants: sites whose updates went into the aggregate.
        dropouts: sites asked to train that did not contribute, with the reason (a
            rejected update's privacy spend is still in its site's own record).
        aggregate: the (unmasked) aggregate update, None when the round was rejected.
        global_weights: the global model after the round (unchanged if rejected).
        checkpoint: the checkpoint file of the round (relative to the run folder).
        checkpoint_sha256: SHA-256 of that file's bytes as written (sealed or not).
    """
    return {
        "kind": "server-round",
        "round": int(server_round),
        "participants": sorted(participants),
        "dropouts": dict(sorted(dropouts.items())),
        "aggregate": hash_arrays(aggregate) if aggregate is not None else None,
        "global_model": hash_arrays(global_weights),
        "secure_aggregation": bool(secagg),
        "mask_generator": mask_generator if secagg else None,
        "checkpoint": checkpoint,
        "checkpoint_sha256": checkpoint_sha256,
    }


def run_end_record(*, rounds: int, last_round: int, global_weights: Sequence[np.ndarray],
                   summary: Mapping[str, Any], records: int) -> dict[str, Any]:
    """The server's ``run-end`` record: how the run ended, signed last.

    Args:
        rounds: rounds that produced a global model.
        last_round: the last round the server ran (produced a model or not).
        global_weights: the final global model.
        summary: the run's ``summary.json`` content (its hash binds the file).
        records: lines in the ledger before this one (a cut ledger cannot keep its end).
    """
    return {
        "kind": "run-end",
        "rounds": int(rounds),
        "last_round": int(last_round),
        "global_model": hash_arrays(global_weights),
        "summary_hash": config_hash(summary),
        "records": int(records),
    }


def run_start_record(
    config: Mapping[str, Any], server_key: SigningKey, site_keys: Mapping[str, str],
    initial_weights: Sequence[np.ndarray], server_name: str = SERVER,
) -> dict[str, Any]:
    """The ``run-start`` record: configuration, initial model and every public key."""
    keys = {server_name: server_key.public_pem(), **dict(site_keys)}
    return {
        "kind": "run-start",
        "config_hash": config_hash(config),
        "config": dict(config),
        "initial_model": hash_arrays(initial_weights),
        "server": server_name,
        "keys": dict(sorted(keys.items())),
    }


# ---- record shapes ------------------------------------------------------------------
_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_STR = (str, type(None))
SCHEMAS: dict[str, dict[str, tuple[type, ...]]] = {
    "run-start": {"config": (dict,), "config_hash": (str,), "initial_model": (str,),
                  "server": (str,), "keys": (dict,)},
    "site-round": {"round": (int,), "site": (str,), "received_model": (str,),
                   "update": (str,), "dp": (bool,), "accountant": _OPT_STR,
                   "sample_rate": _OPT_NUM, "noise_multiplier": _OPT_NUM,
                   "max_grad_norm": _OPT_NUM, "steps": (int,), "epsilon": _OPT_NUM,
                   "delta": _OPT_NUM, "epsilon_budget": _OPT_NUM, "n_samples": (int,),
                   "privacy_unit": (str,), "bytes_sent": (int,), "sent": (dict,),
                   "mask_generator": _OPT_STR, "site_prev": _OPT_STR, "run": _OPT_STR,
                   "noise": _OPT_STR},
    "server-round": {"round": (int,), "participants": (list,), "dropouts": (dict,),
                     "aggregate": _OPT_STR, "global_model": (str,),
                     "secure_aggregation": (bool,), "mask_generator": _OPT_STR,
                     "checkpoint": _OPT_STR, "checkpoint_sha256": _OPT_STR},
    "run-end": {"rounds": (int,), "last_round": (int,), "global_model": (str,),
                "summary_hash": (str,), "records": (int,)},
}
"""Fields and JSON types of each record kind (what :func:`record_problem` checks)."""


def record_problem(record: Any) -> str | None:
    """Why ``record`` is not a well-formed ledger record, or None."""
    if not isinstance(record, dict):
        return "record is not an object"
    kind = record.get("kind")
    schema = SCHEMAS.get(kind) if isinstance(kind, str) else None
    if schema is None:
        return f"unknown record kind {record.get('kind')!r}"
    for key, types in schema.items():
        value = record.get(key)
        if key not in record or not isinstance(value, types) or (
                isinstance(value, bool) and bool not in types):
            return f"field {key!r} is {value!r}, expected {'/'.join(t.__name__ for t in types)}"
    if record["kind"] == "site-round":
        sent = record["sent"]
        if not isinstance(sent.get("update"), str) or not isinstance(sent.get("metrics"), dict):
            return "field 'sent' needs 'update' (str) and 'metrics' (object)"
    if record["kind"] == "server-round" and not all(
            isinstance(n, str) for n in record["participants"]):
        return "field 'participants' must list site names"
    if record["kind"] == "run-start" and not all(
            isinstance(v, str) for v in record["keys"].values()):
        return "field 'keys' must map names to PEM strings"
    return None


# ---- the chain ----------------------------------------------------------------------
def _link_hash(seq: int, prev: str, entry: Mapping[str, Any]) -> str:
    return sha256_hex(canonical_json({"seq": seq, "prev": prev, "entry": entry}))


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


# ---- verification -------------------------------------------------------------------
ProblemKind = Literal["changed", "removed", "reordered", "truncated", "unknown-signer",
                      "key-mismatch", "malformed", "incomplete", "replayed"]


@dataclass(frozen=True)
class LedgerProblem:
    """One thing wrong with a ledger, at a line (1-based) and, when known, a seq."""

    kind: ProblemKind
    line: int
    seq: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" (seq {self.seq})" if self.seq is not None else "")
        return f"{where}: {self.kind}: {self.message}"


@dataclass
class LedgerReport:
    """What :func:`verify_ledger` found: the readable links, the keys used, the problems."""

    path: Path
    links: list[dict[str, Any]] = field(default_factory=list)
    """Links that parsed (in file order), each with a ``line`` number added."""
    keys: dict[str, str] = field(default_factory=dict)
    """Public keys used to verify, by signer name."""
    problems: list[LedgerProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    keys_pinned: bool = False
    """Whether the keys came from the auditor (trusted) rather than from the ledger."""

    @property
    def ok(self) -> bool:
        return not self.problems

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Well-formed signed records (``entry`` of each link) of ``kind``, in ledger order.

        Malformed records are left out (and are problems of the report).
        """
        out = []
        for link in self.links:
            entry = link.get("entry")
            if isinstance(entry, dict) and record_problem(entry.get("record")) is None and (
                    kind is None or entry["record"].get("kind") == kind):
                out.append(entry)
        return out


def _read_lines(path: Path, report: LedgerReport) -> list[tuple[int, dict[str, Any]]]:
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete_last = data.endswith(b"\n")
    if complete_last:
        lines = lines[:-1]
    parsed = []
    for i, raw in enumerate(lines, start=1):
        last = i == len(lines)
        if last and not complete_last:
            report.problems.append(LedgerProblem(
                "truncated", i, None, f"last line is incomplete ({len(raw)} bytes, no newline): "
                "the writer was interrupted or the file was cut; the rounds after the last "
                "complete line are not accounted for"))
            continue
        try:
            link = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            report.problems.append(LedgerProblem("changed", i, None,
                                                 f"not valid JSON ({err.__class__.__name__})"))
            continue
        if not isinstance(link, dict) or not {"seq", "prev", "entry", "hash",
                                              "server_signature"} <= set(link) or not (
                isinstance(link["seq"], int) and isinstance(link["entry"], dict)):
            report.problems.append(LedgerProblem(
                "malformed", i, None, "not a ledger link (needs seq, prev, entry, hash, "
                "server_signature)"))
            continue
        parsed.append((i, link))
    return parsed


def _fingerprint_or_none(pem: Any) -> str | None:
    try:
        return fingerprint(str(pem))
    except ConfigError:
        return None


def _keys(parsed: list[tuple[int, dict[str, Any]]], trusted: Mapping[str, str] | None,
          report: LedgerReport) -> tuple[dict[str, str], str]:
    start = next((link for _, link in parsed if isinstance(link["entry"].get("record"), dict)
                  and link["entry"]["record"].get("kind") == "run-start"
                  and record_problem(link["entry"]["record"]) is None), None)
    presented: dict[str, str] = dict(start["entry"]["record"].get("keys", {})) if start else {}
    server = str(start["entry"]["record"].get("server", SERVER)) if start else SERVER
    if start is None:
        report.problems.append(LedgerProblem("removed", 1, 0, "no run-start record: the keys "
                                             "and configuration of the run are missing"))
    if trusted is None:
        report.notes.append("keys taken from the ledger's own run-start record (trust on first "
                            "use); pass the consortium's public keys (--keys DIR) to pin them")
        return presented, server
    report.keys_pinned = True
    line = next((i for i, link in parsed if link is start), 1)
    for name, pem in presented.items():
        if name in trusted and _fingerprint_or_none(trusted[name]) != _fingerprint_or_none(pem):
            report.problems.append(LedgerProblem(
                "key-mismatch", line, 0, f"run-start presents a key for {name} "
                f"({str(_fingerprint_or_none(pem))[:16]}...) that is not its trusted key "
                f"({str(_fingerprint_or_none(trusted[name]))[:16]}...)"))
        elif name not in trusted:
            report.notes.append(f"{name}: key presented at run start is not among the trusted "
                                "keys; its records count as unknown signer")
    return dict(trusted), server


def verify_ledger(path: str | Path,
                  trusted_keys: Mapping[str, str] | None = None) -> LedgerReport:
    """Check every line of a ledger; return what verified and each problem, by line.

    Finds changed lines (link hash, server signature or record signature wrong), removed
    lines (a gap in ``seq``, a ``prev`` that is not the previous line's hash, or a site
    record whose ``site_prev`` is nowhere in the ledger), reordered lines, a truncated last
    line, unknown signers and keys that differ from the trusted ones.

    Args:
        path: the ``ledger.jsonl`` file.
        trusted_keys: signer name -> public key PEM (e.g. from
            :func:`common.crypto.signing.load_public_keys`). The server's key is under
            ``"server"``. None trusts the keys presented in the run-start record.
    """
    path = Path(path)
    report = LedgerReport(path=path)
    parsed = _read_lines(path, report)
    keys, server = _keys(parsed, trusted_keys, report)
    report.keys = keys
    server_pem = keys.get(server)
    if server_pem is None and parsed:
        report.problems.append(LedgerProblem("unknown-signer", parsed[0][0], None,
                                             f"no key for the server ({server!r}); add "
                                             f"{server}.pub.pem to the keys folder"))
    all_seqs: dict[int, int] = {}
    hash_by_seq: dict[int, str] = {}
    for i, link in parsed:
        all_seqs.setdefault(link["seq"], i)
        hash_by_seq.setdefault(link["seq"], str(link["hash"]))
    expected, prev_line = 0, 0
    seen: set[int] = set()
    site_last: dict[str, tuple[str, bool]] = {}
    """Per site: hash of its last record, and whether that line had problems."""
    for i, link in parsed:
        seq, entry = link["seq"], link["entry"]
        n_before = len(report.problems)
        link["line"] = i
        report.links.append(link)
        # Integrity of this line.
        try:
            recomputed = _link_hash(seq, link["prev"], entry)
        except ValueError as err:
            recomputed = f"unencodable: {err}"
        if recomputed != link["hash"]:
            report.problems.append(LedgerProblem(
                "changed", i, seq, "content does not match its hash (the line was edited)"))
        elif server_pem and not verify_signature(server_pem, _CHAIN_DOMAIN + str(
                link["hash"]).encode(), str(link["server_signature"])):
            report.problems.append(LedgerProblem("changed", i, seq,
                                                 "server signature does not verify"))
        signer = str(entry.get("signer", ""))
        if signer not in keys:
            report.problems.append(LedgerProblem(
                "unknown-signer", i, seq, f"record signed by {signer!r}, which has no "
                f"{'trusted ' if report.keys_pinned else ''}key"))
        else:
            problem = check_signed(entry, keys[signer])
            if problem:
                report.problems.append(LedgerProblem("changed", i, seq, problem))
        record = entry.get("record") if isinstance(entry.get("record"), dict) else {}
        shape = record_problem(entry.get("record"))
        if shape:
            report.problems.append(LedgerProblem("malformed", i, seq, shape))
            record = {}
        if record.get("kind") == "site-round" and record.get("site") != signer:
            report.problems.append(LedgerProblem(
                "changed", i, seq, f"site-round record of {record.get('site')!r} signed by "
                f"{signer!r}"))
        if record.get("kind") in ("run-start", "server-round", "run-end") and signer != server:
            report.problems.append(LedgerProblem(
                "changed", i, seq, f"{record.get('kind')} record signed by {signer!r}, not "
                "the server"))
        # Order and completeness.
        if seq in seen:
            report.problems.append(LedgerProblem("reordered", i, seq,
                                                 f"seq {seq} appears twice (duplicated line)"))
        elif seq < expected:
            report.problems.append(LedgerProblem(
                "reordered", i, seq, f"seq {seq} comes after seq {expected - 1} (line "
                f"{prev_line}); lines were moved"))
        elif seq > expected:
            missing = [s for s in range(expected, seq)]
            later = [s for s in missing if s in all_seqs]
            if later:
                report.problems.append(LedgerProblem(
                    "reordered", i, seq, f"seq {seq} where seq {expected} was expected "
                    f"(seq {later[0]} is on line {all_seqs[later[0]]}); lines were moved"))
            else:
                span = f"{missing[0]}" if len(missing) == 1 else f"{missing[0]}-{missing[-1]}"
                report.problems.append(LedgerProblem(
                    "removed", i, seq, f"seq {span} missing before this line "
                    f"({len(missing)} line(s) removed)"))
        elif link["prev"] != (GENESIS if seq == 0 else hash_by_seq.get(seq - 1)):
            report.problems.append(LedgerProblem(
                "removed", i, seq, f"prev does not match the hash of seq {seq - 1} (line "
                f"{all_seqs.get(seq - 1, '?')}): a line was removed or replaced and the chain "
                "renumbered"))
        seen.add(seq)
        expected = max(expected, seq + 1)
        prev_line = i
        if record.get("kind") == "site-round":
            # The site's own chain: its record names the hash of its previous record.
            site_prev = record.get("site_prev")
            last = site_last.get(signer)
            if site_prev is not None and site_prev != (last[0] if last else None) and not (
                    last and last[1]):
                report.problems.append(LedgerProblem(
                    "removed", i, seq, f"{signer}'s previous record ({str(site_prev)[:16]}...) "
                    "is not its last record before this line: one of its rounds was removed"))
            try:
                site_last[signer] = (envelope_hash(entry), len(report.problems) > n_before)
            except ValueError:
                site_last[signer] = ("", True)
    if not parsed and not report.problems:
        report.problems.append(LedgerProblem("removed", 1, None, "the ledger is empty"))
    _check_run(report)
    for found in report.problems:
        log.debug("%s: %s", path, found)
    return report


def _check_run(report: LedgerReport) -> None:
    """Every site record belongs to this run; the ledger ends with its run-end record."""
    if not report.links:
        return
    run = str(report.links[0].get("hash"))
    for link in report.links:
        record = link["entry"].get("record")
        if (isinstance(record, dict) and record.get("kind") == "site-round"
                and record_problem(record) is None and record.get("run") != run):
            report.problems.append(LedgerProblem(
                "replayed", link["line"], link["seq"], f"{record.get('site')}'s record belongs "
                f"to another run ({str(record.get('run'))[:16]}...), not to this one"))
    last = report.links[-1]
    record = last["entry"].get("record")
    ends = [link for link in report.links if isinstance(link["entry"].get("record"), dict)
            and link["entry"]["record"].get("kind") == "run-end"]
    if not ends:
        report.problems.append(LedgerProblem(
            "incomplete", last["line"], last["seq"], "no run-end record: the run did not "
            "finish (resume it), or its last lines were removed"))
    elif ends[-1] is not last:
        report.problems.append(LedgerProblem(
            "changed", last["line"], last["seq"], "lines follow the run-end record"))
    elif isinstance(record, dict) and record.get("records") != last["seq"]:
        report.problems.append(LedgerProblem(
            "removed", last["line"], last["seq"], f"the run-end record counts "
            f"{record.get('records')} lines before it; the ledger has {last['seq']}"))


__all__ = [
    "GENESIS", "LEDGER_FILE", "LEDGER_METRIC", "SERVER", "Ledger", "LedgerError",
    "LedgerProblem", "LedgerReport", "SCHEMAS", "check_signed", "config_hash", "decode_signed",
    "encode_signed", "envelope_hash", "hash_arrays", "record_problem", "run_start_record",
    "run_end_record", "server_round_record", "sign_record", "site_round_record",
    "verify_ledger",
]


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
