"""A broken or hostile site against the server's strategy (issue 11, item 2).

The real :class:`server.strategy.PathFedStrategy` and the real ledger, fed replies the way
Flower's workflow hands them over (``(proxy, FitRes)``): NaN, inf and huge updates, lying
example counts, malformed metrics and evaluation fields, replayed ledger records. Every
bad reply is rejected alone, nothing crashes, and the global model never moves beyond the
bound an honest update obeys. Each protection also has its weakened twin here: with the
check switched off the same attack gets through, so the test really guards it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters

from common.config import FederationConfig
from common.crypto.signing import SigningKey
from common.ledger import (
    LEDGER_FILE,
    Ledger,
    encode_signed,
    sign_record,
    site_round_record,
    verify_ledger,
)
from common.metrics import EvalCounts
from common.runs import RunFolder
from common.site import SiteReport
from server.strategy import PathFedStrategy

SHAPES = [(4, 3), (3,)]
SITES = ("site-0", "site-1", "site-2")


@dataclass
class Proxy:
    node_id: int


def _cfg(**changes: Any) -> FederationConfig:
    return FederationConfig(**{"sites": 3, "rounds": 3, "secagg": False, **changes})


def _strategy(tmp_path: Path, ledger: bool = False, **changes: Any
              ) -> tuple[PathFedStrategy, dict[str, SigningKey]]:
    cfg = _cfg(**changes)
    weights = [np.zeros(s, np.float32) for s in SHAPES]
    keys = {name: SigningKey.generate() for name in ("server", *SITES)}
    book = None
    if ledger:
        book = Ledger(tmp_path / LEDGER_FILE, keys["server"])
        book.start(cfg.to_run_config(), {n: keys[n].public_pem() for n in SITES}, weights)
    strategy = PathFedStrategy(cfg, ["a", "b"], weights, RunFolder(tmp_path), ledger=book)
    return strategy, keys


def _update(value: float = 0.01) -> list[np.ndarray]:
    return [np.full(s, value, np.float32) for s in SHAPES]


def _metrics(site: str, **changes: Any) -> dict[str, Any]:
    return {"site": site, "steps": 2, "n_train": 10, "epsilon": 1.0, "delta": 1e-5,
            "dp": True, "noise_multiplier": 1.0, "sample_rate": 0.5, "max_grad_norm": 1.0,
            "epsilon_budget": 8.0, "can_train_next": True, **changes}


def _fit(update: list[np.ndarray], n: Any = 10, metrics: dict[str, Any] | None = None) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(update), n, metrics or {})


def _honest(strategy: PathFedStrategy, keys: dict[str, SigningKey] | None = None,
            server_round: int = 1, sites: tuple[str, ...] = SITES,
            value: float = 0.01) -> list[tuple[Proxy, FitRes]]:
    out = []
    for i, site in enumerate(sites):
        update, metrics = _update(value), _metrics(site)
        if keys is not None:
            metrics["ledger_record"] = _signed(strategy, keys, site, update, server_round)
        out.append((Proxy(i + 1), _fit(update, 10, metrics)))
    return out


def _signed(strategy: PathFedStrategy, keys: dict[str, SigningKey], site: str,
            update: list[np.ndarray], server_round: int, run: str | None = None,
            n: int = 10) -> str:
    report = SiteReport(update, n, _metrics(site))
    assert strategy.book.ledger is not None
    record = site_round_record(report, strategy.book.global_weights, server_round=server_round,
                               site=site, plan=None, secagg=False,
                               run=strategy.book.ledger.run if run is None else run)
    return encode_signed(sign_record(record, keys[site], site))


def _moved(before: list[np.ndarray], strategy: PathFedStrategy) -> float:
    return max(float(np.abs(a - b).max()) for a, b in zip(before, strategy.book.global_weights))


BAD_UPDATES = {
    "nan": lambda: [np.full(s, np.nan, np.float32) for s in SHAPES],
    "inf": lambda: [np.full(s, np.inf, np.float32) for s in SHAPES],
    "huge": lambda: _update(1e6),
    "shapes": lambda: [np.zeros((5, 3), np.float32), np.zeros(3, np.float32)],
    "one array": lambda: [np.zeros((4, 3), np.float32)],
}


@pytest.mark.parametrize("attack", sorted(BAD_UPDATES))
def test_a_bad_update_is_rejected_alone(tmp_path: Path, attack: str) -> None:
    strategy, _ = _strategy(tmp_path)
    results = _honest(strategy)
    results[1] = (Proxy(2), _fit(BAD_UPDATES[attack](), 10, _metrics("site-1")))
    params, _ = strategy.aggregate_fit(1, results, [])
    assert params is not None
    assert strategy.book.round_fit[1]["trained"] == ["site-0", "site-2"]
    assert "site-1" in strategy.book.rejected[1]
    assert _moved([np.zeros(s) for s in SHAPES], strategy) == pytest.approx(0.01)


def test_weakened_bound_lets_the_poison_through(tmp_path: Path) -> None:
    """The bound is what stops a 1e6 update: without it the global model is wrecked."""
    strategy, _ = _strategy(tmp_path)
    strategy.book.bound = math.inf
    results = _honest(strategy)
    results[1] = (Proxy(2), _fit(_update(1e6), 10, _metrics("site-1")))
    strategy.aggregate_fit(1, results, [])
    assert _moved([np.zeros(s) for s in SHAPES], strategy) > 1e5


@pytest.mark.parametrize("n", [10**9, 0, -3, 2.5, "ten"])
def test_example_counts_are_bounded(tmp_path: Path, n: Any) -> None:
    strategy, _ = _strategy(tmp_path)
    results = _honest(strategy)
    results[0] = (Proxy(1), _fit(_update(0.5), n, _metrics("site-0")))
    strategy.aggregate_fit(1, results, [])
    assert "site-0" in strategy.book.rejected[1]
    assert _moved([np.zeros(s) for s in SHAPES], strategy) == pytest.approx(0.01)


def test_a_count_that_changes_after_the_first_round_is_rejected(tmp_path: Path) -> None:
    strategy, _ = _strategy(tmp_path)
    strategy.aggregate_fit(1, _honest(strategy), [])
    results = _honest(strategy)
    results[2] = (Proxy(3), _fit(_update(), 999, _metrics("site-2")))
    strategy.aggregate_fit(2, results, [])
    assert "declared 10" in strategy.book.rejected[2]["site-2"]
    strategy.book.declared.clear()  # weakened: no memory of the first round
    strategy.aggregate_fit(3, results, [])
    assert "site-2" not in strategy.book.rejected[3]


@pytest.mark.parametrize("metrics", [
    {"epsilon": "lots"}, {"epsilon": math.nan}, {"epsilon": math.inf}, {"epsilon": -1.0},
    {"steps": "many"}, {"noise_multiplier": None}, {"site": 7}, {"can_train_next": "no"},
])
def test_malformed_training_metrics_reject_the_reply(tmp_path: Path,
                                                     metrics: dict[str, Any]) -> None:
    strategy, _ = _strategy(tmp_path)
    results = _honest(strategy)
    results[1] = (Proxy(2), _fit(_update(), 10, _metrics("site-1") | metrics))
    strategy.aggregate_fit(1, results, [])
    assert len(strategy.book.round_fit[1]["trained"]) == 2


def _eval_metrics(site: str, **changes: Any) -> dict[str, Any]:
    counts = EvalCounts.from_predictions(np.array([-1.0, 2.0, 0.5]), np.array([0, 1, 1]), 1.2)
    return {"site": site, "epsilon": 1.0, "can_train_next": True, **counts.to_metrics(),
            **changes}


@pytest.mark.parametrize("changes", [
    {"hist_pos": b"\x00\x01\x02"}, {"hist_neg": "text"}, {"n": "three"}, {"n": 4},
    {"loss_sum": math.nan}, {"tp": -1}, {"epsilon": "x"},
])
def test_malformed_evaluation_is_ignored_not_fatal(tmp_path: Path,
                                                   changes: dict[str, Any]) -> None:
    strategy, _ = _strategy(tmp_path)
    good = EvaluateRes(Status(Code.OK, ""), 0.5, 3, _eval_metrics("site-0"))
    bad_metrics = _eval_metrics("site-1")
    for key in changes:
        bad_metrics.pop(key, None)
    bad_metrics.update(changes)
    bad = EvaluateRes(Status(Code.OK, ""), 0.5, 3, bad_metrics)
    missing = EvaluateRes(Status(Code.OK, ""), 0.5, 3, {"site": "site-2"})
    strategy.aggregate_evaluate(1, [(Proxy(1), good), (Proxy(2), bad), (Proxy(3), missing)], [])
    summary = strategy.book.history[-1]
    assert summary["sites"] == 1 and math.isfinite(summary["val_loss"])  # only the good one


def test_a_site_cannot_take_another_sites_name(tmp_path: Path) -> None:
    strategy, _ = _strategy(tmp_path)
    strategy.aggregate_fit(1, _honest(strategy), [])
    results = _honest(strategy)
    results[2] = (Proxy(3), _fit(_update(), 10, _metrics("site-0")))
    strategy.aggregate_fit(2, results, [])
    book = strategy.book
    assert book.rejected[2] and book.round_fit[2]["trained"] == ["site-0", "site-1"]


def test_secagg_aggregate_beyond_the_bound_is_rejected(tmp_path: Path) -> None:
    """With SecAgg+ the strategy only sees the unmasked mean: it is checked as a whole."""
    strategy, _ = _strategy(tmp_path, secagg=True)
    poisoned = _update(5.4e6)
    results = [(Proxy(i + 1), _fit(poisoned, 10, _metrics(s))) for i, s in enumerate(SITES)]
    params, _ = strategy.aggregate_fit(1, results, [])
    assert params is None and strategy.book.models == 0
    assert all("aggregate rejected" in r for r in strategy.book.rejected[1].values())
    strategy.book.bound = math.inf  # weakened
    params, _ = strategy.aggregate_fit(2, results, [])
    assert params is not None and _moved([np.zeros(s) for s in SHAPES], strategy) > 1e6


def test_replayed_or_foreign_ledger_records_are_refused(tmp_path: Path) -> None:
    strategy, keys = _strategy(tmp_path, ledger=True)
    first = _honest(strategy, keys, 1)
    strategy.aggregate_fit(1, first, [])
    assert strategy.book.round_fit[1]["trained"] == list(SITES)
    # round 2: site-1 replays its round-1 reply, site-2 a record of another run
    second = _honest(strategy, keys, 2)
    second[1] = first[1]
    update = _update()
    metrics = _metrics("site-2", ledger_record=_signed(strategy, keys, "site-2", update, 2,
                                                       run="f" * 64))
    second[2] = (Proxy(3), _fit(update, 10, metrics))
    strategy.aggregate_fit(2, second, [])
    assert strategy.book.round_fit[2]["trained"] == ["site-0"]
    assert "round 1, this is round 2" in strategy.book.rejected[2]["site-1"]
    assert "another run" in strategy.book.rejected[2]["site-2"] or "belongs to run" in \
        strategy.book.rejected[2]["site-2"]
    # an update that is not the one its record names, and a count its record contradicts
    third = _honest(strategy, keys, 3)
    third[0] = (Proxy(1), _fit(_update(0.02), 10, third[0][1].metrics))
    signed = _signed(strategy, keys, "site-1", _update(), 3, n=11)
    third[1] = (Proxy(2), _fit(_update(), 10, _metrics("site-1", ledger_record=signed)))
    strategy.aggregate_fit(3, third, [])
    assert "not the one its signed ledger record names" in strategy.book.rejected[3]["site-0"]
    assert "signed record says 11" in strategy.book.rejected[3]["site-1"]


def test_rejected_updates_still_record_their_privacy_spend(tmp_path: Path) -> None:
    strategy, keys = _strategy(tmp_path, ledger=True)
    results = _honest(strategy, keys)
    bad = [np.full(s, np.nan, np.float32) for s in SHAPES]
    metrics = _metrics("site-1", ledger_record=_signed(strategy, keys, "site-1", bad, 1))
    results[1] = (Proxy(2), _fit(bad, 10, metrics))
    strategy.book.start_round(1, ["node-1", "node-2", "node-3"])  # asked before named
    strategy.aggregate_fit(1, results, [])
    report = verify_ledger(tmp_path / LEDGER_FILE)
    sites = [e["record"]["site"] for e in report.records("site-round")]
    assert sorted(sites) == list(SITES)  # site-1's spend is on record
    server = report.records("server-round")[0]["record"]
    assert server["participants"] == ["site-0", "site-2"]
    assert "not finite" in server["dropouts"]["site-1"]
    assert set(server["dropouts"]) == {"site-1"}  # sites that trained are not "dropped"


def test_fuzzed_replies_never_crash_nor_move_the_model_beyond_the_bound(tmp_path: Path) -> None:
    strategy, keys = _strategy(tmp_path, ledger=True)
    rng = np.random.default_rng(0)
    garbage: list[Any] = [math.nan, math.inf, -math.inf, 1e300, -1, "x", None, b"\xff" * 7,
                          [1, 2], {"a": 1}, True, 10**30]
    fields = ["epsilon", "steps", "noise_multiplier", "site", "sample_rate", "can_train_next",
              "ledger_record", "n_train", "train_loss"]
    bound = strategy.book.bound
    for rnd in range(1, 41):
        results = _honest(strategy, keys, rnd)
        proxy, res = results[rnd % 3]
        kind = rng.integers(4)
        metrics = dict(res.metrics)
        update = _update()
        n: Any = 10
        if kind == 0:
            metrics[fields[rng.integers(len(fields))]] = garbage[rng.integers(len(garbage))]
        elif kind == 1:
            update = [rng.normal(0, 10.0 ** rng.integers(-3, 9), s).astype(np.float32)
                      for s in SHAPES]
            if rng.random() < 0.3:
                update[0].flat[0] = garbage[rng.integers(3)]
        elif kind == 2:
            n = garbage[rng.integers(len(garbage))]
        else:
            metrics.pop(fields[rng.integers(len(fields))], None)
        try:
            results[rnd % 3] = (proxy, _fit(update, n, metrics))
        except (TypeError, ValueError, OverflowError):
            continue  # Flower itself cannot even encode this reply
        before = [w.copy() for w in strategy.book.global_weights]
        strategy.aggregate_fit(rnd, results, [])
        assert _moved(before, strategy) <= bound * (1 + 1e-6)
        evals = [(Proxy(i + 1), EvaluateRes(Status(Code.OK, ""), 0.1, 3, _eval_metrics(s)))
                 for i, s in enumerate(SITES)]
        evals[rnd % 3][1].metrics[fields[rng.integers(len(fields))]] = garbage[
            rng.integers(len(garbage))]
        strategy.aggregate_evaluate(rnd, evals, [])
    assert strategy.book.models >= 30
    assert verify_ledger(tmp_path / LEDGER_FILE).problems[-1].kind == "incomplete"


def test_site_refuses_to_send_a_non_finite_update(monkeypatch: pytest.MonkeyPatch) -> None:
    import common.site as site_module
    from common.errors import PathFedError
    from common.site import Site
    from common.training import TrainResult

    cfg = _cfg(synthetic_bags=40, dp=False)
    site = Site(cfg, 0)
    weights = [w.numpy().copy() for w in site_module.initial_model(cfg).state_dict().values()]

    def poisoned(*args: Any, **kwargs: Any) -> TrainResult:
        update = [np.full(w.shape, np.nan, np.float32) for w in weights]
        return TrainResult(update=update, n_samples=10, steps=1, loss=0.0, epsilon=0.0)

    monkeypatch.setattr(site_module, "local_train", poisoned)
    with pytest.raises(PathFedError, match="refusing to send.*not finite"):
        site.train(weights, 1)


def test_wrong_shaped_secagg_participant_is_named_and_dropped(
        caplog: pytest.LogCaptureFixture) -> None:
    """The SecAgg+ seam checks each masked vector's shapes before Flower sums them."""
    from types import SimpleNamespace

    from flwr.common import ndarray_to_bytes
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

    from server.secagg import _ShapeCheckingGrid

    shapes = [(1,), *SHAPES]

    def reply(node: int, arrays: list[np.ndarray]) -> Any:
        """What the seam reads of a Flower reply (a message cannot be built outside a run)."""
        records = {RECORD_KEY_CONFIGS: {
            Key.MASKED_PARAMETERS: [ndarray_to_bytes(a.astype(np.uint32)) for a in arrays]}}
        return SimpleNamespace(has_error=lambda: False, metadata=SimpleNamespace(
            src_node_id=node), content=SimpleNamespace(config_records=records))

    good = [np.zeros(s, np.int64) for s in shapes]
    bad = [np.zeros(s, np.int64) for s in [(1,), (5, 3), (3,)]]

    class Grid:
        def send_and_receive(self, messages: Any, timeout: float | None = None) -> list[Any]:
            return [reply(1, good), reply(2, bad), reply(3, good)]

    checked = _ShapeCheckingGrid(Grid(), shapes, {2: "site-1"})  # type: ignore[arg-type]
    kept = checked.send_and_receive([], timeout=1)
    assert [m.metadata.src_node_id for m in kept] == [1, 3]
    assert "site-1 (node 2) sent a masked vector of the wrong shape" in caplog.text
