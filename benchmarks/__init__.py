"""Benchmarks: `python -m benchmarks.<name>`; each prints what it compared, on what, and ratios."""
