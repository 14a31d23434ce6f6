"""Limits and quotas: the ledger, admission, the adaptive rate, client keys."""
