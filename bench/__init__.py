"""Benchmarks of zaiproxy (bench/README.md).

The HTTP suite (``python -m bench.suite``; ``bench.wrk_compare``, ``bench.limits_overhead``,
``bench.loadgen``, ``bench.procs``, ``bench.nginx``) imports nothing from ``zaiproxy``: it starts
the proxy and the mock upstream as child processes (``python -m zaiproxy ...``) and measures
them over HTTP (an import-linter contract in pyproject.toml holds it to that). Micro-benchmarks
that call the proxy's internals in one process live in ``bench.micro``.
"""
