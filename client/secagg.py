"""The client side of PathFed's one seam around Flower's SecAgg+.

Flower's ``secaggplus_mod`` does the whole client protocol (key agreement, Shamir shares,
masking). PathFed changes three things: the function that expands a seed into masks, which in
Flower 1.42 is a 32-bit-seeded ``numpy.random.RandomState``; the encoding of the masked
vector (``int64`` in Flower, ``uint32`` here: half the bytes); and the stochastic
quantiser, which gives Flower's numbers from Flower's random draws with fewer temporary
arrays, as ``uint32`` (:func:`quantize`). With ``uint32`` masks the whole masked vector
is computed in 32-bit arithmetic, which wraps modulo ``2**32``: the same masked values
as Flower's ``int64`` sums once its modulus is taken. Masks are added into the running
vector rather than into a new array each (:func:`common.crypto.add_masks`).
:func:`secaggplus_mod` wraps Flower's mod, swaps these in, and binds the round (the
message's group id) into the nonce.
``server/secagg.py`` does the same on the server; both check that Flower's internals are
where this seam expects them.
"""

from __future__ import annotations

import contextvars
import hashlib
import importlib
import inspect
import logging
from collections.abc import Callable
from typing import cast

import flwr
import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from common.crypto import add_masks, install_generator, mask_round, subtract_masks
from common.crypto.quantize import add_share, pending_share
from common.crypto.quantize import quantize as _quantize

in_secure_round: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pathfed_in_secure_round", default=False)
"""True while Flower's SecAgg+ mod handles a message: a distributed-DP update may only
leave the site inside it (masked, with its noise share)."""
_expect_share: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pathfed_expect_share", default=False)
"""The message trains a distributed-DP round: its quantised vector must get a share."""

log = logging.getLogger(__name__)

# The package re-exports the function under the module's name: import the module itself.
_flwr_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")

FLOWER_SERIES = "1.42."
_STOCK = getattr(_flwr_mod, "pseudo_rand_gen", None)
_STOCK_ENCODE = getattr(_flwr_mod, "ndarray_to_bytes", None)
_STOCK_QUANTIZE = getattr(_flwr_mod, "quantize", None)


def check_flower_internals() -> None:
    """Fail loudly if the Flower internals this seam patches have moved."""
    problems = []
    if not flwr.__version__.startswith(FLOWER_SERIES):
        problems.append(f"flwr {flwr.__version__} installed, seam written for {FLOWER_SERIES}x")
    if _STOCK is None:
        problems.append("flwr.client.mod.secure_aggregation.secaggplus_mod.pseudo_rand_gen is gone")
    elif list(inspect.signature(_STOCK).parameters) != ["seed", "num_range", "dimensions_list"]:
        problems.append(f"pseudo_rand_gen has a new signature {inspect.signature(_STOCK)}")
    if _STOCK_ENCODE is None:
        problems.append("secaggplus_mod.ndarray_to_bytes is gone")
    for name in ("parameters_addition", "parameters_subtraction"):
        if not callable(getattr(_flwr_mod, name, None)):
            problems.append(f"secaggplus_mod.{name} is gone")
    if _STOCK_QUANTIZE is None:
        problems.append("secaggplus_mod.quantize is gone")
    elif list(inspect.signature(_STOCK_QUANTIZE).parameters) != [
            "parameters", "clipping_range", "target_range"]:
        problems.append(f"quantize has a new signature {inspect.signature(_STOCK_QUANTIZE)}")
    if problems:
        raise RuntimeError(
            "PathFed's SecAgg+ mask seam (client/secagg.py) no longer fits Flower: "
            + "; ".join(problems) + ". Re-check the seam before changing the flwr pin."
        )


def install_hardened_masks() -> None:
    """Make Flower's client SecAgg+ mod expand masks with PathFed's generator, quantise
    with :func:`quantize` and send its masked vector as ``uint32`` (:func:`packed_encode`)."""
    install_generator(_flwr_mod, cast(Callable[..., object], _STOCK), check_flower_internals)
    setattr(_flwr_mod, "ndarray_to_bytes", packed_encode)  # noqa: B010 (Flower's module)
    setattr(_flwr_mod, "quantize", quantize)  # noqa: B010
    setattr(_flwr_mod, "parameters_addition", add_masks)  # noqa: B010
    setattr(_flwr_mod, "parameters_subtraction", subtract_masks)  # noqa: B010


def secaggplus_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` with hardened masks bound to the message's round.

    Train messages that carry no SecAgg+ stage (a run with secure aggregation off) pass
    straight through, so one ClientApp serves both kinds of run.
    """
    if (msg.metadata.message_type == MessageType.TRAIN
            and RECORD_KEY_CONFIGS not in msg.content.config_records):
        return call_next(msg, ctxt)
    install_hardened_masks()
    token = mask_round.set(int(msg.metadata.group_id or 0))
    secure = in_secure_round.set(True)
    share = pending_share.set(None)
    fit = msg.content.config_records.get("fitins.config")
    expect = _expect_share.set(bool(
        fit is not None and fit.get("dp-mode") == "distributed" and fit.get("dp")))
    seed = quantiser_seed(msg, ctxt)
    saved = np.random.get_state() if seed is not None else None
    if seed is not None:
        np.random.seed(seed)
    try:
        reply = cast(Message, _flwr_mod.secaggplus_mod(msg, ctxt, call_next))
        if pending_share.get() is not None:  # trained, but the quantiser never ran
            raise RuntimeError("distributed DP: the update's noise share was not added to "
                               "its SecAgg+ vector; nothing is sent")
        return reply
    finally:
        mask_round.reset(token)
        in_secure_round.reset(secure)
        pending_share.reset(share)
        _expect_share.reset(expect)
        if saved is not None:
            np.random.set_state(saved)


def quantize(parameters: list[np.ndarray], clipping_range: float,
             target_range: int) -> list[np.ndarray]:
    """Flower's quantiser (:func:`common.crypto.quantize.quantize`), then, in a
    distributed-DP round, the site's Skellam share added to the quantised vector (before
    Flower adds the masks; :mod:`common.privacy.distributed`)."""
    share = pending_share.get()
    if share is None and _expect_share.get():
        raise RuntimeError("distributed DP: this round's update reached the SecAgg+ quantiser "
                           "without its noise share; nothing is sent")
    vector = _quantize(parameters, clipping_range, target_range)
    if share is not None:
        pending_share.set(None)
        vector = add_share(vector, share)
    return vector


def quantiser_seed(msg: Message, ctxt: Context) -> int | None:
    """A seed for Flower's stochastic rounding of the update (``quantize`` draws from
    NumPy's global generator), so that the same seed gives the same numbers with SecAgg+
    too: only in a simulation whose run is ``deterministic``, never in deployment (a
    deployed site's node config names it), where the rounding stays unpredictable."""
    if "site-name" in ctxt.node_config:
        return None
    config = msg.content.config_records.get("fitins.config")  # the masked-vector stage
    if config is None or not config.get("deterministic"):
        return None
    parts = (config.get("seed"), ctxt.node_config.get("partition-id"), msg.metadata.group_id)
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def packed_encode(array: np.ndarray) -> bytes:
    """Flower's ``ndarray_to_bytes`` for the masked vector, as ``uint32`` rather than ``int64``.

    Masked values lie in ``[0, modulus)`` with a power-of-two modulus of at most ``2**32``
    (Flower's own limit), so they fit 32 bits exactly: half the bytes on the wire. The
    server sums them in ``uint32`` too, which wraps modulo ``2**32``: Flower's modular sum.
    """
    assert _STOCK_ENCODE is not None
    if array.dtype.kind in "iu" and array.size and array.min() >= 0 and array.max() < 2**32:
        array = array.astype(np.uint32)
    return cast(bytes, _STOCK_ENCODE(array))
