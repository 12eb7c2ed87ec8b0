"""Privacy accounting: calibration, persistence across rounds, budget enforcement."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from common.config import FederationConfig
from common.errors import ConfigError, PrivacyBudgetExhausted
from common.privacy import (
    RDP_ALPHAS,
    SiteAccountant,
    independent_epsilon,
    plan_site,
    restore_plan,
)
from common.site import Site
from common.training import local_train

PLAN = dict(batch_size=16, local_epochs=2, rounds=4, epsilon=3.0, delta=1e-5,
            max_grad_norm=1.0, max_noise_multiplier=50.0)


def test_plan_matches_opacus_loader_and_meets_budget() -> None:
    plan = plan_site(100, **PLAN)
    assert plan.sample_rate == pytest.approx(1 / 7)  # ceil(100 / 16) batches
    assert plan.steps_per_round == 14
    eps = independent_epsilon([(plan.noise_multiplier, plan.sample_rate, 4 * 14)], 1e-5)
    assert 2.9 < eps <= 3.0


PLAN_INPUTS = {**PLAN, "accountant": "rdp"}


def test_saved_plan_is_reused_only_for_its_inputs_and_when_it_keeps_the_budget() -> None:
    plan = plan_site(100, **PLAN_INPUTS)
    saved = {"inputs": {"n_train": 100, **PLAN_INPUTS}, "plan": plan.to_dict()}
    assert restore_plan(saved, 100, **PLAN_INPUTS) == plan
    # another site size, budget or number of rounds: calibrate anew
    assert restore_plan(saved, 101, **PLAN_INPUTS) is None
    for key, value in (("epsilon", 4.0), ("rounds", 5), ("accountant", "prv")):
        assert restore_plan(saved, 100, **{**PLAN_INPUTS, key: value}) is None
    # a saved noise that would overspend (edited state, other accountant code): refused
    weak = {**saved, "plan": {**plan.to_dict(), "noise_multiplier": plan.noise_multiplier * 0.9}}
    assert restore_plan(weak, 100, **PLAN_INPUTS) is None
    # a plan whose own budget, clipping or rounds were edited (inputs left alone): refused
    for key, value in (("epsilon_budget", 6.0), ("max_grad_norm", 10.0), ("planned_rounds", 2),
                       ("delta", 1e-3), ("accountant", "gdp")):
        edited = {**saved, "plan": {**plan.to_dict(), key: value}}
        assert restore_plan(edited, 100, **PLAN_INPUTS) is None, key
    # a sampling rate or step count the loader would not give: refused
    odd = {**saved, "plan": {**plan.to_dict(), "steps_per_round": 13}}
    assert restore_plan(odd, 100, **PLAN_INPUTS) is None
    # more noise than the budget needs spends less: a valid plan, kept
    strong = {**saved, "plan": {**plan.to_dict(), "noise_multiplier": plan.noise_multiplier * 2}}
    assert restore_plan(strong, 100, **PLAN_INPUTS).noise_multiplier == pytest.approx(
        2 * plan.noise_multiplier)
    # the calibration's own fallback (the max-noise-multiplier cap) is kept as it is
    capped_inputs = {**PLAN_INPUTS, "epsilon": 0.05, "max_noise_multiplier": 2.0}
    capped = plan_site(100, **capped_inputs)
    assert capped.noise_multiplier == 2.0
    assert restore_plan({"inputs": {"n_train": 100, **capped_inputs}, "plan": capped.to_dict()},
                        100, **capped_inputs) == capped
    for broken in (None, "plan", {"inputs": saved["inputs"]},
                   {"inputs": saved["inputs"], "plan": {"noise_multiplier": 1.0}}):
        assert restore_plan(broken, 100, **PLAN_INPUTS) is None


def test_a_new_site_process_reuses_the_runs_plan_without_calibrating() -> None:
    cfg = FederationConfig(synthetic_bags=60, rounds=3, batch_size=8, epsilon=5.0)
    first = Site(cfg, 0)
    state = first.state()
    assert state["plan"]["plan"] == first.plan.to_dict()  # type: ignore[union-attr]
    plan_site.cache_clear()  # as in a fresh ClientApp process
    again = Site(cfg, 0, state=state)
    assert again.plan == first.plan and plan_site.cache_info().misses == 0
    # a run with another budget calibrates its own
    other = Site(cfg.model_copy(update={"epsilon": 2.0}), 0, state=state)
    assert plan_site.cache_info().misses == 1
    assert other.plan.noise_multiplier > first.plan.noise_multiplier  # type: ignore[union-attr]


def test_delta_must_be_below_one_over_n() -> None:
    with pytest.raises(ConfigError, match="delta"):
        plan_site(10, **{**PLAN, "delta": 0.2})


def test_accountant_survives_rounds_through_its_saved_state() -> None:
    cfg = FederationConfig(synthetic_bags=60, rounds=3, batch_size=8, epsilon=5.0,
                           accountant="rdp")  # checked below against Opacus' RDP by hand
    state = None
    epsilons = []
    for rnd in range(1, 4):
        site = Site(cfg, 0, state=state)  # a new process each round, as in Flower
        site.train(_weights(site), rnd)
        state = site.state()
        epsilons.append(site.epsilon)
    assert epsilons[0] < epsilons[1] < epsilons[2] <= 5.0
    plan = site.plan
    assert plan is not None
    steps = 3 * plan.steps_per_round
    assert site.accountant.steps == steps  # every step counted, empty batches too
    expected = independent_epsilon([(plan.noise_multiplier, plan.sample_rate, steps)], 1e-5)
    assert epsilons[-1] == pytest.approx(expected, rel=1e-9)
    # ... and an Opacus accountant built by hand agrees
    acc = RDPAccountant()
    acc.history = [(plan.noise_multiplier, plan.sample_rate, steps)]
    assert epsilons[-1] == pytest.approx(acc.get_epsilon(1e-5, alphas=RDP_ALPHAS), rel=1e-9)


def test_site_refuses_a_round_beyond_its_budget() -> None:
    cfg = FederationConfig(synthetic_bags=60, batch_size=8, site_epsilon="site-0=0.05",
                           max_noise_multiplier=2.0)
    site = Site(cfg, 0)
    assert not site.can_train()
    before = site.state()
    with pytest.raises(PrivacyBudgetExhausted, match="site-0.*budget 0.05"):
        site.train(_weights(site), 1)
    assert site.state() == before and site.epsilon == 0.0  # nothing spent
    # another site with the federation budget trains
    other = Site(cfg, 1)
    assert other.train(_weights(other), 1).metrics["epsilon"] > 0


def test_budget_check_stops_after_planned_rounds() -> None:
    plan = plan_site(64, **{**PLAN, "rounds": 2})
    acc = SiteAccountant()
    for _ in range(2):
        acc.check_next_round(plan, "site-x")
        acc.accountant.history.append((plan.noise_multiplier, plan.sample_rate,
                                       plan.steps_per_round))
    with pytest.raises(PrivacyBudgetExhausted):
        acc.check_next_round(plan, "site-x")


def test_plain_training_spends_nothing() -> None:
    cfg = FederationConfig(synthetic_bags=40, dp=False)
    site = Site(cfg, 0)
    report = site.train(_weights(site), 1)
    assert report.metrics["epsilon"] == 0.0 and "noise_multiplier" not in report.metrics


def _weights(site: Site) -> list:
    from common.site import initial_model
    from common.training import get_weights

    return get_weights(initial_model(site.cfg))


def test_local_train_requires_accountant_with_plan() -> None:
    plan = plan_site(64, **PLAN)
    site = Site(FederationConfig(synthetic_bags=40), 0)
    from common.site import initial_model

    with pytest.raises(ValueError, match="accountant"):
        local_train(initial_model(site.cfg), site.data.train.to_dataset(), epochs=1,
                    batch_size=8, lr=0.1, plan=plan, accountant=None)


@pytest.mark.parametrize("model, frozen", [("gated-attention-mil", ("embed.", "attention_v.")),
                                           ("attention-mil", ("embed.",))])
def test_frozen_parameters_get_no_update_under_dp(model: str, frozen: tuple[str, ...]) -> None:
    """Per-slide gradients (torch.func) with some layers frozen: frozen layers send a zero
    update, the others a clipped and noised one, and epsilon is spent."""
    from common.site import initial_model

    cfg = FederationConfig(synthetic_bags=40, model=model,
                           freeze=",".join(f.rstrip(".") for f in frozen))
    site = Site(cfg, 0)
    names = list(initial_model(cfg).state_dict())
    report = site.train(_weights(site), 1)
    assert report.metrics["epsilon"] > 0
    for name, update in zip(names, report.update, strict=True):
        assert (np.abs(update).max() == 0) == name.startswith(frozen), name
    with pytest.raises(ConfigError, match="freezes every parameter"):
        initial_model(cfg.model_copy(update={"freeze": ",".join(
            sorted({n.split(".")[0] for n in names}))}))


def test_planner_calibrates_every_layout_with_the_sites_own_accountant() -> None:
    from common.privacy.planner import plan_candidates

    cfg = FederationConfig(epsilon=3.0, rounds=10, accountant="rdp", delta=1e-3)
    found = plan_candidates(cfg, 6, epochs=(1,))
    assert len(found) == len({(c.batch_size, c.local_epochs) for c in found}) == 4
    for c in found:
        assert c.plan == plan_site(6, batch_size=c.batch_size, local_epochs=c.local_epochs,
                                   rounds=10, epsilon=3.0, delta=1e-3, max_grad_norm=1.0,
                                   max_noise_multiplier=20.0, accountant="rdp")
        assert c.epsilon <= 3.0 * (1 + 1e-9) or c.capped
        assert c.snr == pytest.approx(math.sqrt(c.steps) * c.batch / c.plan.noise_multiplier)
    assert [c.snr for c in found if not c.capped] == sorted(
        (c.snr for c in found if not c.capped), reverse=True)
    # a budget no layout can keep at the noise cap is flagged, not hidden
    tight = plan_candidates(FederationConfig(epsilon=0.5, rounds=50, accountant="rdp", delta=1e-3,
                                             max_noise_multiplier=2.0), 2, epochs=(1,))
    assert all(c.capped for c in tight)
    dist = plan_candidates(FederationConfig(epsilon=3.0, rounds=10, dp_mode="distributed"),
                           40, sites=4, dim=500)
    assert len(dist) == 1 and dist[0].plan.distributed and dist[0].batch == 160
    assert dist[0].epsilon <= 3.0 * (1 + 1e-9)
