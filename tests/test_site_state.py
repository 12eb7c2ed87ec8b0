"""Spent epsilon is never lost, the site decides its noise (issue 11, items 3 and 4).

Real sites (:class:`common.site.Site`), real Opacus accountants, the real state file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from common.config import FederationConfig
from common.crypto.noise import NOISE_SOURCE, SecureGaussian
from common.errors import ConfigError, PrivacyBudgetExhausted
from common.privacy.store import STATE_FILE, SiteStore
from common.site import Site, initial_model

CFG = dict(synthetic_bags=40, rounds=2, batch_size=8, epsilon=4.0, secagg=False)


def _weights(cfg: FederationConfig) -> list[np.ndarray]:
    return [v.numpy().copy() for v in initial_model(cfg).state_dict().values()]


def _round(cfg: FederationConfig, folder: Path, rnd: int, lifetime: float = np.inf,
           noise: str = "seeded") -> Site:
    site = Site(cfg, 0, store=SiteStore("site-0", folder), lifetime_budget=lifetime,
                noise=noise)
    site.round(_weights(cfg), rnd)
    return site


def test_a_new_run_id_does_not_reset_what_the_site_spent(tmp_path: Path) -> None:
    first = FederationConfig(**CFG, run_id="study-1")
    for rnd in (1, 2):
        site = _round(first, tmp_path, rnd, lifetime=4.5)
    spent = site.accountant.lifetime_epsilon(site.cfg.delta)
    assert 3.5 < spent <= 4.0
    second = FederationConfig(**CFG, run_id="study-2")
    site = Site(second, 0, store=SiteStore("site-0", tmp_path), lifetime_budget=4.5)
    assert site.epsilon == 0.0  # the new run's own budget starts empty ...
    assert site.accountant.lifetime_epsilon(site.cfg.delta) == pytest.approx(spent)
    assert not site.can_train()  # ... but the site's lifetime budget is what it has left
    with pytest.raises(PrivacyBudgetExhausted, match="lifetime budget 4.5"):
        site.train(_weights(second), 1)
    # weakened: without the lifetime budget the second run would spend it all again
    loose = Site(second, 0, store=SiteStore("site-0", tmp_path))
    assert loose.can_train()


def test_state_file_belongs_to_one_site_and_survives_processes(tmp_path: Path) -> None:
    cfg = FederationConfig(**CFG, run_id="r")
    _round(cfg, tmp_path, 1)
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["site"] == "site-0" and list(state["runs"]) == ["r"]
    with pytest.raises(ConfigError, match="privacy state of site 'site-0', not of 'site-1'"):
        SiteStore("site-1", tmp_path)
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(Exception, match="not a PathFed site state"):
        SiteStore("site-0", tmp_path)


def test_run_ids_cannot_escape_the_state_folder(tmp_path: Path) -> None:
    from common.privacy.store import run_key

    for bad in ("../x", "a/b", "..", "/etc", "x\\..\\y"):
        with pytest.raises(ConfigError, match="run-id"):
            FederationConfig.from_mapping({"run-id": bad})
        with pytest.raises(ConfigError, match="run-id"):
            run_key(bad)
    store = SiteStore("site-0", tmp_path / "state")
    store.save("a..b", {"accountant": None}, last={"round": 1, "received": "x",
                                                   "update": [np.zeros(2)], "n_samples": 1,
                                                   "metrics": {}})
    assert {p.parent for p in tmp_path.rglob("*") if p.is_file()} == {tmp_path / "state"}


def test_old_per_run_state_files_are_adopted(tmp_path: Path) -> None:
    history = [[1.2, 0.25, 8]]
    (tmp_path / "site-state-study-0.json").write_text(json.dumps(
        {"accountant": json.dumps({"mechanism": "rdp", "history": history})}))
    store = SiteStore("site-0", tmp_path)
    assert store.prior_history("study-1") == [tuple(h) for h in history]


def test_a_repeated_round_is_replayed_not_spent_again(tmp_path: Path) -> None:
    """A server that restarts and asks for round 2 again (same global model) gets the same
    reply; the site does not train, and pay, twice. Another model is a new release."""
    cfg = FederationConfig(**{**CFG, "rounds": 3}, run_id="r")
    _round(cfg, tmp_path, 1)
    site = Site(cfg, 0, store=SiteStore("site-0", tmp_path), noise="csprng")
    first = site.round(_weights(cfg), 2)
    spent = site.accountant.steps
    again = Site(cfg, 0, store=SiteStore("site-0", tmp_path), noise="csprng")
    second = again.round(_weights(cfg), 2)
    assert again.accountant.steps == spent
    for a, b in zip(first.update, second.update):
        assert np.array_equal(a, b)
    other = [w + 0.01 for w in _weights(cfg)]
    third = Site(cfg, 0, store=SiteStore("site-0", tmp_path), noise="csprng")
    third.round(other, 2)
    assert third.accountant.steps > spent  # a different model: trained and counted


def test_the_budget_is_met_not_doubled() -> None:
    """Epsilon stays at or below the budget, and close to it: a doubled budget fails here."""
    cfg = FederationConfig(**CFG)
    site = Site(cfg, 0)
    for rnd in (1, 2):
        site.train(_weights(cfg), rnd)
    assert 0.9 * cfg.epsilon <= site.epsilon <= cfg.epsilon * (1 + 1e-9)
    assert not site.can_train()


def test_secure_gaussian_is_gaussian_and_unpredictable() -> None:
    draws = SecureGaussian().normal((200_000,), 2.0)
    assert abs(draws.mean()) < 0.03 and abs(draws.std() - 2.0) < 0.02
    from scipy.stats import kstest

    assert kstest(draws / 2.0, "norm").pvalue > 1e-4
    assert not np.array_equal(SecureGaussian().normal((8,), 1.0),
                              SecureGaussian().normal((8,), 1.0))
    key = os.urandom(32)
    assert np.array_equal(SecureGaussian(key).normal((8,), 1.0),
                          SecureGaussian(key).normal((8,), 1.0))


def test_csprng_noise_is_not_reproducible_and_is_recorded() -> None:
    cfg = FederationConfig(**CFG)
    seeded = [Site(cfg, 0, noise="seeded").train(_weights(cfg), 1).update for _ in range(2)]
    secure = [Site(cfg, 0, noise="csprng").train(_weights(cfg), 1).update for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(*seeded))
    assert not all(np.array_equal(a, b) for a, b in zip(*secure))
    assert Site(cfg, 0, noise="csprng").noise_source == NOISE_SOURCE
    assert Site(cfg, 0, noise="seeded").noise_source.startswith("seeded")


def test_deployed_site_ignores_the_servers_deterministic_flag() -> None:
    """In deployment the node config decides; the server's `deterministic` does not."""
    from flwr.app import Context, RecordDict

    from client.app import _site

    cfg = FederationConfig(**CFG, deterministic=True)
    config = cfg.to_run_config()

    def context(node: dict[str, object]) -> Context:
        return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(),
                       run_config={})

    deployed = {"site-name": "hospital-a", "partition-id": 0}
    assert _site(context(deployed), config).noise == "csprng"
    assert _site(context({**deployed, "deterministic-noise": "true"}), config).noise == "seeded"
    assert _site(context({"partition-id": 0}), config).noise == "seeded"  # a simulation


def test_in_memory_replay_keeps_the_update_exactly() -> None:
    """`flwr run .` keeps the state in Flower's context: a replayed update must hash the
    same as the one the site signed (dtype included)."""
    from common.ledger import hash_arrays

    store = SiteStore("site-0")
    update = [np.arange(6, dtype=np.float32).reshape(2, 3) / 7, np.ones(2, np.float64)]
    store.save("r", {"accountant": None}, last={"round": 2, "received": "h", "update": update,
                                                "n_samples": 5, "metrics": {"b": b"\x01"}})
    again = SiteStore("site-0", text=store.dumps()).replay("r", 2, "h")
    assert again is not None and hash_arrays(again["update"]) == hash_arrays(update)
    assert again["metrics"] == {"b": b"\x01"} and again["n_samples"] == 5
