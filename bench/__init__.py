"""Benchmark suite: run ``python bench/report.py [--quick]`` (see bench/report.py)."""
