"""Benchmarks of zaiproxy against its mock upstream (run with ``python -m bench.wrk_compare``)."""
