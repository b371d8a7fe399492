"""Benchmarks: our paths against raw baselines, as ratios measured in one run (issue 5).

``python -m bench`` (or ``make bench``) starts a fresh local Kafka broker, measures every row,
prints a table and writes ``bench/results.json``. See ``bench/README.md`` for the method.
"""
