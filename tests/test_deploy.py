"""A real consortium on 127.0.0.1: SuperLink + SuperNodes with TLS and node authentication.

One scenario, run once (a few minutes on 2 cores), then checked from several angles:
3 hospitals x 3 rounds with SecAgg+ and DP; an intruder whose key is not on the
allow-list; one hospital killed during round 2 (after SecAgg+ key sharing); the server
killed between rounds 2 and 3, restarted, and the run resumed from its checkpoint. Before
it, a rogue app is submitted by someone holding ``ca.crt`` and a site's folder (refused by
the server) and by someone holding the coordinator's token (refused by every site: it is
not the consortium's signed app). After it, ``pathfed run`` without a config against a
site holding an image folder trains nothing and exits non-zero, naming both sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.deploy import start_site
from common.checks import update_bound
from common.config import FederationConfig
from common.crypto.consortium import enroll_site, init_consortium
from common.crypto.sealed import load_key
from common.data import save_site_file
from common.data.synthetic import synthetic_site
from common.deployment import free_port, stop_process
from common.errors import DataError
from common.privacy import independent_epsilon
from common.runs import load_checkpoint, read_metrics
from common.site import Site
from server.deploy import run_command, start_server

pytestmark = pytest.mark.slow

SITES = ("alpha", "beta", "gamma")

ROGUE_PYPROJECT = """
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "rogue"
version = "1.0.0"

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "rogue_app:server"
clientapp = "rogue_app:client"

[tool.flwr.app.config]
marker = ""
"""

ROGUE_APP = """
import os
from pathlib import Path

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

client = ClientApp()
server = ServerApp()


@client.train()
def steal(msg, context):
    data = str(context.node_config.get("data-path", ""))
    marker = Path(str(context.run_config["marker"]))
    marker.with_name(marker.name + ".site").write_text(data + "\\n" + str(os.listdir(
        Path(data).parent)))
    return Message(RecordDict({"c": ConfigRecord({"ok": 1})}), reply_to=msg)


@server.main()
def main(grid, context):
    Path(str(context.run_config["marker"])).write_text("the rogue server app ran")
    nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=n,
                    message_type="train") for n in nodes]
    list(grid.send_and_receive(msgs, timeout=10))
"""


def _rogue_app(root: Path) -> Path:
    app = root / "rogue"
    app.mkdir()
    (app / "pyproject.toml").write_text(ROGUE_PYPROJECT)
    (app / "rogue_app.py").write_text(ROGUE_APP)
    return app


def _flwr_home(folder: Path, address: str, ca: Path) -> dict[str, str]:
    """A FLWR_HOME that knows the server's address and CA, and nothing else."""
    from common.deployment import flower_env

    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(f'[superlink]\ndefault = "c"\n[superlink.c]\n'
                                        f'address = "{address}"\nroot-certificates = "{ca}"\n')
    return {**flower_env(), "FLWR_HOME": str(folder)}


def _submit_rogue(app: Path, env: dict[str, str], marker: Path, connection: str) -> str:
    from common.deployment import console_script

    result = subprocess.run([console_script("flwr"), "run", str(app), connection,
                             "--run-config", f'marker="{marker}"', "--stream"],
                            env=env, capture_output=True, text=True, timeout=240)
    return f"rc={result.returncode}\n{result.stdout}{result.stderr}"


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
    enroll_site(consortium.root, "delta")  # holds images: started after the main run
    images = _image_folder(root / "delta-images")
    procs: dict[str, subprocess.Popen[Any]] = {}
    timings: dict[str, float] = {}
    # the kill triggers below wait for Flower's SecAgg+ stage lines, logged at DEBUG
    os.environ["PATHFED_LOG_LEVEL"] = "DEBUG"
    rogue: dict[str, str] = {}
    cfg = FederationConfig(sites=3, rounds=3, out=str(root / "run"), run_id="scenario",
                           timeout=30, seed=11, keys=str(consortium.ledger_keys))
    logs = root / "logs"
    logs.mkdir()
    try:
        start = time.perf_counter()
        procs["server"] = start_server(consortium.root, log_file=logs / "server.log")
        for name in SITES:  # alpha and beta seed their noise, so a test can replay them
            procs[name] = start_site(consortium.root, name, data[name],
                                     log_file=logs / f"{name}.log",
                                     seeded_noise=name != "gamma")
        procs["intruder"] = start_site(intruder, "intruder", data["alpha"],
                                       log_file=logs / "intruder.log")
        # A rogue app, from a machine holding ca.crt and a copy of alpha's site folder.
        app = _rogue_app(root)
        stolen = root / "stolen-alpha"
        shutil.copytree(consortium.site_dir("alpha"), stolen)
        outsider = _flwr_home(root / "outsider-home", consortium.address, stolen / "ca.crt")
        rogue["outsider"] = _submit_rogue(app, outsider, root / "outsider.marker", "c")
        # The same app from someone who stole the coordinator's token: every site refuses.
        from common.deployment import flower_env

        insider = flower_env(consortium)
        rogue["insider"] = _submit_rogue(app, insider, root / "insider.marker", "pathfed")

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
        # `pathfed run` with no config, against a site holding images (21 features).
        for name in ("alpha", "beta"):
            stop_process(procs.pop(name))
        procs["delta"] = start_site(consortium.root, "delta", images,
                                    log_file=logs / "delta.log")
        mismatch = subprocess.run(
            [str(Path(sys.executable).parent / "pathfed"), "run", "--consortium",
             str(consortium.root), "--out", str(root / "mismatch"), "--set", "timeout=20"],
            capture_output=True, text=True, timeout=600)
    finally:
        os.environ.pop("PATHFED_LOG_LEVEL", None)
        for proc in procs.values():
            stop_process(proc)
    (root / "timings.json").write_text(json.dumps(timings))
    return {"root": root, "consortium": consortium, "cfg": cfg, "data": data, "rc": (rc1, rc2),
            "timings": timings, "logs": logs, "rogue": rogue, "mismatch": mismatch}


def _image_folder(folder: Path) -> Path:
    """A small labelled image folder (random tissue-like RGB), both classes."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["image,label"]
    for i in range(8):
        pixels = rng.integers(60, 190, size=(96, 96, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        lines.append(f"img{i}.png,{i % 2}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def _plain(path: Path) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace"))


def test_rogue_app_of_an_outsider_is_refused_at_the_server(scenario: dict[str, Any]) -> None:
    """ca.crt and a site's folder are not enough to start anything."""
    text = scenario["rogue"]["outsider"]
    assert not text.startswith("rc=0"), text[-2000:]
    assert "Authentication failed" in text
    root = scenario["root"]
    assert not (root / "outsider.marker").exists()
    assert not (root / "outsider.marker.site").exists()
    server = _plain(scenario["logs"] / "server.log")
    assert "PathFed: Control API call refused" in server
    assert '"POST /v1/control/start-run HTTP/1.1" 401' in server


def test_unsigned_app_is_refused_by_every_site(scenario: dict[str, Any]) -> None:
    """Even with the coordinator's token, no site runs an app the consortium did not sign."""
    root = scenario["root"]
    assert (root / "insider.marker").exists()  # the token holder's server app did start
    assert not (root / "insider.marker.site").exists(), "a site ran the rogue app"
    for name in SITES:
        log = _plain(scenario["logs"] / f"{name}.log")
        assert "FAB could not be verified" in log or "FAB verification failed" in log, name


def test_run_that_trains_nothing_fails(scenario: dict[str, Any]) -> None:
    result = scenario["mismatch"]
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    text = result.stdout + result.stderr
    assert "no round produced a global model" in text
    assert "input features" in text and "32" in text and "21" in text
    summary = json.loads((scenario["root"] / "mismatch" / "summary.json").read_text())
    assert summary["rounds_with_model"] == 0 and summary["error"]


def _records(s: dict[str, Any]) -> list[dict[str, Any]]:
    return read_metrics(s["cfg"].out)


def test_federation_completes_all_rounds_after_restart(scenario: dict[str, Any]) -> None:
    assert scenario["rc"][1] == 0, (scenario["logs"] / "run.log").read_text()[-3000:]
    summary = json.loads((Path(scenario["cfg"].out) / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["dp"] and summary["secagg"]
    assert summary["checkpoints_encrypted"]
    rounds = [r["round"] for r in _records(scenario) if r["site"] == "global"]
    assert rounds == [1, 2, 3]  # resumed at 3: nothing lost, nothing repeated


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
    step = 2 * update_bound(cfg) / cfg.secagg_quantization_range
    tolerance = 2 * step / (sum(weights) / cfg.secagg_max_weight) + 1e-5
    worst = max(float(np.abs(after[k] - expected[k]).max()) for k in names)
    assert worst <= tolerance, (worst, tolerance)


def test_epsilon_is_neither_lost_nor_double_counted(scenario: dict[str, Any]) -> None:
    cfg = scenario["cfg"]
    summary = json.loads((Path(cfg.out) / "summary.json").read_text())
    for name, rounds in (("alpha", 3), ("beta", 3), ("gamma", 1)):
        state_file = scenario["consortium"].site_dir(name) / "state" / "site-state.json"
        state = json.loads(state_file.read_text())
        assert state["site"] == name
        history = json.loads(state["runs"]["scenario"]["accountant"])["history"]
        trained = [r for r in _records(scenario) if r["site"] == name and r.get("trained")]
        assert len(trained) == rounds
        assert sum(h[2] for h in history) == sum(r["steps"] for r in trained)
        mechanism = json.loads(state["runs"]["scenario"]["accountant"])["mechanism"]
        assert mechanism == cfg.accountant == "prv"  # the default
        eps = independent_epsilon([tuple(h) for h in history], cfg.delta, mechanism)
        assert trained[-1]["epsilon"] == pytest.approx(eps, rel=1e-9)
        if name != "gamma":
            assert summary["epsilon"][name] == pytest.approx(eps, rel=1e-9)


def test_sites_decide_their_own_noise(scenario: dict[str, Any]) -> None:
    """The server asked for seeded noise (deterministic = true); only the sites whose own
    node config says so seeded it, and the ledger says which."""
    from common.ledger import verify_ledger

    assert scenario["cfg"].deterministic
    noise = {e["record"]["site"]: e["record"]["noise"]
             for e in verify_ledger(Path(scenario["cfg"].out) / "ledger.jsonl")
             .records("site-round")}
    assert noise["gamma"].startswith("csprng")
    assert noise["alpha"].startswith("seeded") and noise["beta"].startswith("seeded")


def test_checkpoints_decrypt_only_with_the_right_key(scenario: dict[str, Any]) -> None:
    ckpt = Path(scenario["cfg"].out) / "checkpoints" / "round-003.npz.enc"
    assert not list(ckpt.parent.glob("*.npz"))  # nothing in the clear
    good = load_checkpoint(ckpt, load_key(scenario["consortium"].checkpoint_key))
    assert all(np.isfinite(a).all() for a in good.values())
    with pytest.raises(DataError, match="wrong checkpoint key"):
        load_checkpoint(ckpt, os.urandom(32))
    tampered = ckpt.with_name("tampered-round-003.npz.enc")
    blob = bytearray(ckpt.read_bytes())
    blob[-5] ^= 1
    tampered.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="altered"):
        load_checkpoint(tampered, load_key(scenario["consortium"].checkpoint_key))


def test_private_keys_are_owner_only(scenario: dict[str, Any]) -> None:
    root = scenario["consortium"].root
    for key in [root / "ca.key", root / "server.key", root / "checkpoint.key",
                root / "coordinator.token", root / "superexec.secret",
                root / "app-signing.key", root / "flwr-home" / "credentials.yaml",
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
    assert set(claimed) == {*SITES, "delta"}  # delta is enrolled, never started in this run
    assert claimed.pop("delta").rounds_trained == []
    assert claimed["gamma"].rounds_trained == [1]
    assert claimed["alpha"].rounds_trained == [1, 2, 3]
    for site in claimed.values():
        # the claim is PRV's (the default accountant); RDP bounds the same schedule above
        assert site.accountant == "prv" and site.claimed <= site.budget
        assert site.prv == pytest.approx(site.claimed, abs=0.02)
        assert site.rdp >= site.claimed - 0.02
