"""MixPatch (common.data.mixpatch): mixing groups, soft labels, the substitution
accountant, the patch CNN's soft-label gradients, and a private site and federation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import FederationConfig
from common.data.bags import BagSet
from common.data.mixpatch import MixPatchOptions, group_count, mixing_groups, mixpatch_dataset
from common.errors import ConfigError
from common.features import IMAGENET_MEAN, IMAGENET_STD
from common.privacy import (
    SUBSTITUTION,
    history_epsilon,
    plan_site,
    restore_plan,
    substitution_rdp,
)


def test_removing_a_unit_changes_only_its_own_group() -> None:
    names = [f"slide-{i}" for i in range(23)]
    count = group_count(len(names), 2)
    groups = mixing_groups(names, count, seed=5)
    assert sorted(i for g in groups for i in g) == list(range(23))
    for gone in (0, 7, 22):
        kept = [n for n in names if n != names[gone]]
        after = {frozenset(kept[i] for i in g) for g in mixing_groups(kept, count, seed=5)}
        before = {frozenset(names[i] for i in g) for g in groups}
        changed = before ^ after
        own = next(frozenset(names[i] for i in g) for g in groups if gone in g)
        assert changed <= {own, own - {names[gone]}}, changed


def _bags() -> BagSet:
    """Two slides of uniform 8 x 8 patches: dark negatives, bright positives."""
    dark = np.zeros((5, 8, 8, 3), np.uint8)
    bright = np.full((6, 8, 8, 3), 255, np.uint8)
    return BagSet((dark, bright), np.array([0, 1]), ("neg", "pos"))


def _pixels(x: torch.Tensor) -> np.ndarray:
    """Undo the encoder scaling: uint8-valued ``[..., 3, P, P]``."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x * std + mean) * 255).round().numpy()


def test_mixed_patches_are_mosaics_labelled_by_their_positive_share() -> None:
    options = MixPatchOptions(grid=2, ratio=0.75, group=2)
    x, y = mixpatch_dataset(_bags(), [[0, 1]], k=16, seed=3, options=options).tensors
    assert x.shape == (1, 16, 3, 8, 8) and y.shape == (1, 16)
    pixels = _pixels(x[0])
    for col in range(16):
        cells = [pixels[col, 0, r:r + 4, c:c + 4] for r in (0, 4) for c in (0, 4)]
        assert all(np.ptp(cell) == 0 for cell in cells)  # each cell from one patch
        share = np.mean([cell[0, 0] == 255 for cell in cells])
        assert y[0, col].item() == pytest.approx(share)
        if col < 4:  # 16 - round(0.75 * 16) plain patches first
            assert share in (0.0, 1.0)
    soft = y[0, 4:]
    assert ((soft > 0) & (soft < 1)).any()  # some mixed patches mix both slides


def test_a_group_of_one_mixes_only_its_own_patches() -> None:
    x, y = mixpatch_dataset(_bags(), [[0], [1]], k=6, seed=0,
                            options=MixPatchOptions()).tensors
    assert (y[0] == 0).all() and (y[1] == 1).all()
    assert (_pixels(x[0]) == 0).all()


def test_substitution_rdp_bounds_the_exact_gaussian_and_exceeds_add_remove() -> None:
    """At rate 1 the substitution of one sample is the Gaussian of sensitivity 2C, whose
    RDP is exactly 2 alpha / sigma^2: the bound holds, and is not loose by much."""
    from opacus.accountants.analysis import rdp as analysis

    orders = [1.5, 2.0, 4.0, 16.0, 64.0]
    sigma = 3.0
    exact = np.array([2 * a / sigma**2 for a in orders])
    bound = substitution_rdp(sigma, 1.0, 1, orders)
    assert (bound >= exact * (1 - 1e-12)).all() and (bound <= 1.6 * exact).all()
    sampled = substitution_rdp(sigma, 0.1, 50, orders)
    add_remove = np.asarray(analysis.compute_rdp(q=0.1, noise_multiplier=sigma, steps=50,
                                                 orders=orders))
    assert (sampled >= add_remove).all()
    with pytest.raises(ValueError, match="above 1"):
        substitution_rdp(sigma, 0.1, 1, [1.0])


def test_substitution_plan_keeps_its_budget_with_more_noise() -> None:
    settings = dict(batch_size=2, local_epochs=2, rounds=10, epsilon=4.0, delta=1e-5,
                    max_grad_norm=1.0, max_noise_multiplier=50.0, accountant="prv")
    plain = plan_site(6, **settings)
    mixed = plan_site(6, **settings, substitution=True)
    assert mixed.entry() == (mixed.noise_multiplier, mixed.sample_rate, 6, SUBSTITUTION)
    total = [mixed.entry(mixed.steps_per_round * 10)]
    assert history_epsilon(total, 1e-5) <= 4.0 * (1 + 1e-9)
    assert history_epsilon([(mixed.noise_multiplier * 0.98, *total[0][1:])], 1e-5) > 4.0
    assert mixed.accountant == "rdp" and mixed.noise_multiplier > 1.5 * plain.noise_multiplier
    # accounted as add/remove, the same schedule would claim far less than the truth
    assert history_epsilon([total[0][:3]], 1e-5) < 0.7 * history_epsilon(total, 1e-5)
    saved = {"inputs": {"n_train": 6, **settings, "substitution": True},
             "plan": mixed.to_dict()}
    assert restore_plan(saved, 6, **settings, substitution=True) == mixed
    assert restore_plan({**saved, "plan": {**mixed.to_dict(), "substitution": False}}, 6,
                        **settings, substitution=True) is None


def test_soft_label_slide_gradients_match_one_slide_at_a_time() -> None:
    """The CNN's expanded-weight per-sample gradients with MixPatch's soft labels equal
    each sample's own backward pass, and a 0/1 soft label is the class-index loss."""
    from common.models import build_model

    torch.manual_seed(2)
    model = build_model("residual-patch-cnn", patch_size=16, dropout=0.0)
    x = torch.randn(3, 4, 3, 16, 16)
    y = torch.tensor([[0.0, 0.25, 1.0, 0.5], [1.0, 1.0, 0.75, 0.0], [0.0, 0.0, 0.0, 0.5]])
    fast, losses = model.slide_gradients(x, y)
    for i in range(3):
        model.zero_grad()
        loss = model.sample_losses(x[i:i + 1], y[i:i + 1]).sum()
        assert loss.item() == pytest.approx(losses[i].item(), rel=1e-5)
        loss.backward()
        for n, p in model.named_parameters():
            assert torch.allclose(fast[n][i], p.grad, atol=1e-5), n
    hard = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    logits = model(x[:1]).reshape(4, 2)
    expected = torch.nn.functional.cross_entropy(logits, hard[0].long())
    assert model.sample_losses(x[:1], hard).item() == pytest.approx(expected.item(), rel=1e-6)


def test_mixpatch_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="mixpatch: mixes image patches"):
        FederationConfig.from_mapping({"mixpatch": True})
    with pytest.raises(ConfigError, match="mixpatch-grid: 3 must divide patch-size 32"):
        FederationConfig.from_mapping({"mixpatch": True, "model": "residual-patch-cnn",
                                       "mixpatch-grid": 3})
    with pytest.raises(ConfigError, match="mixpatch: its mixing groups"):
        FederationConfig.from_mapping({"mixpatch": True, "model": "residual-patch-cnn",
                                       "dp-mode": "distributed"})


UCSB_MIX = {"model": "residual-patch-cnn", "mixpatch": True, "sites": 5, "rounds": 2,
            "patches-per-slide": 4, "batch-size": 2, "local-epochs": 1, "lr": 0.05,
            "optimizer": "sgd"}


@pytest.mark.slow
def test_mixpatch_federation_accounts_groups_by_substitution_and_audits(
        ucsb: Path, tmp_path: Path) -> None:
    """Two rounds of a 5-hospital UCSB federation with MixPatch, in process: each site's
    samples are its mixing groups, its accountant holds substitution steps only, its
    claim is the substitution bound, and the audit recomputes it; a ledger rewritten to
    claim add/remove accounting for the same run is refused."""
    from common.audit import audit_run
    from common.crypto.signing import SigningKey
    from common.fedavg import run_inprocess
    from common.site import Site

    cfg = FederationConfig.from_mapping({**UCSB_MIX, "data": str(ucsb)})
    sites = [Site(cfg, i) for i in range(cfg.sites)]
    keys = {s.name: SigningKey.generate() for s in sites} | {"server": SigningKey.generate()}
    run = tmp_path / "run"
    result = run_inprocess(cfg, sites, run_dir=run, server_key=keys["server"],
                           site_keys={s.name: keys[s.name] for s in sites})
    assert all(math.isfinite(e) and e > 0 for e in result.epsilon.values())
    for site in sites:
        assert site.plan is not None and site.plan.substitution
        assert site.dp_samples == len(site.mix_groups or []) <= len(site.train_set)
        assert all(len(h) == 4 for h in site.accountant.history)
        assert site.epsilon == pytest.approx(history_epsilon(site.accountant.history, 1e-5))
    report = audit_run(run)
    assert report.ok, report.all_problems
    for audit in report.sites:
        assert audit.rdp == pytest.approx(result.epsilon[audit.site], rel=1e-6)

    from tests.test_audit import _rewrite

    def plain(record: dict) -> dict:
        record.pop("adjacency", None)
        return record

    lied = audit_run(_rewrite(run, tmp_path / "lied", keys, plain))
    assert not lied.ok
    assert any("substitution of a mixing group" in p for p in lied.all_problems)
    records = [json.loads(line)["entry"]["record"]
               for line in (run / "ledger.jsonl").read_text().splitlines()]
    assert {r.get("adjacency") for r in records if r["kind"] == "site-round"} == {
        "substitution"}
