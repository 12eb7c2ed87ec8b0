"""Bad input at the command line: one clear line, exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import CliResult, run_cli


def pathfed(*args: str, cwd: Path | None = None) -> CliResult:
    return run_cli(*args, cwd=cwd)


def _bad(result: CliResult, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_invalid_value_names_field_and_allowed_values() -> None:
    r = pathfed("simulate", "--set", "optimizer=rmsprop")
    _bad(r, "optimizer", "'adam' or 'sgd'")
    assert len(r.stderr.strip().splitlines()) == 1


def test_out_of_range_number() -> None:
    _bad(pathfed("simulate", "--rounds", "0"), "rounds", "greater than or equal to 1")


def test_unknown_setting_lists_known_ones() -> None:
    _bad(pathfed("simulate", "--set", "epochs=3"), "epochs", "local-epochs")


def test_unknown_model_lists_known_ones() -> None:
    _bad(pathfed("simulate", "--set", "model=vit-giant"), "vit-giant", "gated-attention-mil",
         "attention-mil")


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "fed.toml"
    cfg.write_text("rounds = 2\nepsilon = -1\n")
    _bad(pathfed("simulate", "--config", str(cfg)), str(cfg), "epsilon")
    cfg.write_text("rounds = [\n")
    _bad(pathfed("simulate", "--config", str(cfg)), str(cfg), "TOML")
    _bad(pathfed("simulate", "--config", str(tmp_path / "missing.toml")), "missing.toml")


def test_missing_and_empty_data_folder(tmp_path: Path) -> None:
    _bad(pathfed("simulate", "--data", str(tmp_path / "nope")), "nope", "not found")
    _bad(pathfed("simulate", "--data", str(tmp_path)), "labels.csv", "missing")


def test_malformed_labels_csv(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("file,class\na.png,1\n")
    _bad(pathfed("simulate", "--data", str(tmp_path)), "labels.csv", "image,label")
    (tmp_path / "labels.csv").write_text("image,label\na.png,maybe\n")
    _bad(pathfed("simulate", "--data", str(tmp_path)), "labels.csv", "line 2", "maybe")


@pytest.mark.slow
def test_unreadable_images_are_named(tmp_path: Path) -> None:
    """One unreadable image is named and skipped; the federation still runs (rc 0)."""
    import numpy as np
    from PIL import Image

    rows = ["image,label,tma_group"]
    for i in range(4):
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(tmp_path / f"ok{i}.png")
        rows.append(f"ok{i}.png,{i % 2},g{i // 2}")
    (tmp_path / "broken.png").write_text("this is not a png")
    rows.append("broken.png,1,g1")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    # Too few readable images for 3 sites: stops before any work, naming the bad file.
    r = pathfed("simulate", "--data", str(tmp_path), "--sites", "3")
    _bad(r, "tma_group")
    r = pathfed("simulate", "--data", str(tmp_path), "--sites", "2", "--rounds", "1",
                "--out", str(tmp_path / "run"), "--set", "patch-size=16")
    assert "broken.png" in r.stdout + r.stderr
    assert "cannot read image" in r.stdout + r.stderr
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("args", [["--help"], ["simulate", "--help"]])
def test_help(args: list[str]) -> None:
    r = pathfed(*args)
    assert r.returncode == 0 and "pathfed" in r.stdout


def test_consortium_init_and_site_enroll(tmp_path: Path) -> None:
    """What a coordinator types: keys 0600, the site folder to hand over, clear errors."""
    from cryptography import x509

    root = tmp_path / "consortium"
    r = pathfed("consortium", "init", str(root), "--server-host", "fl.example.org",
                "--server-host", "10.1.2.3", "--port", "9443")
    assert r.returncode == 0, r.stderr
    cert = x509.load_pem_x509_certificate((root / "server.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example.org" in sans.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    r = pathfed("site", "enroll", "hospital-a", "--consortium", str(root))
    assert r.returncode == 0 and "sites/hospital-a" in r.stdout
    site = root / "sites" / "hospital-a"
    for key in (site / "supernode.key", site / "ledger.key", root / "ca.key",
                root / "server.key", root / "checkpoint.key", root / "ledger" / "server.key"):
        assert key.stat().st_mode & 0o777 == 0o600, key
        assert key.read_text()[:40] not in r.stdout + r.stderr  # never printed
    assert (root / "allow-list" / "hospital-a.pub").read_bytes().startswith(b"ecdsa-sha2-")
    assert (root / "ledger" / "public" / "hospital-a.pub.pem").is_file()
    _bad(pathfed("site", "enroll", "hospital-a", "--consortium", str(root)), "already")
    _bad(pathfed("site", "enroll", "bad name!", "--consortium", str(root)), "site name")
    _bad(pathfed("site", "enroll", "b", "--consortium", str(tmp_path)), "consortium.json")
    r = pathfed("site", "remove", "hospital-a", "--consortium", str(root))
    assert r.returncode == 0 and not (root / "allow-list" / "hospital-a.pub").exists()
    _bad(pathfed("checkpoint", "decrypt", str(tmp_path / "nope.npz.enc"), "--key-file",
                 str(root / "checkpoint.key"), "--out", str(tmp_path / "x.npz")), "nope")


@pytest.mark.parametrize("summary, rc, words", [
    ({"rounds": 8, "rounds_with_model": 8, "auc": None, "accuracy": 0.5,
      "epsilon": {"site-0": 1.0}, "dp": True, "delta": 1e-5}, 0,
     ["8 rounds", "AUC undefined"]),
    ({"rounds": 8, "rounds_with_model": 0, "auc": None, "accuracy": None,
      "epsilon": {}, "dp": True, "delta": 1e-5, "error": "round 1: every site failed"}, 1,
     ["no round produced a global model", "every site failed"]),
])
def test_simulate_exit_status_follows_what_was_trained(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        summary: dict, rc: int, words: list[str]) -> None:
    """8 rounds with an undefined AUC succeed; a run that trained nothing fails."""
    import simulations.simulate
    from cli import main

    monkeypatch.setattr(simulations.simulate, "simulate", lambda cfg, verbose=False: summary)
    assert main(["simulate", "--out", str(tmp_path / "r")]) == rc
    captured = capsys.readouterr()
    text = captured.out + captured.err
    for word in words:
        assert word in text, text


@pytest.mark.slow
def test_console_script_runs() -> None:
    """The installed `pathfed` script itself (everything else runs the entry point in process)."""
    import subprocess
    import sys

    script = Path(sys.executable).parent / "pathfed"
    r = subprocess.run([str(script), "simulate", "--rounds", "0"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "rounds" in r.stderr and "Traceback" not in r.stderr


def test_models_lists_every_model_with_its_kind() -> None:
    import json

    from common.models import MODELS

    r = pathfed("models", "--json")
    listed = json.loads(r.stdout)
    assert r.returncode == 0 and set(listed["models"]) == set(MODELS)
    from common.models.base import KINDS

    assert {m["kind"] for m in listed["models"].values()} == set(KINDS)
    assert {"color-texture", "resnet-tiny", "patch-cnn"} <= set(listed["encoders"])
    assert listed["encoders"]["color-texture"] == {
        "summary": listed["encoders"]["color-texture"]["summary"], "weights": "none",
        "dim": 21, "input_size": "any", "normalisation": None}
    assert listed["encoders"]["resnet-tiny"]["normalisation"]["mean"] == [0.485, 0.456, 0.406]


@pytest.mark.slow
def test_bad_data_fails_before_torch_is_imported(tmp_path: Path) -> None:
    """Checking the data comes before torch, Flower and Ray are imported (0.3 s here)."""
    import subprocess
    import sys

    code = ("import sys; from cli import main; rc = main(['simulate', '--data', "
            f"{str(tmp_path / 'nope')!r}]); assert 'torch' not in sys.modules; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "not found" in r.stderr, r.stderr


def test_checkpoint_export_serves_the_patch_cnn_encoder(tmp_path: Path) -> None:
    """`pathfed checkpoint export` of a patch-CNN checkpoint is the `patch-cnn` encoder's
    --weights (the README's federated-encoder steps)."""
    import numpy as np
    import torch

    from cli import main
    from common.features import build_encoder
    from common.models import build_model

    torch.manual_seed(3)
    model = build_model("residual-patch-cnn", patch_size=32)
    ckpt = tmp_path / "round-006.npz"
    np.savez(ckpt, **{k: v.numpy() for k, v in model.state_dict().items()})
    assert main(["checkpoint", "export", str(ckpt), "--out", str(tmp_path / "cnn.pt")]) == 0
    encoder = build_encoder("patch-cnn", tmp_path / "cnn.pt")
    patches = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert encoder(patches).shape == (2, 128)
