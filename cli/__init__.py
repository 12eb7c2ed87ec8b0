"""The ``pathfed`` command line: one module per command group, each registering its parsers.

``simulate`` (one-machine federations), ``prepare`` (slides to features), ``predict``
(a released model on new slides, explained), ``finetune`` (a released model adapted
to one hospital under its own DP budget), ``consortium``
and ``site`` (keys; a hospital's SuperNode), ``server`` and ``run`` (the SuperLink; a
federated run), ``audit`` (the privacy ledger), ``checkpoint`` (released models),
``models`` (the model and encoder registries), ``synthesize`` (patches from a DP GAN). Heavy
imports (torch, Flower, Ray) happen inside the commands, so ``pathfed --help`` and
bad-input errors are instant. Bad input exits with code 2 and one line per problem.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cli import (
    audit,
    checkpoint,
    consortium,
    finetune,
    models,
    plan,
    predict,
    prepare,
    server,
    simulate,
    synthesize,
)
from cli._shared import EXIT_BAD_INPUT
from common.errors import ConfigError, DataError, PathFedError, UnknownModelError
from common.logs import setup_logging

COMMANDS = (simulate, prepare, predict, finetune, consortium, server, audit, checkpoint,
            models, plan, synthesize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathfed",
        description="Federated, differentially private training for computational pathology.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "simulate":
        setup_logging(verbose=False)
    try:
        return int(args.func(args))
    except (ConfigError, UnknownModelError, DataError) as err:
        print(f"pathfed: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except PathFedError as err:
        print(f"pathfed: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pathfed: interrupted", file=sys.stderr)
        return 130
