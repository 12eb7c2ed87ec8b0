"""The README, run as a new user would: every command block in a fresh copy of the tree.

Each ```bash block of README.md is run with bash in a temporary copy of the tracked files
(beside a link to ``../shared`` when this checkout has one), with the installed package
on PATH, and the numbers the README quotes are checked against what the commands print,
within the tolerances below. A block the test does not know fails the test, so a new
README block comes with its check.

Two blocks are not re-run here, each for a stated reason: the test command is what CI
itself runs (``.ci/run`` runs it verbatim), and the consortium block needs a server host
and hospital machines (``tests/test_deploy.py`` runs those commands' code on 127.0.0.1).
Of the set-up one-liners only the final command runs: their install steps are CI's own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SHARED = ROOT.parent / "shared"
UCSB = SHARED / "data" / "ucsb-breast"
BIN = Path(sys.executable).parent


def bash_blocks(text: str) -> list[str]:
    """The ```bash blocks of ``text`` (indented ones too), without their indent."""
    blocks = re.findall(r"^( *)```bash\n(.*?)^\1```", text, flags=re.S | re.M)
    return ["\n".join(line[len(indent):] for line in body.splitlines())
            for indent, body in blocks]


def quoted(pattern: str) -> list[float]:
    """The numbers a README sentence quotes (the sentence must be in the README)."""
    match = re.search(pattern, README, flags=re.S)
    assert match, f"README no longer says {pattern!r}: update this test with it"
    return [float(g) for g in match.groups()]


def number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in the output:\n{text[-3000:]}"
    return float(match.group(1))


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy of the tracked files, as a clone would have them."""
    base = tmp_path_factory.mktemp("readme")
    work = base / "pathfed"
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: copy the tree
        ignore = shutil.ignore_patterns(".venv", ".git", "runs", "results", "feats",
                                        "__pycache__", "*.egg-info")
        shutil.copytree(ROOT, work, ignore=ignore)
    else:
        for name in files:
            if (ROOT / name).is_file():
                (work / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, work / name)
    if SHARED.is_dir():
        (base / "shared").symlink_to(SHARED)
    return work


def run(tree: Path, script: str, timeout: float = 900) -> str:
    """``script`` with bash in ``tree``; its output (stdout and stderr); must exit 0."""
    from simulations.simulate import FLOWER_ENV

    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(tree.parent / "flwr-home"),
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "200",
           "PYTHONPATH": str(tree)}  # the copy's code, not the checkout's
    try:
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=tree,
                              env=env, capture_output=True, text=True, timeout=timeout)
    finally:  # Flower's local SuperLink outlives `flwr run`; stop it as the README says
        _stop_local_superlink(tree.parent / "flwr-home")
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{script}\nexited {done.returncode}:\n{out[-4000:]}"
    return out


def _stop_local_superlink(flwr_home: Path) -> None:
    """End the SuperLink `flwr run` left running for this FLWR_HOME (its SuperExec follows)."""
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            try:
                os.kill(int(proc.name), 15)
            except OSError:
                pass


def final_command(block: str) -> str:
    """The last command of a set-up one-liner (``... && .venv/bin/pathfed simulate``)."""
    return block.strip().split("&&")[-1].strip().replace(".venv/bin/", "")


def needs_ucsb() -> None:
    if not UCSB.is_dir():
        pytest.skip(f"{UCSB} is not on this machine (the README's UCSB blocks need it)")


# --- one check per block, picked by what the block runs --------------------------------

def check_quick_start(tree: Path, block: str) -> None:
    command = final_command(block)
    assert command == "pathfed simulate"
    out = run(tree, f"{command} --out runs/quick-start")
    summary = json.loads((tree / "runs" / "quick-start" / "summary.json").read_text())
    assert summary["rounds"] == 8 and all(0 < e <= 8.0 for e in summary["epsilon"].values())
    assert out.count("| sites trained 3/3") == 8
    auc, last3, spread, acc, balanced = quoted(
        r"8 rounds: AUC ([\d.]+) \(last 3 rounds ([\d.]+) \+/- ([\d.]+)\), accuracy ([\d.]+), "
        r"balanced accuracy ([\d.]+)")
    assert number(r"8 rounds: AUC ([\d.]+)", out) == pytest.approx(auc, abs=0.03)
    assert number(r"last 3 rounds ([\d.]+)", out) == pytest.approx(last3, abs=0.03)
    assert number(r"\+/- ([\d.]+)\)", out) == pytest.approx(spread, abs=0.02)
    assert number(r"accuracy ([\d.]+),", out) == pytest.approx(acc, abs=0.05)
    assert number(r"balanced accuracy ([\d.]+)", out) == pytest.approx(balanced, abs=0.05)
    seconds = quoted(r"the federation itself takes about (\d+) s")[0]
    assert number(r"done in ([\d.]+) s", out) < 3 * seconds  # a slow CI machine, not 10x
    # the audit block (a synopsis), on this run
    report = run(tree, "pathfed audit runs/quick-start")
    assert "audit: everything verifies" in report


def check_flower(tree: Path, block: str) -> None:
    assert block.startswith("flwr run . --stream")
    out = run(tree, block)
    rounds = quoted(r"checked here: (\d) rounds in")[0]
    assert f"round {rounds:g} | sites trained 3/3" in out, out[-3000:]
    assert "INFO:" not in out  # no line printed twice
    report = run(tree, "pathfed audit runs/flwr")
    assert "audit: everything verifies" in report


def check_prepare(tree: Path, block: str) -> None:
    needs_ucsb()
    out = run(tree, block)  # prepare exits 1 when a slide failed
    auc = number(r"rounds: AUC ([\d.]+)", out)
    # README: image and feature folders with the default DP (epsilon 8) stay at chance
    quoted(r"and chance\s+\(0\.50\) at the default epsilon 8")
    assert 0.25 <= auc <= 0.75


def check_wsi_demo(tree: Path, block: str) -> None:
    assert block.strip() == "python -m simulations.wsi_demo --out runs/wsi-demo"
    out = run(tree, block)
    result, _ = json.JSONDecoder().raw_decode(out[out.rindex("\n{\n") + 1:])
    auc, spread, balanced = quoted(
        r"reports AUC ([\d.]+) \(mean of the last 3 rounds,\s+spread ([\d.]+)\) and balanced "
        r"accuracy ([\d.]+)")
    assert result["auc_last3_mean"] == pytest.approx(auc, abs=0.03)
    assert result["auc_last3_sd"] <= max(0.02, 3 * spread)
    assert result["balanced_accuracy_calibrated"] == pytest.approx(balanced, abs=0.05)
    assert result["accuracy"] == pytest.approx(quoted(r"accuracy at logit 0 stays ([\d.]+)")[0],
                                               abs=0.1)
    assert result["slides"] == {"done": 192}


def check_federated_encoder(tree: Path, block: str) -> None:
    needs_ucsb()
    assert block.startswith("python -m simulations.federated_encoder")
    out = run(tree, block)
    assert "epsilon" in out


def check_paper(tree: Path, block: str) -> None:
    needs_ucsb()
    lines = block.strip().splitlines()
    assert [line.split()[3] for line in lines] == ["central", "dp", "table"]
    # the dp row is 4 minutes of 50 folds: one repeat (10 folds) shows it runs end to end
    script = "\n".join(lines[:1] + [lines[1] + " --repeats 1"] + lines[2:])
    run(tree, script)
    central = json.loads((tree / "results" / "paper" / "central.json").read_text())
    row = re.search(r"\| Central \(one site, all training images\) \| [\d.]+ ± [\d.]+ \| "
                    r"([\d.]+) ± ([\d.]+)", (ROOT / "docs" / "RESULTS.md").read_text())
    assert row, "docs/RESULTS.md has no central row"
    assert central["auc"][0] == pytest.approx(float(row.group(1)), abs=0.02)
    assert "Central (one site" in (tree / "docs" / "RESULTS.md").read_text()


def check_audit(tree: Path, block: str) -> None:
    """The synopsis: check_quick_start runs it on the quick start's run folder."""
    assert block.split()[:3] == ["pathfed", "audit", "RUN_DIR"]


NOT_RUN = {
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install "
    "-e '.[test]'": "the test command: CI runs it verbatim (.ci/run)",
    "pathfed consortium init": "needs a server host and hospital machines; "
                               "tests/test_deploy.py runs them on 127.0.0.1",
}

CHECKS = {
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install "
    "-e . &&": check_quick_start,
    "flwr run .": check_flower,
    "pathfed prepare ../shared/data/ucsb-breast": check_prepare,
    "python -m simulations.wsi_demo": check_wsi_demo,
    "python -m simulations.federated_encoder": check_federated_encoder,
    "python -m simulations.paper": check_paper,
    "pathfed audit RUN_DIR": check_audit,
}


def _which(block: str) -> str:
    for prefix in (*NOT_RUN, *CHECKS):
        if block.startswith(prefix):
            return prefix
    raise AssertionError(f"README block without a check in tests/test_readme.py:\n{block}")


BLOCKS = bash_blocks(README)


def test_every_block_has_a_check() -> None:
    assert len(BLOCKS) >= 8
    seen = [_which(block) for block in BLOCKS]
    assert set(CHECKS) <= set(seen), set(CHECKS) - set(seen)


@pytest.mark.parametrize("block", [b for b in BLOCKS if _which(b) in CHECKS],
                         ids=lambda b: CHECKS[_which(b)].__name__.removeprefix("check_"))
def test_readme_block(tree: Path, block: str) -> None:
    CHECKS[_which(block)](tree, block)
