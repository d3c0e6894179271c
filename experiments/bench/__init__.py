"""Benchmarks: scripts that measure, print a table and write their section of ``BENCHMARKS.md``.

Each module is a command, ``python -m experiments.bench.<name>``; ``python -m experiments.bench`` lists
them with their descriptions and ``python -m experiments.bench <name> [args]`` runs one.
"""
