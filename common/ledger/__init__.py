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
2. Each round, each site, in :meth:`common.site.Site.round` (after training):
   ``record = site_round_record(report, received_weights, ..., run=..., noise=...)``;
   ``signed = sign_record(record, site_key, site_name)``; send
   ``encode_signed(signed)`` as the string metric :data:`LEDGER_METRIC` and keep
   ``envelope_hash(signed)`` in the site's state for the next round's ``previous``.
3. Each round, server (:meth:`common.rounds.RoundBook.check`, for every reply, before
   its other checks, so a rejected update's spend is still recorded):
   ``ledger.append(decode_signed(metrics), server_round)``. It raises
   :class:`LedgerError` on a bad signature, or a record of another run or round; the
   reply is then rejected. After aggregation the server calls
   ``ledger.append_server(server_round_record(...))``, and at the end ``ledger.end(...)``.

Modules: :mod:`~common.ledger.records` (hashes, signatures, record builders, schemas),
:mod:`~common.ledger.chain` (:class:`Ledger`, the writer), :mod:`~common.ledger.verify`
(:func:`verify_ledger`) and :mod:`~common.ledger.keys` (key folders).
"""

from __future__ import annotations

from common.ledger.chain import Ledger
from common.ledger.keys import (
    PUBLIC_DIR,
    SERVER_KEY_FILE,
    SITE_KEYS_DIR,
    make_key_folder,
    public_key_path,
    server_key_path,
    server_keys,
    site_key_path,
)
from common.ledger.records import (
    _CHAIN_DOMAIN,
    _RECORD_DOMAIN,
    GENESIS,
    LEDGER_FILE,
    LEDGER_METRIC,
    SCHEMAS,
    SERVER,
    LedgerError,
    PrivacyUnit,
    _link_hash,
    check_signed,
    config_hash,
    decode_signed,
    encode_signed,
    envelope_hash,
    hash_arrays,
    record_problem,
    run_end_record,
    run_start_record,
    server_round_record,
    sign_record,
    site_round_record,
)
from common.ledger.verify import LedgerProblem, LedgerReport, verify_ledger

__all__ = [
    "GENESIS", "LEDGER_FILE", "LEDGER_METRIC", "PUBLIC_DIR", "SCHEMAS", "SERVER",
    "SERVER_KEY_FILE", "SITE_KEYS_DIR", "Ledger", "LedgerError", "LedgerProblem",
    "LedgerReport", "PrivacyUnit", "_CHAIN_DOMAIN", "_RECORD_DOMAIN", "_link_hash",
    "check_signed", "config_hash", "decode_signed", "encode_signed", "envelope_hash",
    "hash_arrays", "make_key_folder", "public_key_path", "record_problem", "run_end_record",
    "run_start_record", "server_key_path", "server_keys", "server_round_record", "sign_record",
    "site_key_path", "site_round_record", "verify_ledger",
]
