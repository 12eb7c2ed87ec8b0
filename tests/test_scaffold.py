"""SCAFFOLD (common.scaffold): the control variates' arithmetic, the private correction,
the site's saved variate, the server's state across a resume, and a private federation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import FederationConfig
from common.errors import ConfigError, PathFedError
from common.scaffold import Scaffold, decode, encode, site_control


def _run_rounds(weights: list[int], rounds: int, sample: int, epochs: int, batch: int,
                seed: int = 0) -> tuple[list[np.ndarray], Scaffold]:
    """Sites' and server's variates after ``rounds`` of random updates, ``sample`` sites
    a round (uniformly drawn), with the server's update from the weighted mean alone;
    each site takes the steps its size gives it."""
    rng = np.random.default_rng(seed)
    lr, shape = 0.3, (4, 3)
    sites = len(weights)
    own = [np.zeros(shape) for _ in range(sites)]
    server = Scaffold(lr, sites, epochs, batch)
    steps = [server.steps(n) for n in weights]
    for _ in range(rounds):
        c = server.ensure([shape])[0].copy()
        chosen = sorted(rng.choice(sites, sample, replace=False))
        updates = {i: rng.normal(size=shape) for i in chosen}
        for i in chosen:
            own[i] = site_control([own[i]], [c], [updates[i]], steps[i], lr)[0]
        total = sum(weights[i] for i in chosen)
        mean = sum(weights[i] * updates[i] for i in chosen) / total
        server.step([mean], [weights[i] for i in chosen])
    return own, server


def test_server_variate_is_the_mean_of_the_sites_under_full_participation() -> None:
    """SCAFFOLD's invariant c = mean(c_i), kept by the server from the aggregate alone
    (sites of unequal weights, equal steps: the weighted mean)."""
    weights = [3, 7, 5]  # one batch of 8 each: 4 steps in 4 epochs
    own, server = _run_rounds(weights, rounds=5, sample=3, epochs=4, batch=8)
    expected = sum(w * c for w, c in zip(weights, own)) / sum(weights)
    np.testing.assert_allclose(server.control[0], expected, rtol=1e-12, atol=1e-12)
    assert np.abs(server.control[0]).max() > 0.1  # not vacuous


def test_server_variate_follows_scaffold_under_partial_participation() -> None:
    """2 of 5 equal sites a round: c = (1/N) sum of all c_i, as SCAFFOLD's server update
    c += (1/N) sum_S (c_i+ - c_i) keeps it."""
    own, server = _run_rounds([6] * 5, rounds=8, sample=2, epochs=3, batch=4)
    np.testing.assert_allclose(server.control[0], sum(own) / 5, rtol=1e-12, atol=1e-12)


def test_the_server_counts_a_sites_steps_from_its_weight_not_its_word() -> None:
    """K_i = local-epochs x ceil(n / batch-size), as Opacus' Poisson loader and plain
    batches take them: a site's declared steps never enter c."""
    server = Scaffold(0.1, 2, epochs=2, batch_size=4)
    assert [server.steps(n) for n in (1, 4, 5, 9)] == [2, 2, 4, 6]
    from common.config import FederationConfig
    from common.site import Site, initial_model
    from common.training import get_weights

    cfg = FederationConfig.from_mapping({"sites": 2, "synthetic-bags": 40, "local-epochs": 2,
                                         "batch-size": 8, "scaffold": True})
    weights = get_weights(initial_model(cfg))
    report = Site(cfg, 0).train(weights, 1, control=[np.zeros(w.shape) for w in weights])
    book_side = Scaffold(cfg.lr, 2, cfg.local_epochs, cfg.batch_size)
    assert report.metrics["steps"] == book_side.steps(report.n_samples)


def test_site_variate_is_option_two() -> None:
    c_i, c, u = [np.full(2, 0.5)], [np.full(2, 0.2)], [np.array([-0.6, 0.3])]
    new = site_control(c_i, c, u, steps=3, lr=0.1)
    np.testing.assert_allclose(new[0], 0.5 - 0.2 - u[0] / 0.3)
    np.testing.assert_array_equal(site_control(c_i, c, u, steps=0, lr=0.1)[0], c_i[0])


def test_correction_is_added_after_the_noise() -> None:
    """Two SGD steps of a linear model: each gradient gains the fixed correction exactly."""
    from common.training import add_gradient_correction

    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    correction = np.array([[0.3, -0.2, 0.1]], np.float32)
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    add_gradient_correction(opt, list(model.parameters()), [correction])
    expected = model.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grad = model.weight.grad.detach().clone()  # type: ignore[union-attr]
        opt.step()
        expected = expected - 0.1 * (grad + torch.from_numpy(correction))
        torch.testing.assert_close(model.weight.detach(), expected)
    with pytest.raises(ValueError, match="correction has 2 arrays"):
        add_gradient_correction(opt, list(model.parameters()), [correction, correction])


def test_encoded_variate_round_trips_and_bad_ones_are_named() -> None:
    arrays = [np.arange(6.0).reshape(2, 3), np.ones(4)]
    back = decode(encode(arrays), [(2, 3), (4,)], "x")
    for a, b in zip(arrays, back):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="x: control variate of shapes"):
        decode(encode(arrays), [(3, 2), (4,)], "x")
    with pytest.raises(ValueError, match="NaN"):
        decode(encode([np.array([np.nan])]), [(1,)], "x")
    with pytest.raises(ValueError, match="not a control variate"):
        decode(b"junk", [(1,)], "x")


def test_site_round_needs_the_server_variate_and_keeps_its_own() -> None:
    """A DP site with scaffold: no server variate is refused; after a round its c_i is
    option II's, is saved in its state and restored from it; the correction changes the
    update, and the spend is that of the same round without scaffold."""
    from common.site import Site, initial_model
    from common.training import get_weights

    base = {"sites": 2, "synthetic-bags": 40, "local-epochs": 2, "batch-size": 8, "lr": 0.5}
    cfg = FederationConfig.from_mapping({**base, "scaffold": True})
    weights = get_weights(initial_model(cfg))
    site = Site(cfg, 0)
    with pytest.raises(PathFedError, match="no control variate"):
        site.train(weights, 1)
    rng = np.random.default_rng(1)
    c = [rng.normal(scale=0.5, size=w.shape) for w in weights]
    report = site.train(weights, 1, control=c)
    assert site.control is not None
    expected = [-cs - u / (report.metrics["steps"] * 0.5) for cs, u in zip(c, report.update)]
    for got, want in zip(site.control, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    again = Site(cfg, 0, state=site.state())
    for got, want in zip(again.control or [], site.control):
        np.testing.assert_array_equal(got, want)
    plain = Site(FederationConfig.from_mapping(base), 0).train(weights, 1)
    assert report.metrics["epsilon"] == pytest.approx(plain.metrics["epsilon"])
    assert max(float(np.abs(a - b).max()) for a, b in zip(report.update, plain.update)) > 1e-3


def test_scaffold_is_refused_with_distributed_dp() -> None:
    with pytest.raises(ConfigError, match="scaffold: with distributed DP"):
        FederationConfig.from_mapping({"scaffold": True, "dp-mode": "distributed"})


def test_resumed_run_continues_the_server_variate(tmp_path) -> None:
    """A run killed after round 2 and resumed reaches the unbroken run's model and c."""
    from common.rounds import RoundBook
    from common.runs import RunFolder

    cfg = FederationConfig.from_mapping({"scaffold": True, "sites": 2, "dp": False,
                                         "secagg": False})
    rng = np.random.default_rng(0)
    start = [rng.normal(size=(3, 2)).astype(np.float32)]
    deltas = [[rng.normal(scale=0.01, size=(3, 2))] for _ in range(4)]
    reply = [("site-0", 10, {"steps": 3})]
    whole = RoundBook(cfg, ["w"], start, RunFolder(tmp_path / "a"))
    for rnd, delta in enumerate(deltas, start=1):
        whole.apply(rnd, reply, delta)
    first = RoundBook(cfg, ["w"], start, RunFolder(tmp_path / "b"))
    for rnd, delta in enumerate(deltas[:2], start=1):
        first.apply(rnd, reply, delta)
    resumed = RoundBook(cfg, ["w"], first.global_weights, RunFolder(tmp_path / "b"),
                        round_offset=2)
    np.testing.assert_array_equal((resumed.control() or [])[0], (first.control() or [])[0])
    for rnd, delta in enumerate(deltas[2:], start=3):
        resumed.apply(rnd, reply, delta)
    np.testing.assert_array_equal(whole.global_weights[0], resumed.global_weights[0])
    np.testing.assert_array_equal((whole.control() or [])[0], (resumed.control() or [])[0])
    assert np.abs((whole.control() or [])[0]).max() > 0
