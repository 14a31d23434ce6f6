"""Micro-benchmarks of zaiproxy's internals, in one process (``python -m bench.micro.<name>``).

Unlike the HTTP suite beside this folder (``bench.suite`` and the modules it uses, which only
talk HTTP to a proxy started as a child process), these import the proxy's modules directly:
the ledger, the metric cells, the recorder, the token counting, the admin snapshot.
"""
