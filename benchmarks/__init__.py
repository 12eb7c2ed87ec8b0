"""PathFed benchmarks: ``python -m benchmarks NAME``. Never part of the test suite.

Every benchmark prints ratios against a baseline measured in the same run, because the
machines we run on are noisy.
"""

import time
from collections.abc import Callable


def best(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
