"""A real consortium on 127.0.0.1: SuperLink + SuperNodes with TLS and node authentication.

One scenario, run once (a few minutes on 2 cores), then checked from several angles:
3 hospitals x 4 rounds with SecAgg+ and DP; an intruder whose key is not on the
allow-list; one hospital killed during round 2 (after SecAgg+ key sharing); the server
killed between rounds 2 and 3, restarted, and the run resumed from its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.deploy import start_site
from common.config import FederationConfig
from common.crypto.consortium import enroll_site, init_consortium
from common.crypto.sealed import load_key
from common.data import save_site_file
from common.data.synthetic import synthetic_site
from common.deployment import free_port, stop_process
from common.errors import DataError
from common.privacy import independent_epsilon
from common.runs import load_checkpoint, read_metrics
from common.site import Site, secagg_clipping_range
from server.deploy import run_command, start_server

pytestmark = pytest.mark.slow

SITES = ("alpha", "beta", "gamma")


def _run_until(cmd: list[str], env: dict[str, str], log: Path,
               triggers: list[tuple[tuple[str, ...], Any]], timeout: float,
               stop_after_last: bool = False) -> int:
    """Run ``flwr run``; when the log shows each trigger's strings in order, call it.

    With ``stop_after_last``, ``flwr run`` itself is stopped once the last trigger fired
    (its log stream would otherwise wait for a server that was killed).
    """
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    pending = list(triggers)
    step = 0
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        with log.open("a") as out:
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if pending and pending[0][0][step] in line:
                    step += 1
                    if step == len(pending[0][0]):
                        pending.pop(0)[1]()
                        step = 0
                        if stop_after_last and not pending:
                            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()
    finally:
        timer.cancel()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("consortium")
    consortium = init_consortium(root / "consortium", ["127.0.0.1", "localhost"],
                                 port=free_port())
    data = {}
    for index, name in enumerate(SITES):
        enroll_site(consortium.root, name)
        data[name] = save_site_file(synthetic_site(index, n_bags=80), root / f"{name}.npz")
    # An intruder: right CA and address, but its key was enrolled in another consortium.
    other = init_consortium(root / "other", ["127.0.0.1"], port=free_port())
    intruder = enroll_site(other.root, "intruder")
    shutil.copy(consortium.ca_cert, intruder / "ca.crt")
    (intruder / "site.json").write_text(json.dumps({"name": "intruder",
                                                    "superlink": consortium.address}))
    procs: dict[str, subprocess.Popen[Any]] = {}
    timings: dict[str, float] = {}
    cfg = FederationConfig(sites=3, rounds=4, out=str(root / "run"), run_id="scenario",
                           timeout=45, seed=11, keys=str(consortium.ledger_keys))
    logs = root / "logs"
    logs.mkdir()
    try:
        start = time.perf_counter()
        procs["server"] = start_server(consortium.root, log_file=logs / "server.log")
        for name in SITES:
            procs[name] = start_site(consortium.root, name, data[name],
                                     log_file=logs / f"{name}.log")
        procs["intruder"] = start_site(intruder, "intruder", data["alpha"],
                                       log_file=logs / "intruder.log")

        def kill_gamma() -> None:
            timings["gamma_killed"] = time.perf_counter() - start
            stop_process(procs["gamma"], sig=signal.SIGKILL)

        def kill_server() -> None:
            timings["server_killed"] = time.perf_counter() - start
            stop_process(procs["server"], sig=signal.SIGKILL)

        cmd, env, overrides = run_command(consortium.root, cfg)
        rc1 = _run_until(cmd, env, logs / "run.log", [
            (("[ROUND 1]", "aggregate_fit: received"), lambda: timings.setdefault(
                "first_round", time.perf_counter() - start)),
            (("[ROUND 2]", "[Stage 2] Forwarding"), kill_gamma),
            (("[ROUND 3]",), kill_server),
        ], timeout=900, stop_after_last=True)
        overrides.unlink()
        time.sleep(2)
        procs["server"] = start_server(consortium.root, log_file=logs / "server.log")
        resumed = cfg.model_copy(update={"resume": True, "sites": 2})
        cmd, env, overrides = run_command(consortium.root, resumed)
        rc2 = _run_until(cmd, env, logs / "run.log", [], timeout=900)
        overrides.unlink()
        timings["total"] = time.perf_counter() - start
    finally:
        for proc in procs.values():
            stop_process(proc)
    (root / "timings.json").write_text(json.dumps(timings))
    return {"root": root, "consortium": consortium, "cfg": cfg, "data": data, "rc": (rc1, rc2),
            "timings": timings, "logs": logs}


def _records(s: dict[str, Any]) -> list[dict[str, Any]]:
    return read_metrics(s["cfg"].out)


def test_federation_completes_all_rounds_after_restart(scenario: dict[str, Any]) -> None:
    assert scenario["rc"][1] == 0, (scenario["logs"] / "run.log").read_text()[-3000:]
    summary = json.loads((Path(scenario["cfg"].out) / "summary.json").read_text())
    assert summary["rounds"] == 4 and summary["dp"] and summary["secagg"]
    assert summary["checkpoints_encrypted"]
    rounds = [r["round"] for r in _records(scenario) if r["site"] == "global"]
    assert rounds == [1, 2, 3, 4]  # resumed at 3: nothing lost, nothing repeated


def test_intruder_without_allow_listed_key_is_refused(scenario: dict[str, Any]) -> None:
    sites = {r["site"] for r in _records(scenario)}
    assert "intruder" not in sites
    log = (scenario["logs"] / "intruder.log").read_text().lower()
    assert any(word in log for word in ("unauthenticated", "permission", "not registered",
                                        "refused", "denied", "failed"))


def test_killed_site_does_not_stop_the_round(scenario: dict[str, Any]) -> None:
    round2 = {r["site"]: r for r in _records(scenario) if r["round"] == 2}
    assert round2["global"]["sites_trained"] == 2
    assert round2["alpha"]["trained"] and round2["beta"]["trained"]
    assert "gamma" not in round2 or not round2["gamma"]["trained"]


def test_round_two_aggregate_is_the_survivors_weighted_average(scenario: dict[str, Any]) -> None:
    cfg, key = scenario["cfg"], load_key(scenario["consortium"].checkpoint_key)
    ckpt = Path(cfg.out) / "checkpoints"
    before = load_checkpoint(ckpt / "round-001.npz.enc", key)
    after = load_checkpoint(ckpt / "round-002.npz.enc", key)
    names = list(before)
    updates, weights = [], []
    for name in ("alpha", "beta"):  # replay each survivor's round 2 (seeded, deterministic)
        first = next(r for r in _records(scenario) if r["site"] == name and r["round"] == 1)
        state = {"accountant": json.dumps({"mechanism": "rdp", "history": [
            [first["noise_multiplier"], first["sample_rate"], first["steps"]]]})}
        site = Site(cfg, 0, name=name, data=str(scenario["data"][name]), state=state)
        report = site.train([before[k] for k in names], 2)
        updates.append(report.update)
        weights.append(report.n_samples)
    expected = {k: before[k] + sum(w * u[i] for w, u in zip(weights, updates)) / sum(weights)
                for i, k in enumerate(names)}
    step = 2 * secagg_clipping_range(cfg) / cfg.secagg_quantization_range
    tolerance = 2 * step / (sum(weights) / cfg.secagg_max_weight) + 1e-5
    worst = max(float(np.abs(after[k] - expected[k]).max()) for k in names)
    assert worst <= tolerance, (worst, tolerance)


def test_epsilon_is_neither_lost_nor_double_counted(scenario: dict[str, Any]) -> None:
    cfg = scenario["cfg"]
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    for name, rounds in (("alpha", 4), ("beta", 4), ("gamma", 1)):
        state_file = (scenario["consortium"].site_dir(name) / "state"
                      / "site-state-scenario.json")
        history = json.loads(json.loads(state_file.read_text())["accountant"])["history"]
        trained = [r for r in _records(scenario) if r["site"] == name and r.get("trained")]
        assert len(trained) == rounds
        assert sum(h[2] for h in history) == sum(r["steps"] for r in trained)
        eps = independent_epsilon([tuple(h) for h in history], cfg.delta)
        assert trained[-1]["epsilon"] == pytest.approx(eps, rel=1e-9)
        if name != "gamma":
            assert summary["epsilon"][name] == pytest.approx(eps, rel=1e-9)


def test_checkpoints_decrypt_only_with_the_right_key(scenario: dict[str, Any]) -> None:
    ckpt = Path(scenario["cfg"].out) / "checkpoints" / "round-004.npz.enc"
    assert not list(ckpt.parent.glob("*.npz"))  # nothing in the clear
    good = load_checkpoint(ckpt, load_key(scenario["consortium"].checkpoint_key))
    assert all(np.isfinite(a).all() for a in good.values())
    with pytest.raises(DataError, match="wrong checkpoint key"):
        load_checkpoint(ckpt, os.urandom(32))
    tampered = ckpt.with_name("tampered-round-004.npz.enc")
    blob = bytearray(ckpt.read_bytes())
    blob[-5] ^= 1
    tampered.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="altered"):
        load_checkpoint(tampered, load_key(scenario["consortium"].checkpoint_key))


def test_private_keys_are_owner_only(scenario: dict[str, Any]) -> None:
    root = scenario["consortium"].root
    for key in [root / "ca.key", root / "server.key", root / "checkpoint.key",
                *root.glob("sites/*/supernode.key")]:
        assert key.stat().st_mode & 0o777 == 0o600, key


def test_privacy_ledger_of_the_deployed_run_verifies(scenario: dict[str, Any]) -> None:
    """Sites signed their records with their enrolled keys, across the server restart."""
    from common.audit import audit_run
    from common.crypto.signing import load_public_keys

    keys = load_public_keys(scenario["consortium"].ledger_keys / "public")
    report = audit_run(scenario["cfg"].out, trusted_keys=keys)
    assert report.ok, report.all_problems
    claimed = {s.site: s for s in report.sites}
    assert set(claimed) == set(SITES)
    assert claimed["gamma"].rounds_trained == [1]
    assert claimed["alpha"].rounds_trained == [1, 2, 3, 4]
    for site in claimed.values():
        assert site.rdp == pytest.approx(site.claimed, rel=1e-6) and site.claimed <= site.budget
