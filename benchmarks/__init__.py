"""PathFed benchmarks: ``python -m benchmarks NAME``. Never part of the test suite.

Every benchmark prints ratios against a baseline measured in the same run, because the
machines we run on are noisy.
"""
