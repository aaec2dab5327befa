"""Benchmarks of pdserve; ``bench.serving`` is the ``pdserve bench`` tool."""
