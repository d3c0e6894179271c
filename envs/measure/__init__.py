"""Measurement: meters (latency, memory, energy) and the calibrated cost model built from them.

Imports the runtime, never the environments.
"""
