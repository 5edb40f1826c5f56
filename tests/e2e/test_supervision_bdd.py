"""Steps for features/supervision/*.feature and features/lifecycle/*.feature against a real serve."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from poolmgr.engines.tiny_model import write_tiny_model
from tests.e2e.conftest import Serve, engine_pids

pytestmark = pytest.mark.e2e

scenarios("supervision/restart.feature", "lifecycle/drain_reload.feature")


@dataclass
class World:
    srv: Serve | None = None
    pid: int | None = None
    lease_id: str | None = None
    drain_started: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def serve(self) -> Serve:
        assert self.srv is not None
        return self.srv


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture(scope="session")
def second_model(shared_dir: Path) -> Path:
    path = write_tiny_model(shared_dir / "tiny-b.gguf", seed=1)
    path.chmod(0o644)
    return path


@given(parsers.parse('a running poolmgr with a ready pool "{pool}" on the tiny model'))
def ready_pool(world: World, serve_factory: Any, sqlite_url: str, tiny_model: Path, pool: str) -> None:
    world.srv = serve_factory(sqlite_url)
    world.serve.write_pools({"id": pool, "model": str(tiny_model), "slots": 2, "ctx_size": 1024})
    world.serve.start()
    world.pid = world.serve.wait_state(pool, "ready")["pid"]


@given(parsers.parse('a running poolmgr with breaker threshold {n:d} and a pool "{pool}" whose model is missing'))
def broken_pool(world: World, serve_factory: Any, sqlite_url: str, shared_dir: Path, n: int, pool: str) -> None:
    world.srv = serve_factory(
        sqlite_url,
        POOL_MANAGERD_CIRCUIT_BREAKER_THRESHOLD=str(n),
        POOL_MANAGERD_CIRCUIT_BREAKER_TIMEOUT_SECS="3600",
    )
    world.serve.write_pools({"id": pool, "model": str(shared_dir / "no-such-model.gguf")})
    world.serve.start()


@given(parsers.parse('a lease on "{pool}"'))
def a_lease(world: World, pool: str) -> None:
    resp = world.serve.request("POST", f"/pools/{pool}/leases", json={"ttl_s": 600})
    assert resp.status_code == 201, resp.text
    world.lease_id = resp.json()["lease_id"]
    assert world.serve.status(pool)["active_leases"] == 1


@when(parsers.parse('the engine of "{pool}" is killed with SIGKILL'))
def kill_engine(world: World, pool: str) -> None:
    assert world.pid is not None
    os.kill(world.pid, signal.SIGKILL)


@when(parsers.parse('"{pool}" is drained with a deadline of {ms:d} ms'))
def drain(world: World, pool: str, ms: int) -> None:
    world.drain_started = time.monotonic()
    resp = world.serve.request("POST", f"/pools/{pool}/drain", json={"deadline_ms": ms})
    assert resp.status_code == 202, resp.text


@when(parsers.parse('"{pool}" is preloaded'))
def preload(world: World, pool: str) -> None:
    assert world.serve.request("POST", f"/pools/{pool}/preload").status_code == 202


@when(parsers.parse('"{pool}" is reloaded to the corrupt model'))
def reload_corrupt(world: World, pool: str, corrupt_model: Path) -> None:
    resp = world.serve.request("POST", f"/pools/{pool}/reload", json={"model": str(corrupt_model)})
    assert resp.status_code == 202, resp.text


@when(parsers.parse('"{pool}" is reloaded to the second tiny model'))
def reload_good(world: World, pool: str, second_model: Path) -> None:
    resp = world.serve.request("POST", f"/pools/{pool}/reload", json={"model": str(second_model)})
    assert resp.status_code == 202, resp.text


@then(parsers.parse('"{pool}" records a crash with reason "{reason}" and signal {sig:d}'))
def crash_recorded(world: World, pool: str, reason: str, sig: int) -> None:
    world.serve.wait_for(pool, lambda s: s["restart_count"] >= 1 or s["state"] != "ready", what="crash seen")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        crashes = [e for e in world.serve.events(pool) if e["kind"] == "crashed"]
        if crashes:
            assert (crashes[0]["reason"], crashes[0]["signal"]) == (reason, sig)
            assert (crashes[0]["from_state"], crashes[0]["to_state"]) == ("ready", "crashed")
            return
        time.sleep(0.05)
    raise AssertionError("no crashed event")


@then(parsers.parse('"{pool}" backs off and is ready again with restart_count {n:d} and a new pid'))
def ready_again(world: World, pool: str, n: int) -> None:
    status = world.serve.wait_for(pool, lambda s: s["ready"] and s["restart_count"] == n, what="ready again")
    assert status["pid"] != world.pid and status["pid"] in engine_pids(pool)
    triggers = [e["trigger"] for e in world.serve.events(pool) if e["trigger"]]
    assert triggers[-4:] == ["crash", "back_off", "retry", "preload_ok"]
    backoff = next(e for e in world.serve.events(pool) if e["trigger"] == "back_off")
    assert backoff["backoff_ms"] is not None and 40 <= backoff["backoff_ms"] <= 60


@then(parsers.parse('completions to "{pool}" work'))
def completions_work(world: World, pool: str) -> None:
    url = world.serve.status(pool)["endpoint_url"]
    resp = httpx.post(url + "/completion", json={"prompt": "hi", "n_predict": 4, "ignore_eos": True}, timeout=30)
    assert resp.status_code == 200 and resp.json()["tokens_predicted"] == 4


@then(parsers.parse('"{pool}" reaches state "{state}"'))
def reaches_state(world: World, pool: str, state: str) -> None:
    world.serve.wait_state(pool, state, timeout=30)


@then(parsers.parse('"{pool}" made exactly {n:d} failed starts'))
def failed_starts(world: World, pool: str, n: int) -> None:
    failed = [e for e in world.serve.events(pool) if e["kind"] == "preload_failed"]
    assert len(failed) == n
    assert all(e["reason"] == "model_missing" for e in failed)
    opened = [e for e in world.serve.events(pool) if e["trigger"] == "open_breaker"]
    assert len(opened) == 1 and f"{n} consecutive failed starts" in opened[0]["reason"]


@then(parsers.parse('"{pool}" makes no start attempt for {secs:d} seconds'))
def no_attempts(world: World, pool: str, secs: int) -> None:
    before = len(world.serve.events(pool))
    time.sleep(secs)
    assert len(world.serve.events(pool)) == before
    assert world.serve.status(pool)["state"] == "breaker-open"
    assert engine_pids(pool) == []


@then(parsers.parse('its last_error says "{text}"'))
def last_error_says(world: World, text: str) -> None:
    pool = world.serve.pool_ids[0]
    assert text in (world.serve.status(pool)["last_error"] or "")


@then(parsers.parse('a new lease on "{pool}" is refused with 409'))
def lease_refused(world: World, pool: str) -> None:
    resp = world.serve.request("POST", f"/pools/{pool}/leases", json={})
    assert resp.status_code == 409
    assert "draining" in resp.json()["error"]["message"]
    assert world.serve.status(pool)["active_leases"] == 1


@then(parsers.parse('"{pool}" is still draining after {ms:d} ms'))
def still_draining(world: World, pool: str, ms: int) -> None:
    time.sleep(max(0.0, ms / 1000 - (time.monotonic() - world.drain_started)))
    status = world.serve.status(pool)
    assert status["state"] == "draining" and status["draining"] and not status["ready"]
    assert status["pid"] in engine_pids(pool)


@then(parsers.parse('"{pool}" ends stopped with force_stopped {forced} and {n:d} final lease'))
def ends_stopped(world: World, pool: str, forced: str, n: int) -> None:
    status = world.serve.wait_state(pool, "stopped")
    assert not status["draining"] and status["active_leases"] == 0 and status["pid"] is None
    drained = [e for e in world.serve.events(pool) if e["kind"] == "drained"][-1]
    assert drained["detail"]["force_stopped"] is (forced == "true")
    assert drained["detail"]["final_leases"] == n
    assert drained["correlation_id"]
    if forced == "true":
        assert drained["detail"]["duration_ms"] >= 1400


@then(parsers.parse('no engine of "{pool}" is running'))
def no_engine(world: World, pool: str) -> None:
    assert engine_pids(pool) == []


@then(parsers.parse('"{pool}" is ready again'))
def is_ready_again(world: World, pool: str) -> None:
    world.serve.wait_state(pool, "ready")


@then(parsers.parse('"{pool}" is ready again on the tiny model'))
def ready_on_tiny(world: World, pool: str, tiny_model: Path) -> None:
    status = world.serve.wait_for(
        pool,
        lambda s: s["ready"] and any(e["trigger"] == "rollback" for e in world.serve.events(pool)),
        what="ready after rollback",
    )
    assert status["model"] == str(tiny_model)
    assert status["pid"] in engine_pids(pool)


@then(parsers.parse('"{pool}" is ready again on the second tiny model'))
def ready_on_second(world: World, pool: str, second_model: Path) -> None:
    status = world.serve.wait_for(pool, lambda s: s["ready"] and s["model"] == str(second_model), what="reloaded")
    assert status["pid"] != world.pid
    ok = [e for e in world.serve.events(pool) if e["trigger"] == "preload_ok"][-1]
    assert ok["detail"]["reload_outcome"] == "success"


@then(parsers.parse('the audit of "{pool}" shows the failed reload and the rollback'))
def audit_rollback(world: World, pool: str) -> None:
    events = world.serve.events(pool)
    kinds = [e["kind"] for e in events]
    assert "reload_requested" in kinds and "preload_failed" in kinds and "rollback" in kinds
    failed = next(e for e in events if e["kind"] == "preload_failed")
    assert failed["reason"] == "model_corrupt"
    ok = [e for e in events if e["trigger"] == "preload_ok"][-1]
    assert ok["detail"]["reload_outcome"] == "rolled_back"


@given(
    parsers.parse(
        'a running poolmgr with breaker threshold {n:d}, breaker timeout {secs:d} s and a pool "{pool}" '
        "whose model is missing"
    )
)
def broken_pool_short_breaker(
    world: World, serve_factory: Any, sqlite_url: str, shared_dir: Path, n: int, secs: int, pool: str
) -> None:
    world.srv = serve_factory(
        sqlite_url,
        POOL_MANAGERD_CIRCUIT_BREAKER_THRESHOLD=str(n),
        POOL_MANAGERD_CIRCUIT_BREAKER_TIMEOUT_SECS=str(secs),
    )
    world.serve.write_pools({"id": pool, "model": str(shared_dir / "no-such-model.gguf")})
    world.serve.start()


@then(parsers.parse('after the timeout "{pool}" made exactly 1 trial start and reopened with a {secs:d} s timeout'))
def one_trial(world: World, pool: str, secs: int) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        opens = [e for e in world.serve.events(pool) if e["trigger"] == "open_breaker"]
        if len(opens) >= 2:
            break
        time.sleep(0.05)
    events = world.serve.events(pool)
    first_open = next(i for i, e in enumerate(events) if e["trigger"] == "open_breaker")
    second_open = [i for i, e in enumerate(events) if e["trigger"] == "open_breaker"][1]
    between = events[first_open + 1 : second_open]
    assert [e["trigger"] for e in between if e["trigger"]] == ["trial_start", "preload_failed"]
    assert "half-open trial failed" in events[second_open]["reason"]
    assert events[second_open]["detail"]["timeout_s"] == secs
    status = world.serve.status(pool)
    assert status["state"] in ("breaker-open", "preloading", "crashed")


@when(parsers.parse('the breaker of "{pool}" is reset'))
def reset_breaker(world: World, pool: str) -> None:
    resp = world.serve.request("POST", f"/pools/{pool}/breaker/reset")
    assert resp.status_code == 202, resp.text
    again = world.serve.request("POST", f"/pools/{pool}/breaker/reset")
    assert again.status_code in (202, 409)


@then(parsers.parse('the audit of "{pool}" shows a manual breaker reset followed by a new start'))
def manual_reset(world: World, pool: str) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        events = world.serve.events(pool)
        resets = [i for i, e in enumerate(events) if e["trigger"] == "reset_breaker"]
        if resets and any(e["kind"] == "preload_failed" for e in events[resets[0] :]):
            assert events[resets[0]]["reason"] == "breaker reset by operator"
            assert events[resets[0]]["correlation_id"]
            return
        time.sleep(0.05)
    raise AssertionError("no start after the manual reset")
