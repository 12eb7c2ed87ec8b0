"""``pathfed predict``: a released model on new slides, heatmaps, QuPath GeoJSON, masks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from common.errors import ConfigError, DataError
from common.explain.geojson import check_geojson
from common.release import RELEASE, ModelCard, load_model, release_bytes
from common.runs import RunFolder
from common.wsi.extract import prepare
from simulations.wsi_demo import make_slides
from tests.conftest import run_cli


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "predictions.csv").open() as fh:
        return {r["slide"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_slides(tmp_path_factory.mktemp("pred") / "slides", 2, 4, size=(768, 512))
    (folder / "junk.svs").write_text("not a slide\n")  # a bad slide fails alone
    return folder


@pytest.fixture(scope="module")
def features(slides: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pred") / "features"
    prepare(slides, out, mpp=1.0, patch_size=32, progress=False)
    return out


def _release(folder: Path, features: Path, model: str = "gated-attention-mil",
             key: bytes | None = None, options: str = "") -> Path:
    """A released model with a fresh (seeded) initialisation, as a run writes it."""
    import torch

    from common.models import build_model, parse_model_options

    torch.manual_seed(0)
    net = build_model(model, in_dim=21, **parse_model_options(model, options))
    with h5py.File(next(features.glob("*.h5"))) as h5:
        settings = str(h5.attrs["settings"])
    card = ModelCard(model=model, model_options=options, kind="bags", in_dim=21, children=0,
                     features=settings, threshold=0.0, round=3, run_id="run-x")
    names = list(net.state_dict())
    weights = [v.numpy() for v in net.state_dict().values()]
    return RunFolder(folder, key, "run-x").save_release(RELEASE,
                                                         release_bytes(names, weights, card))


def test_predictions_on_features_and_on_slides_agree(slides: Path, features: Path,
                                                     tmp_path: Path) -> None:
    model = _release(tmp_path / "run", features)
    r = run_cli("predict", str(features), "--model", str(tmp_path / "run"), "--out",
                str(tmp_path / "a"), "--slides", str(slides), "--no-progress")
    assert r.returncode == 1 and "1 slide(s) failed" in r.stderr  # junk.svs, alone
    a = _rows(tmp_path / "a")
    assert a["junk.svs"]["status"] == "failed" and "not a slide format" in a["junk.svs"]["reason"]
    done = [k for k, v in a.items() if v["status"] == "done"]
    assert len(done) == 8
    r = run_cli("predict", str(slides), "--model", str(model), "--out", str(tmp_path / "b"),
                "--no-progress")
    b = _rows(tmp_path / "b")
    for name in done:  # prepared on the fly with the card's settings: the same numbers
        assert a[name]["probability"] == b[name]["probability"], name
        assert a[name]["label"] == str(int(float(a[name]["logit"]) > 0.0))
        assert len(a[name]["top_patches"].split(";")) == 8
    stem = Path(done[0]).stem
    with h5py.File(tmp_path / "a" / f"{stem}_scores.h5") as h5:
        assert h5["scores"].shape == (int(a[done[0]]["n_patches"]),) == h5["coords"].shape[:1]
        assert np.isclose(h5["scores"][:].sum(), 1.0, atol=1e-4)  # attention weights
    assert (tmp_path / "a" / "heatmaps" / f"{stem}.png").stat().st_size > 5000
    assert len(list((tmp_path / "a" / "heatmaps" / f"{stem}_top").glob("*.png"))) == 8
    assert (tmp_path / "a" / "masks" / f"{stem}.png").is_file()


def test_geojson_opens_in_qupath_and_lies_on_the_slide(features: Path, tmp_path: Path) -> None:
    from common.predict import predict

    _release(tmp_path / "run", features)
    summary = predict(features, tmp_path / "run", tmp_path / "out", progress=False,
                      heatmaps=False, segment_threshold=1.0, threshold=-100.0)
    assert summary.counts["done"] == 8
    for row in summary.rows:
        if row.status != "done":
            continue
        stem = Path(row.slide).stem
        collection = json.loads((tmp_path / "out" / "geojson" / f"{stem}.geojson").read_text())
        with h5py.File(features / f"{stem}.h5") as h5:
            dims = tuple(int(v) for v in h5.attrs["slide_dimensions"])
        assert check_geojson(collection, dims) == []  # type: ignore[arg-type]
        kinds = [f["properties"]["objectType"] for f in collection["features"]]
        assert kinds.count("tile") == row.n_patches
        assert kinds.count("annotation") >= 1  # every slide is positive at logit -100
        tile = collection["features"][0]
        assert tile["geometry"]["type"] == "Polygon"
        assert set(tile["properties"]["measurements"]) == {"score", "rank score",
                                                           "slide probability"}
        assert tile["properties"]["classification"]["color"] in ([200, 0, 0], [20, 120, 20])
    bad = {"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [
            [[0, 0], [9e9, 0], [9e9, 9], [0, 9], [0, 0]]]},
        "properties": {"objectType": "tile", "classification": {"name": "Tumor"},
                       "measurements": {"score": float("nan")}}}]}
    problems = " ".join(check_geojson(bad, (100, 100)))
    assert "color" in problems and "finite" in problems and "outside the slide" in problems


def test_a_sealed_model_needs_its_key(features: Path, tmp_path: Path) -> None:
    from common.crypto.sealed import SUFFIX

    key = bytes(range(32))
    path = _release(tmp_path / "run", features, key=key)
    assert path.name == RELEASE + SUFFIX
    with pytest.raises(DataError, match="encrypted"):
        load_model(tmp_path / "run")
    (tmp_path / "key").write_bytes(key.hex().encode())
    weights, card, _ = load_model(tmp_path / "run", key)
    assert card is not None and card.run_id == "run-x" and len(weights) == 10
    r = run_cli("predict", str(features), "--model", str(path), "--out", str(tmp_path / "o"),
                "--no-progress")
    assert r.returncode == 2 and "give the key" in r.stderr


def test_features_made_otherwise_are_refused_in_one_line(slides: Path, features: Path,
                                                         tmp_path: Path) -> None:
    from common.predict import predict

    _release(tmp_path / "run", features)
    other = tmp_path / "other"
    prepare(slides, other, mpp=1.0, patch_size=32, encoder="resnet-tiny", progress=False)
    with pytest.raises(ConfigError, match="encoder=resnet-tiny.*expects encoder=color-texture"):
        predict(other, tmp_path / "run", tmp_path / "o", progress=False)
    coarse = tmp_path / "coarse"
    prepare(slides, coarse, mpp=2.0, patch_size=32, progress=False)
    r = run_cli("predict", str(coarse), "--model", str(tmp_path / "run"), "--out",
                str(tmp_path / "o2"))
    assert r.returncode == 2 and "mpp=2, the model expects mpp=1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="--encoder resnet-tiny: the model was trained on "
                       "features of encoder 'color-texture'"):
        predict(features, tmp_path / "run", tmp_path / "o4", encoder="resnet-tiny")
    RunFolder(tmp_path / "r2").save_checkpoint(1, ["a"], [np.zeros(2)])
    with pytest.raises(ConfigError, match="round checkpoint carries no model card"):
        predict(features, tmp_path / "r2" / "checkpoints" / "round-001.npz", tmp_path / "o3")


def test_mc_dropout_uncertainty_and_abstention(features: Path, tmp_path: Path) -> None:
    from common.predict import predict

    _release(tmp_path / "run", features, options="dropout=0.5")
    summary = predict(features, tmp_path / "run", tmp_path / "o", progress=False,
                      heatmaps=False, passes=8, max_uncertainty=0.0)
    done = [r for r in summary.rows if r.status == "done"]
    assert all(r.uncertainty is not None and r.uncertainty > 0 for r in done)
    assert all(r.abstained and r.tumour_patches == 0 for r in done)  # abstained: no mask


@pytest.mark.slow
def test_a_trained_attention_model_segments_the_tumour(tmp_path: Path) -> None:
    """Train gated attention-MIL on generated slides with tumour foci (slide labels only),
    then predict on new slides of the same kind: Dice of the tumour mask above 0.5."""
    from common.config import FederationConfig
    from common.fedavg import run_inprocess
    from common.predict import predict

    train = make_slides(tmp_path / "train", 2, 16, size=(768, 512))
    prepare(train, tmp_path / "features", mpp=1.0, patch_size=32, progress=False)
    cfg = FederationConfig(sites=2, rounds=8, data=str(tmp_path / "features"), batch_size=8,
                           local_epochs=2, optimizer="adam", lr=0.01, dp=False, secagg=False)
    run_inprocess(cfg, run_dir=tmp_path / "run")
    test = make_slides(tmp_path / "test", 1, 10, size=(768, 512), seed=5)
    summary = predict(test, tmp_path / "run", tmp_path / "out", progress=False)
    with (test / "labels.csv").open() as fh:
        positive = {r["slide"] for r in csv.DictReader(fh) if r["label"] == "1"}
    tumour = [r for r in summary.rows if r.slide in positive]
    assert all(r.label == 1 for r in tumour)
    dice = float(np.mean([r.dice for r in tumour]))
    assert dice > 0.5, [(r.slide, r.dice) for r in tumour]
    from cli.audit import render_html
    from common.audit import audit_run

    page = render_html(audit_run(tmp_path / "run"))  # the run's report shows the model
    assert "Validation ROC and calibration (round 8" in page
    assert page.count("<h2>Validation slide ") == 3


def test_roc_and_calibration_from_the_pooled_histograms() -> None:
    from common.metrics import (
        EvalCounts,
        calibration_from_histograms,
        roc_auc,
        roc_from_histograms,
    )

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    logits = rng.normal(0, 1, 400) + 1.5 * (labels - 0.5)
    counts = EvalCounts.from_predictions(logits, labels, 0.0)
    fpr, tpr = roc_from_histograms(np.array(counts.hist_pos), np.array(counts.hist_neg))
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(logits, labels), abs=0.01)
    mean_p, frac, n = calibration_from_histograms(np.array(counts.hist_pos),
                                                  np.array(counts.hist_neg))
    assert n.sum() == 400 and np.all(np.diff(mean_p) > 0)
    prob = 1 / (1 + np.exp(-logits))
    top = prob >= 0.9
    assert frac[-1] == pytest.approx(labels[top].mean(), abs=0.05)


def test_a_patch_model_on_an_image_folder_with_test_time_augmentation(tmp_path: Path) -> None:
    """The seed's patch CNN: per-patch probabilities are its scores, rotations and flips
    its uncertainty; images are cut as training cut them."""
    import torch
    from PIL import Image

    from common.models import build_model
    from common.predict import predict
    from common.wsi.synthetic import synthetic_tissue

    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(synthetic_tissue(160, 128, seed=i, tissue_fraction=0.8)).save(
            images / f"im{i}.png")
    (images / "labels.csv").write_text("image,label\nim0.png,0\nim1.png,1\nim2.png,0\n")
    torch.manual_seed(0)
    net = build_model("residual-patch-cnn", patch_size=32)
    card = ModelCard(model="residual-patch-cnn", model_options="", kind="patches", in_dim=0,
                     children=0, features="images;patch=32;encoder=none;weights=none",
                     threshold=0.0, round=1, run_id="r")
    RunFolder(tmp_path / "run").save_release(RELEASE, release_bytes(
        list(net.state_dict()), [v.numpy() for v in net.state_dict().values()], card))
    summary = predict(images, tmp_path / "run", tmp_path / "out", progress=False, passes=4)
    assert summary.counts == {"done": 3, "failed": 0}
    for row in summary.rows:
        assert row.uncertainty is not None and row.uncertainty >= 0
        with h5py.File(tmp_path / "out" / f"{Path(row.slide).stem}_scores.h5") as h5:
            scores = h5["scores"][:]
        assert len(scores) == row.n_patches > 0 and ((scores >= 0) & (scores <= 1)).all()
    assert (tmp_path / "out" / "heatmaps" / "im1.png").is_file()
    assert len(list((tmp_path / "out" / "heatmaps" / "im1_top").glob("*.png"))) == 8


def test_ranks_keep_negligible_attention_at_the_bottom() -> None:
    from common.explain.segment import dice_iou, rank_normalise, relative_scores, tumour_patches

    scores = np.array([0.5, 0.3, 0.2, 1e-9, 2e-9, 0.0])
    ranks = rank_normalise(scores)
    assert list(ranks[:3]) == [1.0, 0.8, 0.6] and set(ranks[3:]) == {0.0}
    assert relative_scores(scores)[0] == pytest.approx(3.0)
    assert list(tumour_patches(scores, True, 1.5)) == [True, True, False, False, False, False]
    assert not tumour_patches(scores, False).any()
    assert dice_iou(np.array([1, 1, 0], bool), np.array([1, 0, 0], bool)) == (2 / 3, 0.5)
    assert dice_iou(np.zeros(3, bool), np.zeros(3, bool)) == (1.0, 1.0)


def test_a_multiscale_model_scores_every_high_power_patch(slides: Path, tmp_path: Path) -> None:
    """Regions in, one score per 1 um/px patch out: its region's weight times its share of
    the cross-scale attention, in the feature file's patch order."""
    import torch

    from common.models import build_model
    from common.predict import predict

    features = tmp_path / "ms"
    prepare(slides, features, mpp=1.0, context_mpp=(4.0,), patch_size=32, progress=False)
    with h5py.File(next(features.glob("h*.h5"))) as h5:
        settings = str(h5.attrs["settings"])
    torch.manual_seed(0)
    net = build_model("multiscale-mil", in_dim=21, children=16)
    card = ModelCard(model="multiscale-mil", model_options="", kind="multiscale", in_dim=21,
                     children=16, features=settings, threshold=0.0, round=1, run_id="r")
    RunFolder(tmp_path / "run").save_release(RELEASE, release_bytes(
        list(net.state_dict()), [v.numpy() for v in net.state_dict().values()], card))
    summary = predict(features, tmp_path / "run", tmp_path / "out", progress=False,
                      heatmaps=False)
    row = next(r for r in summary.rows if r.status == "done")
    stem = Path(row.slide).stem
    with h5py.File(tmp_path / "out" / f"{stem}_scores.h5") as h5, \
            h5py.File(features / f"{stem}.h5") as fh:
        assert np.array_equal(h5["coords"][:], fh["coords"][:])  # the finest patches
        assert np.isclose(h5["scores"][:].sum(), 1.0, atol=1e-4)
    assert row.n_patches == len(fh_coords(features / f"{stem}.h5"))


def fh_coords(path: Path) -> np.ndarray:
    with h5py.File(path) as h5:
        return np.asarray(h5["coords"])


def test_slides_are_prepared_with_the_model_s_stain_normalisation(slides: Path,
                                                                   tmp_path: Path) -> None:
    from common.predict import predict

    features = tmp_path / "norm"
    prepare(slides, features, mpp=1.0, patch_size=32, progress=False,
            stain_normalize="reinhard")
    _release(tmp_path / "run", features)
    a = predict(features, tmp_path / "run", tmp_path / "a", progress=False, heatmaps=False)
    b = predict(slides, tmp_path / "run", tmp_path / "b", progress=False, heatmaps=False)
    assert ";stain=reinhard:default" in a.card.features
    got = {r.slide: r.probability for r in b.rows if r.status == "done"}
    assert got and all(got[r.slide] == r.probability for r in a.rows if r.status == "done")
    raw = tmp_path / "raw"
    prepare(slides, raw, mpp=1.0, patch_size=32, progress=False)
    with pytest.raises(ConfigError, match="stain=none, the model expects stain=reinhard"):
        predict(raw, tmp_path / "run", tmp_path / "c", progress=False)


def test_a_federation_can_start_from_a_released_model(features: Path, tmp_path: Path) -> None:
    from common.config import FederationConfig
    from common.site import initial_model

    _release(tmp_path / "run", features)
    weights, _, _ = load_model(tmp_path / "run")
    cfg = FederationConfig(data=str(features), init=str(tmp_path / "run"), seed=5)
    model = initial_model(cfg)  # the released weights, whatever the seed
    assert all(np.array_equal(v.numpy(), weights[k]) for k, v in model.state_dict().items())
    assert not np.array_equal(initial_model(cfg.model_copy(update={"init": ""})).state_dict()[
        "classifier.weight"].numpy(), weights["classifier.weight"])
    with pytest.raises(ConfigError, match="is a gated-attention-mil.*this run trains dsmil"):
        initial_model(cfg.model_copy(update={"model": "dsmil"}))
    with pytest.raises(ConfigError, match="does not fit"):
        initial_model(cfg.model_copy(update={"data": ""}))  # 32 synthetic features, not 21


@pytest.mark.slow
def test_finetune_adapts_a_released_model_under_the_site_s_budget(
        slides: Path, features: Path, tmp_path: Path) -> None:
    from common.audit import audit_run
    from common.config import FederationConfig
    from common.finetune import finetune

    _release(tmp_path / "base", features)
    cfg = FederationConfig(data=str(features), rounds=2, batch_size=2, epsilon=4.0)
    result = finetune(tmp_path / "base", cfg, tmp_path / "ft")
    assert 0 < result.epsilon <= 4.0 and set(result.before) == {"auc", "accuracy",
                                                                 "balanced_accuracy"}
    weights, card, _ = load_model(tmp_path / "ft")
    assert card is not None and card.features == load_model(tmp_path / "base")[1].features
    assert audit_run(tmp_path / "ft").ok
    other = tmp_path / "other"
    prepare(slides, other, mpp=2.0, patch_size=32, progress=False)
    with pytest.raises(ConfigError, match="mpp=2, the model's with mpp=1"):
        finetune(tmp_path / "base", cfg.model_copy(update={"data": str(other)}),
                 tmp_path / "ft2")
    r = run_cli("finetune", str(tmp_path / "base"), "--data", str(features), "--out",
                str(tmp_path / "ft3"), "--rounds", "1", "--set", "batch-size=2", "--freeze",
                "embed,attention_v,attention_u")
    assert r.returncode == 0 and "held-out AUC" in r.stdout, r.stderr
    base, tuned = load_model(tmp_path / "base")[0], load_model(tmp_path / "ft3")[0]
    for name in base:  # frozen layers kept exactly; the rest adapted under DP
        frozen = name.startswith(("embed.", "attention_v.", "attention_u."))
        assert np.array_equal(base[name], tuned[name]) == frozen, name
    r = run_cli("finetune", str(tmp_path / "base"), "--data", str(features), "--out",
                str(tmp_path / "ft4"), "--freeze", "encoder")
    assert r.returncode == 2 and "no parameters under encoder; its parameter groups are " \
        "attention_u.0, attention_v.0, attention_w, classifier, embed.0" in r.stderr, r.stderr


def test_sites_whose_features_differ_are_named(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from common.config import FederationConfig
    from common.rounds import RoundBook

    book = RoundBook(FederationConfig(), ["w"], [np.zeros(2)], None)
    with caplog.at_level(logging.WARNING, logger="common.rounds"):
        book._note_features("site-0", "mpp=1;encoder=color-texture")
        book._note_features("site-1", "mpp=1;encoder=color-texture")
        assert not caplog.records
        book._note_features("site-2", "mpp=1;encoder=resnet-tiny")
        book._note_features("site-3", 42)  # a hostile reply: ignored
        book._note_features("site-4", "x" * 501)
    assert len(caplog.records) == 1 and "site-2 made its features otherwise" in caplog.text
    assert set(book.features) == {"site-0", "site-1", "site-2"}
