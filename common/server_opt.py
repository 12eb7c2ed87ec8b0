"""Server optimisers: how the server turns a round's aggregate update into a new global model.

The adaptive federated optimisers of Reddi et al. (2021), "Adaptive Federated
Optimization", with Flower's arithmetic and defaults (``flwr.server.strategy.FedAdam``,
``FedYogi``, ``FedAdagrad``, ``FedAvgM``): the aggregate update ``delta`` (the weighted mean
of the sites' updates, or their SecAgg+ sum unmasked as a mean) is the pseudo-gradient of
one server step. They live here, Flower-free, because every engine applies its aggregate
through :class:`common.rounds.RoundBook` (the Flower strategy and the in-process runner
alike); ``tests/test_server_opt.py`` checks each against Flower's strategy on the same
inputs.

A server step is post-processing of the aggregate: it costs no privacy, with local or
distributed DP. Under DP the aggregate is noisy, and an adaptive step rescales each
coordinate by its running second moment, which damps the noise of coordinates the
gradients rarely move (docs/privacy.md, "Server optimisers").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

NDArrays = list[np.ndarray]

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
DEFAULT_SERVER_LR = {"fedavg": 1.0, "fedavgm": 1.0, "fedadam": 0.1, "fedyogi": 0.1,
                     "fedadagrad": 0.1}
"""Flower's default server learning rates (``server_learning_rate``, ``eta``)."""


@dataclass
class ServerOptimizer:
    """One server optimiser and its state (the moments, the steps taken).

    Args:
        name: one of :data:`SERVER_OPTIMIZERS`.
        lr: the server learning rate (Flower's ``eta``; ``server_learning_rate`` of FedAvgM);
            0 takes Flower's default (:data:`DEFAULT_SERVER_LR`).
        momentum: FedAvgM's server momentum.
        beta1, beta2, tau: the adaptive optimisers' moment decays and their
            denominator's constant (Flower: 0.9, 0.99, 1e-9); FedAdagrad, as Flower's,
            keeps no first moment and sums squares (neither beta applies).
    """

    name: str = "fedavg"
    lr: float = 0.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-9
    steps: int = 0
    """Server steps taken (rounds that produced a global model)."""
    m: NDArrays = field(default_factory=list)
    v: NDArrays = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPTIMIZERS:
            raise ValueError(f"server-optimizer: unknown {self.name!r}; known: "
                             f"{', '.join(SERVER_OPTIMIZERS)}")
        if self.lr <= 0:
            self.lr = DEFAULT_SERVER_LR[self.name]

    @classmethod
    def from_config(cls, cfg: Any) -> ServerOptimizer:
        return cls(cfg.server_optimizer, cfg.server_lr, cfg.server_momentum,
                   cfg.server_beta1, cfg.server_beta2, cfg.server_tau)

    def step(self, weights: NDArrays, delta: NDArrays) -> NDArrays:
        """The new global model from ``weights`` and the round's aggregate update."""
        delta = [np.asarray(d, np.float64) for d in delta]
        self.steps += 1
        if self.name == "fedavg":
            return [w + (self.lr * d).astype(w.dtype) for w, d in zip(weights, delta)]
        if not self.m:
            self.m = [np.zeros_like(d) for d in delta]
        if self.name == "fedavgm":
            # Flower's FedAvgM: v = momentum * v + delta; w += lr * v
            self.m = [self.momentum * m + d for m, d in zip(self.m, delta)]
            return [w + (self.lr * m).astype(w.dtype) for w, m in zip(weights, self.m)]
        beta1 = 0.0 if self.name == "fedadagrad" else self.beta1  # Flower's FedAdagrad: none
        self.m = [beta1 * m + (1 - beta1) * d for m, d in zip(self.m, delta)]
        if not self.v:
            self.v = [np.zeros_like(d) for d in delta]
        squared = [d * d for d in delta]
        if self.name == "fedadam":
            self.v = [self.beta2 * v + (1 - self.beta2) * s for v, s in zip(self.v, squared)]
            # Flower's bias correction counts from its round number + 1
            t = self.steps + 1.0
            lr = self.lr * np.sqrt(1 - self.beta2**t) / (1 - self.beta1**t)
        elif self.name == "fedyogi":
            self.v = [v - (1 - self.beta2) * s * np.sign(v - s) for v, s in zip(self.v, squared)]
            lr = self.lr
        else:  # fedadagrad
            self.v = [v + s for v, s in zip(self.v, squared)]
            lr = self.lr
        return [w + (lr * m / (np.sqrt(v) + self.tau)).astype(w.dtype)
                for w, m, v in zip(weights, self.m, self.v)]

    # ---- state kept with the checkpoints (a resumed run continues the same moments) ----
    def state_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"steps": np.asarray(self.steps)}
        arrays.update({f"m/{i}": m for i, m in enumerate(self.m)})
        arrays.update({f"v/{i}": v for i, v in enumerate(self.v)})
        return arrays

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.steps = int(arrays["steps"])
        self.m = [arrays[f"m/{i}"] for i in range(sum(k.startswith("m/") for k in arrays))]
        self.v = [arrays[f"v/{i}"] for i in range(sum(k.startswith("v/") for k in arrays))]

    @property
    def stateful(self) -> bool:
        return self.name != "fedavg"

    def describe(self) -> str:
        if self.name == "fedavg":
            return f"fedavg (server lr {self.lr:g})"
        if self.name == "fedavgm":
            return f"fedavgm (server lr {self.lr:g}, momentum {self.momentum:g})"
        return (f"{self.name} (server lr {self.lr:g}, beta1 {self.beta1:g}, beta2 "
                f"{self.beta2:g}, tau {self.tau:g})")


__all__ = ["DEFAULT_SERVER_LR", "SERVER_OPTIMIZERS", "ServerOptimizer"]
