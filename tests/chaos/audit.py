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
    # Leases are not in the audit trail (the leases table is their record; docs/registry.md).


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
    by_cid: Counter[tuple[str | None, str]] = Counter((ev.correlation_id, ev.trigger or ev.kind) for ev in events)
    problems = _drain_problems(ledger.drains, by_cid)
    problems += _once_each("preload", ledger.preloads, "preload_requested", by_cid)
    problems += _once_each("breaker reset", ledger.resets, "reset_breaker", by_cid)
    return problems


def _drain_problems(drains: list[str], by_cid: Counter[tuple[str | None, str]]) -> list[str]:
    problems = []
    for cid in drains:
        n = by_cid[(cid, "drain")] + by_cid[(cid, "stop_requested")]
        if n != 1:
            problems.append(f"drain {cid}: {n} audit rows (want 1)")
        if by_cid[(cid, "drain_done")] > 1:
            problems.append(f"drain {cid}: finished {by_cid[(cid, 'drain_done')]} times")
    return problems


def _once_each(what: str, cids: list[str], key: str, by_cid: Counter[tuple[str | None, str]]) -> list[str]:
    """Each acknowledged request left exactly one `key` audit row."""
    return [f"{what} {cid}: {by_cid[(cid, key)]} audit rows (want 1)" for cid in cids if by_cid[(cid, key)] != 1]


def adoption_problems(events: list[EventView]) -> list[str]:
    ids = Counter(str((ev.detail or {}).get("adoption_id")) for ev in events if ev.kind == "adopted")
    return [f"adoption {aid} recorded {n} times" for aid, n in ids.items() if n != 1]
