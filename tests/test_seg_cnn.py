"""The segmentation CNN (common.models.seg_cnn): fitness for DP-SGD, per-slide gradients,
its loss, annotation masks through the data path, a private site round, and a federation
whose released model writes pixel masks with ``pathfed predict``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import FederationConfig
from common.errors import ConfigError, DataError
from common.models import build_model


def test_unet_passes_opacus_strict_validation_and_keeps_the_patch_size() -> None:
    from opacus.validators import ModuleValidator

    model = build_model("seg-cnn", patch_size=16)
    ModuleValidator.validate(model, strict=True)  # GroupNorm, no BatchNorm
    x = torch.randn(2, 3, 3, 16, 16)
    assert model(x).shape == (2, 3, 16, 16)
    assert model.segment(x[0]).shape == (3, 16, 16)  # type: ignore[operator]
    assert model.scores(x).shape == (2,)  # type: ignore[operator]
    with pytest.raises(ValueError, match="multiple of 4"):
        build_model("seg-cnn", patch_size=18)


def test_per_slide_gradients_match_one_slide_at_a_time() -> None:
    from common.training import _vmap_grad_samples

    torch.manual_seed(0)
    model = build_model("seg-cnn", patch_size=16, width=4)
    x = torch.randn(3, 4, 3, 16, 16)
    masks = (torch.rand(3, 4, 16, 16) > 0.7).float()
    _vmap_grad_samples(model, [x, masks])
    per_slide = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    for i in range(3):
        model.zero_grad()
        model.sample_losses(x[i:i + 1], masks[i:i + 1]).sum().backward()  # type: ignore[operator]
        for n, p in model.named_parameters():
            assert torch.allclose(per_slide[n][i], p.grad, atol=1e-5), n


def test_loss_is_cross_entropy_plus_the_slides_soft_dice() -> None:
    from common.models.seg_cnn import DICE_SMOOTH, segmentation_losses

    truth = torch.zeros(2, 2, 4, 4)
    truth[0, 0, :2] = 1.0  # slide 0: tumour in 8 of its 32 pixels; slide 1: none
    confident = (truth * 2 - 1) * 30.0  # logits that are right everywhere
    perfect = segmentation_losses(confident, truth)
    assert perfect.shape == (2,) and float(perfect.max()) < 1e-6
    half = segmentation_losses(torch.zeros_like(truth), truth, dice_weight=1.0)
    bce = float(np.log(2))
    dice0 = (2 * 0.5 * 8 + DICE_SMOOTH) / (0.5 * 32 + 8 + DICE_SMOOTH)
    dice1 = DICE_SMOOTH / (0.5 * 32 + DICE_SMOOTH)
    assert half.tolist() == pytest.approx([bce + 1 - dice0, bce + 1 - dice1], rel=1e-5)
    assert segmentation_losses(torch.zeros_like(truth), truth, 0.0).tolist() == \
        pytest.approx([bce, bce], rel=1e-5)
    with pytest.raises(ValueError, match="masks of shape"):
        segmentation_losses(torch.zeros(2, 2, 4, 4), torch.zeros(2, 2, 4))


def _folder(folder: Path, n: int, seed: int, size: int = 64, masks: bool = True,
            beside: bool = False) -> Path:
    """``n`` images with labels.csv; odd ones hold a purple tumour disc (off the patch
    grid) that their mask annotates (in ``masks/``, or ``beside`` the images)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = ["image,label,tma_group" + (",mask" if masks else "")]
    yy, xx = np.ogrid[:size, :size]
    for i in range(n):
        image = rng.integers(150, 190, (size, size, 3), dtype=np.uint8)
        image[..., 1] = rng.integers(90, 130, (size, size), dtype=np.uint8)  # pinkish tissue
        mask = np.zeros((size, size), np.uint8)
        if i % 2:
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 5) ** 2
            image[disc] = np.array([110, 40, 150]) + rng.integers(
                -20, 20, (int(disc.sum()), 3))
            mask[disc] = 255
        Image.fromarray(image).save(folder / f"s{i}.png")
        mask_name = f"s{i}-mask.png" if beside else f"masks/s{i}.png"
        (folder / "masks").mkdir(exist_ok=True)
        Image.fromarray(mask).save(folder / mask_name)
        rows.append(f"s{i}.png,{i % 2},g{(i // 2) % 2}" + (f",{mask_name}" if masks else ""))
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def test_masks_reach_a_site_round(tmp_path: Path) -> None:
    """labels.csv `mask` column: each patch's piece of the mask is the segmenter's target
    (patients keep theirs), and a site trains on them (DP: the federation test below)."""
    from common.data.images import tumour_labels
    from common.site import Site, initial_model
    from common.training import get_weights

    data = _folder(tmp_path / "data", 8, seed=0)
    cfg = FederationConfig(sites=2, data=str(data), model="seg-cnn", patch_size=16,
                           patches_per_slide=8, batch_size=2, val_fraction=0.25,
                           model_options="width=4", dp=False)
    site = Site(cfg, 0, data=str(data))
    masks, labels = site.data.train.instance_masks, site.data.train.instance_labels
    assert masks is not None and labels is not None
    for bag, piece, patch_labels in zip(site.data.train.bags, masks, labels):
        assert piece.shape == bag.shape[:3] and set(np.unique(piece)) <= {0, 1}
        assert (tumour_labels(piece) == patch_labels).all()
    positive = [m.sum() for m, y in zip(masks, site.data.train.labels) if y]
    assert positive and all(p > 0 for p in positive)
    train = site._dataset("train", 1)
    assert train.tensors[1].shape == (len(site.data.train), 8, 16, 16)
    assert site._dataset("val", 0).tensors[1].dim() == 1  # slides are validated
    report = site.train(get_weights(initial_model(cfg)), 1)
    assert report.metrics["steps"] > 0 and report.metrics["epsilon"] == 0
    assert all(np.isfinite(u).all() for u in report.update)
    assert any(np.abs(u).max() > 0 for u in report.update)
    by_patient = site.data.train.__class__(
        site.data.train.bags, site.data.train.labels, site.data.train.names,
        patients=("p",) * len(site.data.train), instance_labels=labels,
        instance_masks=masks).by_patient()
    assert by_patient.instance_masks is not None
    assert by_patient.instance_masks[0].shape[0] == sum(len(b) for b in site.data.train.bags)


def test_a_segmenter_without_masks_or_with_mixpatch_is_refused(tmp_path: Path) -> None:
    from common.site import Site

    data = _folder(tmp_path / "plain", 6, seed=0, masks=False)
    cfg = FederationConfig(sites=2, data=str(data), model="seg-cnn", patch_size=16)
    with pytest.raises(DataError, match="has a mask column"):
        Site(cfg, 0, data=str(data))
    with pytest.raises(ConfigError, match="mixpatch: .*learns annotation masks"):
        FederationConfig.from_mapping({"model": "seg-cnn", "mixpatch": True})


@pytest.mark.slow
def test_segmenter_federation_audits_and_predicts_pixel_masks(tmp_path: Path) -> None:
    """A 2-hospital federation of the segmenter on annotated images: without DP it learns
    the tumour discs (pixel Dice of `pathfed predict` on new images above 0.6); with DP
    its ledger audits. Annotation masks in the folder are not predicted on."""
    from common.audit import audit_run
    from common.fedavg import run_inprocess
    from common.predict import predict

    data = _folder(tmp_path / "train", 16, seed=0)
    base = {"data": str(data), "model": "seg-cnn", "sites": 2, "patch-size": 16,
            "patches-per-slide": 16, "batch-size": 4, "local-epochs": 2, "lr": 0.01,
            "optimizer": "adam", "secagg": False}
    run_inprocess(FederationConfig.from_mapping({**base, "rounds": 5, "dp": False}),
                  run_dir=tmp_path / "plain")
    test = _folder(tmp_path / "test", 8, seed=1, beside=True)
    summary = predict(test, tmp_path / "plain", tmp_path / "out", progress=False,
                      heatmaps=False)
    # the annotation masks beside the images are not slides to predict on
    assert sorted(r.slide for r in summary.rows) == [f"s{i}.png" for i in range(8)]
    tumour = [r for r in summary.rows if int(r.slide[1]) % 2]
    assert np.mean([r.dice for r in tumour]) > 0.6, [(r.slide, r.dice) for r in tumour]
    with Image.open(tmp_path / "out" / "masks" / "s1.png") as im:
        mask = np.asarray(im)
    assert mask.shape == (64, 64) and 0 < (mask > 0).mean() < 0.5  # pixels, not squares
    with (tmp_path / "out" / "predictions.csv").open() as fh:
        assert {r["status"] for r in csv.DictReader(fh)} == {"done"}
    from tests.conftest import run_cli

    strict = run_cli("predict", str(test), "--model", str(tmp_path / "plain"), "--out",
                     str(tmp_path / "strict"), "--pixel-threshold", "0.95", "--no-heatmaps",
                     "--no-progress")
    assert strict.returncode == 0, strict.stderr
    with Image.open(tmp_path / "strict" / "masks" / "s1.png") as im:
        assert (np.asarray(im) > 0).sum() < (mask > 0).sum()  # fewer pixels pass 0.95
    bad = run_cli("predict", str(test), "--model", str(tmp_path / "plain"), "--out",
                  str(tmp_path / "bad"), "--pixel-threshold", "1")
    assert bad.returncode == 2 and "--pixel-threshold 1.0: a probability" in bad.stderr

    private = run_inprocess(FederationConfig.from_mapping({**base, "rounds": 2, "dp": True}),
                            run_dir=tmp_path / "private")
    assert all(0 < e <= 8.0 * (1 + 1e-9) for e in private.epsilon.values())
    report = audit_run(tmp_path / "private")  # every DP-SGD step recomputed from the ledger
    assert report.ok, report.all_problems


def test_generated_slides_become_an_annotated_image_folder(tmp_path: Path) -> None:
    """simulations.segmentation reads the WSI demo's slides at 1 um/px into an image folder
    with masks of the same size, which a patch model's site loads with its annotations."""
    from common.data.images import image_folder_site
    from simulations.segmentation import _model, slides_as_images
    from simulations.wsi_demo import make_slides

    slides = make_slides(tmp_path / "slides", 1, 2, size=(256, 192))
    images = slides_as_images(slides, tmp_path / "images")
    rows = list(csv.DictReader((images / "labels.csv").open()))
    assert [r["label"] for r in rows] == ["0", "1"]
    for row in rows:
        with Image.open(images / row["image"]) as im, Image.open(images / row["mask"]) as m:
            assert im.size == m.size == (128, 96)  # 0.5 um/px slides read at 1 um/px
    with Image.open(images / rows[1]["mask"]) as m:
        assert 0 < (np.asarray(m) > 0).mean() < 0.2  # the tumour focus, about 5 %
    site = image_folder_site(images, 0, 1, val_fraction=0.5, patch_size=32, encoder=None)
    assert site.train.instance_masks is not None
    assert _model("seg-cnn:width=4,dice_weight=0.5") == (
        "seg-cnn", "width=4,dice_weight=0.5", "seg-cnn-width-4+dice_weight-0.5")
