"""Benchmarks: each script prints ratios against a baseline measured in the same run; ``python -m bench``
runs them all with their correctness checks (bench/run.py)."""
