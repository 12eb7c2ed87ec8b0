"""Run a simulated federation of hospitals on this machine (Flower's simulation engine)."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from common import deployment
from common.config import FederationConfig
from common.runs import default_run_dir

log = logging.getLogger(__name__)

FLOWER_ENV = {
    **deployment.FLOWER_ENV,
    "RAY_DEDUP_LOGS": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}


class _DropDeprecation(logging.Filter):
    """Flower warns that the Python simulation entry point is deprecated; we pin 1.42."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in str(record.msg) and "deprecated feature" not in str(
            record.msg)


def quiet_flower(verbose: bool = False) -> None:
    """Flower logs every protocol step; PathFed prints one line per round instead."""
    import flwr.supercore.logger  # noqa: F401  (sets the flwr logger to DEBUG on import)

    flower = logging.getLogger("flwr")
    flower.propagate = False
    if not verbose:
        flower.setLevel(logging.WARNING)
        flower.addFilter(_DropDeprecation())


def run_apps(server_app: Any, client_app: Any, sites: int, num_cpus: int | None = None) -> None:
    """Run a ServerApp and ClientApp in Flower's simulation engine: ``sites`` virtual
    sites, one CPU each, on ``num_cpus`` CPUs (all by default)."""
    from flwr.simulation import run_simulation

    os.environ.update(FLOWER_ENV)
    cpus = num_cpus or os.cpu_count() or 1
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                      "logging_level": logging.ERROR},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=sites,
                       backend_config=backend_config)  # type: ignore[arg-type]


def simulate(cfg: FederationConfig, num_cpus: int | None = None,
             verbose: bool = False) -> dict[str, Any]:
    """Run ``cfg`` with ``cfg.sites`` virtual hospitals; return the run's summary."""
    os.environ.update(FLOWER_ENV)
    if not cfg.out:
        cfg = cfg.model_copy(update={"out": str(default_run_dir())})
    if not cfg.run_id:
        # Sites keep their accountants by run id: a resumed run continues its own, a new
        # run in a reused folder does not inherit an earlier run's.
        earlier = Path(cfg.out) / "config.json"
        run_id = ""
        if cfg.resume and earlier.is_file():
            run_id = str(json.loads(earlier.read_text()).get("run-id", ""))
        cfg = cfg.model_copy(update={"run_id": run_id or f"sim-{os.urandom(6).hex()}"})
    if not cfg.keys:
        # Simulated sites' ledger keys, beside (not inside) the run folder that auditors get.
        from common.ledger import make_key_folder

        keys = make_key_folder(Path(f"{cfg.out.rstrip('/')}.keys"),
                               [f"site-{i}" for i in range(cfg.sites)])
        cfg = cfg.model_copy(update={"keys": str(keys.resolve())})
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "summary.json").unlink(missing_ok=True)

    from client.app import make_client_app
    from server.app import make_server_app

    quiet_flower(verbose)
    # The simulated sites' privacy state, beside the run folder like their keys: a killed
    # and resumed simulation continues every site's accountant.
    state_root = Path(f"{cfg.out.rstrip('/')}.sites")
    run_apps(make_server_app(cfg), make_client_app(cfg.secagg, state_root), cfg.sites,
             num_cpus)
    summary_path = Path(cfg.out) / "summary.json"
    if not summary_path.exists():
        raise RuntimeError(f"the federation ended without writing {summary_path}; see the log")
    return dict(json.loads(summary_path.read_text()))
