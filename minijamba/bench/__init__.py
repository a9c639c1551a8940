"""Benchmarks, run as scripts (never as timed tests): `python -m minijamba.bench scan`.

Each prints a table and writes figures/bench_*.png. Timings on shared machines vary by ±15-40% between runs, so
compare rows measured in the same run; the README records what was measured and on which machine.
"""
