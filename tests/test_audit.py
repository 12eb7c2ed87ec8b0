"""The auditor's view: epsilon recomputed independently, budgets, reports, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli.audit import render_html
from common.audit import audit_run
from common.config import FederationConfig
from common.crypto.signing import SigningKey
from common.fedavg import run_inprocess
from common.ledger import LEDGER_FILE, Ledger, envelope_hash, sign_record
from tests.conftest import CliResult, run_cli

TINY = dict(sites=2, rounds=2, synthetic_bags=40, seed=11, batch_size=16, epsilon=3.0,
            delta=1e-3, secagg=False)


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, SigningKey]) -> Path:
    base = tmp_path_factory.mktemp("audit")
    run = base / "run"
    run_inprocess(FederationConfig(**TINY), run_dir=run, server_key=keys["server"],
                  site_keys={k: v for k, v in keys.items() if k != "server"})
    for name, key in keys.items():
        key.save_public(base / "keys" / f"{name}.pub.pem")
    return run


def _rewrite(src: Path, dst: Path, keys: dict[str, SigningKey], edit: object) -> Path:
    """Copy a run whose ledger is re-written, record by record, with ``edit`` applied and
    every record honestly re-signed by its own key: a ledger that verifies but lies."""
    shutil.copytree(src, dst)
    (dst / LEDGER_FILE).unlink()
    ledger = Ledger(dst / LEDGER_FILE, keys["server"])
    last: dict[str, str] = {}
    for line in (src / LEDGER_FILE).read_text().splitlines():
        entry = json.loads(line)["entry"]
        record = edit(dict(entry["record"]))  # type: ignore[operator]
        if record["kind"] == "site-round":
            record["site_prev"] = last.get(entry["signer"])
            record["run"] = ledger.run
        if record["kind"] == "run-end":
            record["records"] = ledger.seq
        signed = sign_record(record, keys[entry["signer"]], entry["signer"])
        last[entry["signer"]] = envelope_hash(signed)
        if entry["signer"] == "server":
            link = ledger._write(signed)
            if record["kind"] == "run-start":
                ledger.keys, ledger.run = dict(record["keys"]), link["hash"]
        else:
            ledger.append(signed)
    return dst


def test_good_run_verifies_and_recomputes_the_claims(good_run: Path,
                                                     keys: dict[str, SigningKey]) -> None:
    report = audit_run(good_run, {k: v.public_pem() for k, v in keys.items()})
    assert report.ok, report.all_problems
    assert [s.site for s in report.sites] == ["site-0", "site-1"]
    for site in report.sites:
        assert site.verdict == "ok" and site.rounds_trained == [1, 2]
        # PRV is the default accountant: the claim is PRV's, RDP bounds it from above
        assert site.accountant == "prv"
        assert site.prv == pytest.approx(site.claimed, abs=0.02)
        assert all(p["rdp"] >= p["claimed"] - 0.02 for p in site.curve)
        assert 0 < site.prv <= site.rdp + 0.02  # PRV is the tighter accountant
        assert site.claimed <= site.budget and site.privacy_unit == "slide"
    # secagg = false and seeded noise are said, not hidden
    unmasked = [w for w in report.warnings if "unmasked" in w]
    seeded = [w for w in report.warnings if "noise was seeded" in w]
    assert len(unmasked) == 2 and len(seeded) == 2 and len(report.warnings) == 4
    from common.runs import read_metrics

    paces = [r["elapsed_s"] for r in read_metrics(good_run) if r["site"] == "global"]
    assert len(paces) == 2 and 0 < paces[0] < paces[1]  # each round's time, in seconds


def test_budget_overrun_written_by_hand_is_flagged(good_run: Path, tmp_path: Path,
                                                   keys: dict[str, SigningKey]) -> None:
    def lower_budget(rec: dict) -> dict:
        if rec["kind"] == "site-round" and rec["site"] == "site-1":
            rec["epsilon_budget"] = 1.0
        return rec

    report = audit_run(_rewrite(good_run, tmp_path / "run", keys, lower_budget))
    assert report.ledger.ok  # the ledger itself is intact: the site really signed this
    assert not report.ok
    bad = {s.site: s for s in report.sites}["site-1"]
    assert bad.verdict == "FAIL"
    assert any("claims a budget of 1; the run's configuration gives it 3" in p
               for p in bad.problems), bad.problems
    assert {s.site: s for s in report.sites}["site-0"].verdict == "ok"


def test_budget_is_the_configured_one_not_the_sites_claim(good_run: Path, tmp_path: Path,
                                                          keys: dict[str, SigningKey]) -> None:
    """Sites that claim the budget they spent are still held to the run's configuration."""
    from common.ledger import config_hash

    def lower_config(rec: dict) -> dict:
        if rec["kind"] == "run-start":
            rec["config"] = dict(rec["config"], epsilon=1.0)
            rec["config_hash"] = config_hash(rec["config"])
        return rec

    run = _rewrite(good_run, tmp_path / "run", keys, lower_config)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(config, epsilon=1.0)))
    report = audit_run(run)
    assert report.ledger.ok and not report.ok
    for site in report.sites:
        assert site.budget == 1.0 and site.verdict == "FAIL"
        assert any("exceeds the budget 1" in p for p in site.problems), site.problems


def test_understated_epsilon_is_flagged(good_run: Path, tmp_path: Path,
                                        keys: dict[str, SigningKey]) -> None:
    def understate(rec: dict) -> dict:
        if rec["kind"] == "site-round" and rec["site"] == "site-0" and rec["round"] == 2:
            rec["epsilon"] = rec["epsilon"] * 0.9
        return rec

    report = audit_run(_rewrite(good_run, tmp_path / "run", keys, understate))
    problems = {s.site: s for s in report.sites}["site-0"].problems
    assert any("round 2: claimed epsilon" in p and "schedule gives" in p for p in problems)


def test_model_swap_and_unaccounted_update_are_flagged(good_run: Path, tmp_path: Path,
                                                       keys: dict[str, SigningKey]) -> None:
    def tamper(rec: dict) -> dict:
        if rec["kind"] == "site-round" and rec["site"] == "site-1" and rec["round"] == 2:
            rec["received_model"] = "f" * 64  # the server sent site-1 another model
        if rec["kind"] == "server-round" and rec["round"] == 2:
            rec["participants"] = rec["participants"] + ["site-9"]
        return rec

    problems = audit_run(_rewrite(good_run, tmp_path / "run", keys, tamper)).all_problems
    assert any("site-1: round 2: trained from a model" in p for p in problems), problems
    assert any("aggregated site-9" in p for p in problems), problems


def test_html_report(good_run: Path) -> None:
    text = render_html(audit_run(good_run))
    assert text.startswith("<!DOCTYPE html>") and "everything verifies" in text
    # epsilon, loss/AUC, the released model's ROC and calibration, participation
    assert text.count("data:image/png;base64,") == 4
    assert "Validation ROC and calibration" in text
    assert "site-0" in text and "http" not in text.replace("https://", "")  # self-contained


def pathfed(*args: str) -> CliResult:
    return run_cli("audit", *args)


def test_cli_good_run_exits_0(good_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    r = pathfed(str(good_run), "--keys", str(good_run.parent / "keys"), "--report", str(out),
                "--json", str(tmp_path / "audit.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "everything verifies" in r.stdout and "site-1" in r.stdout
    assert out.is_file() and json.loads((tmp_path / "audit.json").read_text())["ok"]


def test_cli_tampered_run_exits_1(good_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    lines = (run / LEDGER_FILE).read_text().splitlines(keepends=True)
    link = json.loads(lines[4])
    link["entry"]["record"]["epsilon"] = 0.1
    lines[4] = json.dumps(link) + "\n"
    (run / LEDGER_FILE).write_text("".join(lines))
    r = pathfed(str(run))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "line 5 (seq 4): changed" in r.stdout
    assert (run / "audit.html").is_file()


@pytest.mark.parametrize("keep", ["all but the end", "all but the last round",
                                  "the run start only"])
def test_a_cut_ledger_is_incomplete_and_fails(good_run: Path, tmp_path: Path, keep: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Removing the last line(s), even cleanly at a line boundary, never verifies."""
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    lines = (run / LEDGER_FILE).read_text().splitlines(keepends=True)
    cut = {"all but the end": lines[:-1], "all but the last round": lines[:-4],
           "the run start only": lines[:1]}[keep]
    (run / LEDGER_FILE).write_text("".join(cut))
    report = audit_run(run)
    assert not report.ok
    assert any("incomplete" in p and "no run-end record" in p for p in report.problems)
    from cli import main

    assert main(["audit", str(run)]) == 1
    assert "incomplete" in capsys.readouterr().out


def test_summary_and_checkpoints_are_cross_checked(good_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    summary = json.loads((run / "summary.json").read_text())
    summary["epsilon"] = {k: v / 2 for k, v in summary["epsilon"].items()}
    (run / "summary.json").write_text(json.dumps(summary))
    ckpt = run / "checkpoints" / "round-001.npz"
    ckpt.write_bytes((run / "checkpoints" / "round-002.npz").read_bytes())
    report = audit_run(run)
    assert report.ledger.ok and not report.ok
    text = " | ".join(report.problems)
    assert "summary.json: differs from the summary the server signed" in text
    assert "reports epsilon" in text  # and says which site is understated
    assert "round 1: checkpoints/round-001.npz is not the checkpoint" in text
    ckpt.unlink()
    assert any("round-001.npz is missing" in p for p in audit_run(run).problems)


def test_the_released_model_is_the_final_global_model(good_run: Path, tmp_path: Path) -> None:
    from common.release import load_model, release_bytes

    weights, card, path = load_model(good_run)
    assert card is not None and card.round == 2 and path.name == "model.npz"
    assert audit_run(good_run).ok
    run = tmp_path / "run"
    shutil.copytree(good_run, run)
    arrays = list(weights.values())
    arrays[0] = arrays[0] + 0.01  # a model that is not the one trained
    (run / "model.npz").write_bytes(release_bytes(list(weights), arrays, card))
    assert any("model.npz: not the released model the server signed" in p
               for p in audit_run(run).problems)
    import hashlib  # a server that names the wrong weights' bytes in its summary

    summary = json.loads((run / "summary.json").read_text())
    summary["model_file_sha256"] = hashlib.sha256((run / "model.npz").read_bytes()).hexdigest()
    (run / "summary.json").write_text(json.dumps(summary))
    assert any("its weights are not the final global model" in p
               for p in audit_run(run).problems)
    (run / "model.npz").unlink()
    assert any("released model the summary names is missing" in p
               for p in audit_run(run).problems)


def test_cli_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli import main

    assert main(["audit", str(tmp_path / "nope")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    assert main(["audit", str(tmp_path)]) == 2
    assert "no privacy ledger" in capsys.readouterr().err
    (tmp_path / LEDGER_FILE).write_text("")
    assert main(["audit", str(tmp_path), "--keys", str(tmp_path / "nokeys")]) == 2
    assert "keys folder not found" in capsys.readouterr().err


# ---- empirical audit: membership inference -------------------------------------------
def test_clopper_pearson_matches_scipy() -> None:
    from scipy.stats import beta

    from common.attacks import clopper_pearson

    for k, n in ((0, 10), (3, 10), (10, 10), (37, 200), (1, 500)):
        lo, hi = clopper_pearson(k, n, 0.025)
        assert lo == pytest.approx(beta.ppf(0.025, k, n - k + 1) if k else 0.0, abs=1e-9)
        assert hi == pytest.approx(beta.ppf(0.975, k + 1, n - k) if k < n else 1.0, abs=1e-9)


def test_epsilon_lower_bound_sanity() -> None:
    from common.attacks import epsilon_lower_bound

    assert epsilon_lower_bound(50, 50, 50, 50, 1e-5) == 0.0  # a coin flip proves nothing
    perfect = epsilon_lower_bound(500, 0, 0, 500, 1e-5)
    assert 4.0 < perfect < 6.0  # ln(~0.99 / ~0.009): limited by the number of trials
    assert epsilon_lower_bound(500, 0, 0, 500, 1e-5, confidence=0.5) > perfect


@pytest.mark.slow
def test_attack_beats_chance_without_dp() -> None:
    """A tiny, overfit federation without DP leaks membership of its canaries."""
    from common.attacks import AttackSettings, membership_audit

    cfg = FederationConfig(sites=2, rounds=2, synthetic_bags=40, seed=3, batch_size=16,
                           local_epochs=5, dp=False, delta=1e-3, secagg=False)
    audit = membership_audit(cfg, AttackSettings(models=12, canaries=32))
    loss, lira = audit.results
    assert loss.auc > 0.75 and lira.auc > 0.75, audit.summary()
    assert loss.epsilon_lower_bound > 0.5  # the audit can certify leakage when there is some
    assert audit.ok and audit.claimed_epsilon is None  # no claim to contradict


@pytest.mark.slow
def test_attack_under_dp_stays_below_the_claim(good_run: Path, tmp_path: Path) -> None:
    """`pathfed audit --attack` on a DP run: the empirical bound never exceeds the claim."""
    from cli import main

    out = tmp_path / "audit.json"
    code = main(["audit", str(good_run), "--attack", "--attack-models", "8",
                 "--attack-canaries", "32", "--report", str(tmp_path / "a.html"),
                 "--json", str(out)])
    data = json.loads(out.read_text())
    attack = data["attack"]
    assert code == 0, data
    assert attack["dp"] and 0 < attack["claimed_epsilon"] <= TINY["epsilon"]
    for result in attack["results"]:
        assert result["epsilon_lower_bound"] <= attack["claimed_epsilon"]
    assert "membership-inference" in (tmp_path / "a.html").read_text()


def test_secagg_shares_are_listed_and_a_minority_threshold_warned_of() -> None:
    from types import SimpleNamespace

    from common.audit import _check_shares

    def rnd(r: int, shares: object) -> dict[str, object]:
        return {"round": r, "secagg_shares": shares}

    report = SimpleNamespace(notes=[], warnings=[], problems=[])
    good = {"sites": 30, "shares": 13, "threshold": 7, "tolerated_dropouts": 6,
            "asked_dropouts": 6}
    weak = {**good, "shares": 5, "threshold": 2, "tolerated_dropouts": 3}
    _check_shares([rnd(1, good), rnd(2, good), rnd(3, weak), rnd(4, None),
                   rnd(5, {"sites": 3})], report)  # type: ignore[arg-type]
    assert report.notes == [
        "SecAgg+ in round(s) 1-2: 30 sites, each site's keys shared among 13 (itself "
        "included), 7 rebuild one; any 6 could drop out",
        "SecAgg+ in round(s) 3: 30 sites, each site's keys shared among 5 (itself "
        "included), 2 rebuild one; any 3 could drop out"]
    assert len(report.warnings) == 1 and "round 3" in report.warnings[0]
    assert "no majority" in report.warnings[0]
    assert report.problems == ["round 5: malformed secagg_shares {'sites': 3}"]
