"""Chaos: `serve` is killed (SIGKILL, mostly) at random moments while pools preload, serve, crash and drain,
and started again each time. Afterwards: one engine per pool that should run, no orphan, no audit row lost or
doubled, every pool's state what the machine shows.

Bounded in time: POOLMGR_CHAOS_SECONDS of chaos (default 25) per database, then a few seconds to converge.
POOLMGR_CHAOS_SEED replays a run (the seed is in the failure message).
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from poolmgr.store import Registry
from tests.chaos._rig import Rig, engines, marked_processes, model_file
from tests.chaos.audit import (
    Ledger,
    adoption_problems,
    ledger_problems,
    restart_count_matches,
    transition_chain_gaps,
)

pytestmark = pytest.mark.slow

CHAOS_S = float(os.environ.get("POOLMGR_CHAOS_SECONDS", "25"))
ENDINGS = ("kill",) * 8 + ("term-keep", "term")


def _post(rig: Rig, path: str, headers: dict[str, str]) -> bool:
    """POST without a body; True when accepted (202)."""
    return rig.client.post(path, headers=headers).status_code == 202


def _operate(rig: Rig, rng: random.Random, pool_id: str, ledger: Ledger) -> None:
    """One operator action on the draining pool, as its state allows; only clear answers go to the ledger."""
    try:
        status = rig.status(pool_id)
        cid = f"chaos-{uuid.uuid4().hex[:12]}"
        headers = {"X-Correlation-Id": cid}
        if status["state"] == "ready":
            if rng.random() < 0.5 and status["slots_free"] > 0:  # a drain with a lease held (no audit row)
                rig.client.post(f"/pools/{pool_id}/leases", json={"ttl_s": 30})
            body = {"deadline_ms": rng.choice([0, 400, 1200])}
            if rig.client.post(f"/pools/{pool_id}/drain", json=body, headers=headers).status_code == 202:
                ledger.drains.append(cid)
        elif status["state"] == "stopped" and _post(rig, f"/pools/{pool_id}/preload", headers):
            ledger.preloads.append(cid)
    except (httpx.HTTPError, AssertionError):
        return  # serve not up yet, or gone: nothing was acknowledged


def _chaos_round(rig: Rig, rng: random.Random, drainy: str, ledger: Ledger) -> str:
    ending = rng.choice(ENDINGS)
    pid = rig.start(*(("--keep-engines",) if ending == "term-keep" else ()))
    life = rng.uniform(0.05, 2.0)
    if ending != "kill":
        # SIGTERM in the first milliseconds of the process, before serve() installs its handlers, ends it by
        # the signal (as a kill would); from then on, start-up included, SIGTERM is a clean stop.
        life = max(life, 0.3)
    started = time.monotonic()
    if rng.random() < 0.6:
        time.sleep(rng.uniform(0.2, 1.0) * life)
        _operate(rig, rng, drainy, ledger)
    time.sleep(max(0.0, life - (time.monotonic() - started)))
    if ending == "kill":
        rig.kill(pid)
    else:
        status = rig.term(pid)
        assert status == 0, f"serve exited {status} on SIGTERM\n{rig.log_tail()}"
    return ending


def _converge(rig: Rig, ledger: Ledger, timeout: float = 40) -> dict[str, dict[str, Any]]:
    """Drive every pool to ready (preload a drained one, reset an open breaker); their statuses."""

    def all_ready() -> bool:
        for pool_id in rig.pool_ids:
            status = rig.status(pool_id)
            cid = f"chaos-{uuid.uuid4().hex[:12]}"
            headers = {"X-Correlation-Id": cid}
            wants_preload = status["state"] == "stopped" or status["desired_state"] == "stopped"
            if wants_preload and status["state"] != "draining" and _post(rig, f"/pools/{pool_id}/preload", headers):
                ledger.preloads.append(cid)
            elif status["state"] == "breaker-open" and _post(rig, f"/pools/{pool_id}/breaker/reset", headers):
                ledger.resets.append(cid)
        return all(rig.status(p)["state"] == "ready" for p in rig.pool_ids)

    rig.wait_until(all_ready, timeout, "every pool ready")
    return {p: rig.status(p) for p in rig.pool_ids}


def _stable_pids(rig: Rig, seconds: float = 1.5) -> dict[str, int]:
    """Wait until every pool kept the same ready engine for `seconds` (an engine started before the crashing
    model was mended may still crash once)."""
    last: dict[str, int] = {}
    since = time.monotonic()

    def stable() -> bool:
        nonlocal last, since
        now = {p: rig.status(p)["pid"] for p in rig.pool_ids if rig.status(p)["state"] == "ready"}
        if len(now) != len(rig.pool_ids) or now != last:
            last, since = now, time.monotonic()
            return False
        return time.monotonic() - since >= seconds

    rig.wait_until(stable, 30, "every pool ready with a stable engine")
    return last


def _engines_match_registry(rig: Rig, registry: Registry) -> None:
    for pool_id in rig.pool_ids:
        view = registry.get(pool_id)
        found = engines(pool_id)
        assert [(p.pid, p.start_time) for p in found] == [(view.pid, view.pid_start_time)], (pool_id, found, view)
        assert len(marked_processes(pool_id)) == 1, f"{pool_id}: an orphan engine process"
        assert view.endpoint_url == rig.endpoint_url(pool_id)
        with rig.engine(pool_id) as engine:
            assert engine.get("/health", timeout=5).status_code == 200


def _audit(rig: Rig, registry: Registry, ledger: Ledger) -> Counter[str]:
    kinds: Counter[str] = Counter()
    every = []
    for pool_id in rig.pool_ids:
        view = registry.get(pool_id)
        events = registry.events(pool_id=pool_id)
        every += events
        kinds.update(ev.trigger or ev.kind for ev in events)
        assert transition_chain_gaps(view, events) == [], pool_id
        assert restart_count_matches(view, events), (pool_id, view.restart_count)
    assert ledger_problems(ledger, every) == []
    assert adoption_problems(every) == []
    return kinds


def test_serve_killed_at_random_moments_keeps_one_engine_per_pool_and_every_audit_row(
    db_url: str, rig_factory: Callable[..., Rig]
) -> None:
    seed = int(os.environ.get("POOLMGR_CHAOS_SEED", str(random.randrange(1 << 30))))
    rng = random.Random(seed)
    rig = rig_factory(
        db_url, POOL_MANAGERD_RESTART_RATE_LIMIT="6", POOL_MANAGERD_RESTART_WINDOW_SECS="20",
        POOL_MANAGERD_CIRCUIT_BREAKER_TIMEOUT_SECS="2",
    )  # fmt: skip
    ok, crashing = model_file(rig.dir / "ok.gguf", "ok"), model_file(rig.dir / "crashing.gguf", "crash_after")
    steady, crashy, drainy = rig.pool_id("steady"), rig.pool_id("crashy"), rig.pool_id("drainy")
    rig.write_pools({steady: ok, crashy: crashing, drainy: ok})
    ledger = Ledger()
    endings: Counter[str] = Counter()
    deadline = time.monotonic() + CHAOS_S
    while time.monotonic() < deadline:
        endings[_chaos_round(rig, rng, drainy, ledger)] += 1
        for pool_id in rig.pool_ids:
            assert len(engines(pool_id)) <= 1, f"seed {seed}: two engines for {pool_id}"

    model_file(crashing, "ok")  # the crashing pool mends: from here on every pool should serve
    serve = rig.start_and_wait()
    registry = Registry(db_url, node_id="chaos-reader")
    try:
        _converge(rig, ledger)
        pids = _stable_pids(rig)
        _engines_match_registry(rig, registry)

        # kill -9 once more: the next serve adopts every engine, spawns none, changes no state
        last_event = max(ev.id for ev in registry.events())
        rig.kill(serve)
        serve = rig.start_and_wait()
        rig.wait_until(
            lambda: {e.pool_id for e in registry.events(after_id=last_event) if e.kind == "adopted"} == set(pids),
            20, "every engine adopted",
        )  # fmt: skip
        assert {p: rig.status(p)["pid"] for p in rig.pool_ids} == pids
        assert [e for e in registry.events(after_id=last_event) if e.trigger] == []
        _engines_match_registry(rig, registry)

        # a plain SIGTERM stops every engine and leaves nothing behind
        assert rig.term(serve) == 0
        for pool_id in rig.pool_ids:
            assert marked_processes(pool_id) == [], f"{pool_id}: orphan after a graceful stop"
            view = registry.get(pool_id)
            assert (view.state.value, view.pid) == ("stopped", None)
        kinds = _audit(rig, registry, ledger)
    finally:
        registry.close()
    print(f"chaos seed {seed}: {dict(endings)} rounds; audit {dict(kinds)}; {len(ledger.drains)} drains")
    assert endings["kill"] >= 5, f"seed {seed}: too few kills to mean anything: {dict(endings)}"
    assert kinds["adopted"] >= len(rig.pool_ids) and kinds["crash"] >= 1
