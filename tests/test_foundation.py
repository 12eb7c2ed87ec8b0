"""Pathology foundation encoders (common.models.foundation) without their real weights.

- Every timm-format encoder's architecture, built on the meta device, has exactly the
  state-dict keys and shapes timm gives the published call (``tests/data/
  timm_architectures.json.gz``, written by ``tests/data/make_timm_fixtures.py`` with timm).
- A small variant of each (every structural choice kept) with random weights gives, through
  ``--weights``, the embedding timm computed for the same weights and patches.
- The small encoder at full size (Lunit ViT-S/8) is built, saved in timm's and in
  transformers' names, loaded through ``--weights`` and run through ``prepare``.
- Transformers-format checkpoints (Phikon) in the key names transformers 4 wrote.
- Resizing (a 256-px patch at 224 input), cropping, normalisation; wrong or missing weights
  are one line naming the encoder and the file it expects.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.errors import ConfigError, DataError
from common.features import build_encoder, encoder_spec, foundation_encoder
from common.models.foundation import (
    FOUNDATION,
    Resize,
    build_module,
    hf_to_timm,
    load_module,
    n_params,
)
from common.wsi.synthetic import synthetic_tissue

DATA = Path(__file__).parent / "data"
TIMM = [name for name, a in FOUNDATION.items() if a.weights_format == "timm"]


@pytest.fixture(scope="module")
def timm_architectures() -> dict:
    with gzip.open(DATA / "timm_architectures.json.gz", "rt") as f:
        return json.load(f)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def timm_tiny() -> dict:
    return torch.load(DATA / "timm_tiny.pt", weights_only=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", TIMM)
def test_architecture_is_the_published_timm_one(name: str, timm_architectures: dict) -> None:
    arch = FOUNDATION[name]
    with torch.device("meta"):
        module = build_module(arch)
    expected = {k: tuple(shape) for k, shape in timm_architectures[name]["state"]}
    ours = {k: tuple(v.shape) for k, v in hf_to_timm(module.state_dict(), arch).items()}
    assert ours == expected
    assert arch.params == timm_architectures[name]["params"]
    assert encoder_spec(name).dim == arch.dim


@pytest.mark.parametrize("name, params", [("phikon", 85_798_656), ("phikon-v2", 303_350_784)])
def test_transformers_native_architectures(name: str, params: int) -> None:
    """Phikon's published 85.8 M parameters; Phikon-v2 is a ViT-L/16 (UNI's shapes)."""
    with torch.device("meta"):
        module = build_module(FOUNDATION[name])
    assert n_params(module) == params == FOUNDATION[name].params


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("name", TIMM)
def test_features_equal_timm_for_the_same_weights(name: str, timm_tiny: dict,
                                                  tmp_path: Path) -> None:
    """The same random weights in timm's format give timm's embedding (class token, or
    class token + mean of patch tokens), through the whole --weights path."""
    small = FOUNDATION[name].scaled()
    ref = timm_tiny[name]
    weights = _save({k: v.float() for k, v in ref["state"].items()}, tmp_path / "w.bin")
    encoder = foundation_encoder(small, weights)
    got = encoder(ref["patches"].numpy())
    assert got.shape == tuple(ref["embedding"].shape) and encoder.dim == small.dim
    np.testing.assert_allclose(got, ref["embedding"].numpy(), rtol=1e-4, atol=1e-4)
    assert np.abs(got).mean() > 0.1  # not a degenerate output
    # the same network saved in transformers' names (with its mask token) loads too
    hf = _save(load_module(small, weights).state_dict(), tmp_path / "hf.bin")
    np.testing.assert_allclose(foundation_encoder(small, hf)(ref["patches"].numpy()), got,
                               rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def lunit(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path]:
    """Lunit ViT-S/8 with random weights, saved in timm's names (safetensors) and in
    transformers' (torch.save)."""
    torch.manual_seed(0)
    arch, folder = FOUNDATION["lunit-dino"], tmp_path_factory.mktemp("lunit")
    module = build_module(arch)
    return (module, _save(hf_to_timm(module.state_dict(), arch), folder / "model.safetensors"),
            _save(module.state_dict(), folder / "hf.bin"))


@pytest.mark.slow  # a full-size ViT-S/8 forward on CPU (seconds)
def test_small_encoder_at_full_size_through_weights_files(lunit: tuple) -> None:
    """Lunit ViT-S/8 (21.7 M) with random weights in both files, loaded with --weights: the
    same features, from 256-px patches resized to its 224 input and normalised with Lunit's
    constants."""
    module, timm_file, hf_file = lunit
    arch = FOUNDATION["lunit-dino"]
    patches = np.stack([synthetic_tissue(256, 256, seed=s) for s in range(2)])

    a = build_encoder("lunit-dino", timm_file)
    b = build_encoder("lunit-dino", hf_file)
    assert a.dim == 384 and a.weights_hash != b.weights_hash
    fa, fb = a(patches), b(patches)
    np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-5)

    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in arch.normalisation)
    with torch.no_grad():
        expected = module(pixel_values=(x - mean) / std).last_hidden_state[:, 0]
    np.testing.assert_allclose(fa, expected.numpy(), rtol=1e-4, atol=1e-4)
    assert not np.allclose(fa, a(patches[:, :224, :224]), atol=1e-3)  # resized, not cropped


@pytest.mark.slow  # a full-size ViT-S/8 forward on CPU (seconds)
def test_prepare_with_a_foundation_encoder(tmp_path: Path, lunit: tuple) -> None:
    import h5py

    from common.wsi.extract import PrepareOptions, prepare
    from common.wsi.synthetic import synthetic_slide

    weights = lunit[1]
    slides = tmp_path / "slides"
    slides.mkdir()
    synthetic_slide(slides / "s.tiff", width=1024, height=512, seed=1)
    summary = prepare(slides, tmp_path / "out", PrepareOptions(
        mpp=0.5, patch_size=224, tissue_threshold=0.2, encoder="lunit-dino",
        weights=str(weights)), progress=False)
    assert summary.counts["done"] == 1
    with h5py.File(tmp_path / "out" / "s.h5") as h5:
        assert h5["features"].shape[1] == 384 and len(h5["features"]) > 0
        assert h5.attrs["encoder"] == "lunit-dino"
        assert h5.attrs["encoder_precision"] == "float32"  # bfloat16 only on CUDA
        assert h5.attrs["weights_hash"] == build_encoder("lunit-dino", weights).weights_hash


_V4_NAMES = {  # transformers 5 name -> the name transformers 4 wrote (owkin's files)
    "vit": [("layers.", "encoder.layer."), ("attention.q_proj", "attention.attention.query"),
            ("attention.k_proj", "attention.attention.key"),
            ("attention.v_proj", "attention.attention.value"),
            ("attention.o_proj", "attention.output.dense"), ("mlp.fc1", "intermediate.dense"),
            ("mlp.fc2", "output.dense")],
    "dinov2": [("attention.q_proj", "attention.attention.query"),
               ("attention.k_proj", "attention.attention.key"),
               ("attention.v_proj", "attention.attention.value"),
               ("attention.o_proj", "attention.output.dense")],
}


@pytest.mark.parametrize("name", ["phikon", "phikon-v2"])
def test_transformers_checkpoint_in_older_key_names(name: str, tmp_path: Path) -> None:
    """A downloaded model folder (or its model.safetensors) in transformers 4's names, with a
    pooler Phikon carries: loaded through from_pretrained, the same features."""
    small = FOUNDATION[name].scaled()
    torch.manual_seed(1)
    module = build_module(small)
    state = {}
    for key, value in module.state_dict().items():
        for new, old in _V4_NAMES[small.family]:
            key = key.replace(new, old)
        state[key] = value
    state["pooler.dense.weight"] = torch.zeros(small.width, small.width)
    folder = tmp_path / "phikon"
    folder.mkdir()
    _save(state, folder / "model.safetensors")
    patches = np.stack([synthetic_tissue(small.img_size, small.img_size, seed=s)
                        for s in range(2)])
    reference = foundation_encoder(small, _save(module.state_dict(), tmp_path / "hf.bin"))
    for weights in (folder, folder / "model.safetensors"):
        loaded = load_module(small, weights)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in module.state_dict().items()
                   if not k.endswith("mask_token"))
    half = tmp_path / "half"
    half.mkdir()
    _save({k: v.half() for k, v in state.items()}, half / "model.safetensors")
    assert {p.dtype for p in load_module(small, half).parameters()} == {torch.float32}
    np.testing.assert_allclose(foundation_encoder(small, folder)(patches), reference(patches),
                               rtol=1e-5, atol=1e-5)


def test_resize_and_centre_crop() -> None:
    """Prov-GigaPath's 256 -> centre 224; a 224 patch at a 224 input is untouched."""
    x = torch.zeros(1, 3, 256, 256)
    x[..., 16:240, 16:240] = 1.0
    cropped = Resize(256, 224)(x)
    assert cropped.shape[-2:] == (224, 224) and bool((cropped == 1).all())
    y = torch.rand(1, 3, 224, 224)
    assert torch.equal(Resize(224)(y), y)
    assert Resize(224)(torch.rand(2, 3, 256, 256)).shape == (2, 3, 224, 224)
    assert FOUNDATION["prov-gigapath"].resize.input == 224


def test_wrong_or_missing_weights_are_one_line(tmp_path: Path, lunit: tuple) -> None:
    lunit_file = lunit[1]
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="'uni' needs a local weights file"):
        build_encoder("uni")
    cases = [
        (tmp_path / "missing.bin", r"missing.bin: weights file not found \(encoder 'uni' "
                                   r"expects pytorch_model.bin of MahmoodLab/UNI"),
        (tmp_path / "junk.bin", "junk.bin: not a weights file"),
        (lunit_file, r"model.safetensors: weights do not fit encoder 'uni' \(missing: "
                     r"blocks.0.ls1.gamma.*wrong shape: .*pos_embed \[1, 785, 384\] "
                     r"\(expected \[1, 197, 1024\]\).*"
                     r"it expects pytorch_model.bin of MahmoodLab/UNI"),
        (tmp_path, "no model.safetensors or pytorch_model.bin in this folder"),
    ]
    for weights, needle in cases:
        with pytest.raises(DataError, match=needle) as err:
            build_encoder("uni", weights)
        assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"weights do not fit encoder 'phikon'"):
        build_encoder("phikon", lunit_file)


def test_cli_names_the_encoder_and_its_file(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from cli import main
    from common.wsi.synthetic import synthetic_slide

    slides = tmp_path / "slides"
    slides.mkdir()
    synthetic_slide(slides / "s.tiff", width=512, height=512, seed=1)
    for extra, needle in (((), "'uni' needs a local weights file"),
                          (("--weights", str(tmp_path / "UNI.bin")),
                           "expects pytorch_model.bin of MahmoodLab/UNI")):
        code = main(["prepare", str(slides), "--out", str(tmp_path / "out"), "--encoder",
                     "uni", *extra])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_a_batch_that_does_not_fit_is_halved(caplog: pytest.LogCaptureFixture) -> None:
    """Out of device memory (raised here by a stand-in network, as CUDA would raise it):
    the batch is halved until it fits, and the features are those of the whole input."""
    from common.features import TorchEncoder

    class Tight(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if len(x) > 3:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return x.mean(dim=(2, 3))

    encoder = TorchEncoder(Tight(), "tight", batch_size=16)
    patches = np.stack([synthetic_tissue(32, 32, seed=s) for s in range(10)])
    feats = encoder(patches)
    assert encoder.batch_size == 2 and feats.shape == (10, 3)
    np.testing.assert_allclose(feats, TorchEncoder(Tight(), "tight", batch_size=1)(patches),
                               rtol=1e-6)
    assert "batch size now 2" in caplog.text

    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        TorchEncoder(Broken(), "broken")
