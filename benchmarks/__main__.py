"""``python -m benchmarks NAME [options]``: run one benchmark and print its table."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "dp": "benchmarks.dp",
    "secagg": "benchmarks.secagg",
    "scale": "benchmarks.scale",
    "tiling": "benchmarks.tiling",
    "extract": "benchmarks.extract",
    "encoders": "benchmarks.encoders",
    "deploy": "benchmarks.deploy",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("name", choices=sorted(BENCHMARKS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="options of the benchmark")
    ns = parser.parse_args(argv)
    module = importlib.import_module(BENCHMARKS[ns.name])
    return int(module.main(ns.args))


if __name__ == "__main__":
    sys.exit(main())
