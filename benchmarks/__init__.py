"""mlx-engine benchmarks: `python -m benchmarks` (or `mlx-engine bench` from a source checkout).

A tool of the source checkout, not part of the installed package. See harness.py for
the method and RESULTS.md for the latest full run.
"""
