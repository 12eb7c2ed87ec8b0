"""SCAFFOLD drift control (Karimireddy et al. 2020, option II), private and SecAgg+-compatible.

Each site ``i`` keeps a control variate ``c_i`` (site state, never sent); the server keeps
``c`` and sends it with every training message. A local step corrects the site's gradient
by ``c - c_i``; after ``K_i`` local steps at learning rate ``lr`` from the global model
``x``, with update ``u_i = y_i - x``::

    c_i <- c_i - c - u_i / (K_i lr)                                  (option II)

and the server, with ``S`` the sites whose updates were aggregated out of ``N``::

    c <- c + (1/N) sum_{i in S} (c_i(new) - c_i) = c - (|S|/N) (c + mean_i u_i / (K_i lr))

**No second vector.** SCAFFOLD's sites send ``c_i(new) - c_i`` beside their update, which
would double the SecAgg+ vector. Here the server derives that sum from the aggregate it
already unmasks: ``mean_i u_i / (K_i lr)`` is the aggregate ``u`` (the weighted mean of the
updates) over ``K lr``, with ``K`` the weighted mean of the sites' step counts. The server
computes each ``K_i`` from the site's weight and the run's settings (``local-epochs x
ceil(n / batch-size)``, the steps of Opacus' Poisson loader and of plain batches alike),
never from what the site says, so a site cannot inflate ``c``. This is SCAFFOLD's update
exactly when the sites of a round take equal numbers of steps (as sites of equal size
do) and an approximation otherwise; ``tests/test_scaffold.py`` checks that ``c`` stays
the mean of the ``c_i`` under full participation.

**Privacy.** The correction ``c - c_i`` is added to the gradient after DP-SGD has clipped
and noised it (as FedProx's term): it is a function of earlier released, already private
outputs (``c`` from the aggregates, ``c_i`` from the site's own DP updates), so the step
stays a post-processing of the private gradient and costs nothing more. The server's ``c``
is computed from the aggregate alone. With distributed DP a site's update is private only
in the sum, so ``c_i`` would be a function of an unprotected update: SCAFFOLD is refused
there (one full-batch step per round has no client drift to correct anyway).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

NDArrays = list[np.ndarray]

CONTROL_KEY = "scaffold-control"
"""The training message's config entry that carries the server's control variate."""


def site_control(own: NDArrays, server: NDArrays, update: NDArrays, steps: int,
                 lr: float) -> NDArrays:
    """A site's new control variate ``c_i - c - u / (K lr)`` after ``steps`` local steps
    (option II); unchanged when it took none."""
    if steps <= 0:
        return [np.asarray(c, np.float64) for c in own]
    return [np.asarray(ci, np.float64) - np.asarray(c, np.float64)
            - np.asarray(u, np.float64) / (steps * lr)
            for ci, c, u in zip(own, server, update)]


@dataclass
class Scaffold:
    """The server's control variate ``c`` and its update from each round's aggregate.

    Args:
        lr: the sites' local learning rate.
        sites: ``N``, the sites of the federation.
        epochs, batch_size: the sites' local epochs and (expected) batch size, which
            give a site of ``n`` samples ``epochs x ceil(n / batch_size)`` steps.
    """

    lr: float
    sites: int
    epochs: int = 1
    batch_size: int = 1
    control: NDArrays = field(default_factory=list)

    def steps(self, n: int) -> int:
        """Local steps of a site of ``n`` samples in one round."""
        return self.epochs * math.ceil(n / self.batch_size)

    def ensure(self, shapes: Sequence[tuple[int, ...]]) -> NDArrays:
        """``c`` (zeros before the first round)."""
        if not self.control:
            self.control = [np.zeros(shape, np.float64) for shape in shapes]
        return self.control

    def step(self, mean_update: NDArrays, accepted: Sequence[int]) -> None:
        """Update ``c`` from the round's aggregate and the accepted replies' sample counts
        (their weights in the aggregate, already checked by the server)."""
        total = sum(accepted)
        steps = sum(n * self.steps(n) for n in accepted) / total if total else 0
        if steps <= 0:
            return
        control = self.ensure([np.shape(u) for u in mean_update])
        fraction = min(1.0, len(accepted) / self.sites)
        self.control = [c - fraction * (c + np.asarray(u, np.float64) / (steps * self.lr))
                        for c, u in zip(control, mean_update)]

    def state_arrays(self) -> dict[str, np.ndarray]:
        return {f"c/{i}": c for i, c in enumerate(self.control)}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.control = [np.asarray(arrays[f"c/{i}"], np.float64)
                        for i in range(sum(k.startswith("c/") for k in arrays))]


def encode(arrays: NDArrays) -> bytes:
    """Arrays as the bytes of one ``.npz`` (a config value, or a site state entry)."""
    buf = io.BytesIO()
    np.savez(buf, *[np.asarray(a, np.float64) for a in arrays])
    return buf.getvalue()


def decode(data: bytes, shapes: Sequence[tuple[int, ...]] | None, what: str) -> NDArrays:
    """The arrays :func:`encode` wrote, checked against the model's ``shapes`` (if given);
    :class:`ValueError` naming ``what`` when they are not a finite control variate of it."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = [z[f"arr_{i}"] for i in range(len(z.files))]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{what}: not a control variate ({err})") from None
    got = [tuple(a.shape) for a in arrays]
    if shapes is not None and got != [tuple(s) for s in shapes]:
        raise ValueError(f"{what}: control variate of shapes {got[:3]}..., the model's are "
                         f"{list(shapes)[:3]}...")
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError(f"{what}: control variate holds NaN or infinity")
    return [a.astype(np.float64) for a in arrays]


__all__ = ["CONTROL_KEY", "Scaffold", "decode", "encode", "site_control"]
