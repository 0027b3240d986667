"""Benchmarks of the recording engine: `python -m benchmarks [name ...] [--quick]` (see README.md)."""
