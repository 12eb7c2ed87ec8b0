"""Distributed DP (common.privacy.distributed): Skellam shares summed by SecAgg+'s arithmetic,
their accounting, the dropout rule, and the audit that recomputes them."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from common.config import FederationConfig
from common.crypto.quantize import MODULUS, NoiseShare, add_share, quantize, secure_sum
from common.errors import ConfigError, PathFedError
from common.privacy import history_epsilon, plan_distributed
from common.privacy.distributed import (
    INT_ALPHAS,
    calibrate_sigma,
    integer_sensitivity,
    min_sites,
    skellam_epsilon,
    skellam_rdp,
)

DIST = {"dp-mode": "distributed", "sites": 3, "synthetic-bags": 60, "secagg-max-weight": 100}


def test_skellam_rdp_bounds_the_exact_renyi_divergence() -> None:
    """The bound against the exact Renyi divergence of two shifted 1-D Skellams, computed
    from their pmfs; and the closed form's known value."""
    from scipy.special import logsumexp
    from scipy.stats import skellam

    assert skellam_rdp(16, 1, 1, 1000) == pytest.approx(0.008 + 37 / 4e6, rel=1e-12)
    for mu, shift in ((20.0, 1), (50.0, 3), (200.0, 5)):
        k = np.arange(-int(40 * math.sqrt(mu)) - shift, int(40 * math.sqrt(mu)) + shift)
        p = skellam.logpmf(k - shift, mu / 2, mu / 2)  # Poisson(mu/2) - Poisson(mu/2)
        q = skellam.logpmf(k, mu / 2, mu / 2)
        for alpha in (2, 4, 8, 16):
            exact = logsumexp(alpha * p + (1 - alpha) * q) / (alpha - 1)
            bound = skellam_rdp(alpha, shift, shift, mu)
            assert exact <= bound * (1 + 1e-9)
            assert exact >= 0.8 * bound  # and not loose


def test_plan_is_the_least_noise_that_keeps_the_budget() -> None:
    l2, l1 = integer_sensitivity(5000, lr=0.5, max_grad_norm=1.0, max_weight=100,
                                 quantization_range=2**22, clipping_range=0.5)
    sigma = calibrate_sigma(3.0, 1e-5, 40, l2, l1, 50.0)
    assert skellam_epsilon(sigma, 40, 1e-5, l2, l1) <= 3.0 * (1 + 1e-9)
    assert skellam_epsilon(sigma * 0.99, 40, 1e-5, l2, l1) > 3.0
    # the discrete correction is tiny at this variance: the Gaussian at integer orders
    from common.privacy import spent

    gauss = spent(INT_ALPHAS, np.array([40 * a / (2 * sigma**2) for a in INT_ALPHAS]), 1e-5)
    assert gauss <= skellam_epsilon(sigma, 40, 1e-5, l2, l1) < gauss * 1.001
    # quantisation costs sqrt(d) on the grid: here 0.3 % more noise than sensitivity alone
    ideal = 2**22 / (2 * 0.5) * 0.5 * (1 / 100 + 2 / 2**22)
    assert l2 == pytest.approx((ideal + math.sqrt(5000)) * (1 + 1e-6))
    assert l1 == pytest.approx(l2 * math.sqrt(5000))


def test_secure_sum_is_flowers_secagg_arithmetic() -> None:
    """Without noise, :func:`secure_sum` is Flower 1.42's client weighting and quantiser and
    its server's modular sum and dequantisation, value for value."""
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        parameters_addition,
        parameters_mod,
        parameters_multiply,
    )
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.common.secure_aggregation.quantization import quantize as flower_quantize

    rng = np.random.default_rng(1)
    c, t, w = 0.5, 2**22, 100.0
    replies = [([rng.normal(scale=0.05, size=(7, 3)), rng.normal(scale=0.05, size=4)], n, None)
               for n in (30, 42, 17)]
    np.random.seed(5)
    ours = secure_sum(replies, clipping_range=c, quantization_range=t, max_weight=w)
    np.random.seed(5)
    total = None
    for update, n, _ in replies:
        q_ratio = round(n / w * t)
        vec = flower_quantize(parameters_multiply(update, q_ratio / t), c, t)
        vec = [v.astype(np.int64) for v in factor_combine(q_ratio, vec)]  # masks: int64
        total = vec if total is None else parameters_addition(total, vec)
    q_total, summed = factor_extract(parameters_mod(total, MODULUS))
    theirs = dequantize(summed, c, t)
    for ours_arr, theirs_arr in zip(ours, theirs):
        expected = (theirs_arr - (len(replies) - 1) * c) * (t / q_total)
        np.testing.assert_allclose(ours_arr, expected, rtol=0, atol=1e-12)


def test_noise_of_the_sum_has_the_intended_variance_over_many_rounds() -> None:
    """Three shares of v/3 each sum to a centred noise of variance v (a z-test on the
    sample variance of 60 000 coordinates), and the modular sum is exact: the noisy and
    noiseless aggregates differ by whole grid steps."""
    c, t, w, v = 0.5, 2**22, 100.0, 4.0e6
    step = 2 * c / t
    rng = np.random.default_rng(2)
    noise = []
    for rnd in range(30):
        replies = [([rng.normal(scale=0.05, size=2000)], n, None) for n in (30, 42, 17)]
        state = np.random.get_state()
        plain = secure_sum(replies, clipping_range=c, quantization_range=t, max_weight=w)
        np.random.set_state(state)
        noisy = secure_sum([(u, n, NoiseShare(v / 3, 3, seed=1000 * rnd + i))
                            for i, (u, n, _) in enumerate(replies)],
                           clipping_range=c, quantization_range=t, max_weight=w)
        inverse = t / sum(round(n / w * t) for _, n, _ in replies)
        units = (noisy[0] - plain[0]) / (step * inverse)
        np.testing.assert_allclose(units, np.round(units), atol=1e-6)
        noise.append(np.round(units))
    sample = np.concatenate(noise)
    var = sample.var()
    assert abs(var - v) < 4 * v * math.sqrt(2 / sample.size)  # 4 standard errors
    assert abs(sample.mean()) < 4 * math.sqrt(v / sample.size)


def test_shares_wrap_modulo_two_to_the_32_and_still_sum_exactly() -> None:
    """Vectors at the edges of the grid plus shares far larger than the values: each site's
    vector wraps below zero, the sum modulo 2**32 is the integer sum."""
    quantized = [np.array([0, 1, 2**22], np.uint32), np.array([3, 0, 2**22 - 1], np.uint32)]
    shares = [NoiseShare(1e12, 2, seed=s) for s in (7, 8)]
    vectors = [add_share([q], share)[0] for q, share in zip(quantized, shares)]
    assert all(v.dtype == np.uint32 for v in vectors)
    draws = [share.draw([(3,)])[0] for share in shares]
    true = sum(q.astype(np.int64) for q in quantized) + sum(draws)
    summed = (vectors[0].astype(np.int64) + vectors[1]) % MODULUS
    np.testing.assert_array_equal(summed, true % MODULUS)
    assert (quantized[0].astype(np.int64) + draws[0] < 0).any()


def test_client_seam_adds_the_pending_share_to_flowers_quantised_vector() -> None:
    from client.secagg import quantize as seam_quantize
    from common.crypto.quantize import pending_share

    update = [np.linspace(-0.1, 0.1, 12).reshape(3, 4)]
    np.random.seed(0)
    plain = quantize(update, 0.5, 2**22)
    share = NoiseShare(1e6, 3, seed=11)
    token = pending_share.set(share)
    try:
        np.random.seed(0)
        noisy = seam_quantize(update, 0.5, 2**22)
        assert pending_share.get() is None  # consumed: never added twice
    finally:
        pending_share.reset(token)
    expected = (plain[0].astype(np.int64) + share.draw([(3, 4)])[0]) % MODULUS
    np.testing.assert_array_equal(noisy[0], expected)
    # a distributed-DP round whose share did not reach the quantiser sends nothing
    from client.secagg import _expect_share

    token = _expect_share.set(True)
    try:
        with pytest.raises(RuntimeError, match="without its noise share"):
            seam_quantize(update, 0.5, 2**22)
    finally:
        _expect_share.reset(token)


def test_dropout_rule_sizes_shares_for_the_survivors() -> None:
    """With secagg-dropout 1/3 of 3 sites the shares are sized for 2: a sum of the 2
    survivors carries the whole planned variance; a sum of fewer is never formed."""
    from common.fedavg import _aggregate
    from common.site import Site, initial_model
    from common.training import get_weights

    cfg = FederationConfig.from_mapping({**DIST, "rounds": 5, "secagg-dropout": 0.34})
    assert min_sites(3, 0.34) == 2 and min_sites(3, 0.0) == 3 and min_sites(10, 0.2) == 8
    sites = [Site(cfg, i) for i in range(3)]
    weights = get_weights(initial_model(cfg))
    reports = [s.train(weights, 1, sites_in_sum=2) for s in sites[:2]]  # site-2 dropped
    plan = sites[0].plan
    assert plan is not None and plan.distributed
    assert all(r.noise_share.sites == 2 for r in reports)
    assert sum(r.noise_share.variance for r in reports) == pytest.approx(plan.noise_variance)
    # the promised epsilon is what each survivor's accountant holds after the round
    promised = skellam_epsilon(plan.noise_multiplier, 1, cfg.delta, plan.l2_sensitivity,
                               plan.l1_sensitivity)
    assert sites[0].epsilon == pytest.approx(promised)
    updates = [(r.update, r.n_samples) for r in reports]
    shares = [r.noise_share for r in reports]
    assert _aggregate(cfg, updates, shares, 2) is not None
    assert _aggregate(cfg, updates, shares, 3) is None  # shares sized for 3: not summed
    # after the planned rounds the budget is spent, to the accountant's precision
    for rnd in range(2, 6):
        sites[0].train(weights, rnd, sites_in_sum=2)
    assert sites[0].epsilon <= cfg.epsilon * (1 + 1e-9) and not sites[0].can_train()


def test_distributed_federation_spends_as_planned_and_audits(tmp_path: Path) -> None:
    from common.audit import _distributed_entry, audit_run
    from common.fedavg import run_inprocess
    from common.ledger import verify_ledger

    cfg = FederationConfig.from_mapping({**DIST, "rounds": 4, "server-optimizer": "fedadam",
                                         "server-lr": 0.05})
    result = run_inprocess(cfg, run_dir=tmp_path / "run")
    plan = plan_distributed(42, rounds=4, epsilon=8.0, delta=1e-5, max_grad_norm=1.0,
                            max_noise_multiplier=20.0, lr=0.5,
                            dim=int(_records(tmp_path / "run")[0]["dim"]), max_weight=100.0,
                            quantization_range=2**22, clipping_range=0.5)
    expected = history_epsilon([plan.entry(4)], 1e-5)
    assert all(eps == pytest.approx(expected) for eps in result.epsilon.values())
    assert 7.9 < expected <= 8.0
    report = audit_run(tmp_path / "run")
    assert report.ok, report.all_problems
    assert {s.dp_mode for s in report.sites} == {"distributed"}
    assert all(s.rdp == pytest.approx(expected) for s in report.sites)
    assert any("semi-honest" in n for s in report.sites for n in s.notes)
    # a record whose sensitivity or shares are smaller than its settings give is refused
    record = verify_ledger(tmp_path / "run" / "ledger.jsonl").records("site-round")[0]["record"]
    from common.audit import SiteAudit

    config = FederationConfig.from_mapping(DIST | {"rounds": 4}).to_run_config()
    entry = (record["noise_multiplier"], 1.0, 1)
    for change, words in (({"l2_sensitivity": record["l2_sensitivity"] / 2}, "below"),
                          ({"share_variance": record["share_variance"] / 2}, "sum to less"),
                          ({"dim": 10**9}, "sends")):
        audit = SiteAudit("site-0")
        assert _distributed_entry(record | change, entry, config, audit) is None
        assert words in audit.problems[0]
    assert _distributed_entry(record, entry, config, SiteAudit("site-0")) is not None


def _records(run_dir: Path) -> list[dict]:
    from common.ledger import verify_ledger

    return [e["record"] for e in
            verify_ledger(run_dir / "ledger.jsonl").records("site-round")]


def test_distributed_mode_needs_secagg_and_one_budget() -> None:
    with pytest.raises(ConfigError, match="dp-mode: distributed DP needs"):
        FederationConfig.from_mapping({**DIST, "secagg": False})
    with pytest.raises(ConfigError, match="dp-mode: distributed DP needs"):
        FederationConfig.from_mapping({**DIST, "dp": False})
    with pytest.raises(ConfigError, match="site-epsilon"):
        FederationConfig.from_mapping({**DIST, "site-epsilon": "site-0=1"})


def test_a_round_already_answered_is_never_answered_again(tmp_path: Path) -> None:
    """A restarted server asking the same round again: a second vector with fresh shares
    beside other sites' could expose a difference with too little noise, so the site
    refuses (local DP re-sends the reply already released)."""
    from common.privacy.store import SiteStore
    from common.site import Site, initial_model
    from common.training import get_weights

    cfg = FederationConfig.from_mapping({**DIST, "rounds": 3})
    weights = get_weights(initial_model(cfg))
    site = Site(cfg, 0, store=SiteStore("site-0", tmp_path / "site-0"))
    site.round(weights, 1)
    spent = site.epsilon
    again = Site(cfg, 0, store=SiteStore("site-0", tmp_path / "site-0"))
    with pytest.raises(PathFedError, match="never sends a second vector"):
        again.round(weights, 1)
    assert again.epsilon == pytest.approx(spent)


def _site_files(folder: Path, broken: int) -> Path:
    """Three synthetic sites as site files; site ``broken`` has a NaN feature, so it fails
    every training message (after SecAgg+'s key sharing: a dropout)."""
    from common.data.bags import save_site_file
    from common.data.sources import load_site

    for i in range(3):
        site = load_site(i, 3, "", 0, 0.3, 60)
        if i == broken:
            site.train.bags[0][0, 0] = np.nan
        save_site_file(site, folder / f"site-{i}.npz")
    return folder


@pytest.mark.slow
def test_flower_secagg_federation_with_a_dropout(tmp_path: Path) -> None:
    """A real Flower simulation with SecAgg+: site-2 drops after key sharing in every round.
    With secagg-dropout 1/3 the two survivors' shares are summed and unmasked, each
    survivor spends exactly its plan, and the audit recomputes it; with secagg-dropout 0
    the shares are sized for three and the server never unmasks a sum of two."""
    from common.audit import audit_run
    from simulations.simulate import simulate

    data = _site_files(tmp_path / "data", broken=2)
    base = {**DIST, "rounds": 2, "data": str(data), "seed": 3,
            "server-optimizer": "fedadam", "server-lr": 0.03}  # the Flower path steps with it
    cfg = FederationConfig.from_mapping({**base, "secagg-dropout": 0.34,
                                         "out": str(tmp_path / "tolerant")})
    simulate(cfg)
    from common.runs import RunFolder

    latest = RunFolder(cfg.out).latest_checkpoint()
    assert latest is not None and latest[0] == 2  # both rounds summed by the survivors
    report = audit_run(cfg.out)
    assert report.ok, report.all_problems
    audited = {s.site: s for s in report.sites}
    assert not audited["site-2"].rounds_trained
    for name in ("site-0", "site-1"):
        s = audited[name]
        assert s.dp_mode == "distributed" and len(s.rounds_trained) == 2
        assert s.claimed == pytest.approx(s.rdp) and s.claimed <= cfg.epsilon * (1 + 1e-9)
    assert {r["noise_sites"] for r in _records(Path(cfg.out))} == {2}

    strict = FederationConfig.from_mapping({**base, "secagg-dropout": 0.0,
                                            "out": str(tmp_path / "strict")})
    simulate(strict)
    assert RunFolder(strict.out).latest_checkpoint() is None  # no sum of two was unmasked


def test_server_accepts_an_aggregate_as_noisy_as_the_shares_make_it() -> None:
    """The honest-update bound plus 8 standard deviations of the shares' noise in the mean:
    a noisy honest aggregate is applied, one beyond that is not."""
    from common.privacy.distributed import aggregate_noise_std
    from common.rounds import RoundBook

    cfg = FederationConfig.from_mapping({**DIST, "rounds": 4})
    shapes = [np.zeros((3, 4), np.float32)]
    metrics = {"share_variance": 4e8}
    accepted = [("site-0", 40, metrics), ("site-1", 30, metrics)]
    std = aggregate_noise_std([(40, 4e8), (30, 4e8)], max_weight=100.0,
                              quantization_range=2**22, clipping_range=0.5)
    book = RoundBook(cfg, ["w"], shapes, None)
    assert book.aggregate_bound(accepted) == pytest.approx(0.5 + 8 * std)
    assert book.apply(1, accepted, [np.full((3, 4), 0.5 + 5 * std)])
    assert not book.apply(2, accepted, [np.full((3, 4), 0.5 + 9 * std)])
    local = RoundBook(FederationConfig.from_mapping({"rounds": 4}), ["w"], shapes, None)
    assert local.aggregate_bound(accepted) == local.bound


def test_deployed_shares_come_from_chacha20_keyed_by_the_os() -> None:
    """Without a seed (a deployed site) each draw is fresh ChaCha20 output of the intended
    Skellam variance."""
    share = NoiseShare(1e6, 2, seed=None)
    a, b = share.draw([(50_000,)])[0], share.draw([(50_000,)])[0]
    assert not np.array_equal(a, b)
    assert abs(a.var() - 1e6) < 4 * 1e6 * math.sqrt(2 / a.size)
    from randomgen import ChaCha

    from common.crypto.quantize import noise_rng

    assert isinstance(noise_rng(None).bit_generator, ChaCha)
