"""The client side of PathFed's one seam around Flower's SecAgg+.

Flower's ``secaggplus_mod`` does the whole client protocol (key agreement, Shamir shares,
masking). PathFed changes one thing: the function that expands a seed into masks, which in
Flower 1.42 is a 32-bit-seeded ``numpy.random.RandomState``. :func:`secaggplus_mod` wraps
Flower's mod, swaps that function for :func:`common.crypto.expand_masks` and binds the
round (the message's group id) into the nonce. ``server/secagg.py`` does the same on the
server; both check that Flower's internals are where this seam expects them.
"""

from __future__ import annotations

import importlib
import inspect
import logging

import flwr
import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

from common.crypto import install_generator, mask_round

log = logging.getLogger(__name__)

# The package re-exports the function under the module's name: import the module itself.
_flwr_mod = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")

FLOWER_SERIES = "1.42."
_STOCK = getattr(_flwr_mod, "pseudo_rand_gen", None)


def check_flower_internals() -> None:
    """Fail loudly if the Flower internals this seam patches have moved."""
    problems = []
    if not flwr.__version__.startswith(FLOWER_SERIES):
        problems.append(f"flwr {flwr.__version__} installed, seam written for {FLOWER_SERIES}x")
    if _STOCK is None:
        problems.append("flwr.client.mod.secure_aggregation.secaggplus_mod.pseudo_rand_gen is gone")
    elif list(inspect.signature(_STOCK).parameters) != ["seed", "num_range", "dimensions_list"]:
        problems.append(f"pseudo_rand_gen has a new signature {inspect.signature(_STOCK)}")
    if problems:
        raise RuntimeError(
            "PathFed's SecAgg+ mask seam (client/secagg.py) no longer fits Flower: "
            + "; ".join(problems) + ". Re-check the seam before changing the flwr pin."
        )


def install_hardened_masks() -> None:
    """Make Flower's client SecAgg+ mod expand masks with PathFed's generator."""
    install_generator(_flwr_mod, _STOCK, check_flower_internals)


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
    try:
        reply = _flwr_mod.secaggplus_mod(msg, ctxt, call_next)
    finally:
        mask_round.reset(token)
    if reply.has_content():
        pack_masked_vector(reply.content)
    return reply


def pack_masked_vector(content: RecordDict) -> None:
    """Send the masked vector as ``uint32``, not Flower's ``int64``: half the bytes.

    Masked values lie in ``[0, modulus)`` with a power-of-two modulus of at most ``2**32``,
    so they fit 32 bits exactly; the server seam widens them back before summing.
    """
    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or Key.MASKED_PARAMETERS not in configs:
        return
    arrays = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]  # type: ignore
    if any(a.size and (a.min() < 0 or a.max() >= 2**32) for a in arrays):
        return  # not a modulus Flower allows; leave Flower's encoding alone
    configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(a.astype(np.uint32)) for a in arrays]
