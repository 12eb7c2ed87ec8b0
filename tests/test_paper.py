"""The paper-table harness (simulations/paper.py) on a small labelled image folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from simulations import paper


def _images(folder: Path, n: int) -> Path:
    """``n`` images in 5 tma_groups; malignant ones carry dark purple blobs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["image,label,tma_group"]
    for i in range(n):
        label = i % 2
        img = rng.integers(150, 200, (96, 96, 3), dtype=np.uint8)
        if label:
            img[16:48, 16:48] = (90, 30, 120)
        Image.fromarray(img).save(folder / f"img{i}.png")
        rows.append(f"img{i}.png,{'malignant' if label else 'benign'},g{i % 5}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """40 small labelled images in 5 groups."""
    (tmp_path / "data").mkdir()
    return _images(tmp_path / "data", 40)


def _tiny(rounds: int = 3) -> paper.FederationConfig:
    return paper.FederationConfig(rounds=rounds, local_epochs=1, batch_size=2, lr=0.5,
                                  patch_size=16)


def test_cv_folds_partition_each_repeat_and_stratify() -> None:
    labels = np.array([0] * 32 + [1] * 26)
    tests = paper.cv_folds(labels, folds=10, repeats=2, seed=0)
    assert len(tests) == 20
    for repeat in range(2):
        cover = np.sum(tests[repeat * 10:(repeat + 1) * 10], axis=0)
        assert (cover == 1).all()  # every image tested exactly once per repeat
        for test in tests[repeat * 10:(repeat + 1) * 10]:
            assert 2 <= labels[test].sum() <= 3 and 3 <= (~labels[test].astype(bool)).sum() <= 4
    assert not np.array_equal(tests[0], tests[10])  # repeats reshuffle


@pytest.mark.slow  # in-process federations of 5 hospitals, 2 folds per row
def test_rows_run_on_the_same_folds_and_make_the_table(tmp_path: Path, images: Path) -> None:
    data, out, cfg = images, tmp_path / "out", _tiny()
    central = paper.run_row("central", data, out, cfg, folds=2, repeats=1, epsilon=None)
    dp = paper.run_row("dp", data, out, cfg, folds=2, repeats=1, epsilon=3.0)
    alone = paper.run_row("hospitals", data, out, cfg, folds=2, repeats=1, epsilon=None)
    assert {r["hospital"] for r in alone["results"]} == set(range(5))
    assert len(central["results"]) == len(dp["results"]) == 2
    assert [r["n_test"] for r in central["results"]] == [r["n_test"] for r in dp["results"]]
    for r in dp["results"]:  # every hospital spent (almost exactly) its budget
        assert set(r["epsilon"]) == {f"site-{h}" for h in range(5)}
        assert all(2.5 < e <= 3.0 for e in r["epsilon"].values())
    assert central["auc"][0] > 0.9  # the blobs are easy
    assert json.loads((out / "dp-eps3.json").read_text())["engine"] == "in-process FedAvg"
    results = tmp_path / "RESULTS.md"
    results.write_text(f"# R\n{paper.START}\nOLD-TABLE\n{paper.END}\ntail\n")
    text = paper.table(out, results)
    assert "Federated (FedAvg) + local DP, eps 3 per hospital" in text and "Central" in text
    assert "hospital 4 alone" in text
    doc = results.read_text()
    assert "OLD-TABLE" not in doc and doc.endswith("tail\n") and text in doc
    assert (out / "auc-vs-epsilon.png").stat().st_size > 1000


@pytest.mark.slow
def test_secagg_row_runs_through_flower(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    data = _images(tmp_path / "data", 40)
    cfg = paper.FederationConfig(rounds=2, local_epochs=1, batch_size=2, lr=0.5, patch_size=16)
    row = paper.run_row("dp-secagg", data, tmp_path / "out", cfg, folds=2, repeats=1,
                        epsilon=8.0)
    assert row["engine"] == "Flower simulation + SecAgg+"
    assert all(0.0 <= r["auc"] <= 1.0 for r in row["results"])
    runs = sorted((tmp_path / "out" / "runs" / "dp-secagg-eps8").glob("repeat0-fold*"))
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["secagg"] and summary["sites"] == 5
    # run again: finished folds are reused, not trained again
    before = (runs[0] / "summary.json").stat().st_mtime_ns
    again = paper.run_row("dp-secagg", data, tmp_path / "out", cfg, folds=2, repeats=1,
                          epsilon=8.0)
    assert (runs[0] / "summary.json").stat().st_mtime_ns == before
    assert again["results"] == row["results"]


def test_model_zoo_table_has_a_row_per_model(tmp_path: Path, images: Path) -> None:
    from simulations import models

    data, out, cfg = images, tmp_path / "zoo", _tiny(rounds=2)
    for name in ("dsmil", "sparse-mil", "multiscale-mil"):  # multiscale: regions of images
        paper.run_row("central", data, out / name, cfg.model_copy(update={"model": name}),
                      folds=2, repeats=1, epsilon=None)
    summary = json.loads((out / "dsmil" / "central.json").read_text())
    assert summary["config"]["model"] == "dsmil"
    results = tmp_path / "RESULTS.md"
    results.write_text(f"x\n{models.START}\nOLD\n{models.END}\ny\n")
    text = models.table(out, results)
    assert "| `dsmil` |" in text and "| `sparse-mil` |" in text and "2 x 1" in text
    assert "| `multiscale-mil` |" in text and (out / "multiscale-mil" /
                                              "bags-color-texture-16px-regions4x.npz").is_file()
    assert "OLD" not in results.read_text()
    with pytest.raises(SystemExit):  # an unknown model fails before any work
        models.main(["--data", str(data), "--out", str(out), "--models", "nope"])


def test_abstention_table_compares_mc_dropout_with_plain_confidence(
        tmp_path: Path, images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulations import abstention

    assert abstention.main(["--data", str(images), "--out", str(tmp_path / "ab"), "--folds",
                            "2", "--repeats", "2", "--passes", "4"]) == 0
    text = capsys.readouterr().out
    assert "| MC dropout (4 passes) |" in text and "| no abstention |" in text
    result = json.loads((tmp_path / "ab" / "abstention.json").read_text())
    assert all(len(v) == 2 and all(0 <= a <= 1 for a in v)
               for v in result["accuracy"].values())
    assert abstention.main(["--data", str(images), "--out", str(tmp_path / "cnn"), "--model",
                            "residual-patch-cnn", "--folds", "2", "--repeats", "1",
                            "--passes", "3"]) == 0  # the patch CNN adds test-time augmentation
    assert "| test-time augmentation (3 rotations/flips) |" in capsys.readouterr().out
