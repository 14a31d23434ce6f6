"""Compiled hot-path helpers (Cython) and their pure-Python twin.

Do not import the modules here directly: ``zaiproxy.limits.ledger`` chooses one in
one place and refuses to fall back silently.
"""
