"""Server optimisers (common.server_opt) against Flower's strategies, and FedProx."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdagrad, FedAdam, FedAvgM, FedYogi

from common.server_opt import ServerOptimizer

FLOWER = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}


def _flower_rounds(name: str, start: list[np.ndarray], updates: list[list[np.ndarray]]
                   ) -> list[np.ndarray]:
    """Flower's strategy fed one site per round whose new weights are ``w + update``."""
    params = ndarrays_to_parameters(start)
    if name == "fedavgm":
        strategy = FedAvgM(initial_parameters=params, server_learning_rate=0.7,
                           server_momentum=0.8)
    else:
        betas = {} if name == "fedadagrad" else {"beta_1": 0.9, "beta_2": 0.99}
        strategy = FLOWER[name](initial_parameters=params, eta=0.05, tau=1e-3, **betas)
    weights = [w.copy() for w in start]
    for rnd, update in enumerate(updates, start=1):
        new = [w + u for w, u in zip(weights, update)]
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(new), 10, {})
        aggregated, _ = strategy.aggregate_fit(rnd, [(None, res)], [])  # type: ignore[list-item]
        assert aggregated is not None
        weights = parameters_to_ndarrays(aggregated)
    return weights


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_server_optimizers_step_as_flowers_strategies(name: str) -> None:
    rng = np.random.default_rng(3)
    start = [rng.normal(size=(4, 3)), rng.normal(size=5)]
    updates = [[rng.normal(scale=0.1, size=w.shape) for w in start] for _ in range(6)]
    if name == "fedavgm":
        opt = ServerOptimizer(name, lr=0.7, momentum=0.8)
    else:
        opt = ServerOptimizer(name, lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
    ours = [w.copy() for w in start]
    for update in updates:
        ours = opt.step(ours, update)
    theirs = _flower_rounds(name, start, updates)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_fedavg_is_plain_addition_and_state_round_trips() -> None:
    w = [np.ones(3, np.float32)]
    assert ServerOptimizer("fedavg").step(w, [np.full(3, 0.5)])[0].tolist() == [1.5] * 3
    opt = ServerOptimizer("fedadam", lr=0.1)
    opt.step(w, [np.full(3, 0.5)])
    again = ServerOptimizer("fedadam", lr=0.1)
    again.load_state(opt.state_arrays())
    a = opt.step(w, [np.full(3, -0.2)])
    b = again.step(w, [np.full(3, -0.2)])
    np.testing.assert_array_equal(a[0], b[0])
    with pytest.raises(ValueError, match="server-optimizer"):
        ServerOptimizer("adamw")


def test_resumed_run_continues_the_server_moments(tmp_path) -> None:
    """A killed run resumed after round 2 reaches the global model an unbroken run does."""
    from common.config import FederationConfig
    from common.rounds import RoundBook
    from common.runs import RunFolder

    cfg = FederationConfig.from_mapping({"server-optimizer": "fedyogi", "server-lr": 0.05,
                                         "dp": False, "secagg": False})
    rng = np.random.default_rng(0)
    start = [rng.normal(size=(3, 2)).astype(np.float32)]
    deltas = [[rng.normal(scale=0.01, size=(3, 2))] for _ in range(4)]
    whole = RoundBook(cfg, ["w"], start, RunFolder(tmp_path / "a"))
    for rnd, delta in enumerate(deltas, start=1):
        whole.apply(rnd, [("site-0", 10, {})], delta)
    first = RoundBook(cfg, ["w"], start, RunFolder(tmp_path / "b"))
    for rnd, delta in enumerate(deltas[:2], start=1):
        first.apply(rnd, [("site-0", 10, {})], delta)
    resumed = RoundBook(cfg, ["w"], first.global_weights, RunFolder(tmp_path / "b"),
                        round_offset=2)
    for rnd, delta in enumerate(deltas[2:], start=3):
        resumed.apply(rnd, [("site-0", 10, {})], delta)
    np.testing.assert_array_equal(whole.global_weights[0], resumed.global_weights[0])


def test_fedprox_adds_the_proximal_gradient_after_the_noise() -> None:
    """Two SGD steps on a linear model: the second gradient gains mu (w1 - w0), exactly."""
    from common.training import add_proximal_term

    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def run(mu: float) -> torch.Tensor:
        model = torch.nn.Linear(3, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(0.5)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if mu:
            add_proximal_term(opt, list(model.parameters()), mu)
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return model.weight.detach().clone()

    plain, prox = run(0.0), run(2.0)
    # by hand: step 1 is the same (w = w0); step 2 adds 0.1 * 2.0 * (w1 - w0)
    model = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.5)
    w0 = model.weight.detach().clone()
    grad = torch.autograd.grad(torch.nn.functional.mse_loss(model(x), y), model.weight)[0]
    w1 = w0 - 0.1 * grad
    with torch.no_grad():
        model.weight.copy_(w1)
    grad = torch.autograd.grad(torch.nn.functional.mse_loss(model(x), y), model.weight)[0]
    expected = w1 - 0.1 * (grad + 2.0 * (w1 - w0))
    torch.testing.assert_close(prox, expected)
    assert not torch.allclose(plain, prox)


def test_fedprox_site_round_under_dp_stays_closer_to_the_global_model() -> None:
    from common.config import FederationConfig
    from common.site import Site, initial_model
    from common.training import get_weights

    base = {"sites": 2, "synthetic-bags": 40, "local-epochs": 3, "batch-size": 8, "lr": 0.5}
    norms = {}
    for mu in (0.0, 1.0):
        cfg = FederationConfig.from_mapping({**base, "prox-mu": mu})
        site = Site(cfg, 0)
        weights = get_weights(initial_model(cfg))
        report = site.train(weights, 1)
        norms[mu] = float(np.sqrt(sum((u.astype(np.float64) ** 2).sum()
                                      for u in report.update)))
        assert report.metrics["epsilon"] > 0  # still DP-SGD, accounted as before
    assert norms[1.0] < norms[0.0]


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    {"server-optimizer": "fedavgm"}, {"server-optimizer": "fedadam", "server-lr": 0.03},
    {"server-optimizer": "fedyogi", "server-lr": 0.01},
    {"server-optimizer": "fedadagrad", "server-lr": 0.01}, {"prox-mu": 0.1},
    {"scaffold": True}, {"scaffold": True, "server-optimizer": "fedyogi", "server-lr": 0.01},
    {"server-optimizer": "fedadam", "server-lr": 0.03, "dp-mode": "distributed",
     "secagg-max-weight": 100}])
def test_each_strategy_trains_a_tiny_private_federation(settings: dict, tmp_path) -> None:
    """Two DP sites, three rounds, in process: the global model is finite and better than
    chance, its checkpoints hold the server optimiser's state, and the ledger audits."""
    from common.audit import audit_run
    from common.config import FederationConfig
    from common.fedavg import run_inprocess

    cfg = FederationConfig.from_mapping({"sites": 2, "rounds": 3, "synthetic-bags": 60,
                                         "epsilon": 8.0, **settings})
    result = run_inprocess(cfg, run_dir=tmp_path / "run")
    assert result.history[-1]["val_auc"] > 0.5
    assert all(np.isfinite(w).all() for w in result.weights)
    states = sorted((tmp_path / "run" / "checkpoints").glob("server-opt-*.npz"))
    assert len(states) == (3 if cfg.server_optimizer != "fedavg" or cfg.scaffold else 0)
    report = audit_run(tmp_path / "run")
    assert report.ok, report.all_problems
