"""Bad input fails early with one line naming the file or field (issue 11, items 6, 7, 9).

Every case runs the real ``pathfed`` entry point (in process, so it is quick) or the real
loader, and checks the exit code 2, a single ``pathfed: error:`` line and no traceback.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from cli import main
from common.crypto.consortium import enroll_site, init_consortium
from common.errors import ConfigError, DataError


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], *words: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pathfed: error:")]
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _images(folder: Path, labels: list[str] | None = None, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((64, 64, 3), 90 + 20 * i, np.uint8)).save(folder / f"{i}.png")
    rows = labels or [f"{i}.png,{i % 2}" for i in range(n)]
    (folder / "labels.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    return folder


@pytest.mark.parametrize("setting, words", [
    (["--set", "secagg-num-shares=inf"], ["secagg-num-shares"]),
    (["--seed", str(2**64)], ["seed"]),
    (["--set", 'site-epsilon="site-0=nan"'], ["site-epsilon"]),
    (["--set", 'site-epsilon="site-0=inf"'], ["site-epsilon"]),
    (["--set", "max-grad-norm=inf"], ["max-grad-norm"]),
    (["--set", "patch-size=4096"], ["patch-size"]),
    (["--set", 'run-id="../../etc"'], ["run-id"]),
    (["--epsilon", "nan"], ["epsilon"]),
])
def test_simulate_settings(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                           setting: list[str], words: list[str]) -> None:
    _fails(capsys, ["simulate", "--out", str(tmp_path / "r"), *setting], *words)


def test_config_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    binary = tmp_path / "fed.toml"
    binary.write_bytes(b"\x00\xff\xfe\x89PNG\r\n\x1a\n" * 10)
    _fails(capsys, ["simulate", "--config", str(binary)], str(binary), "TOML")
    _fails(capsys, ["simulate", "--config", str(tmp_path)], str(tmp_path), "folder")
    _fails(capsys, ["simulate", "--config", str(tmp_path / "missing.toml")], "not found")


def test_truncated_feature_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    feats = tmp_path / "feats"
    feats.mkdir()
    for i in range(4):
        with h5py.File(feats / f"s{i}.h5", "w") as h5:
            h5["features"] = np.ones((5, 8), np.float32)
    data = (feats / "s1.h5").read_bytes()
    (feats / "s1.h5").write_bytes(data[: len(data) // 3])
    (feats / "manifest.csv").write_text("slide,status\n")
    (feats / "labels.csv").write_text("slide,label\n" + "".join(
        f"s{i},{i % 2}\n" for i in range(4)))
    _fails(capsys, ["simulate", "--data", str(feats), "--sites", "2"], "s1.h5")


def test_prepare_out_naming_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    slides = _images(tmp_path / "slides")
    target = tmp_path / "file.txt"
    target.write_text("not a folder")
    _fails(capsys, ["prepare", str(slides), "--out", str(target), "--patch-size", "32",
                    "--slide-mpp", "0.5", "--no-progress"], "is a file")


def test_consortium_inputs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _fails(capsys, ["consortium", "init", str(tmp_path / "a"), "--server-host", ""],
           "--server-host")
    _fails(capsys, ["consortium", "init", str(tmp_path / "b"), "--server-host", "hôpital.fr"],
           "--server-host")
    _fails(capsys, ["consortium", "init", str(tmp_path / "c"), "--server-host", "x.org",
                    "--port", "70000"], "--port")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
    root = tmp_path / "consortium"
    assert main(["consortium", "init", str(root), "--server-host", "127.0.0.1"]) == 0
    server_key = (root / "ledger" / "server.key").read_bytes()
    for name in ("server", "SERVER", "global", "../evil", "a/b", "..", ".hidden"):
        _fails(capsys, ["site", "enroll", name, "--consortium", str(root)], "site name")
    assert (root / "ledger" / "server.key").read_bytes() == server_key
    assert not (root / "ledger" / "public" / "SERVER.pub.pem").exists()
    folder = tmp_path / "ckpt-folder"
    folder.mkdir()
    _fails(capsys, ["checkpoint", "decrypt", str(tmp_path / "x.npz.enc"), "--key-file",
                    str(folder), "--out", str(tmp_path / "m.npz")], "folder")


def test_a_site_folder_starts_only_its_own_site(tmp_path: Path) -> None:
    from client.deploy import site_folder

    root = init_consortium(tmp_path / "c", ["127.0.0.1"]).root
    enroll_site(root, "hospital-a")
    enroll_site(root, "hospital-b")
    assert site_folder(root, "hospital-a") == root / "sites" / "hospital-a"
    with pytest.raises(ConfigError, match="folder of site 'hospital-a', not of 'hospital-b'"):
        site_folder(root / "sites" / "hospital-a", "hospital-b")
    with pytest.raises(ConfigError, match="site name"):
        site_folder(root, "../hospital-a")


def test_checkpoints_are_bound_to_their_run(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import os

    from common.runs import RunFolder, load_checkpoint

    key = os.urandom(32)
    arrays = [np.arange(3, dtype=np.float32)]
    one = RunFolder(tmp_path / "one", key, run_id="study-1").save_checkpoint(2, ["w"], arrays)
    other = tmp_path / "two" / "checkpoints" / one.name
    other.parent.mkdir(parents=True)
    other.write_bytes(one.read_bytes())
    assert load_checkpoint(other, key)["w"].tolist() == [0, 1, 2]  # it says whose it is
    with pytest.raises(DataError, match="of run 'study-1', not of this run"):
        load_checkpoint(other, key, run_id="study-2")
    # a header edited to claim the other run breaks the authentication tag
    blob = bytearray(one.read_bytes())
    start = blob.index(b"study-1")
    blob[start + 6] = ord("2")
    forged = tmp_path / "forged" / one.name
    forged.parent.mkdir()
    forged.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="moved from another run"):
        load_checkpoint(forged, key, run_id="study-2")
    # a plain checkpoint given to `checkpoint decrypt` is an error, not a silent copy
    plain = RunFolder(tmp_path / "plain").save_checkpoint(1, ["w"], arrays)
    key_file = tmp_path / "k"
    key_file.write_text(key.hex())
    _fails(capsys, ["checkpoint", "decrypt", str(plain), "--key-file", str(key_file),
                    "--out", str(tmp_path / "m.npz")], "not an encrypted checkpoint")


# ---- labels and data folders ----------------------------------------------------------
@pytest.mark.parametrize("rows, words", [
    (["0.png,0", "1.png,1", "0.png,0"], ["listed twice", "line 4", "line 2"]),
    (["0.png,0", "1.png,1", "0.png,1"], ["contradictory"]),
    (["0.png,0", "../1.png,1"], ["outside the data folder"]),
    (["0.png,0", "/etc/passwd,1"], ["outside the data folder"]),
    (["0.png,0", "1.png,maybe"], ["label 'maybe'"]),
])
def test_labels_mistakes(tmp_path: Path, rows: list[str], words: list[str]) -> None:
    from common.data.images import read_labels

    folder = _images(tmp_path / "d", rows)
    with pytest.raises(DataError) as err:
        read_labels(folder)
    for word in words:
        assert word in str(err.value)
    assert "labels.csv" in str(err.value)


def test_labels_not_utf8_and_partial_patients(tmp_path: Path) -> None:
    from common.data.images import read_labels

    folder = _images(tmp_path / "d")
    (folder / "labels.csv").write_bytes("image,label\n0.png,0\n1\xe9.png,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_labels(folder)
    (folder / "labels.csv").write_text("image,label,patient\n0.png,0,p1\n1.png,1,\n")
    with pytest.raises(DataError, match="line 3: empty patient"):
        read_labels(folder)


def _feature_folder(folder: Path, encoders: list[tuple[str, str]], nan: int | None = None,
                    patients: list[str] | None = None) -> Path:
    folder.mkdir()
    for i, (encoder, weights) in enumerate(encoders):
        features = np.ones((4, 6), np.float32) * i
        if nan == i:
            features[2, 3] = np.nan
        with h5py.File(folder / f"s{i}.h5", "w") as h5:
            h5["features"] = features
            h5.attrs["encoder"] = encoder
            h5.attrs["weights_hash"] = weights
    (folder / "manifest.csv").write_text("slide,status\n")
    header = "slide,label" + (",patient" if patients else "")
    lines = [f"s{i},{i % 2}" + (f",{patients[i]}" if patients else "")
             for i in range(len(encoders))]
    (folder / "labels.csv").write_text(header + "\n" + "\n".join(lines) + "\n")
    return folder


def test_feature_folders_refuse_mixed_encoders_nan_and_partial_patients(tmp_path: Path) -> None:
    from common.data.h5 import load_h5_bags

    same = [("color-texture", "")] * 4
    assert len(load_h5_bags(_feature_folder(tmp_path / "ok", same)).bags) == 4
    mixed = [("color-texture", ""), ("resnet-tiny", "ab12"), ("color-texture", "")]
    with pytest.raises(DataError, match="different encoders or weights"):
        load_h5_bags(_feature_folder(tmp_path / "mixed", mixed))
    weights = [("resnet-tiny", "aaaa"), ("resnet-tiny", "bbbb")]
    with pytest.raises(DataError, match="different encoders or weights"):
        load_h5_bags(_feature_folder(tmp_path / "weights", weights))
    with pytest.raises(DataError, match=r"s2\.h5: 1 patch\(es\) with NaN"):
        load_h5_bags(_feature_folder(tmp_path / "nan", same, nan=2))
    with pytest.raises(DataError, match="empty patient"):
        load_h5_bags(_feature_folder(tmp_path / "pat", same, patients=["p", "q", "", "r"]))


def test_a_site_needs_both_classes_and_two_slides(tmp_path: Path) -> None:
    from common.config import FederationConfig
    from common.site import Site

    one_class = _images(tmp_path / "one", [f"{i}.png,1" for i in range(4)])
    cfg = FederationConfig(sites=2, data=str(one_class), dp=False)
    with pytest.raises(DataError, match="all 4 slides are labelled 1"):
        Site(cfg, 0, data=str(one_class))


def test_two_prepare_runs_on_one_folder(tmp_path: Path) -> None:
    from common.wsi.extract import LOCK_FILE, _lock_folder

    out = tmp_path / "feats"
    out.mkdir()
    first = _lock_folder(out)
    try:
        with pytest.raises(DataError, match="another `pathfed prepare`.*pid"):
            _lock_folder(out)
    finally:
        first.close()
    _lock_folder(out).close()  # free again once the first run ended
    assert (out / LOCK_FILE).is_file()


def test_prepare_refuses_while_another_holds_the_folder(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    from common.wsi.extract import _lock_folder

    slides = _images(tmp_path / "slides")
    out = tmp_path / "feats"
    out.mkdir()
    held = _lock_folder(out)
    try:
        _fails(capsys, ["prepare", str(slides), "--out", str(out), "--patch-size", "32",
                        "--slide-mpp", "0.5", "--no-progress"], "another `pathfed prepare`")
    finally:
        held.close()
    assert not (out / "manifest.csv").exists()  # nothing of the first run was touched


def test_an_image_smaller_than_the_patch_says_so(tmp_path: Path) -> None:
    from common.wsi.extract import prepare

    slides = tmp_path / "slides"
    slides.mkdir()
    Image.fromarray(np.full((40, 40, 3), 120, np.uint8)).save(slides / "tiny.png")
    summary = prepare(slides, tmp_path / "out", mpp=0.5, patch_size=64, slide_mpp=0.5,
                      progress=False)
    reason = summary.results[0].reason
    assert "smaller than one 64 px patch" in reason and "--patch-size" in reason
    assert "tissue-threshold" not in reason

