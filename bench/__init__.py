"""Benchmarks: `python -m bench.run` (end to end, against nginx and direct) and `bench.micro`."""
