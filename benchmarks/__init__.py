"""Measurements with their own entry points (``python -m benchmarks.<name>``)."""
