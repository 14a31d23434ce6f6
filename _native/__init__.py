"""Compiled hot-path helpers (Cython) and their pure-Python twin.

Installed as ``zaiproxy._native`` (setup.py/pyproject.toml map this folder there; nothing
of it is a top-level import name).

Do not import the modules here directly: ``zaiproxy.limits.ledger`` chooses one in
one place and refuses to fall back silently.
"""
