"""``pathfed plan``: a site's DP plan (noise, sampling rate, local steps) before training."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(sub: Any) -> None:
    """Register ``plan``."""
    p = sub.add_parser(
        "plan", help="choose a site's DP noise, sampling rate and local steps for a budget",
        description="Search the layouts a site could train with (expected batch, local "
        "epochs; distributed DP: one full-batch step a round) for its budget, data size and "
        "rounds, calibrate each with the run's accountant, and print them best first (by "
        "the signal-to-noise ratio of the run's summed steps) with the settings to use.")
    p.add_argument("--slides", type=int, required=True,
                   help="training slides (or patients) at the site")
    p.add_argument("--config", metavar="FILE", help="TOML file of settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting, e.g. --set epsilon=3 --set rounds=40 (repeatable)")
    p.add_argument("--dim", type=int, help="trainable coordinates of the model (distributed "
                   "DP; default: the configured model on the configured data)")
    p.add_argument("--top", type=int, default=8, help="layouts to print (default 8)")
    p.add_argument("--json", action="store_true", help="as JSON")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args: argparse.Namespace) -> int:
    from cli._shared import settings
    from common.errors import ConfigError
    from common.privacy.planner import plan_candidates

    cfg = settings(args.config, args.set)
    if not cfg.dp:
        raise ConfigError("dp: the run trains without DP (dp = false): there is nothing to plan")
    if args.slides < 1:
        raise ConfigError("--slides: a site needs one training slide at least")
    dim = args.dim
    if cfg.dp_mode == "distributed" and dim is None:
        from common.site import initial_model

        dim = sum(p.numel() for p in initial_model(cfg).parameters() if p.requires_grad)
    found = plan_candidates(cfg, args.slides, dim=dim)
    if args.json:
        print(json.dumps([c.row() for c in found[: args.top]], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, width=120)
    mode = "distributed DP (Skellam shares in SecAgg+'s sum)" if cfg.dp_mode == "distributed" \
        else f"local DP-SGD ({cfg.accountant.upper()} accountant)"
    table = Table(title=f"{mode}: epsilon {cfg.epsilon:g}, delta {cfg.delta:g}, "
                  f"{cfg.rounds} rounds, {args.slides} slides a site")
    for col in ("batch-size", "local-epochs", "sample rate", "steps", "noise multiplier",
                "epsilon spent", "accountant", "snr"):
        table.add_column(col, justify="right")
    for i, c in enumerate(found[: args.top]):
        style = "bold green" if i == 0 else ("yellow" if c.capped else "")
        table.add_row(str(c.batch_size), str(c.local_epochs), f"{c.plan.sample_rate:.3g}",
                      str(c.steps), f"{c.plan.noise_multiplier:.3g}" + (" (cap)" if c.capped
                                                                          else ""),
                      f"{c.epsilon:.3f}", c.plan.accountant, f"{c.snr:.3g}", style=style)
    console.print(table)
    best = found[0]
    if cfg.dp_mode == "distributed":
        from common.privacy.distributed import describe

        info = describe(best.plan, int(dim or 0))
        console.print(f"one full-batch step a round over each site's {args.slides} slides; noise "
                      f"multiplier {best.plan.noise_multiplier:.3g} on the grid, quantisation "
                      f"adds {100 * (info['rounding_inflation'] - 1):.2g} % (lower "
                      "secagg-max-weight towards the largest site to shrink it)")
    else:
        console.print(f"use: --set batch-size={best.batch_size} "
                      f"--set local-epochs={best.local_epochs}")
    if best.capped:
        console.print("[yellow]the budget needs more noise than max-noise-multiplier: the "
                      "site stops before the planned rounds[/]")
    return 0
