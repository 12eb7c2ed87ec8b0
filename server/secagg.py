"""The server side of PathFed's one seam around Flower's SecAgg+.

Everything of the protocol is Flower's ``SecAggPlusWorkflow``. PathFed swaps the mask
expansion (``pseudo_rand_gen``, a 32-bit-seeded ``RandomState`` in Flower 1.42) for
:func:`common.crypto.expand_masks`, binds the round into the nonce, chooses the number of
shares from the sites sampled and the dropouts to tolerate (:func:`common.crypto.choose_shares`),
and logs why sites dropped out. The ``uint32`` masked vectors the client seam sends are
summed and unmasked as ``uint32``, which wraps modulo ``2**32``: Flower's modular sum,
in half the memory of its ``int64``. The client side is ``client/secagg.py``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import flwr
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from common.checks import update_bound
from common.config import FederationConfig
from common.crypto import (
    MASK_GENERATOR,
    ShareChoice,
    add_masks,
    choose_shares,
    install_generator,
    mask_round,
    subtract_masks,
    use_stock_masks,
)
from common.privacy.distributed import min_sites

log = logging.getLogger(__name__)

_flwr_workflow = importlib.import_module(
    "flwr.server.workflow.secure_aggregation.secaggplus_workflow"
)

FLOWER_SERIES = "1.42."
_STOCK = getattr(_flwr_workflow, "pseudo_rand_gen", None)
_STAGES = ("setup_stage", "share_keys_stage", "collect_masked_vectors_stage", "unmask_stage")


def check_flower_internals() -> None:
    """Fail loudly if the Flower internals this seam patches have moved."""
    problems = []
    if not flwr.__version__.startswith(FLOWER_SERIES):
        problems.append(f"flwr {flwr.__version__} installed, seam written for {FLOWER_SERIES}x")
    if _STOCK is None:
        problems.append("secaggplus_workflow.pseudo_rand_gen is gone")
    elif list(inspect.signature(_STOCK).parameters) != ["seed", "num_range", "dimensions_list"]:
        problems.append(f"pseudo_rand_gen has a new signature {inspect.signature(_STOCK)}")
    for name in ("parameters_addition", "parameters_subtraction"):
        if not callable(getattr(_flwr_workflow, name, None)):
            problems.append(f"secaggplus_workflow.{name} is gone")
    missing = [s for s in _STAGES if not hasattr(SecAggPlusWorkflow, s)]
    if missing:
        problems.append(f"SecAggPlusWorkflow lost {missing}")
    if problems:
        raise RuntimeError(
            "PathFed's SecAgg+ mask seam (server/secagg.py) no longer fits Flower: "
            + "; ".join(problems) + ". Re-check the seam before changing the flwr pin."
        )


def install_hardened_masks() -> None:
    """Make Flower's SecAgg+ workflow expand masks with PathFed's generator, and sum masked
    vectors and masks into the running total (:func:`common.crypto.add_masks`)."""
    install_generator(_flwr_workflow, cast(Callable[..., object], _STOCK),
                      check_flower_internals)
    setattr(_flwr_workflow, "parameters_addition", add_masks)  # noqa: B010
    setattr(_flwr_workflow, "parameters_subtraction", subtract_masks)  # noqa: B010


class HardenedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow with cryptographic masks, shares chosen per round and
    logged dropouts.

    Args:
        dropout: fraction of a round's sites that may drop after setup (``secagg-dropout``).
        num_shares, reconstruction_threshold: as PathFed's config gives them; 0 chooses
            them each round (:func:`common.crypto.choose_shares`).
        **kwargs: the rest of Flower's ``SecAggPlusWorkflow`` arguments.
    """

    def __init__(self, *, dropout: float = 0.2, num_shares: float = 0.0,
                 reconstruction_threshold: float = 0.0, distributed_dp: bool = False,
                 **kwargs: Any) -> None:
        install_hardened_masks()
        self.dropout = dropout
        self.distributed_dp = distributed_dp
        """Sites add distributed-DP noise shares sized for :func:`min_sites` of the
        sampled sites: a sum of fewer is never unmasked."""
        self._choose = partial(choose_shares, dropout=dropout, num_shares=num_shares,
                               threshold=reconstruction_threshold)
        # Flower checks these before each round; setup_stage replaces them per round
        super().__init__(num_shares=1.0, reconstruction_threshold=0.5, **kwargs)
        if not use_stock_masks():
            log.info("SecAgg+ masks: %s", MASK_GENERATOR)

    def _sized(self, sampled: int) -> None:
        """Set Flower's share settings for a round of ``sampled`` sites."""
        if sampled < 2:
            return  # Flower cancels the round itself ("should be greater than 1")
        choice = self._choose(sampled)
        self.num_shares = choice.flower_num_shares
        self.reconstruction_threshold = choice.flower_threshold

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        strategy = context.strategy
        context.strategy = cast(Any, _Sampling(strategy, self._sized))
        try:
            ok = super().setup_stage(grid, context, state)
        finally:
            context.strategy = strategy
        from server.strategy import failure_reason

        if state.num_shares:  # Flower got as far as choosing them
            sites = len(state.sampled_node_ids)
            asked = self._choose(sites).asked_dropouts
            ran = ShareChoice(sites=sites, shares=min(state.num_shares, sites),
                              threshold=state.threshold, asked_dropouts=asked)  # as Flower ran
            log.info("SecAgg+: %d sites, each site's keys shared among %d (itself "
                     "included), %d rebuild one: any %d may drop out", sites, ran.shares,
                     ran.threshold, ran.tolerated_dropouts)
            if ran.tolerated_dropouts < asked:
                log.warning("SecAgg+: secagg-dropout asks that %d of %d sites may drop; "
                            "these shares tolerate %d", asked, sites, ran.tolerated_dropouts)
            book = getattr(strategy, "book", None)
            if book is not None:
                cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
                book.secagg_shares[int(cast(int, cfg[WorkflowKey.CURRENT_ROUND]))] = (
                    ran.record())

        for failure in state.failures:
            log.warning("site left secure aggregation at setup: %s", failure_reason(failure))
        if not ok:
            log.warning("SecAgg+ setup failed (%d site(s) answered; the reconstruction "
                        "threshold needs more): no update this round",
                        len(state.active_node_ids))
        return ok

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext,
                                     state: Any) -> bool:
        before = set(state.active_node_ids)
        book = getattr(context.strategy, "book", None)  # PathFed's RoundBook, if any
        if book is not None:  # the weight factor, then the model's arrays
            grid = cast(Grid, _ShapeCheckingGrid(
                grid, [(1,), *book.shapes], getattr(context.strategy, "node_site", {})))
        failed_before = len(state.failures)
        ok = super().collect_masked_vectors_stage(grid, context, state)
        dropped = before - state.active_node_ids
        from server.strategy import FederationAborted, failure_reason

        reasons = [failure_reason(f) for f in state.failures[failed_before:]]
        if dropped and state.active_node_ids:
            # the strategy logs these failures when Flower hands it the round's results
            log.warning("%d site(s) dropped before sending masked updates; their masks are "
                        "recovered from shares", len(dropped))
        elif reasons:  # nobody left: Flower may not reach the strategy this round
            for reason in reasons:
                log.warning("a site failed in training: %s", reason)
        if book is not None:
            if not state.active_node_ids and reasons and book.first_round(book.last_round):
                raise FederationAborted(f"round {book.last_round}: every site failed, "
                                        f"nothing was trained; first failure: {reasons[0]}")
        return ok

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        if self.distributed_dp:
            needed = min_sites(len(state.sampled_node_ids), self.dropout)
            if len(state.active_node_ids) < needed:
                log.warning("SecAgg+: %d of %d sites sent masked vectors; their noise shares "
                            "are sized for a sum of %d at least (distributed DP), so this "
                            "sum is not unmasked: no update this round",
                            len(state.active_node_ids), len(state.sampled_node_ids), needed)
                return False
        cfg = context.state.config_records[MAIN_CONFIGS_RECORD]
        token = mask_round.set(int(cast(int, cfg[WorkflowKey.CURRENT_ROUND])))
        try:
            return super().unmask_stage(grid, context, state)
        finally:
            mask_round.reset(token)


class _Sampling:
    """The strategy, for the setup stage only: tells ``sized`` how many sites
    ``configure_fit`` sampled, before Flower reads the share settings."""

    def __init__(self, strategy: Any, sized: Callable[[int], None]) -> None:
        self._strategy, self._sized = strategy, sized

    def __getattr__(self, name: str) -> Any:
        return getattr(self._strategy, name)

    def configure_fit(self, *args: Any, **kwargs: Any) -> Any:
        chosen = self._strategy.configure_fit(*args, **kwargs)
        if chosen:
            self._sized(len(chosen))
        return chosen


class _ShapeCheckingGrid:
    """The grid, for the masked-vector stage only: a reply whose masked vector does not
    have the model's shapes is named and dropped, so Flower recovers that site's masks as
    for a dropout instead of failing (or summing garbage) on the whole round."""

    def __init__(self, grid: Grid, shapes: list[tuple[int, ...]],
                 names: dict[int, str]) -> None:
        self._grid, self._shapes, self._names = grid, [tuple(s) for s in shapes], names

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Any, *args: Any, **kwargs: Any) -> list[Any]:
        from flwr.common import bytes_to_ndarray
        from flwr.common.secure_aggregation.secaggplus_constants import (
            RECORD_KEY_CONFIGS,
            Key,
        )

        kept = []
        for msg in self._grid.send_and_receive(messages, *args, **kwargs):
            if not msg.has_error():
                problem = None
                try:
                    raw = msg.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
                    got = [tuple(bytes_to_ndarray(b).shape) for b in cast(list[bytes], raw)]
                    if got != self._shapes:
                        problem = (f"{len(got)} arrays, first {got[:2]}; expected "
                                   f"{len(self._shapes)}, first {self._shapes[:2]}")
                except Exception as err:  # noqa: BLE001 (any malformed reply is dropped)
                    problem = f"unreadable ({err.__class__.__name__}: {err})"
                if problem:
                    node = msg.metadata.src_node_id
                    log.warning("SecAgg+: %s (node %d) sent a masked vector of the wrong "
                                "shape (%s); it is left out of the round like a dropout",
                                self._names.get(node) or _claimed_site(msg) or "a site",
                                node, problem)
                    continue
            kept.append(msg)
        return kept


def _claimed_site(msg: Any) -> str | None:
    """The site name a reply's own metrics give (before the server has mapped the node)."""
    import flwr.compat.common.recorddict_compat as compat

    try:
        site = compat.recorddict_to_fitres(msg.content, keep_input=True).metrics.get("site")
    except Exception:  # noqa: BLE001
        return None
    return site if isinstance(site, str) else None


def make_secagg_workflow(cfg: FederationConfig) -> HardenedSecAggPlusWorkflow:
    """SecAgg+ with its ranges set deliberately from the DP and training settings."""
    clipping = update_bound(cfg)
    step = 2 * clipping / cfg.secagg_quantization_range
    log.info(
        "SecAgg+: clipping range +/-%.4g (bound on one round's update), quantisation step "
        "%.3g, max weight %d slides", clipping, step, cfg.secagg_max_weight,
    )
    return HardenedSecAggPlusWorkflow(
        dropout=cfg.secagg_dropout,
        num_shares=cfg.secagg_num_shares,
        reconstruction_threshold=cfg.secagg_threshold,
        max_weight=float(cfg.secagg_max_weight),
        clipping_range=clipping,
        quantization_range=cfg.secagg_quantization_range,
        timeout=cfg.timeout,
        distributed_dp=cfg.dp and cfg.dp_mode == "distributed",
    )
