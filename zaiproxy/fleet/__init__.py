"""Many proxies at once: the fleet collector and the canary check."""
