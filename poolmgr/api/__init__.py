"""The HTTP API (layer 8)."""
