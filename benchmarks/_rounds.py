"""A federation whose sites send a fixed-size update: the cost of aggregation alone.

Sites skip training and return ``n_params`` random float32 values, so a round's time is
Flower's messaging plus, with SecAgg+, PathFed's SecAgg+ workflow (the real one, with its
seams: ChaCha20 masks, uint32 masked vectors). A client mod measures every reply a site
sends, serialised as Flower puts it on the wire (``recorddict_to_proto``), so bytes count
all four SecAgg+ stages, not just the masked vector.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

BYTES_ENV = "PATHFED_BENCH_BYTES"


def _measure_bytes(msg: Any, ctxt: Any, call_next: Any) -> Any:
    """Outermost client mod: append ``round, node, reply bytes`` to ``$PATHFED_BENCH_BYTES``."""
    from flwr.common.serde import recorddict_to_proto

    reply = call_next(msg, ctxt)
    size = recorddict_to_proto(reply.content).ByteSize() if reply.has_content() else 0
    with open(os.environ[BYTES_ENV], "a") as fh:
        fh.write(json.dumps([msg.metadata.group_id, ctxt.node_id, size]) + "\n")
    return reply


def run(sites: int, n_params: int, rounds: int, secagg: bool, work: Path,
        num_shares: float = 0.0, dropout: float = 0.2) -> dict[str, float]:
    """Run the federation; mean seconds per round (rounds 2..) and mean bytes per site-round."""
    from flwr.client import NumPyClient
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow

    from client.secagg import secaggplus_mod
    from common.config import FederationConfig
    from server.secagg import make_secagg_workflow
    from simulations.simulate import quiet_flower, run_apps

    bytes_log = work / f"bytes-{sites}-{n_params}-{int(secagg)}.jsonl"
    bytes_log.unlink(missing_ok=True)
    os.environ[BYTES_ENV] = str(bytes_log)
    spans: list[tuple[float, float]] = []

    class Timed(FedAvg):  # type: ignore[misc]
        def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> Any:
            spans.append((time.perf_counter(), float("nan")))
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round: int, results: Any, failures: Any) -> Any:
            out = super().aggregate_fit(server_round, results, failures)
            spans[-1] = (spans[-1][0], time.perf_counter())
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} site(s) failed")
            return out

    class Fixed(NumPyClient):  # type: ignore[misc]
        def fit(self, parameters: Any, config: Any) -> Any:
            rng = np.random.default_rng()
            return [rng.uniform(-0.01, 0.01, n_params).astype(np.float32)], 1, {}

    cfg = FederationConfig(sites=sites, secagg=True, secagg_clipping_range=0.05,
                           secagg_num_shares=num_shares, secagg_dropout=dropout)
    server = ServerApp()

    @server.main()  # type: ignore[misc]
    def main(grid: Any, context: Any) -> None:
        strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=sites,
                         fit_metrics_aggregation_fn=lambda metrics: {},
                         min_available_clients=sites, initial_parameters=ndarrays_to_parameters(
                             [np.zeros(n_params, np.float32)]))
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds),
                               strategy=strategy)
        DefaultWorkflow(fit_workflow=make_secagg_workflow(cfg) if secagg else None)(grid, legacy)

    client = ClientApp(client_fn=lambda context: Fixed().to_client(),
                       mods=[_measure_bytes] + ([secaggplus_mod] if secagg else []))
    quiet_flower()
    logging.getLogger("server.secagg").setLevel(logging.WARNING)
    run_apps(server, client, sites)
    done = [end - start for start, end in spans[1:] if end == end]
    if len(done) < rounds - 1:
        raise RuntimeError(f"{sites} sites, {n_params:,} values, secagg={secagg}: only "
                           f"{len(spans)} rounds ran; see the log")
    per_site_round: dict[tuple[str, int], int] = {}
    for line in bytes_log.read_text().splitlines():
        rnd, node, size = json.loads(line)
        per_site_round[(rnd, node)] = per_site_round.get((rnd, node), 0) + size
    return {"s_per_round": float(np.mean(done)),
            "bytes_per_site_round": float(np.mean(list(per_site_round.values())))}
