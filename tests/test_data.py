"""Data: the synthetic default, labelled image folders (real UCSB images), site files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data import load_site_file, save_site_file
from common.data.images import assign_sites, read_labels, tissue_patches
from common.data.synthetic import synthetic_site
from common.errors import DataError
from common.metrics import EvalCounts, auc_from_histograms, roc_auc


def test_synthetic_is_deterministic_and_a_minority_signal() -> None:
    a, b = synthetic_site(1, seed=3), synthetic_site(1, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a.train.bags, b.train.bags))
    assert not np.array_equal(a.train.bags[0], synthetic_site(2, seed=3).train.bags[0])
    labels = np.concatenate([a.train.labels, a.val.labels])
    assert 0.4 < labels.mean() < 0.6
    assert len(a.val) == pytest.approx(0.3 * 300, abs=2)


def test_site_file_round_trip(tmp_path: Path) -> None:
    site = synthetic_site(0, n_bags=20)
    back = load_site_file(save_site_file(site, tmp_path / "s.npz"))
    assert back.name == site.name and back.train.names == site.train.names
    assert all(np.array_equal(x, y) for x, y in zip(back.val.bags, site.val.bags))
    (tmp_path / "bad.npz").write_text("nope")
    with pytest.raises(DataError, match="bad.npz"):
        load_site_file(tmp_path / "bad.npz")


def test_ucsb_hospitals_from_tma_groups(ucsb: Path) -> None:
    items = read_labels(ucsb)
    assert len(items) == 58 and sum(i.label for i in items) == 26
    sites = assign_sites(items, 3)
    groups = [{i.group for i in s} for s in sites]
    assert all(not (a & b) for a in groups for b in groups if a is not b)  # whole groups
    assert sorted(len(s) for s in sites) == [18, 18, 22]
    with pytest.raises(DataError, match="only 10 tma_group"):
        assign_sites(items, 11)


def test_ucsb_patches_drop_background(ucsb: Path) -> None:
    from common.data.images import read_image

    image = read_image(ucsb / "ytma10_010704_benign1_ccd.tif")
    patches, labels = tissue_patches(image, 32)
    assert labels is None
    assert 0 < len(patches) <= (896 // 32) * (768 // 32)
    white = np.full((64, 64, 3), 250, np.uint8)
    assert len(tissue_patches(white, 32)[0]) == 0


def test_pooled_auc_from_histograms_matches_exact() -> None:
    rng = np.random.default_rng(0)
    logits = np.concatenate([rng.normal(1, 1, 300), rng.normal(-1, 1, 300)])
    labels = np.array([1] * 300 + [0] * 300)
    halves = [EvalCounts.from_predictions(logits[i::2], labels[i::2], 0.0) for i in (0, 1)]
    pooled = halves[0] + halves[1]
    assert pooled.auc == pytest.approx(roc_auc(logits, labels), abs=2e-3)
    assert pooled.n == 600 and pooled.tp + pooled.fn == 300
    from common.checks import eval_counts

    back, problem = eval_counts(pooled.to_metrics())  # what the server reads back
    assert problem is None and back == pooled
    assert np.isnan(auc_from_histograms(np.ones(3), np.zeros(3)))


def test_patient_column_makes_the_patient_the_privacy_unit(tmp_path: Path) -> None:
    """A patient with k slides is one DP sample, and never on both sides of the split."""
    from PIL import Image

    from common.config import FederationConfig
    from common.site import Site, initial_model
    from common.training import get_weights

    rng = np.random.default_rng(0)
    rows = ["image,label,tma_group,patient"]
    for i in range(12):
        Image.fromarray(rng.integers(60, 200, (64, 64, 3), dtype=np.uint8)).save(
            tmp_path / f"s{i}.png")
        rows.append(f"s{i}.png,{(i // 2) % 2},g0,p{i // 2}")  # 6 patients x 2 slides
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = FederationConfig(sites=2, data=str(tmp_path), patch_size=16, batch_size=2)
    site = Site(cfg, 0, data=str(tmp_path))
    train, val = site.data.train, site.data.val
    assert set(train.patients or ()) and not set(train.patients or ()) & set(val.patients or ())
    assert site.privacy_unit == "patient"
    assert len(site.train_set) == len(set(train.patients or ())) == len(train) // 2
    report = site.train(get_weights(initial_model(cfg)), 1)
    assert report.n_samples == len(site.train_set)  # FedAvg weight: patients


def test_patient_column_must_be_complete(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("image,label,patient\na.png,1,p1\nb.png,0,\n")
    with pytest.raises(DataError, match="line 3: empty patient"):
        read_labels(tmp_path)


def test_annotation_masks_give_patch_labels_to_the_patch_cnn(tmp_path: Path) -> None:
    """labels.csv `mask` column: patch labels from annotations, used in DP training."""
    import torch
    from PIL import Image

    from common.config import FederationConfig
    from common.site import Site, initial_model
    from common.training import get_weights

    rng = np.random.default_rng(1)
    rows = ["image,label,tma_group,mask"]
    for i in range(8):
        img = rng.integers(120, 180, (64, 64, 3), dtype=np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        if i % 2:  # a tumour focus in the top-left quarter of positive slides
            img[:32, :32] = (90, 40, 140)
            mask[:32, :32] = 255
        Image.fromarray(img).save(tmp_path / f"s{i}.png")
        Image.fromarray(mask).save(tmp_path / f"s{i}-mask.png")
        rows.append(f"s{i}.png,{i % 2},g{i % 2},s{i}-mask.png")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = FederationConfig(sites=2, data=str(tmp_path), model="residual-patch-cnn",
                           patch_size=16, patches_per_slide=8, batch_size=2, val_fraction=0.25)
    site = Site(cfg, 0, data=str(tmp_path))
    tumour = site.data.train.instance_labels
    assert tumour is not None
    for label, patches in zip(site.data.train.labels, tumour):
        assert patches.sum() == (4 if label else 0)  # 4 of the 16 patches are tumour
    train = site._dataset("train", 1)
    assert train.tensors[1].shape == (len(site.data.train), 8)  # per-patch labels
    assert site._dataset("val", 0).tensors[1].dim() == 1  # slides are evaluated
    report = site.train(get_weights(initial_model(cfg)), 1)
    assert report.metrics["steps"] > 0 and report.metrics["epsilon"] > 0
    model = site._model(get_weights(initial_model(cfg))).eval()  # no dropout: compare
    x, y = train.tensors
    expected = torch.nn.functional.cross_entropy(
        model(x).reshape(-1, 2), y.long().reshape(-1), reduction="none").reshape(y.shape).mean(1)
    assert torch.allclose(model.sample_losses(x, y), expected)


def test_folder_of_site_files_gives_each_site_its_own(tmp_path: Path) -> None:
    from common.config import FederationConfig
    from common.data import load_site
    from common.site import feature_layout

    for i in range(3):
        save_site_file(synthetic_site(i, n_bags=12), tmp_path / f"site-{i}.npz")
    for i in range(3):
        assert load_site(i, 3, str(tmp_path), 0, 0.3).name == f"site-{i}"
    dim = synthetic_site(0, n_bags=4).train.dim
    assert feature_layout(FederationConfig(data=str(tmp_path))).dim == dim
    with pytest.raises(DataError, match="3 site files.*sites = 3"):
        load_site(0, 4, str(tmp_path), 0, 0.3)


def test_latest_checkpoint_past_round_999(tmp_path: Path) -> None:
    from common.runs import RunFolder

    run = RunFolder(tmp_path)
    for rnd in (998, 999, 1000, 1001):
        run.save_checkpoint(rnd, ["w"], [np.zeros(1, np.float32)])
    (tmp_path / "checkpoints" / "round-notes.txt").write_text("ignored")
    rnd, path = run.latest_checkpoint()
    assert rnd == 1001 and path.name == "round-1001.npz"


def test_threshold_calibrated_from_histograms_matches_brute_force() -> None:
    from common.metrics import EvalCounts

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 400)
    logits = rng.normal(2.0 * labels + 1.0, 1.0)  # every logit > 0: threshold 0 is poor
    counts = EvalCounts.from_predictions(logits, labels, 0.0)
    threshold, balanced = counts.calibrated()

    def at(t: float) -> float:
        pred = logits > t
        return ((pred & (labels == 1)).sum() / (labels == 1).sum()
                + (~pred & (labels == 0)).sum() / (labels == 0).sum()) / 2

    assert balanced == pytest.approx(at(threshold))
    best = max(at(t) for t in np.unique(logits))
    assert balanced >= best - 0.02 and balanced > counts.balanced_accuracy + 0.1
    assert np.isnan(EvalCounts.from_predictions(logits, np.ones(400), 0.0).calibrated()[1])


def test_one_detection_names_every_kind_of_data(tmp_path: Path) -> None:
    from common.data.sources import detect_source

    assert detect_source("").kind == "synthetic"
    save_site_file(synthetic_site(0, n_bags=10), tmp_path / "sites" / "site-0.npz")
    assert detect_source(tmp_path / "sites").kind == "site-folder"
    assert detect_source(tmp_path / "sites" / "site-0.npz").kind == "site-file"
    (tmp_path / "feats").mkdir()
    (tmp_path / "feats" / "manifest.csv").write_text("slide,status\n")
    assert detect_source(tmp_path / "feats").kind == "features"
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "labels.csv").write_text("image,label\n")
    assert detect_source(tmp_path / "images").kind == "images"
    assert detect_source(tmp_path / "images").small
    (tmp_path / "empty").mkdir()
    for bad, says in ((tmp_path / "nope", "not found"), (tmp_path / "empty", "holds no"),
                      (tmp_path / "x.npz", "not found"), (tmp_path / "images" / "labels.csv",
                                                           "not a data folder")):
        with pytest.raises(DataError, match=says) as err:
            detect_source(bad)
        assert str(bad) in str(err.value)


def test_data_modules_do_not_import_each_other() -> None:
    """bags, labels and featurefile are leaves (importing at most the row layout of
    multiscale, which imports none); each kind's reader imports only them; only sources
    dispatches over the kinds."""
    import ast

    folder = Path(__file__).parent.parent / "common" / "data"
    leaves = {"bags", "labels", "featurefile", "multiscale"}
    for path in folder.glob("*.py"):
        imported = {node.module.rsplit(".", 1)[-1] for node in ast.walk(ast.parse(
            path.read_text())) if isinstance(node, ast.ImportFrom) and node.module
            and node.module.startswith("common.data.")}
        if path.stem == "multiscale":
            assert not imported, (path.name, imported)
        elif path.stem in leaves:
            assert imported <= {"multiscale"}, (path.name, imported)
        elif path.stem not in ("sources", "__init__"):
            assert imported <= leaves, (path.name, imported)


def test_pooled_auc_resolves_a_barely_trained_model() -> None:
    """Scores within a few hundredths of 0 (a model under strong DP noise) still rank:
    the histogram AUC and the calibrated threshold follow the exact ones."""
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 2
    logits = 0.01 * labels + rng.normal(0, 0.003, 40) - 0.02
    counts = EvalCounts.from_predictions(logits, labels, 0.0)
    assert counts.auc == pytest.approx(roc_auc(logits, labels), abs=0.02)
    assert counts.auc > 0.9 and counts.accuracy == 0.5
    threshold, balanced = counts.calibrated()
    assert -0.02 < threshold < -0.005 and balanced > 0.9


def test_site_files_keep_image_patches_as_pixels(tmp_path: Path) -> None:
    from common.data import BagSet, SiteData, load_site_file, save_site_file

    rng = np.random.default_rng(0)
    bags = tuple(rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8) for n in (3, 5))
    site = SiteData("s", BagSet(bags, np.array([0, 1]), ("a", "b")),
                    BagSet(bags[:1], np.array([1]), ("c",)))
    back = load_site_file(save_site_file(site, tmp_path / "s.npz"))
    assert back.train.bags[1].dtype == np.uint8
    assert np.array_equal(back.train.bags[1], bags[1])
    assert back.train.to_patch_dataset(4, seed=0, stain_augment=0.1).tensors[0].shape == (
        2, 4, 3, 8, 8)  # stain augmentation needs pixels, not floats


def test_image_folders_can_be_stain_normalised(tmp_path: Path) -> None:
    from PIL import Image

    from common.config import FederationConfig
    from common.data.images import image_folder_site
    from common.data.sources import feature_provenance
    from common.wsi.synthetic import synthetic_tissue

    for i in range(4):
        Image.fromarray(synthetic_tissue(128, 96, seed=i, tissue_fraction=0.9)).save(
            tmp_path / f"im{i}.png")
    (tmp_path / "labels.csv").write_text("image,label\n" + "".join(
        f"im{i}.png,{i % 2}\n" for i in range(4)))
    raw = image_folder_site(tmp_path, 0, 1, patch_size=32)
    norm = image_folder_site(tmp_path, 0, 1, patch_size=32, stain="macenko")
    assert raw.train.bags[0].shape == norm.train.bags[0].shape
    assert not np.allclose(raw.train.bags[0], norm.train.bags[0])
    assert feature_provenance(str(tmp_path), 32, "color-texture", "macenko").endswith(
        ";stain=macenko:default")
    assert FederationConfig(stain_normalize="reinhard").to_run_config()[
        "stain-normalize"] == "reinhard"


def test_a_site_file_rewritten_in_place_is_read_again(tmp_path: Path) -> None:
    """Experiments rewrite one fold folder per fold: the per-process cache of sites must
    never serve the previous fold's slides (it did, and leaked test images into training)."""
    from common.data.bags import BagSet, SiteData, save_site_file
    from common.data.sources import load_site

    path = tmp_path / "site-0.npz"

    def write(value: float) -> None:
        bags = BagSet(tuple(np.full((3, 2), value, np.float32) for _ in range(4)),
                      np.array([0, 1, 0, 1]), tuple(f"s{i}" for i in range(4)))
        save_site_file(SiteData("site-0", bags, bags), path)

    write(1.0)
    assert load_site(0, 1, str(path), 0, 0.3).train.bags[0][0, 0] == 1.0
    write(2.0)
    assert load_site(0, 1, str(path), 0, 0.3).train.bags[0][0, 0] == 2.0
