"""Real federations in Flower's simulation engine, with real Opacus and real SecAgg+."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.checks import update_bound
from common.config import FederationConfig
from common.privacy import independent_epsilon
from common.runs import load_checkpoint, read_metrics
from simulations.simulate import simulate

pytestmark = pytest.mark.slow

# site-2's budget is too small for even one round: it refuses after SecAgg+ key sharing,
# so its masks must be recovered from the other sites' shares.
BASE = dict(sites=3, rounds=2, synthetic_bags=300, seed=7, site_epsilon="site-2=0.05",
            max_noise_multiplier=5.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = {}
    for name, secagg in (("secagg", True), ("plain", False)):
        cfg = FederationConfig(**BASE, secagg=secagg,
                               out=str(tmp_path_factory.mktemp(name) / "run"))
        out[name] = (cfg, simulate(cfg))
    return out


def _records(cfg: FederationConfig) -> list[dict[str, Any]]:
    return read_metrics(cfg.out)


def _max_diff_and_tolerance(cfg: FederationConfig, plain_cfg: FederationConfig,
                            rnd: int = 1) -> tuple[float, float]:
    """Largest gap between the SecAgg+ and the plain global model, and the bound on it.

    SecAgg+ quantises weight * update to a grid of step 2c/Q and divides the unmasked sum
    by the summed weights: the average is off by at most sites * step / sum(weights).
    """
    name = f"round-{rnd:03d}.npz"
    masked = load_checkpoint(Path(cfg.out) / "checkpoints" / name)
    plain = load_checkpoint(Path(plain_cfg.out) / "checkpoints" / name)
    step = 2 * update_bound(cfg) / cfg.secagg_quantization_range
    trained = [r for r in _records(cfg) if r["round"] == rnd and r.get("trained")]
    total_weight = sum(r["n_train"] for r in trained) / cfg.secagg_max_weight
    worst = max(float(np.abs(masked[k] - plain[k]).max()) for k in masked)
    return worst, len(trained) * step / total_weight


def test_run_folder_is_complete(runs: dict[str, Any]) -> None:
    cfg, summary = runs["secagg"]
    run = Path(cfg.out)
    assert summary["rounds"] == 2 and summary["dp"] and summary["secagg"]
    assert {"rounds", "auc", "accuracy", "epsilon", "delta", "dp", "secagg"} <= set(summary)
    assert json.loads((run / "summary.json").read_text()) == summary
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round-001.npz",
                                                                      "round-002.npz"]
    records = _records(cfg)
    assert len(records) == 2 * (3 + 1)  # per round: each site, plus the global record
    # the SecAgg+ clipping range was chosen so that nothing is silently clipped
    assert all(r["secagg_clipped"] == 0 for r in records if r.get("trained"))


def test_simulated_run_keeps_a_ledger_that_audits(runs: dict[str, Any]) -> None:
    from common.audit import audit_run
    from common.crypto.signing import load_public_keys

    cfg, summary = runs["secagg"]
    assert cfg.keys == "" and (Path(cfg.out) / "ledger.jsonl").is_file()
    keys = load_public_keys(Path(f"{cfg.out}.keys") / "public")
    report = audit_run(cfg.out, trusted_keys=keys)
    assert report.ok, report.all_problems
    audited = {s.site: s for s in report.sites}
    for site in ("site-0", "site-1"):
        assert audited[site].rounds_trained == [1, 2]
        assert audited[site].claimed == pytest.approx(summary["epsilon"][site], rel=1e-9)
    # each round records the SecAgg+ shares the server chose: all 3 sites, a majority of 2;
    # in round 2 the exhausted site-2 is no longer sampled, and 2 sites need both shares
    shares = [r["secagg_shares"] for r in report.rounds]
    assert shares == [{"sites": 3, "shares": 3, "threshold": 2, "tolerated_dropouts": 1,
                       "asked_dropouts": 0},
                      {"sites": 2, "shares": 2, "threshold": 2, "tolerated_dropouts": 0,
                       "asked_dropouts": 0}]
    assert any("3 sites, each site's keys shared among 3" in n for n in report.notes)


def test_secagg_aggregate_equals_plain_weighted_average(runs: dict[str, Any]) -> None:
    """3 sites, one of which drops after key sharing: its masks are recovered."""
    (cfg, _), (plain_cfg, _) = runs["secagg"], runs["plain"]
    worst, tolerance = _max_diff_and_tolerance(cfg, plain_cfg)
    assert worst <= tolerance, (worst, tolerance)
    first = load_checkpoint(Path(cfg.out) / "checkpoints" / "round-001.npz")
    second = load_checkpoint(Path(cfg.out) / "checkpoints" / "round-002.npz")
    moved = max(float(np.abs(first[k] - second[k]).max()) for k in first)
    assert moved > 100 * tolerance  # the comparison is not vacuous


def test_two_site_secagg_equals_plain_average(tmp_path: Path) -> None:
    """Two hospitals, the smallest consortium: hardened masks still cancel exactly. The
    plain average comes from the in-process engine (the same sites, seeds and rounds).
    With SCAFFOLD: round 1 (c = 0) is FedAvg's; in round 2 the server's control variate
    reaches the sites through SecAgg+'s training message and corrects their steps as the
    in-process engine's do, and each site keeps its own variate in its state."""
    from common.fedavg import run_inprocess
    from common.privacy.store import SiteStore

    cfgs = [FederationConfig(sites=2, rounds=2, synthetic_bags=120, seed=3, secagg=secagg,
                             scaffold=True, out=str(tmp_path / f"run-{secagg}"))
            for secagg in (True, False)]
    assert simulate(cfgs[0])["rounds"] == 2
    run_inprocess(cfgs[1], run_dir=cfgs[1].out)
    worst, tolerance = _max_diff_and_tolerance(*cfgs)
    assert worst <= tolerance, (worst, tolerance)
    # round 2 starts from models that differ by SecAgg+'s rounding only: the corrected
    # steps land close, and far from where uncorrected steps would
    worst, tolerance = _max_diff_and_tolerance(*cfgs, rnd=2)
    assert worst <= 5 * tolerance, (worst, tolerance)  # 2.3x measured
    plain = FederationConfig(sites=2, rounds=2, synthetic_bags=120, seed=3, secagg=False,
                             out=str(tmp_path / "no-scaffold"))
    run_inprocess(plain, run_dir=plain.out)
    effect, _ = _max_diff_and_tolerance(cfgs[1], plain, rnd=2)
    assert effect > 4 * worst, (effect, worst)  # 7.8x measured
    for site in ("site-0", "site-1"):  # each keeps its own variate in its site state
        runs = SiteStore(site, Path(cfgs[0].out).parent / "run-True.sites" / site).data["runs"]
        assert len(runs) == 1 and next(iter(runs.values())).get("scaffold")


def test_epsilon_grows_and_matches_an_independent_accountant(runs: dict[str, Any]) -> None:
    cfg, summary = runs["secagg"]
    records = [r for r in _records(cfg) if r["site"] != "global"]
    for site in ("site-0", "site-1"):
        mine = sorted((r for r in records if r["site"] == site), key=lambda r: r["round"])
        assert [r["trained"] for r in mine] == [True, True]
        assert 0 < mine[0]["epsilon"] < mine[1]["epsilon"] <= cfg.epsilon
        steps = sum(r["steps"] for r in mine)
        history = [(mine[0]["noise_multiplier"], mine[0]["sample_rate"], steps)]
        assert mine[1]["epsilon"] == pytest.approx(  # by the site's accountant, PRV
            independent_epsilon(history, cfg.delta, cfg.accountant), rel=1e-9)
        assert summary["epsilon"][site] == pytest.approx(mine[1]["epsilon"])


def test_site_without_budget_refuses_and_the_others_go_on(runs: dict[str, Any]) -> None:
    for cfg, summary in runs.values():
        records = [r for r in _records(cfg) if r["site"] == "site-2"]
        assert [r["trained"] for r in records] == [False, False]
        assert all(r["epsilon"] == 0.0 for r in records)
        assert summary["epsilon"]["site-2"] == 0.0
        assert "site-2" in summary["exhausted_sites"]
        glob = [r for r in _records(cfg) if r["site"] == "global"]
        assert [g["sites_trained"] for g in glob] == [2, 2]


def test_patch_cnn_trains_in_federation_and_serves_as_encoder(tmp_path: Path, ucsb: Path) -> None:
    """The seed's CNN: federated DP-SGD on real UCSB patches (one slide = one DP sample),
    then its global model embeds patches as the `patch-cnn` encoder."""
    import torch

    from common.features import build_encoder

    cfg = FederationConfig(sites=2, rounds=1, model="residual-patch-cnn", data=str(ucsb),
                           patches_per_slide=4, batch_size=4, lr=0.05, secagg=True,
                           out=str(tmp_path / "cnn"))
    summary = simulate(cfg)
    assert summary["rounds"] == 1 and all(e > 0 for e in summary["epsilon"].values())
    records = [r for r in _records(cfg) if r["site"] != "global"]
    assert all(r["trained"] and r["steps"] > 0 for r in records)
    arrays = load_checkpoint(Path(cfg.out) / summary["checkpoint"])
    weights = tmp_path / "patch-cnn.pt"
    torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, weights)
    encoder = build_encoder("patch-cnn", weights)
    feats = encoder(np.zeros((3, 32, 32, 3), np.uint8))
    assert feats.shape == (3, 128) and encoder.weights_hash != "none"


def _leftovers(marker: str) -> list[int]:
    """Processes (Ray's too) that inherited the marker of a killed run."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "environ").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                pass
    return found


def test_killed_and_resumed_simulation_spends_what_an_uninterrupted_one_does(
        tmp_path: Path) -> None:
    """SIGKILL after round 1, resume: every site's epsilon equals the uninterrupted run's
    (the accountants live on the sites' disks, and a repeated round is replayed)."""
    import os
    import signal
    import time

    args = [sys.executable, "-m", "cli", "simulate", "--rounds", "3", "--sites",
            "2", "--seed", "3", "--set", "synthetic-bags=60"]
    whole = subprocess.run([*args, "--out", str(tmp_path / "whole")], capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    marker = f"PATHFED_KILL_TEST={os.urandom(6).hex()}"
    env = {**os.environ, marker.split("=")[0]: marker.split("=")[1]}
    run = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(run)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "round-001.npz").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "run ended early"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in _leftovers(marker):
            os.kill(pid, signal.SIGKILL)
    assert not (run / "summary.json").exists()
    resumed = subprocess.run([*args, "--out", str(run), "--set", "resume=true"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = json.loads((tmp_path / "whole" / "summary.json").read_text())["epsilon"]
    got = json.loads((run / "summary.json").read_text())
    assert got["rounds_with_model"] == 3
    assert got["epsilon"] == pytest.approx(expected, rel=1e-12), (got["epsilon"], expected)
    rounds = [r["round"] for r in read_metrics(run) if r["site"] == "global"]
    assert rounds[-2:] == [2, 3] and len(set(rounds)) == len(rounds)
    from common.audit import audit_run

    report = audit_run(run, None)
    assert report.ok, report.all_problems


def test_same_seed_same_checkpoints_with_secagg(runs: dict[str, Any],
                                                tmp_path: Path) -> None:
    """A second seeded SecAgg+ run gives bit-identical checkpoints: Flower's stochastic
    rounding is seeded through the client seam in simulation (never in deployment)."""
    cfg, _ = runs["secagg"]
    again = cfg.model_copy(update={"out": str(tmp_path / "again"), "keys": "", "run_id": ""})
    simulate(again)
    for rnd in (1, 2):
        name = f"round-{rnd:03d}.npz"
        first = load_checkpoint(Path(cfg.out) / "checkpoints" / name)
        second = load_checkpoint(Path(again.out) / "checkpoints" / name)
        assert all(np.array_equal(first[k], second[k]) for k in first), name
