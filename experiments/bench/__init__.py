"""Benchmarks: scripts that measure, print a table and write their section of ``BENCHMARKS.md``."""
