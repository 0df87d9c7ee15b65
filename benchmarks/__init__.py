"""Benchmarks: measured side by side in one run; their figures go in the issue notes."""
