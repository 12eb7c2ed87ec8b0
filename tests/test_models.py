"""Models: registry, Opacus fitness, per-sample gradients against one bag at a time."""

from __future__ import annotations

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from common.errors import UnknownModelError
from common.models import MODELS, MILOutput, build_model, models_of_kind
from common.models.base import BAG_KINDS
from tests._bags import assert_per_bag_gradients, build
from tests._bags import bags as _bags

MIL_MODELS = models_of_kind(*BAG_KINDS)  # by declared kind, never by name


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(UnknownModelError) as err:
        build_model("resnet-9000", in_dim=4)
    for name in MODELS:
        assert name in str(err.value)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_pass_opacus_strict_validation(name: str) -> None:
    model = build(name) if MODELS[name].kind in BAG_KINDS else build_model(name)
    ModuleValidator.validate(model, strict=True)
    assert not ModuleValidator.validate(model, strict=False)


@pytest.mark.parametrize("name", MIL_MODELS)
def test_output_shapes_and_attention(name: str) -> None:
    x, mask, _ = _bags(name)
    out = build(name)(x, mask)
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (5,) and out.attention.shape == (5, 9)
    assert torch.allclose(out.attention.sum(1), torch.ones(5))
    assert (out.attention[~mask] == 0).all()


@pytest.mark.parametrize("name", MIL_MODELS)
def test_padding_does_not_change_a_bag(name: str) -> None:
    torch.manual_seed(1)
    model = build(name).eval()
    x, mask, _ = _bags(name)
    padded = model(x, mask).logits
    alone = torch.stack([model(x[i : i + 1, mask[i]], None).logits[0] for i in range(5)])
    assert torch.allclose(padded, alone, atol=1e-6)


HOOKS_MODELS = [n for n in MIL_MODELS if build(n, d=4).opacus_hooks]


@pytest.mark.parametrize("name", HOOKS_MODELS)
def test_per_sample_gradients_match_one_bag_at_a_time(name: str) -> None:
    """Opacus' hook-based per-sample gradients, for the models that declare they hold."""
    torch.manual_seed(0)
    model = build(name)
    x, mask, y = _bags(name)
    gsm = GradSampleModule(model, loss_reduction="sum")
    loss = torch.nn.functional.binary_cross_entropy_with_logits(gsm(x, mask).logits, y,
                                                                reduction="sum")
    loss.backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    for i in range(len(y)):
        model.zero_grad()
        for p in model.parameters():
            p.grad_sample = None
        out = gsm(x[i : i + 1], mask[i : i + 1]).logits
        torch.nn.functional.binary_cross_entropy_with_logits(out, y[i : i + 1],
                                                             reduction="sum").backward()
        for n, p in model.named_parameters():
            assert torch.allclose(per_sample[n][i], p.grad, atol=1e-6), n


def test_patch_cnn_follows_the_seed_architecture() -> None:
    from torch import nn

    from common.models.patch_cnn import ResidualPatchCNN, ResidualUnit

    cnn = ResidualPatchCNN(patch_size=32)
    convs = [m for m in cnn.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in cnn.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == len(convs)  # a normalisation after every convolution
    assert sum(isinstance(m, nn.MaxPool2d) for m in cnn.modules()) == 2
    assert sum(isinstance(m, ResidualUnit) for m in cnn.modules()) >= 2
    assert cnn.fc.out_features == 128 and cnn.dropout.p == 0.5
    x = torch.randn(5, 3, 32, 32)
    assert cnn(x).shape == (5, 2) and cnn.embed(x).shape == (5, 128)
    assert torch.allclose(cnn.eval().predict_proba(x).sum(1), torch.ones(5))


def test_patch_cnn_per_slide_gradients_match_one_slide_at_a_time() -> None:
    from common.training import _vmap_grad_samples

    torch.manual_seed(0)
    model = build_model("residual-patch-cnn", patch_size=16, dropout=0.0)
    x = torch.randn(3, 4, 3, 16, 16)  # 3 slides x 4 patches
    y = torch.tensor([0.0, 1.0, 1.0])
    _vmap_grad_samples(model, [x, y])
    per_slide = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    assert per_slide["cnn.stem.0.weight"].shape[0] == 3  # one gradient per slide
    for i in range(3):
        model.zero_grad()
        model.sample_losses(x[i : i + 1], y[i : i + 1]).sum().backward()
        for n, p in model.named_parameters():
            assert torch.allclose(per_slide[n][i], p.grad, atol=1e-5), n


def test_patch_cnn_expanded_weights_equal_vmap_with_patch_labels_and_frozen_layers() -> None:
    """The CNN's own per-slide gradients (one weight copy per slide) equal torch.func's
    vmap over slides, with annotation labels per patch and the stem frozen."""
    from torch.func import functional_call, grad, vmap

    from common.site import freeze

    torch.manual_seed(1)
    model = build_model("residual-patch-cnn", patch_size=16, dropout=0.0)
    freeze(model, "cnn.stem", "residual-patch-cnn")
    x, y = torch.randn(5, 3, 3, 16, 16), torch.randint(0, 2, (5, 3)).float()
    fast, losses = model.slide_gradients(x, y)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert set(fast) == set(params) and not any(n.startswith("cnn.stem") for n in fast)

    losses_of = _Losses(model)

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return functional_call(losses_of, {f"m.{k}": v for k, v in p.items()},
                               (xi[None], yi[None]))[0]

    slow = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    for n in params:
        assert torch.allclose(fast[n], slow[n], atol=1e-5), n
    assert torch.allclose(losses, model.sample_losses(x, y), atol=1e-6)


class _Losses(torch.nn.Module):
    def __init__(self, m: torch.nn.Module) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.m.sample_losses(x, y)  # type: ignore[operator, no-any-return]


@pytest.mark.parametrize("name", MIL_MODELS)
def test_mil_vmap_per_bag_gradients_match_one_bag_at_a_time(name: str) -> None:
    """The torch.func path (PathFed's default for DP) agrees with one bag at a time."""
    torch.manual_seed(0)
    assert_per_bag_gradients(build(name).eval(), *_bags(name))


def test_every_model_declares_a_kind_and_honours_the_contract() -> None:
    from common.models.base import KINDS, TrainableModel

    assert set(models_of_kind(*KINDS)) == set(MODELS)
    for name, spec in MODELS.items():
        assert spec.kind in KINDS and spec.summary
        model = build(name, d=8) if spec.kind in BAG_KINDS else build_model(name)
        assert isinstance(model, TrainableModel), name
        assert model.per_sample_grads in ("vmap", "hooks")


def test_every_bag_model_gives_instance_scores() -> None:
    from common.models.base import InstanceScorer

    for name in MIL_MODELS:
        x, mask, _ = _bags(name)
        model = build(name).eval()
        assert isinstance(model, InstanceScorer), name
        scores = model.instance_scores(x, mask)
        assert scores.shape == (5, 9) and (scores[~mask] == 0).all(), name


def test_sparse_mil_selects_a_few_patches() -> None:
    from common.models.sparse_mil import sparsemax

    torch.manual_seed(0)
    model = build_model("sparse-mil", in_dim=12, temperature=0.05).eval()
    x, mask, _ = _bags()
    chosen = model.selected(x, mask)
    assert all(0 < len(c) <= int(m.sum()) for c, m in zip(chosen, mask))
    assert all(bool(mask[i, c].all()) for i, c in enumerate(chosen))  # never padding
    z = torch.tensor([[0.5, -0.1, -3.0], [2.0, 0.1, 0.0]])
    assert torch.allclose(sparsemax(z), torch.tensor([[0.8, 0.2, 0.0], [1.0, 0.0, 0.0]]))


def test_model_options_are_checked_and_applied() -> None:
    from common.config import FederationConfig
    from common.site import initial_model

    model = initial_model(FederationConfig(model="sa-mil",
                                           model_options="hidden_dim=8, kernel=rbf"))
    assert model.embed[0].out_features == 8 and model.kernel == "rbf"
    for options, says in (("hidden=3", r"'hidden=3' is not an option of model 'sa-mil'; its "
                                        r"options: hidden_dim \(default 32\)"),
                          ("kernel=gauss", "is not one of dot, rbf, laplace"),
                          ("hidden_dim=big", r"hidden_dim='big' is not a int")):
        with pytest.raises(ValueError, match=says):
            FederationConfig(model="sa-mil", model_options=options)


@pytest.mark.slow
@pytest.mark.parametrize("name", MIL_MODELS)
def test_each_bag_model_trains_in_a_tiny_dp_federation(name: str, tmp_path) -> None:
    """2 sites x 2 rounds of DP-SGD through the one engine (real Opacus, the ledger), then
    the last checkpoint loads into a fresh model that scores bags as the global one."""
    from common.config import FederationConfig
    from common.fedavg import run_inprocess
    from common.runs import RunFolder, load_checkpoint
    from common.site import initial_model
    from common.training import set_weights

    cfg = FederationConfig(model=name, sites=2, rounds=2, synthetic_bags=24, batch_size=8,
                           local_epochs=1, dp=True, epsilon=8.0, secagg=False)
    result = run_inprocess(cfg, run_dir=tmp_path / "run")
    assert result.summary["rounds_with_model"] == 2, result.summary
    assert all(0 < e <= 8.0 for e in result.epsilon.values())
    latest = RunFolder(tmp_path / "run").latest_checkpoint()
    assert latest is not None and latest[0] == 2
    fresh = initial_model(cfg)
    set_weights(fresh, list(load_checkpoint(latest[1]).values()))
    again = initial_model(cfg)
    set_weights(again, result.weights)
    x, mask, _ = _bags(name, d=32)  # the synthetic default's layout (4 children a region)
    assert torch.allclose(fresh.eval().scores(x, mask), again.eval().scores(x, mask))


def test_acmil_masks_top_instances_only_in_training() -> None:
    torch.manual_seed(0)
    model = build_model("acmil", in_dim=12, top_k=3, mask_prob=1.0)
    x, mask, y = _bags()
    model.eval()
    assert torch.equal(model(x, mask).attention, model(x, mask).attention)
    model.train()
    logits, _, attention = model._parts(x, mask)
    masked = (attention == 0) & mask.unsqueeze(1)  # real instances the masking hid
    assert masked.any() and (attention.sum(-1) - 1).abs().max() < 1e-5
    assert torch.isfinite(model.sample_losses(x, mask, y)).all()

