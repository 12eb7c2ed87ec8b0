"""Multi-scale features: regions and their children, from prepare to the model."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from common.data import load_site, load_site_file, save_site_file
from common.data.multiscale import Layout, high_power, pack_regions, unpack
from common.errors import DataError
from common.wsi.extract import prepare
from common.wsi.synthetic import synthetic_slide
from tests._bags import assert_per_bag_gradients, bags, build
from tests.conftest import CMU_SLIDE, run_cli


def test_regions_pack_unpack_and_refuse_what_does_not_fit() -> None:
    rng = np.random.default_rng(0)
    low = rng.normal(size=(3, 5)).astype(np.float32)
    high = rng.normal(size=(6, 5)).astype(np.float32)
    parent = np.array([2, 0, 2, 2, 0, 1])
    rows = pack_regions(low, high, parent, children=4)
    layout = Layout(5, 4)
    assert rows.shape == (3, layout.width) and Layout.of_width(layout.width, 4) == layout
    got_low, got_high, present = unpack(rows, layout)
    assert np.array_equal(got_low, low)
    assert present.sum(1).tolist() == [2, 1, 3]
    assert np.array_equal(got_high[2, :3], high[[0, 2, 3]])  # in their original order
    assert np.array_equal(got_high[0, :2], high[[1, 4]]) and not got_high[1, 1:].any()
    assert np.array_equal(high_power(rows, layout), high[[1, 4, 5, 0, 2, 3]])
    with pytest.raises(DataError, match="3 children, more than the 2"):
        pack_regions(low, high, parent, children=2)
    with pytest.raises(DataError, match="outside"):
        pack_regions(low, high, parent + 1, children=4)
    with pytest.raises(DataError, match="not multi-scale rows"):
        Layout.of_width(layout.width + 1, 4)
    t_low, t_high, t_present = unpack(torch.from_numpy(rows), layout)  # torch alike
    assert torch.equal(t_high, torch.from_numpy(got_high)) and t_present.dtype == torch.bool


def test_synthetic_multiscale_bags_and_site_files(tmp_path: Path) -> None:
    from common.data.synthetic import SYNTHETIC_CHILDREN, synthetic_multiscale_site

    site = synthetic_multiscale_site(1, seed=3, n_bags=20)
    again = synthetic_multiscale_site(1, seed=3, n_bags=20)
    assert all(np.array_equal(a, b) for a, b in zip(site.train.bags, again.train.bags))
    assert site.train.layout == Layout(32, SYNTHETIC_CHILDREN)
    assert set(site.train.labels) | set(site.val.labels) == {0, 1}
    path = save_site_file(site, tmp_path / "site-0.npz")
    back = load_site_file(path)
    assert back.train.children == SYNTHETIC_CHILDREN
    assert all(np.array_equal(a, b) for a, b in zip(site.val.bags, back.val.bags))
    single = load_site(0, 1, str(path), 0, 0.3)  # a bag model: the high-power patches
    assert single.train.children == 0 and single.train.dim == 32
    assert np.array_equal(single.train.bags[0], high_power(site.train.bags[0],
                                                           site.train.layout))
    assert load_site(0, 1, str(path), 0, 0.3, multiscale=True).train.children == 4
    plain = save_site_file(single, tmp_path / "plain.npz")
    with pytest.raises(DataError, match=r"--mpp 0.5,2.0"):
        load_site(0, 1, str(plain), 0, 0.3, multiscale=True)


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ms-slides")
    for i in range(4):
        synthetic_slide(folder / f"s{i}.tif", 768, 512, seed=i)
    (folder / "labels.csv").write_text("slide,label,site\ns0.tif,0,a\ns1.tif,1,a\n"
                                       "s2.tif,0,b\ns3.tif,1,b\n")
    return folder


def test_prepare_links_every_patch_to_its_coarse_parent(slides: Path, tmp_path: Path) -> None:
    from common.features import get_encoder
    from common.wsi import open_slide

    out = tmp_path / "ms"
    summary = prepare(slides, out, mpp=1.0, context_mpp=(4.0,), patch_size=32, progress=False)
    assert summary.counts["done"] == 4
    single = tmp_path / "single"
    prepare(slides, single, mpp=1.0, patch_size=32, progress=False)
    with h5py.File(out / "s1.h5") as h5, h5py.File(single / "s1.h5") as one:
        # the finest scale is the single-scale file's, so every single-scale reader is served
        assert np.array_equal(h5["features"][:], one["features"][:])
        assert list(h5.attrs["context_mpp"]) == [4.0]
        group = h5["scale_4"]
        coords, fine, parent = group["coords"][:], h5["coords"][:], group["parent"][:]
        size = group.attrs["size_baseline"]
        assert size == 256 and group.attrs["children"] == 16  # 32 px at 4 um/px over 0.5 um/px
        centre = fine + 64 / 2  # a 32-px patch at 1 um/px is 64 baseline px
        assert ((centre >= coords[parent]) & (centre < coords[parent] + size)).all()
        assert np.bincount(parent).min() >= 1 and np.bincount(parent).max() <= 16
        with open_slide(slides / "s1.tif") as reader:
            patch = reader.read_at_mpp(tuple(coords[0]), (32, 32), 4.0)
        expected = get_encoder("color-texture")(patch[None])[0]
        assert np.allclose(group["features"][0], expected, atol=1e-5)
    rows = {r.slide: r for r in summary.results}
    assert rows["s1.tif"].settings.startswith("mpp=1,4;")
    again = prepare(slides, out, mpp=1.0, context_mpp=(4.0,), patch_size=32, progress=False)
    assert again.counts["skipped"] == 4  # the same scales: nothing to do
    assert prepare(slides, out, mpp=1.0, patch_size=32, progress=False).counts["done"] == 4


def test_a_multiscale_folder_serves_both_kinds_of_model(slides: Path, tmp_path: Path) -> None:
    out = tmp_path / "ms"
    prepare(slides, out, mpp=1.0, context_mpp=(4.0,), patch_size=32, progress=False)
    regions = load_site(0, 1, str(out), 0, 0.5, multiscale=True)
    patches = load_site(0, 1, str(out), 0, 0.5)
    assert regions.train.layout == Layout(21, 16) and patches.train.children == 0
    for rows, bag in zip(regions.train.bags, patches.train.bags):
        assert np.array_equal(np.sort(high_power(rows, regions.train.layout), axis=0),
                              np.sort(bag, axis=0))  # the same patches, grouped by region
    from common.config import FederationConfig
    from common.site import initial_model

    model = initial_model(FederationConfig(model="multiscale-mil", data=str(out), sites=2))
    assert model.layout == Layout(21, 16)
    single = tmp_path / "single"
    prepare(slides, single, mpp=1.0, patch_size=32, progress=False)
    with pytest.raises(DataError, match=r"one scale \(1 um/px\).*--mpp 1,4"):
        load_site(0, 1, str(single), 0, 0.5, multiscale=True)
    r = run_cli("simulate", "--data", str(single), "--set", "model=multiscale-mil")
    assert r.returncode == 2 and "--mpp 1,4" in r.stderr and "Traceback" not in r.stderr


def test_prepare_refuses_scales_out_of_order(slides: Path, tmp_path: Path) -> None:
    for scales, needle in (("2.0,0.5", "the first scale is the finest"),
                           ("0.5,x", "give microns per pixel"),
                           ("0.5,1,2,4", "three different scales at most")):
        r = run_cli("prepare", str(slides), "--out", str(tmp_path / "o"), "--mpp", scales)
        assert r.returncode == 2 and needle in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_image_folders_give_regions_of_four_by_four_patches() -> None:
    from common.data.images import CONTEXT_FACTOR, tissue_regions
    from common.wsi.synthetic import synthetic_tissue

    image = synthetic_tissue(300, 200, seed=2)
    regions, patches, parent = tissue_regions(image, 32)
    assert CONTEXT_FACTOR == 4 and regions.shape[1:] == (32, 32, 3)
    assert len(patches) == len(parent) and np.bincount(parent).max() <= 16
    # the region over the top-left 128 px, seen at a quarter of the resolution
    from PIL import Image

    if 0 in parent:
        first = regions[0]
        block = np.full((128, 128, 3), 255, np.uint8)
        block[:128, :128] = image[:128, :128]
        assert np.array_equal(first, np.asarray(Image.fromarray(block).resize(
            (32, 32), Image.Resampling.BOX)))


@pytest.mark.parametrize("scales", ["both", "high", "low"])
def test_every_ablation_has_per_bag_gradients(scales: str) -> None:
    torch.manual_seed(0)
    model = build("multiscale-mil", scales=scales).eval()
    x, mask, y = bags("multiscale-mil")
    assert_per_bag_gradients(model, x, mask, y)  # every parameter the variant has is used
    scores = model.patch_scores(x, mask)  # no high-power view, no high-power scores
    total = torch.zeros(5) if scales == "low" else torch.ones(5)
    assert scores.shape == (5, 9, 4) and torch.allclose(scores.sum((1, 2)), total)


def test_the_model_refuses_rows_of_another_layout() -> None:
    model = build("multiscale-mil")
    with pytest.raises(ValueError, match="this model takes 64"):
        model(torch.zeros(1, 3, 65))


@pytest.mark.slow
def test_multiscale_model_trains_on_a_real_slide_in_federation(tmp_path: Path) -> None:
    """The real Aperio slide (and generated ones) prepared at 0.5 and 2 um/px, then a
    2-site DP federation of the multi-scale model through the one engine."""
    from common.config import FederationConfig
    from common.fedavg import run_inprocess

    folder = tmp_path / "slides"
    folder.mkdir()
    rows = ["slide,label,site"]
    if CMU_SLIDE.is_file():
        shutil.copy(CMU_SLIDE, folder / "cmu.svs")
        rows.append("cmu.svs,1,a")
    for i in range(7):
        synthetic_slide(folder / f"s{i}.tif", 768, 512, seed=10 + i)
        rows.append(f"s{i}.tif,{i % 2},{'ab'[i % 2 if i < 4 else (i + 1) % 2]}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    prepare(folder, tmp_path / "ms", mpp=0.5, context_mpp=(2.0,), patch_size=64,
            progress=False)
    cfg = FederationConfig(model="multiscale-mil", data=str(tmp_path / "ms"), sites=2, rounds=2,
                           batch_size=2, dp=True, epsilon=8.0, secagg=False,
                           val_fraction=0.3)
    result = run_inprocess(cfg, run_dir=tmp_path / "run")
    assert result.summary["rounds_with_model"] == 2, result.summary
    assert all(0 < e <= 8.0 for e in result.epsilon.values())
