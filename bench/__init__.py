"""pyanomaly benchmarks: `python -m bench.run` or `pytest bench/ --benchmark-only` (see README.md)."""
