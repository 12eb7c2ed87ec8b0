"""The privacy ledger: signed site records, the server's hash chain, and tampering caught."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from common.config import FederationConfig
from common.crypto.signing import SigningKey, canonical_json, load_public_keys
from common.data import BagSet
from common.errors import DataError
from common.fedavg import run_inprocess
from common.ledger import (
    LEDGER_FILE,
    Ledger,
    LedgerError,
    _link_hash,
    hash_arrays,
    sign_record,
    verify_ledger,
)

# batch-size above the training set: sampling rate 1, whose RDP is closed-form (fast).
TINY = dict(sites=2, rounds=2, synthetic_bags=40, seed=5, batch_size=64, epsilon=4.0,
            delta=1e-3, secagg=False)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, SigningKey]) -> Path:
    run = tmp_path_factory.mktemp("ledger") / "run"
    run_inprocess(FederationConfig(**TINY), run_dir=run, server_key=keys["server"],
                  site_keys={k: v for k, v in keys.items() if k != "server"}, evaluate=False)
    return run


def _lines(run: Path) -> list[str]:
    return (run / LEDGER_FILE).read_text().splitlines(keepends=True)


def _copy(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / LEDGER_FILE
    path.write_text("".join(lines))
    return path


def _trusted(keys: dict[str, SigningKey]) -> dict[str, str]:
    return {name: key.public_pem() for name, key in keys.items()}


def test_good_ledger_verifies(good_run: Path, keys: dict[str, SigningKey]) -> None:
    report = verify_ledger(good_run / LEDGER_FILE, _trusted(keys))
    assert report.ok, report.problems
    kinds = [e["record"]["kind"] for e in report.records()]
    # run-start, then per round: one record per site and the server's record
    assert kinds == (["run-start"] + ["site-round", "site-round", "server-round"] * 2
                     + ["run-end"])
    assert report.keys_pinned
    assert verify_ledger(good_run / LEDGER_FILE).notes  # trust-on-first-use is said aloud


def test_site_record_holds_the_schedule(good_run: Path) -> None:
    report = verify_ledger(good_run / LEDGER_FILE)
    rec = report.records("site-round")[0]["record"]
    for key in ("received_model", "update", "sample_rate", "noise_multiplier", "max_grad_norm",
                "steps", "accountant", "epsilon", "delta", "epsilon_budget", "n_samples",
                "privacy_unit", "bytes_sent", "sent", "mask_generator"):
        assert key in rec, key
    assert rec["privacy_unit"] == "slide" and rec["accountant"] == "prv"  # the default
    assert rec["sent"]["update"] == "plain"  # in-process FedAvg says so honestly
    assert set(rec["sent"]["metrics"].values()) <= {"int", "float", "bool", "str"}
    start = report.records("run-start")[0]["record"]
    # every site trained from the model the server started with
    assert {r["record"]["received_model"] for r in report.records("site-round")
            if r["record"]["round"] == 1} == {start["initial_model"]}


def test_tampered_record_is_caught_and_named(good_run: Path, tmp_path: Path) -> None:
    lines = _lines(good_run)
    link = json.loads(lines[2])
    link["entry"]["record"]["epsilon"] = 0.5  # a site looks cheaper than it was
    lines[2] = json.dumps(link) + "\n"
    report = verify_ledger(_copy(tmp_path, lines))
    assert not report.ok
    assert {(p.kind, p.line, p.seq) for p in report.problems} == {("changed", 3, 2)}
    assert "line 3 (seq 2): changed" in str(report.problems[0])


def test_resigned_but_forged_site_record_is_caught(good_run: Path, tmp_path: Path,
                                                   keys: dict[str, SigningKey]) -> None:
    """A server that holds its key can re-chain, but cannot forge a site's signature."""
    lines = _lines(good_run)
    link = json.loads(lines[1])
    link["entry"]["record"]["epsilon"] = 0.5
    link["hash"] = _link_hash(link["seq"], link["prev"], link["entry"])
    lines[1] = canonical_json(link).decode() + "\n"
    problems = verify_ledger(_copy(tmp_path, lines), _trusted(keys)).problems
    assert any(p.kind == "changed" and p.line == 2 and "signature of site-0" in p.message
               for p in problems), problems


def test_truncated_last_line_is_caught(good_run: Path, tmp_path: Path) -> None:
    lines = _lines(good_run)
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    report = verify_ledger(_copy(tmp_path, lines))
    assert [(p.kind, p.line) for p in report.problems] == [("truncated", len(lines)),
                                                           ("incomplete", len(lines) - 1)]


def test_reordered_records_are_caught(good_run: Path, tmp_path: Path) -> None:
    lines = _lines(good_run)
    lines[2], lines[3] = lines[3], lines[2]
    report = verify_ledger(_copy(tmp_path, lines))
    assert {p.kind for p in report.problems} == {"reordered"}
    assert {p.line for p in report.problems} == {3, 4}


def test_removed_record_is_caught(good_run: Path, tmp_path: Path) -> None:
    lines = _lines(good_run)
    del lines[4]  # site-0's round-2 record
    report = verify_ledger(_copy(tmp_path, lines))
    assert any(p.kind == "removed" and p.line == 5 and "seq 4 missing" in p.message
               for p in report.problems), report.problems


def test_removed_record_and_rechained_is_caught(good_run: Path, tmp_path: Path,
                                                keys: dict[str, SigningKey]) -> None:
    """A server dropping a site's round and re-signing the chain is still caught: the
    site's next record names the dropped one (``site_prev``)."""
    links = [json.loads(line) for line in _lines(good_run)]
    kept = [lk for lk in links if not (lk["entry"]["record"].get("site") == "site-0"
                                       and lk["entry"]["record"].get("round") == 1)]
    server = keys["server"]
    prev = "0" * 64
    lines = []
    for seq, link in enumerate(kept):
        with_chain = {"seq": seq, "prev": prev, "entry": link["entry"]}
        h = _link_hash(seq, prev, link["entry"])
        from common.ledger import _CHAIN_DOMAIN

        with_chain.update(hash=h, server_signature=server.sign(_CHAIN_DOMAIN + h.encode()))
        lines.append(canonical_json(with_chain).decode() + "\n")
        prev = h
    report = verify_ledger(_copy(tmp_path, lines), _trusted(keys))
    # the site's own chain names the dropped record; the run-end record counts the lines
    assert [(p.kind, "site-0" in p.message) for p in report.problems] == [
        ("removed", True), ("removed", False)]
    assert "run-end record counts" in report.problems[1].message


def test_unknown_signer_and_key_mismatch(good_run: Path, keys: dict[str, SigningKey]) -> None:
    trusted = _trusted(keys)
    del trusted["site-1"]
    report = verify_ledger(good_run / LEDGER_FILE, trusted)
    assert {p.kind for p in report.problems} == {"unknown-signer"}
    assert all("site-1" in p.message for p in report.problems)
    trusted = _trusted(keys) | {"site-1": SigningKey.generate().public_pem()}
    kinds = {p.kind for p in verify_ledger(good_run / LEDGER_FILE, trusted).problems}
    assert "key-mismatch" in kinds and "changed" in kinds


def _site_record(site: str, **changes: object) -> dict[str, object]:
    return {"kind": "site-round", "round": 1, "site": site, "received_model": "0" * 64,
            "update": "1" * 64, "dp": True, "accountant": "rdp", "sample_rate": 0.5,
            "noise_multiplier": 1.0, "max_grad_norm": 1.0, "steps": 2, "epsilon": 1.0,
            "delta": 1e-5, "epsilon_budget": 2.0, "n_samples": 10, "privacy_unit": "slide",
            "bytes_sent": 12, "sent": {"update": "secagg+-masked", "metrics": {}},
            "mask_generator": None, "site_prev": None, "run": None, "noise": None} | changes


def test_server_rejects_records_it_cannot_verify(tmp_path: Path) -> None:
    server, site, other = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    ledger = Ledger(tmp_path / LEDGER_FILE, server)
    with pytest.raises(LedgerError, match="start"):
        ledger.append(sign_record(_site_record("a"), site, "a"))
    ledger.start({"rounds": 1}, {"a": site.public_pem()}, [np.zeros(3, np.float32)])
    run = ledger.run
    with pytest.raises(LedgerError, match="unknown site 'b'"):
        ledger.append(sign_record(_site_record("b", run=run), other, "b"))
    with pytest.raises(LedgerError, match="not a's key"):
        ledger.append(sign_record(_site_record("a", run=run), other, "a"))
    with pytest.raises(LedgerError, match="malformed.*'steps'"):
        ledger.append(sign_record(_site_record("a", steps="many", run=run), site, "a"))
    signed = sign_record(_site_record("a", run=run), site, "a")
    signed["record"]["epsilon"] = 0.1
    with pytest.raises(LedgerError, match="does not verify"):
        ledger.append(signed)
    # a record of another run, or of another round, is a replay
    with pytest.raises(LedgerError, match="another run|belongs to run"):
        ledger.append(sign_record(_site_record("a", run="f" * 64), site, "a"))
    with pytest.raises(LedgerError, match="for round 1, this is round 2"):
        ledger.append(sign_record(_site_record("a", run=run), site, "a"), server_round=2)
    good = sign_record(_site_record("a", run=run), site, "a")
    assert ledger.append(good, server_round=1) is not None
    assert ledger.append(good, server_round=1) is None  # the same reply resent: kept once
    # resuming appends after the last line; a broken ledger is never appended to
    resumed = Ledger(tmp_path / LEDGER_FILE, server)
    assert resumed.seq == 2
    with pytest.raises(LedgerError, match="another server key"):
        Ledger(tmp_path / LEDGER_FILE, other)
    with (tmp_path / LEDGER_FILE).open("a") as fh:
        fh.write('{"seq": 2, "pr')
    # a line cut by a killed writer was never written: resuming drops it and goes on
    assert Ledger(tmp_path / LEDGER_FILE, server).seq == 2
    assert (tmp_path / LEDGER_FILE).read_text().endswith("\n")
    lines = (tmp_path / LEDGER_FILE).read_text().splitlines(keepends=True)
    link = json.loads(lines[1])
    link["entry"]["record"]["epsilon"] = 0.0
    lines[1] = json.dumps(link) + "\n"
    (tmp_path / LEDGER_FILE).write_text("".join(lines))
    with pytest.raises(LedgerError, match="problems"):  # an edited one is never resumed
        Ledger(tmp_path / LEDGER_FILE, server)


def test_signing_key_files(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = key.save(tmp_path / "keys" / "site-0.key.pem")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert SigningKey.load(path).public_pem() == key.public_pem()
    assert "PRIVATE" not in repr(key) and key.fingerprint()[:16] in repr(key)
    key.save_public(tmp_path / "pub" / "site-0.pub.pem")
    assert load_public_keys(tmp_path / "pub") == {"site-0": key.public_pem()}
    with pytest.raises(DataError, match="private key"):
        load_public_keys(tmp_path / "keys")
    with pytest.raises(DataError, match="not found"):
        SigningKey.load(tmp_path / "missing.pem")


def test_canonical_json_and_array_hash() -> None:
    assert canonical_json({"b": 0.1, "a": [1, True, None]}) == b'{"a":[1,true,null],"b":0.1}'
    with pytest.raises(ValueError, match="NaN"):
        canonical_json({"loss": float("nan")})
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert hash_arrays([a]) == hash_arrays([np.asfortranarray(a)])
    assert hash_arrays([a]) == hash_arrays([a.astype(">f4")])
    assert hash_arrays([a]) != hash_arrays([a.reshape(4, 3)])
    assert hash_arrays([a]) != hash_arrays([a.astype(np.float64)])


def test_patient_level_privacy_unit() -> None:
    bags = tuple(np.full((n, 2), i, np.float32) for i, n in enumerate([2, 3, 4]))
    slides = BagSet(bags, np.array([0, 1, 0]), ("s0", "s1", "s2"))
    assert slides.privacy_unit == "slide" and slides.by_patient() is slides
    with_patients = BagSet(bags, np.array([0, 1, 0]), ("s0", "s1", "s2"), ("p1", "p2", "p1"))
    patients = with_patients.by_patient()
    assert patients.privacy_unit == "patient"
    assert patients.names == ("p1", "p2") and patients.labels.tolist() == [0, 1]
    assert [b.shape[0] for b in patients.bags] == [6, 3]
    features, mask, labels = patients.to_dataset().tensors
    assert features.shape == (2, 6, 2) and mask.sum().item() == 9


def test_resume_sets_aside_a_checkpoint_the_ledger_never_recorded(good_run: Path,
                                                                  tmp_path: Path) -> None:
    """Killed between writing round 3's checkpoint and its ledger record: resuming goes on
    from round 2, the last round the ledger vouches for."""
    import shutil

    from common.config import FederationConfig
    from common.runs import RunFolder
    from server.federation import _recorded_checkpoint

    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    folder = RunFolder(run)
    folder.save_checkpoint(3, ["w"], [np.zeros(2, np.float32)])
    cfg = FederationConfig(keys="ledger-keys", resume=True)
    rnd, path = _recorded_checkpoint(folder, cfg)
    assert rnd == 2 and path.name == "round-002.npz"
    assert (run / "checkpoints" / "round-003.npz.unrecorded").is_file()
    assert _recorded_checkpoint(folder, cfg)[0] == 2  # nothing else is touched
