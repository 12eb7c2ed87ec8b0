"""Ledger records: their hashes, signatures, builders and shapes (schemas)."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from common.crypto.signing import (
    SigningKey,
    canonical_json,
    fingerprint,
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
        **_distributed_fields(p, metrics),
        **_substitution_fields(p),
    }


def _substitution_fields(plan: Any) -> dict[str, Any]:
    """A round whose DP samples are groups of units (MixPatch), for the auditor."""
    if plan is None or not getattr(plan, "substitution", False):
        return {}
    return {
        "adjacency": "substitution",
        "dp_samples": "mixing groups: a unit's change substitutes the one group it hashes "
                      "to (common/data/mixpatch.py); accounted by the weak triangle "
                      "inequality over the sampled Gaussian's RDP",
    }


def _distributed_fields(plan: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """A distributed-DP round's noise and trust, for the auditor (nothing in local mode)."""
    if plan is None or getattr(plan, "mode", "local") != "distributed":
        return {}
    return {
        "dp_mode": "distributed",
        "dim": int(metrics.get("dim", 0)),
        "l2_sensitivity": float(plan.l2_sensitivity),
        "l1_sensitivity": float(plan.l1_sensitivity),
        "noise_sites": int(metrics.get("noise_sites", 0)),
        "share_variance": float(metrics.get("share_variance", 0.0)),
        "trust": "Skellam shares complete only in SecAgg+'s sum: private against a server "
                 "that follows SecAgg+ (semi-honest) while fewer parties than its "
                 "reconstruction threshold collude, with at least noise_sites sites in "
                 "each unmasked sum",
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
    secagg_shares: Mapping[str, int] | None = None,
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
        secagg_shares: the round's SecAgg+ share settings
            (:meth:`common.crypto.ShareChoice.record`: sites, shares, threshold,
            tolerated and asked dropouts), None without SecAgg+ or before its setup.
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
        "secagg_shares": dict(secagg_shares) if secagg and secagg_shares else None,
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
    if record["kind"] == "server-round" and not isinstance(record.get("secagg_shares"),
                                                            (dict, type(None))):
        return "field 'secagg_shares' must be an object or null"
    if record["kind"] == "run-start" and not all(
            isinstance(v, str) for v in record["keys"].values()):
        return "field 'keys' must map names to PEM strings"
    return None


def _link_hash(seq: int, prev: str, entry: Mapping[str, Any]) -> str:
    return sha256_hex(canonical_json({"seq": seq, "prev": prev, "entry": entry}))
