"""Verification of a ledger file: every line, the chain, the sites' own chains, the end."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from common.crypto.signing import (
    fingerprint,
    verify_signature,
)
from common.errors import ConfigError
from common.ledger.records import (
    _CHAIN_DOMAIN,
    GENESIS,
    SERVER,
    _link_hash,
    check_signed,
    envelope_hash,
    record_problem,
)

log = logging.getLogger(__name__)

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


