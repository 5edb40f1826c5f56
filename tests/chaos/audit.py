"""Checks over the audit trail that hold however often poolmgr was killed."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from poolmgr.store import EventView, PoolView

RESTART_TRIGGERS = ("retry", "trial_start")


@dataclass
class Ledger:
    """What the API acknowledged (2xx) during the test: each must be in the audit trail exactly once."""

    drains: list[str] = field(default_factory=list)  # correlation ids
    preloads: list[str] = field(default_factory=list)
    resets: list[str] = field(default_factory=list)
    leases: list[str] = field(default_factory=list)  # lease ids


def transition_chain_gaps(pool: PoolView, events: list[EventView]) -> list[str]:
    """Every state change of the pool, in order: each starts where the previous ended, the first from the
    registration, the last where the pool is now. A lost row leaves a gap; a doubled one repeats an edge."""
    problems = []
    state = None
    for ev in events:
        if ev.kind == "registered":
            state = ev.to_state
            continue
        if ev.trigger is None:
            if ev.to_state is None:  # spec_updated and the like: no state recorded
                continue
            if ev.from_state != ev.to_state or ev.to_state != state:
                problems.append(f"event {ev.id} ({ev.kind}) in state {ev.from_state}->{ev.to_state}, pool was {state}")
            continue
        if ev.from_state != state:
            problems.append(f"event {ev.id} {ev.trigger} {ev.from_state}->{ev.to_state}, but the pool was {state}")
        state = ev.to_state
    if state != pool.state.value:
        problems.append(f"the last audited state is {state}, the pool is {pool.state.value}")
    return problems


def restart_count_matches(pool: PoolView, events: list[EventView]) -> bool:
    """restart_count lives in the database: it equals the restarts audited, never reset by a restart."""
    return pool.restart_count == sum(1 for ev in events if ev.trigger in RESTART_TRIGGERS)


def ledger_problems(ledger: Ledger, events: list[EventView]) -> list[str]:
    problems = []
    by_cid: Counter[tuple[str | None, str]] = Counter()
    for ev in events:
        key = ev.trigger or ev.kind
        by_cid[(ev.correlation_id, key)] += 1
    for cid in ledger.drains:
        n = by_cid[(cid, "drain")] + by_cid[(cid, "stop_requested")]
        if n != 1:
            problems.append(f"drain {cid}: {n} audit rows (want 1)")
        if by_cid[(cid, "drain_done")] > 1:
            problems.append(f"drain {cid}: finished {by_cid[(cid, 'drain_done')]} times")
    for cid in ledger.preloads:
        if by_cid[(cid, "preload_requested")] != 1:
            problems.append(f"preload {cid}: {by_cid[(cid, 'preload_requested')]} audit rows (want 1)")
    for cid in ledger.resets:
        if by_cid[(cid, "reset_breaker")] != 1:
            problems.append(f"breaker reset {cid}: {by_cid[(cid, 'reset_breaker')]} audit rows (want 1)")
    allocated = Counter(
        str((ev.detail or {}).get("lease_id")) for ev in events if ev.kind == "lease_allocated"
    )  # fmt: skip
    for lease_id in ledger.leases:
        if allocated[lease_id] != 1:
            problems.append(f"lease {lease_id}: {allocated[lease_id]} lease_allocated rows (want 1)")
    return problems


def adoption_problems(events: list[EventView]) -> list[str]:
    ids = Counter(str((ev.detail or {}).get("adoption_id")) for ev in events if ev.kind == "adopted")
    return [f"adoption {aid} recorded {n} times" for aid, n in ids.items() if n != 1]
