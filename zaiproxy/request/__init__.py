"""The request path: routing, the gate, the exchange and relay, control routes."""
