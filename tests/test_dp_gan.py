"""The DP GAN (common.models.dp_gan): fitness for DP-SGD, per-slide gradients, the
adversarial loop's privacy accounting, a private federation, and ``pathfed synthesize``."""

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


def test_both_networks_pass_opacus_strict_validation() -> None:
    from opacus.validators import ModuleValidator

    gan = build_model("dp-gan", patch_size=16)
    for net in (gan.generator, gan.discriminator):  # type: ignore[union-attr]
        ModuleValidator.validate(net, strict=True)  # GroupNorm, no BatchNorm
    out = gan.sample(torch.tensor([0, 1, 1]))  # type: ignore[operator]
    assert out.shape == (3, 3, 16, 16) and torch.isfinite(out).all()


def test_discriminator_per_slide_gradients_match_one_slide_at_a_time() -> None:
    from common.training import _vmap_grad_samples

    torch.manual_seed(0)
    disc = build_model("dp-gan", patch_size=16).discriminator  # type: ignore[union-attr]
    real, fake = torch.randn(3, 4, 3, 16, 16), torch.randn(3, 4, 3, 16, 16)
    labels = torch.tensor([0.0, 1.0, 1.0])
    _vmap_grad_samples(disc, [real, fake, labels])
    per_slide = {n: p.grad_sample.clone() for n, p in disc.named_parameters()}
    for i in range(3):
        disc.zero_grad()
        disc.sample_losses(real[i:i + 1], fake[i:i + 1], labels[i:i + 1]).sum().backward()
        for n, p in disc.named_parameters():
            assert torch.allclose(per_slide[n][i], p.grad, atol=1e-5), n


def _patches(n: int, k: int, size: int, seed: int) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.TensorDataset(torch.randn(n, k, 3, size, size, generator=g),
                                          torch.tensor([i % 2 for i in range(n)]).float())


def test_adversarial_round_accounts_only_the_discriminator_and_moves_both() -> None:
    """DP: Opacus records one step per discriminator step at the plan's noise and rate
    (the generator's steps are not accounted: they see no real patch); both move."""
    from common.privacy import SiteAccountant, plan_site
    from common.training import adversarial_train, get_weights

    plan = plan_site(6, batch_size=2, local_epochs=1, rounds=5, epsilon=8.0, delta=1e-5,
                     max_grad_norm=1.0, max_noise_multiplier=20.0)
    torch.manual_seed(0)
    gan = build_model("dp-gan", patch_size=16, width=8, latent=16)
    names = list(gan.state_dict())
    start = get_weights(gan)
    accountant = SiteAccountant()
    result = adversarial_train(gan, _patches(6, 2, 16, 1), epochs=1, batch_size=2,
                               lr=0.001, plan=plan, accountant=accountant, seed=3)
    assert result.steps == plan.steps_per_round == 3
    assert accountant.history == [(plan.noise_multiplier, plan.sample_rate, 3)]
    assert result.epsilon == pytest.approx(accountant.epsilon(1e-5))
    moved = {n.split(".")[0]: 0.0 for n in names}
    for n, u in zip(names, result.update):
        moved[n.split(".")[0]] = max(moved[n.split(".")[0]], float(np.abs(u).max()))
    assert moved["generator"] > 0 and moved["discriminator"] > 0
    assert all(np.isfinite(u).all() for u in result.update)
    assert len(start) == len(result.update)


def test_gan_settings_are_checked() -> None:
    ok = {"model": "dp-gan", "optimizer": "adam"}
    FederationConfig.from_mapping(ok)
    for extra, field in (({"scaffold": True}, "scaffold"), ({"prox-mu": 0.1}, "prox-mu"),
                         ({"optimizer": "sgd"}, "optimizer"),
                         ({"dp-mode": "distributed"}, "dp-mode")):
        with pytest.raises(ConfigError, match=f"{field}: model 'dp-gan'"):
            FederationConfig.from_mapping({**ok, **extra})


@pytest.mark.slow
def test_gan_trains_in_federation_audits_and_synthesizes(ucsb: Path, tmp_path: Path) -> None:
    """Two rounds of a 5-hospital DP GAN on UCSB patches, in process: the ledger audits
    (the discriminator's DP-SGD steps), the released generator draws labelled PNGs, and a
    classifier's run is refused by `pathfed synthesize` with a clear error."""
    from common.audit import audit_run
    from common.fedavg import run_inprocess
    from common.synthesize import synthesize
    from tests.conftest import run_cli

    cfg = FederationConfig.from_mapping({
        "data": str(ucsb), "model": "dp-gan", "model-options": "width=8,latent=16",
        "sites": 5, "rounds": 2, "patches-per-slide": 4, "batch-size": 4,
        "local-epochs": 1, "lr": 0.002, "optimizer": "adam"})
    result = run_inprocess(cfg, run_dir=tmp_path / "run")
    assert all(0 < e <= 8.0 * (1 + 1e-9) for e in result.epsilon.values())
    report = audit_run(tmp_path / "run")
    assert report.ok, report.all_problems
    written = synthesize(tmp_path / "run", 6, tmp_path / "synthetic", seed=1)
    assert len(written) == 6
    with Image.open(written[0]) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    rows = list(csv.DictReader((tmp_path / "synthetic" / "labels.csv").open()))
    assert [r["label"] for r in rows] == ["0", "1"] * 3
    one_class = synthesize(tmp_path / "run", 3, tmp_path / "malignant", "malignant")
    assert all("malignant" in p.name for p in one_class)
    with pytest.raises(ConfigError, match="generates patches.*pathfed synthesize"):
        from common.predict import predict

        predict(ucsb, tmp_path / "run", tmp_path / "predicted")
    cli = run_cli("synthesize", str(tmp_path / "run"), "--n", "2", "--out",
                  str(tmp_path / "cli"))
    assert cli.returncode == 0 and len(list((tmp_path / "cli").glob("*.png"))) == 2

    classifier = FederationConfig.from_mapping({"sites": 2, "rounds": 1,
                                                "synthetic-bags": 40})
    run_inprocess(classifier, run_dir=tmp_path / "mil")
    with pytest.raises(DataError, match="is a classifier, not a generator"):
        synthesize(tmp_path / "mil", 2, tmp_path / "nothing")
    bad = run_cli("synthesize", str(tmp_path / "mil"), "--n", "2", "--out",
                  str(tmp_path / "nothing"))
    assert bad.returncode == 2 and "not a generator" in bad.stderr
