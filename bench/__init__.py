"""Ingest benchmarks: ``make bench`` (``python -m bench.ingest``); see docs/benchmarks.md."""
