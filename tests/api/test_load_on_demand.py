"""`load_on_demand` as clients see it: a request to a stopped pool that has it starts the pool (once, however many
requests arrive together), waits like any request to a starting pool and is answered; one without it, or whose
start is refused, is a 503 with the reason. And which pools the gate lets a request start (from their rows)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import httpx
import pytest

from poolmgr.errors import ConflictError
from poolmgr.inflight import IDLE_UNLOAD, Drain
from poolmgr.lifecycle.traffic import Mode, TrafficBoard, gate_for, startable_on_demand
from poolmgr.poolsfile import PoolSpec
from poolmgr.states import DesiredState, PoolState
from poolmgr.store import PoolView, Registry

from ._plane import FakeEngine, Plane, simple_app

START_S = 0.3  # how long the stand-in for the worker takes to bring the pool up


class Starts:
    """The daemon's starter, as the data plane sees it: records each start, then the pool queues and, START_S
    later, opens (what the preload and the worker do)."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.fail = fail
        self.board: TrafficBoard | None = None

    async def __call__(self, pool_id: str, correlation_id: str | None) -> None:
        self.calls.append((pool_id, correlation_id))
        await asyncio.sleep(0.05)  # the preload's database write, off the loop
        if self.fail is not None:
            raise self.fail
        assert self.board is not None
        traffic = self.board.get(pool_id)
        traffic.startable = False
        traffic.set(Mode.QUEUE, "starting")
        asyncio.get_running_loop().call_later(START_S, traffic.set, Mode.OPEN, "ready")


def _stopped_plane(
    engine: FakeEngine, plane_factory: Callable[..., Plane], starts: Starts, *, on_demand: bool
) -> Plane:
    board = TrafficBoard(queue_timeout_s=5.0, socket_for=lambda _pool: str(engine.path))
    board.starter = starts
    starts.board = board
    traffic = board.get("a")
    traffic.set(Mode.REFUSE, "stopped")
    traffic.startable = on_demand
    return plane_factory(simple_app(), board)


def _chat(model: str = "a") -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


def test_requests_arriving_together_at_a_stopped_pool_start_it_once_and_are_all_answered(
    engine: FakeEngine, plane_factory: Callable[..., Plane]
) -> None:
    starts = Starts()
    plane = _stopped_plane(engine, plane_factory, starts, on_demand=True)
    listed = httpx.get(plane.url + "/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["a"]  # a stopped pool that a request starts is offered
    answers: list[httpx.Response] = []

    def send(i: int) -> None:
        if i % 2:
            answers.append(httpx.post(plane.url + "/v1/chat/completions", json=_chat(), timeout=10))
        else:
            answers.append(httpx.get(plane.url + "/pools/a/engine/props", timeout=10))

    clients = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for c in clients:
        c.start()
    for c in clients:
        c.join(15)
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
    assert {r.json()["engine"] for r in answers} == {"a"} and engine.requests == 8
    assert len(starts.calls) == 1 and starts.calls[0][0] == "a"
    assert starts.calls[0][1] is not None  # the preload carries the first request's correlation id
    # the server counts a request out after its last byte went out: a client can read it a moment before that
    deadline = time.monotonic() + 5
    while plane.traffic("a").in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert plane.traffic("a").queued == 0 and plane.traffic("a").in_flight == 0


def test_a_stopped_pool_without_load_on_demand_refuses_at_once_and_is_not_started(
    engine: FakeEngine, plane_factory: Callable[..., Plane]
) -> None:
    starts = Starts()
    plane = _stopped_plane(engine, plane_factory, starts, on_demand=False)
    response = httpx.post(plane.url + "/v1/chat/completions", json=_chat())
    assert response.status_code == 503 and response.json()["error"]["message"] == "pool 'a' is stopped"
    assert starts.calls == [] and engine.requests == 0
    assert httpx.get(plane.url + "/v1/models").json()["data"] == []


def test_a_start_that_is_refused_answers_503_saying_why(
    engine: FakeEngine, plane_factory: Callable[..., Plane]
) -> None:
    starts = Starts(fail=ConflictError("pool 'a': its circuit breaker is open"))
    plane = _stopped_plane(engine, plane_factory, starts, on_demand=True)
    response = httpx.get(plane.url + "/pools/a/engine/props")
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    message = response.json()["error"]["message"]
    assert message == "pool 'a' is stopped and could not be started: pool 'a': its circuit breaker is open"
    assert len(starts.calls) == 1 and engine.requests == 0


# -- which rows a request may start -----------------------------------------------------------------------------
@pytest.fixture
def stopped(sqlite_url: str) -> PoolView:
    registry = Registry(sqlite_url, node_id="n")
    try:
        view = registry.register(PoolSpec(id="a", model="/m.gguf", load_on_demand=True, idle_unload_s=60))
    finally:
        registry.close()
    return replace(view, state=PoolState.STOPPED, desired_state=DesiredState.STOPPED)


def test_a_stopped_or_stopping_pool_with_load_on_demand_may_be_started_by_a_request(stopped: PoolView) -> None:
    assert gate_for(stopped)[:2] == (Mode.REFUSE, "stopped") and startable_on_demand(stopped)
    stopping = replace(stopped, state=PoolState.PRELOADING)  # desired stopped while it was still starting
    assert startable_on_demand(stopping)
    assert not startable_on_demand(replace(stopped, spec=replace(stopped.spec, load_on_demand=False)))


def test_a_breaker_open_or_draining_pool_is_never_started_by_a_request(stopped: PoolView) -> None:
    breaker = replace(stopped, state=PoolState.BREAKER_OPEN, last_error="exit 1")
    assert gate_for(breaker)[0] is Mode.REFUSE and not startable_on_demand(breaker)
    op = Drain(datetime(2026, 1, 1, tzinfo=UTC), 30_000)
    draining = replace(stopped, state=PoolState.DRAINING, pending_op=op)
    assert gate_for(draining)[:2] == (Mode.REFUSE, "draining") and not startable_on_demand(draining)


def test_an_idle_unload_of_a_load_on_demand_pool_queues_requests_instead_of_refusing(stopped: PoolView) -> None:
    op = Drain(datetime(2026, 1, 1, tzinfo=UTC), 30_000, None, IDLE_UNLOAD)
    unloading = replace(stopped, state=PoolState.DRAINING, pending_op=op)
    assert gate_for(unloading)[0] is Mode.QUEUE  # they wait, then start it again once it has stopped
    plain = replace(unloading, spec=replace(stopped.spec, load_on_demand=False))
    assert gate_for(plain)[:2] == (Mode.REFUSE, "draining")
    starting = replace(stopped, desired_state=DesiredState.RUNNING)  # preload asked, worker not yet at it
    assert gate_for(starting)[:2] == (Mode.QUEUE, "starting")
