"""Whole-slide pipeline: real OpenSlide on the real CMU slide and on synthetic pyramids."""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from common.errors import DataError, SlideReadError, UnknownModelError
from common.features import ENCODERS, build_encoder, get_encoder
from common.models.foundation import FOUNDATION
from common.wsi import ArrayReader, open_slide, tile_tissue, tissue_mask
from common.wsi.extract import prepare
from common.wsi.manifest import read_manifest
from common.wsi.stain import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    MacenkoNormalizer,
    from_od,
    hed_augment,
    hed_augment_tensor,
    to_od,
)
from common.wsi.synthetic import synthetic_slide, synthetic_tissue
from common.wsi.tiling import quality_flags
from common.wsi.tissue import otsu_threshold, rgb_to_hsv
from tests.conftest import CMU_SLIDE, UCSB, CliResult, run_cli


@pytest.fixture(scope="module")
def cmu() -> Path:
    if not CMU_SLIDE.is_file():
        pytest.skip(f"real CMU slide not found at {CMU_SLIDE}")
    return CMU_SLIDE


@pytest.fixture(scope="module")
def pyramid_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_slide(tmp_path_factory.mktemp("syn") / "syn.tif", 1024, 768, seed=1)


# --- Readers ---------------------------------------------------------------------------

def test_cmu_slide_geometry_tissue_and_patches(cmu: Path) -> None:
    with open_slide(cmu) as slide:
        assert slide.dimensions == (2220, 2967) and slide.level_count == 1
        assert slide.mpp == pytest.approx(0.499, abs=1e-3) and slide.mpp_source == "metadata"
        grid = tile_tissue(slide, mpp=0.5, patch_size=256, tissue_threshold=0.5)
        assert 0.2 < grid.mask.mean() < 0.6  # the skin section, not the glass
        assert len(grid) >= 20
        w, h = slide.dimensions
        x, y = grid.coords[:, 0], grid.coords[:, 1]
        assert (x >= 0).all() and (y >= 0).all()
        assert (x + grid.size_baseline <= w).all() and (y + grid.size_baseline <= h).all()
        s = grid.mask_scale
        for cx, cy in grid.coords:  # each patch is mostly tissue on the mask
            box = grid.mask[int(cy / s):int(np.ceil((cy + grid.size_baseline) / s)),
                            int(cx / s):int(np.ceil((cx + grid.size_baseline) / s))]
            assert box.mean() >= 0.45
        patches = np.stack([slide.read_at_mpp(tuple(c), (64, 64), 2.0) for c in grid.coords])
        sat = rgb_to_hsv(patches)[..., 1].mean(axis=(1, 2))
        assert (sat > 0.1).all()  # stained, not glass


def test_synthetic_pyramid_levels_agree(pyramid_slide: Path) -> None:
    with open_slide(pyramid_slide) as slide:
        assert slide.vendor == "generic-tiff"
        assert slide.level_count == 3 and slide.level_downsamples == pytest.approx((1, 2, 4))
        assert slide.mpp == pytest.approx(0.5) and slide.mpp_source == "metadata"
        fine = slide.read_region((256, 128), 0, (512, 512))
        coarse = slide.read_region((256, 128), 1, (256, 256))
        down = np.asarray(Image.fromarray(fine).resize((256, 256), Image.Resampling.BOX))
        assert np.abs(down.astype(int) - coarse).mean() < 2.0
        at_mpp = slide.read_at_mpp((256, 128), (256, 256), 1.0)  # served from level 1
        assert np.abs(at_mpp.astype(int) - coarse).mean() < 1.0
        thumb = slide.thumbnail(200)
        assert thumb.shape == (150, 200, 3) and thumb.dtype == np.uint8


def test_synthetic_is_deterministic() -> None:
    assert np.array_equal(synthetic_tissue(128, 96, seed=4), synthetic_tissue(128, 96, seed=4))
    assert not np.array_equal(synthetic_tissue(128, 96, seed=4), synthetic_tissue(128, 96, 5))


def test_array_reader_pads_white_and_resizes() -> None:
    img = np.zeros((100, 200, 3), dtype=np.uint8)
    img[:, 100:] = 200
    reader = ArrayReader([img, img[::2, ::2]], mpp=0.25, name="mem")
    assert reader.dimensions == (200, 100) and reader.level_downsamples == (1.0, 2.0)
    region = reader.read_region((190, 90), 0, (20, 20))
    assert (region[:10, :10] == 200).all() and (region[10:, :] == 255).all()
    out = reader.read_at_mpp((100, 0), (25, 25), 1.0)  # 4x: level 1 then resize
    assert out.shape == (25, 25, 3) and (out == 200).all()
    assert reader.thumbnail(50).shape == (25, 50, 3)
    with pytest.raises(SlideReadError, match="positive"):
        ArrayReader(img, mpp=-1)


def test_mpp_fallbacks_warn_or_fail(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    aperio = synthetic_slide(tmp_path / "objective.svs", 512, 512, mpp=None, vendor="aperio",
                             objective=20)
    with caplog.at_level(logging.WARNING, logger="common.wsi.reader"):
        with open_slide(aperio) as slide:
            assert slide.mpp == pytest.approx(0.5) and slide.mpp_source == "objective-power"
    assert any("objective.svs" in r.getMessage() and "20x" in r.getMessage()
               for r in caplog.records)
    bare = synthetic_slide(tmp_path / "bare.tif", 512, 512, mpp=None)
    with pytest.raises(SlideReadError, match=r"bare\.tif.*--slide-mpp"):
        open_slide(bare)
    with open_slide(bare, default_mpp=0.25) as slide:
        assert slide.mpp == 0.25 and slide.mpp_source == "user-default"
    with open_slide(aperio, mpp=0.3) as slide:  # an explicit value overrides
        assert slide.mpp == 0.3


@pytest.mark.skipif(not (UCSB / "labels.csv").is_file(), reason="real UCSB data not found")
def test_plain_tiff_ignores_72_dpi() -> None:
    image = UCSB / "ytma10_010704_benign1_ccd.tif"
    with pytest.raises(SlideReadError, match="ytma10_010704_benign1_ccd.tif"):
        open_slide(image)  # 72 dpi is a default, not a microscope resolution
    with open_slide(image, default_mpp=0.5) as slide:
        assert type(slide).__name__ == "ImageReader" and slide.dimensions == (896, 768)


def test_bad_files_raise_slide_read_error(tmp_path: Path, cmu: Path) -> None:
    (tmp_path / "bad.svs").write_text("not a slide\n")
    (tmp_path / "notes.txt").write_text("x")
    truncated = tmp_path / "cut.svs"
    truncated.write_bytes(cmu.read_bytes()[:900_000])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    cases = {"bad.svs": "not a slide format", "notes.txt": "unsupported file type",
             "cut.svs": "truncated", "missing.svs": "not found", "broken.png": "broken.png"}
    for name, reason in cases.items():
        with pytest.raises(SlideReadError, match=reason) as info:
            open_slide(tmp_path / name)
        assert name in str(info.value)


# --- Tissue, QC, stain -----------------------------------------------------------------

def test_tissue_mask_and_otsu() -> None:
    values = np.concatenate([np.full(100, 10.0), np.full(100, 200.0)])
    assert 10 <= otsu_threshold(values) < 200
    blank = np.full((64, 64, 3), 240, dtype=np.uint8)
    assert not tissue_mask(blank).any()
    img = synthetic_tissue(256, 256, seed=2)
    mask = tissue_mask(img)
    assert 0.2 < mask.mean() < 0.7
    sat = rgb_to_hsv(img)[..., 1]
    assert sat[mask].mean() > 3 * sat[~mask].mean()


def test_quality_flags_blur_and_pen() -> None:
    sharp = synthetic_tissue(128, 128, seed=3)
    blurred = ndimage.gaussian_filter(sharp, sigma=(4, 4, 0))
    pen = sharp.copy()
    pen[20:100, 20:100] = (30, 60, 200)  # blue marker
    flags = quality_flags(np.stack([sharp, blurred, pen]))
    assert flags["qc_blur"].tolist() == [False, True, False]
    assert flags["qc_pen"].tolist() == [False, False, True]


def test_macenko_maps_stain_shift_back_to_reference() -> None:
    ref = synthetic_tissue(256, 256, seed=5)
    norm = MacenkoNormalizer().fit(ref)
    target = norm.transform(ref)  # the reference as the two-stain model sees it
    hed = to_od(ref) @ HED_FROM_RGB
    shifted = from_od((hed * np.array([1.4, 0.7, 1.0])) @ RGB_FROM_HED)
    tissue = (to_od(ref) > 0.15).all(axis=-1)

    def err(a: np.ndarray) -> float:
        return float(np.abs(a.astype(int) - target)[tissue].mean())

    out = norm.transform(shifted)
    assert out.shape == ref.shape and out.dtype == np.uint8
    assert err(out) < 0.5 * err(shifted)
    blank = np.full((32, 32, 3), 250, dtype=np.uint8)
    assert np.array_equal(norm.transform(blank), blank)  # background left alone


def test_hed_augmentation_changes_colour_not_shape() -> None:
    batch = np.stack([synthetic_tissue(64, 64, seed=s) for s in range(4)])
    a = hed_augment(batch, np.random.default_rng(0), scale=0.1, shift=0.1)
    b = hed_augment(batch, np.random.default_rng(0), scale=0.1, shift=0.1)
    assert a.shape == batch.shape and a.dtype == np.uint8 and np.array_equal(a, b)
    assert np.abs(a.astype(int) - batch).mean() > 2
    tissue = (to_od(batch) > 0.15).all(axis=-1)
    assert np.corrcoef(a[tissue][:, 1], batch[tissue][:, 1])[0, 1] > 0.8  # structure kept
    import torch

    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    t = hed_augment_tensor(x, np.random.default_rng(0), scale=0.1, shift=0.1)
    assert t.shape == x.shape  # same draws as the numpy version: same colours, up to rounding
    assert (t * 255 - torch.from_numpy(a).permute(0, 3, 1, 2).float()).abs().mean() < 1.0


# --- Encoders --------------------------------------------------------------------------

def test_encoder_registry(tmp_path: Path) -> None:
    import torch

    patches = np.stack([synthetic_tissue(32, 32, seed=s) for s in range(3)])
    ct = get_encoder("color-texture")
    assert ct.dim == 21 and ct.weights_hash == "none" and ct(patches).shape == (3, 21)
    net = build_encoder("resnet-tiny")
    feats = net(patches)
    assert feats.shape == (3, net.dim) and feats.dtype == np.float32
    assert np.array_equal(feats, build_encoder("resnet-tiny")(patches))  # seeded init
    weights = tmp_path / "enc.pt"
    torch.save({"state_dict": net.module.state_dict()}, weights)  # type: ignore[attr-defined]
    loaded = build_encoder("resnet-tiny", weights)
    assert len(loaded.weights_hash) == 64 and np.allclose(loaded(patches), feats, atol=1e-5)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match=r"other\.pt.*do not fit"):
        build_encoder("resnet-tiny", tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(DataError, match=r"junk\.pt"):
        build_encoder("resnet-tiny", tmp_path / "junk.pt")
    with pytest.raises(UnknownModelError, match="color-texture"):
        build_encoder("vit-giant")


# --- The pipeline ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def slide_folder(tmp_path_factory: pytest.TempPathFactory, cmu: Path,
                 pyramid_slide: Path) -> Path:
    folder = tmp_path_factory.mktemp("slides")
    shutil.copy(cmu, folder / "cmu.svs")
    (folder / "cmu-truncated.svs").write_bytes(cmu.read_bytes()[:1_000_000])
    (folder / "bad.svs").write_text("this is a text file\n")
    shutil.copy(pyramid_slide, folder / "syn-a.tif")
    synthetic_slide(folder / "syn-b.tif", 768, 768, seed=7)
    (folder / "labels.csv").write_text(
        "slide,label,site\ncmu.svs,1,h1\nsyn-a.tif,0,h2\nsyn-b.tif,1,h2\nbad.svs,0,h1\n")
    return folder


def test_prepare_is_fault_isolated_and_resumable(slide_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats"
    summary = prepare(slide_folder, out, mpp=1.0, patch_size=64, progress=False)
    rows = read_manifest(out / "manifest.csv")
    assert {k: r["status"] for k, r in rows.items()} == {
        "bad.svs": "failed", "cmu-truncated.svs": "failed", "cmu.svs": "done",
        "syn-a.tif": "done", "syn-b.tif": "done"}
    assert "not a slide format" in rows["bad.svs"]["reason"]
    assert "truncated" in rows["cmu-truncated.svs"]["reason"]
    assert summary.counts == {"done": 3, "skipped": 0, "failed": 2}
    with h5py.File(out / "cmu.h5") as h5:
        coords, feats = h5["coords"][:], h5["features"][:]
        assert coords.dtype == np.int64 and coords.shape == (int(rows["cmu.svs"]["n_patches"]), 2)
        assert feats.dtype == np.float32 and feats.shape == (len(coords), 21)
        assert np.isfinite(feats).all() and h5["qc_blur"].shape == (len(coords),)
        attrs = dict(h5.attrs)
        assert attrs["mpp"] == 1.0 and attrs["patch_size"] == 64 and attrs["level"] == 0
        assert attrs["encoder"] == "color-texture" and attrs["weights_hash"] == "none"
        assert attrs["slide_mpp"] == pytest.approx(0.499) and attrs["downsample"] == 1.0
        assert attrs["slide_path"] == "cmu.svs"  # relative: no hospital directory layout
    assert not list(out.glob(".*tmp"))  # no temporary file left behind

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")}
    first_seconds = read_manifest(out / "manifest.csv")["cmu.svs"]["seconds"]
    again = prepare(slide_folder, out, mpp=1.0, patch_size=64, progress=False)
    assert again.counts == {"done": 0, "skipped": 3, "failed": 2}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.h5")} == mtimes  # no work
    rows = read_manifest(out / "manifest.csv")
    assert rows["cmu.svs"]["status"] == "skipped" and rows["cmu.svs"]["n_patches"] != "0"
    assert rows["cmu.svs"]["seconds"] == first_seconds != "0.00"  # the first run's timing

    changed = prepare(slide_folder, out, mpp=1.0, patch_size=32, progress=False)
    assert changed.counts["done"] == 3  # other settings: redone


def test_prepared_folder_is_training_data(slide_folder: Path, tmp_path: Path) -> None:
    from common.data import load_site
    from common.data.h5 import load_h5_bags

    out = tmp_path / "feats"
    prepare(slide_folder, out, mpp=2.0, patch_size=32, progress=False)
    bags = load_h5_bags(out)  # labels.csv was copied; bad.svs has no features: skipped
    assert bags.names == ["cmu.svs", "syn-a.tif", "syn-b.tif"]
    assert bags.labels.tolist() == [1, 0, 1] and bags.groups == ["h1", "h2", "h2"]
    assert all(b.ndim == 2 and b.shape[1] == 21 for b in bags.bags)
    site = load_site(0, 1, str(out), 0, 0.3)
    assert len(site.train) + len(site.val) == 3 and site.train.dim == 21
    two = [load_site(i, 2, str(out), 0, 0.3) for i in range(2)]
    assert sorted(len(s.train) + len(s.val) for s in two) == [1, 2]


@pytest.mark.slow  # starts worker processes
def test_workers_give_the_same_features(pyramid_slide: Path, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    shutil.copy(pyramid_slide, tmp_path / "in" / "s.tif")
    one = prepare(tmp_path / "in", tmp_path / "w1", mpp=1.0, patch_size=32, progress=False)
    two = prepare(tmp_path / "in", tmp_path / "w2", mpp=1.0, patch_size=32, workers=2,
                  batch_size=16, progress=False)
    assert one.counts["done"] == two.counts["done"] == 1
    with h5py.File(tmp_path / "w1" / "s.h5") as a, h5py.File(tmp_path / "w2" / "s.h5") as b:
        assert np.array_equal(a["coords"][:], b["coords"][:])
        assert np.array_equal(a["features"][:], b["features"][:])


# --- The command line ------------------------------------------------------------------

def pathfed(*args: str) -> CliResult:
    return run_cli(*args)


def test_cli_prepare(pyramid_slide: Path, tmp_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(pyramid_slide, slides / "a.tif")
    (slides / "b.svs").write_text("junk")
    r = pathfed("prepare", str(slides), "--out", str(tmp_path / "out"), "--mpp", "1",
                "--patch-size", "64")
    # one failed slide: the others are done, and the exit status says something failed
    assert r.returncode == 1, r.stderr
    assert "1 done" in r.stdout and "1 failed" in r.stdout and "manifest.csv" in r.stdout
    assert "1 of 2 slides failed" in r.stderr
    with (tmp_path / "out" / "manifest.csv").open() as fh:
        assert {row["slide"]: row["status"] for row in csv.DictReader(fh)} == {
            "a.tif": "done", "b.svs": "failed"}
    (slides / "a.tif").unlink()
    r = pathfed("prepare", str(slides), "--out", str(tmp_path / "out2"))
    assert r.returncode == 1 and "1 of 1 slides failed" in r.stderr


def test_cli_prepare_bad_input_exits_2(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "x.svs").write_text("junk")
    (tmp_path / "w.pt").write_text("junk")
    out = str(tmp_path / "out")
    cases = [
        (("prepare", str(tmp_path / "nope"), "--out", out), "not found"),
        (("prepare", str(tmp_path / "empty"), "--out", out), "no slide files"),
        (("prepare", str(slides), "--out", out, "--encoder", "vit"), "known encoders"),
        (("prepare", str(slides), "--out", out, "--encoder", "resnet-tiny", "--weights",
          str(tmp_path / "w.pt")), "w.pt"),
        (("prepare", str(slides), "--out", out, "--tissue-threshold", "2"), "tissue threshold"),
    ]
    for args, needle in cases:
        r = pathfed(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr + r.stdout and needle in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_prepare_plain_images_blank_and_duplicate_names(tmp_path: Path) -> None:
    from common.wsi.synthetic import write_pyramid_tiff

    slides = tmp_path / "slides"
    slides.mkdir()
    Image.fromarray(synthetic_tissue(256, 256, seed=8)).save(slides / "a.png")
    Image.fromarray(synthetic_tissue(256, 256, seed=9)).save(slides / "a.jpg")
    write_pyramid_tiff(slides / "blank.tif", np.full((512, 512, 3), 245, np.uint8))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="no slide files"):
        prepare(tmp_path, out)  # only a sub-folder, and not a DICOM one
    summary = prepare(slides, out, mpp=0.5, patch_size=32, slide_mpp=0.5, progress=False)
    rows = read_manifest(out / "manifest.csv")
    assert rows["a.jpg"]["status"] == "done" and int(rows["a.jpg"]["n_patches"]) > 0
    assert rows["a.png"]["status"] == "failed" and "same name as a.jpg" in rows["a.png"]["reason"]
    assert rows["blank.tif"]["status"] == "failed" and "tissue" in rows["blank.tif"]["reason"]
    assert summary.counts == {"done": 1, "skipped": 0, "failed": 2}
    with h5py.File(out / "a.h5") as h5:
        assert h5.attrs["slide_mpp_source"] == "user-default"


@pytest.mark.parametrize("name", sorted(set(ENCODERS) - set(FOUNDATION)))
def test_every_encoder_matches_its_declaration(name: str) -> None:
    """Built without weights (none required here), each encoder is what its entry says:
    build_encoder raises on a contradiction; the declaration is what `pathfed models` shows."""

    spec = ENCODERS[name]
    assert spec.weights != "required"  # nothing here can be downloaded: every entry builds
    encoder = build_encoder(name)
    side = spec.input_size if isinstance(spec.input_size, int) else (encoder.input_size or 48)
    feats = encoder(np.stack([synthetic_tissue(side, side, seed=s) for s in range(2)]))
    assert feats.shape == (2, spec.dim or encoder.dim) and np.isfinite(feats).all()
    assert spec.describe()["weights"] in ("none", "optional", "required")


def test_encoder_declarations_are_enforced(tmp_path: Path) -> None:
    from common.errors import ConfigError
    from common.features import ENCODERS, FunctionEncoder, register_encoder

    with pytest.raises(ConfigError, match="takes no weights"):
        build_encoder("color-texture", tmp_path / "w.pt")
    with pytest.raises(ConfigError, match=r"32-px patches, got 64x64 px; use --patch-size 32"):
        build_encoder("patch-cnn")(np.zeros((1, 64, 64, 3), np.uint8))
    register_encoder("test-liar", lambda w: FunctionEncoder("test-liar", lambda p: p[:, 0, 0],
                                                            3), "claims 8-d", dim=8,
                     normalisation=None)
    register_encoder("test-needs-weights", lambda w: get_encoder("color-texture"), "x",
                     weights="required", normalisation=None)
    try:
        with pytest.raises(ConfigError, match=r"test-liar.*dim 3 \(declared 8\)"):
            build_encoder("test-liar")
        with pytest.raises(ConfigError, match="needs a local weights file"):
            build_encoder("test-needs-weights")
    finally:
        ENCODERS.pop("test-liar"), ENCODERS.pop("test-needs-weights")


def test_stain_normalisation_targets_the_published_reference(tmp_path: Path) -> None:
    from common.wsi.stain import (
        MACENKO_REFERENCE,
        MacenkoNormalizer,
        StainNormalizer,
        _to_lab,
        reference_tile,
    )

    fitted = MacenkoNormalizer().fit(reference_tile())
    assert np.allclose(fitted.stain_matrix, MACENKO_REFERENCE[0], atol=0.01)
    image = synthetic_tissue(96, 96, seed=3)
    reinhard = StainNormalizer("reinhard")
    out = reinhard(image[None])[0]
    target = _to_lab(reference_tile()).reshape(-1, 3)
    got = _to_lab(out).reshape(-1, 3)
    assert np.allclose(got.mean(0), target.mean(0), atol=0.02)  # up to uint8 rounding
    assert reinhard.key == "reinhard:default" and StainNormalizer("none").key == "none"
    assert np.array_equal(StainNormalizer("none")(image[None]), image[None])
    Image.fromarray(image).save(tmp_path / "t.png")
    assert StainNormalizer("macenko", str(tmp_path / "t.png")).key.startswith("macenko:")
    with pytest.raises(DataError, match="cannot read the image"):
        StainNormalizer("macenko", str(tmp_path / "nope.png"))


def test_prepare_records_stain_normalisation_and_refuses_a_mixed_folder(
        pyramid_slide: Path, tmp_path: Path) -> None:
    from common.data.h5 import load_h5_bags

    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(pyramid_slide, slides / "a.tif")
    shutil.copy(pyramid_slide, slides / "b.tif")
    (slides / "labels.csv").write_text("slide,label\na.tif,0\nb.tif,1\n")
    raw, norm = tmp_path / "raw", tmp_path / "norm"
    prepare(slides, raw, mpp=1.0, patch_size=64, progress=False)
    prepare(slides, norm, mpp=1.0, patch_size=64, progress=False, stain_normalize="macenko")
    key = read_manifest(norm / "manifest.csv")["a.tif"]["settings"]
    assert key.endswith(";stain=macenko:default")
    with h5py.File(raw / "a.h5") as r, h5py.File(norm / "a.h5") as n:
        assert r["features"].shape == n["features"].shape
        assert not np.allclose(r["features"][:], n["features"][:])
        assert np.array_equal(r["qc_blur"][:], n["qc_blur"][:])  # QC is of the raw pixels
    shutil.copy(raw / "b.h5", norm / "b.h5")  # one slide of each
    with pytest.raises(DataError, match="different stain normalisation"):
        load_h5_bags(norm)
    r = run_cli("prepare", str(slides), "--out", str(tmp_path / "x"), "--stain-target",
                str(tmp_path / "t.png"))
    assert r.returncode == 2 and "does nothing" in r.stderr


def test_row_reads_give_the_pixels_of_patch_by_patch_reads(tmp_path: Path) -> None:
    """One region read per run of a row's patches (levels 0 and 1 of a pyramid, with
    overlap, at the slide's edge; the real CMU slide) is pixel-identical to reading each
    patch; a level that needs resampling (0.7 um/px) reads patch by patch."""
    from scipy import ndimage

    from common.wsi.synthetic import write_pyramid_tiff
    from common.wsi.tiling import laplacian_variance
    from tests.conftest import CMU_SLIDE

    write_pyramid_tiff(tmp_path / "s.tif", synthetic_tissue(1000, 700, seed=3), mpp=0.5)
    cases = [(tmp_path / "s.tif", mpp, overlap)
             for mpp, overlap in ((0.5, 16), (1.0, 0), (1.0, 16), (0.7, 0))]
    if CMU_SLIDE.is_file():  # the real Aperio slide (one level, JPEG tiles)
        cases += [(CMU_SLIDE, 0.5, 0), (CMU_SLIDE, 0.5, 16)]
    for path, mpp, overlap in cases:
        with open_slide(path) as reader:
            grid = tile_tissue(reader, mpp=max(mpp, reader.mpp), patch_size=64,
                               overlap=overlap, tissue_threshold=0.0)
            fast = reader.read_patches_at_mpp(grid.coords, 64, grid.mpp)
            slow = np.stack([reader.read_at_mpp((int(x), int(y)), (64, 64), grid.mpp)
                             for x, y in grid.coords])
            assert len(grid) > 4 and np.array_equal(fast, slow), (path.name, mpp, overlap)
    grey = slow.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    assert np.array_equal(laplacian_variance(slow),
                          np.array([ndimage.laplace(g).var() for g in grey], np.float32))
    assert laplacian_variance(slow[:0]).shape == (0,)


@pytest.mark.slow  # prepares the slide twice
def test_a_small_single_level_slide_is_decoded_once_with_the_same_pixels(
        tmp_path: Path) -> None:
    """The thumbnail, tissue grid, patches and the feature file of a slide decoded once
    into memory equal those read through OpenSlide tile by tile; pyramids and slides over
    the size limit are not held in memory."""
    import h5py

    from common.wsi.extract import PrepareOptions, prepare
    from common.wsi.reader import decoded_once
    from common.wsi.synthetic import write_pyramid_tiff
    from tests.conftest import CMU_SLIDE

    if not CMU_SLIDE.is_file():
        write_pyramid_tiff(tmp_path / "one.tif", synthetic_tissue(900, 700, seed=5), mpp=0.5,
                           min_level_size=10_000)  # one level
    path = CMU_SLIDE if CMU_SLIDE.is_file() else tmp_path / "one.tif"
    with open_slide(path) as reader:
        assert reader.level_count == 1
        memory = decoded_once(reader)
        assert memory is not None and decoded_once(reader, max_pixels=1000) is None
        assert (memory.mpp, memory.mpp_source, memory.path) == (
            reader.mpp, reader.mpp_source, reader.path)
        assert np.array_equal(memory.thumbnail(300), reader.thumbnail(300))
        grid = tile_tissue(reader, mpp=reader.mpp, patch_size=64, overlap=16,
                           tissue_threshold=0.0)
        again = tile_tissue(memory, mpp=reader.mpp, patch_size=64, overlap=16,
                            tissue_threshold=0.0)
        assert np.array_equal(grid.coords, again.coords)
        assert np.array_equal(memory.read_patches_at_mpp(grid.coords, 64, grid.mpp),
                              reader.read_patches_at_mpp(grid.coords, 64, grid.mpp))
        edge = memory.read_region((reader.dimensions[0] - 10, 0), 0, (40, 20))
        assert np.array_equal(edge, reader.read_region((reader.dimensions[0] - 10, 0), 0,
                                                       (40, 20)))  # white past the edge
    write_pyramid_tiff(tmp_path / "pyr.tif", synthetic_tissue(600, 400, seed=2), mpp=0.5)
    with open_slide(tmp_path / "pyr.tif") as pyramid:
        assert pyramid.level_count > 1 and decoded_once(pyramid) is None
    # end to end: prepare's feature file is the one it wrote reading tile by tile
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / path.name).symlink_to(path.resolve())
    import common.wsi.reader as reader_module

    files = {}
    for limit in (reader_module.DECODE_ONCE_PIXELS, 0):
        reader_module.DECODE_ONCE_PIXELS = limit
        try:
            out = tmp_path / f"out-{limit}"
            prepare(tmp_path / "in", out, PrepareOptions(patch_size=64, mpp=0.5,
                                                         progress=False))
        finally:
            reader_module.DECODE_ONCE_PIXELS = 64 * 2**20
        (files[limit],) = out.glob("*.h5")
    with h5py.File(files[0]) as slow, h5py.File(files[64 * 2**20]) as fast:
        for key in ("coords", "features"):
            assert np.array_equal(slow[key][()], fast[key][()]), key


def test_patches_read_ahead_by_a_thread_come_in_order_and_errors_at_their_batch(
        tmp_path: Path) -> None:
    """With one worker, a thread reads the next batch while the caller encodes: the
    batches and flags are those read one after another, and a read that fails raises in
    the caller at that batch, after the batches before it."""
    from common.wsi.patches import PatchReader, read_patches
    from common.wsi.reader import ArrayReader
    from common.wsi.synthetic import write_pyramid_tiff

    path = write_pyramid_tiff(tmp_path / "s.tif", synthetic_tissue(900, 600, seed=4), mpp=0.5)
    with open_slide(path) as reader:
        grid = tile_tissue(reader, mpp=0.5, patch_size=32, tissue_threshold=0.0)
    assert len(grid) > 100
    got = list(PatchReader(1).batches(path, None, grid.coords, 0.5, 32, 16))
    want = [read_patches(str(path), None, grid.coords[i:i + 16], 0.5, 32)
            for i in range(0, len(grid), 16)]
    assert len(got) == len(want)
    for (gp, gf), (wp, wf) in zip(got, want):
        assert np.array_equal(gp, wp) and all(np.array_equal(gf[k], wf[k]) for k in wf)

    class Failing(ArrayReader):
        calls = 0

        def read_patches_at_mpp(self, *args: Any, **kwargs: Any) -> np.ndarray:
            Failing.calls += 1
            if Failing.calls == 3:
                raise SlideReadError("s.tif: cannot decode the region (corrupt)")
            return super().read_patches_at_mpp(*args, **kwargs)

    memory = Failing(synthetic_tissue(900, 600, seed=4), mpp=0.5, name="s.tif")
    seen = []
    with pytest.raises(SlideReadError, match="corrupt"):
        for patches, _ in PatchReader(1).batches(path, None, grid.coords, 0.5, 32, 16,
                                                 memory):
            seen.append(len(patches))
    assert seen == [16, 16]


def test_fast_hsv_and_saturation_are_the_reference_conversion_bit_for_bit() -> None:
    """rgb_to_hsv (no size-3 reductions) and saturation (from the uint8 channels) give
    the floats of the straightforward float32 conversion, on a grid of 636,056 colours."""
    from common.wsi.tissue import rgb_to_hsv, saturation

    def reference(image: np.ndarray) -> np.ndarray:
        rgb = image.astype(np.float32) / 255.0
        v = rgb.max(axis=-1)
        c = v - rgb.min(axis=-1)
        s = np.where(v > 0, c / np.maximum(v, 1e-12), 0.0)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        safe_c = np.maximum(c, 1e-12)
        h = np.where(v == r, ((g - b) / safe_c) % 6.0,
                     np.where(v == g, (b - r) / safe_c + 2.0, (r - g) / safe_c + 4.0))
        h = np.where(c > 0, h / 6.0, 0.0)
        return np.stack([h, s, v], axis=-1).astype(np.float32)

    levels = np.arange(0, 256, 3, dtype=np.uint8)
    colours = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(
        -1, 1, 3)
    want = reference(colours)
    assert np.array_equal(rgb_to_hsv(colours), want)
    assert np.array_equal(saturation(colours), want[..., 1])
    assert saturation(colours).dtype == np.float32


def _jpeg_pyramid(path: Path) -> Path:
    """A tiled JPEG pyramid as tifffile (with imagecodecs) writes one."""
    import tifffile

    from common.wsi.synthetic import pyramid

    levels = pyramid(synthetic_tissue(1100, 900, seed=7), min_size=200)
    with tifffile.TiffWriter(path) as tw:
        for i, level in enumerate(levels):
            tw.write(level, tile=(256, 256), compression="jpeg", photometric="rgb",
                     subfiletype=1 if i else 0, resolution=(20000.0, 20000.0),
                     resolutionunit="CENTIMETER", metadata=None)
    return path


def test_tile_decoding_gives_openslides_pixels(tmp_path: Path) -> None:
    """Levels decoded tile by tile with tifffile (deflate and JPEG pyramids, the real
    Aperio slide) give OpenSlide's own pixels for any region: inside, across tiles, past
    the edges, pixel-aligned or not, and through the thumbnail and patch readers."""
    from common.wsi.reader import OpenSlideReader
    from common.wsi.synthetic import write_pyramid_tiff

    paths = [write_pyramid_tiff(tmp_path / "deflate.tif", synthetic_tissue(1000, 700, seed=3),
                                mpp=0.5), _jpeg_pyramid(tmp_path / "jpeg.tif")]
    if CMU_SLIDE.is_file():
        paths.append(CMU_SLIDE)
    rng = np.random.default_rng(0)
    for path in paths:
        fast, plain = OpenSlideReader(path), OpenSlideReader(path, tiles=False)
        with fast, plain:
            assert fast._tiles is not None and plain._tiles is None
            assert all(fast._tiles.covers(level) for level in range(fast.level_count)), path
            for level in range(fast.level_count):
                w, h = fast.level_dimensions[level]
                ds = fast.level_downsamples[level]
                for _ in range(60):
                    x, y = int(rng.integers(-50, w + 20)), int(rng.integers(-50, h + 20))
                    size = (int(rng.integers(1, 300)), int(rng.integers(1, 300)))
                    at = (round(x * ds) + int(rng.integers(0, 2)), round(y * ds))  # some off-grid
                    assert np.array_equal(fast.read_region(at, level, size),
                                          plain.read_region(at, level, size)), (path, level, at)
                whole = fast.level_dimensions[level]
                assert np.array_equal(fast.read_region((0, 0), level, whole),
                                      plain.read_region((0, 0), level, whole))
            assert np.array_equal(fast.thumbnail(300), plain.thumbnail(300))
            grid = tile_tissue(fast, mpp=max(1.0, fast.mpp), patch_size=64, overlap=8,
                               tissue_threshold=0.0)
            assert np.array_equal(fast.read_patches_at_mpp(grid.coords, 64, grid.mpp),
                                  plain.read_patches_at_mpp(grid.coords, 64, grid.mpp))


def test_tile_decoding_is_used_only_where_it_matches_openslide(tmp_path: Path) -> None:
    """A level whose checked tile differs from OpenSlide's pixels, a striped TIFF and a
    tile that fails to decode are all left to OpenSlide (same pixels, same errors)."""
    import tifffile

    from common.wsi.reader import OpenSlideReader
    from common.wsi.synthetic import write_pyramid_tiff
    from common.wsi.tiles import TiffTiles

    path = write_pyramid_tiff(tmp_path / "s.tif", synthetic_tissue(700, 500, seed=4), mpp=0.5)
    with OpenSlideReader(path) as reader:
        tiles = TiffTiles(path)
        try:
            def wrong(level: int, location: Any, size: Any) -> np.ndarray:
                return np.zeros((size[1], size[0], 3), np.uint8)
            assert tiles.adopt(reader.level_dimensions, wrong) == []
            assert tiles.region(0, (0, 0), (8, 8)) is None
        finally:
            tiles.close()
        # a tile that cannot be decoded: OpenSlide reads the region (and says what is wrong)
        assert reader._tiles is not None
        good = reader.read_region((300, 200), 0, (64, 64))

        def broken(*args: Any) -> np.ndarray:
            raise ValueError("corrupt tile")

        reader._tiles._tile = broken  # type: ignore[method-assign]
        assert np.array_equal(reader.read_region((300, 200), 0, (64, 64)), good)
    striped = tmp_path / "striped.tif"
    tifffile.imwrite(striped, synthetic_tissue(300, 200, seed=1), photometric="rgb")
    tiles = TiffTiles(striped)
    try:
        assert tiles.adopt(((300, 200),), lambda *a: np.zeros(1)) == []
    finally:
        tiles.close()
