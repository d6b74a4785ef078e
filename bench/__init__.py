"""Benchmarks: each module runs with `python -m bench.<topic>` and writes artifacts/bench-<topic>.json."""
