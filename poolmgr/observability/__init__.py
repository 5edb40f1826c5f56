"""Observability: Prometheus metrics, structured logs (layer 8)."""
