"""Lifecycle: the pool FSM, restart policy (backoff, breaker, storm) and the reconciler (layer 7)."""
