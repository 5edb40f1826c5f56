"""The pool's traffic gate as clients see it: queued until open, refused, cut by a drain, abandoned by the client."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import httpx
import pytest

from poolmgr.lifecycle.traffic import Mode

from ._plane import FakeEngine, Plane, open_board, simple_app, wait_until
from .conftest import engine_get


@pytest.fixture
def plane(engine: FakeEngine, plane_factory: Callable[..., Plane]) -> Plane:
    return plane_factory(simple_app(), open_board(lambda _pool: str(engine.path), "a", queue_timeout_s=0.5))


def later(seconds: float, fn: Callable[[], None]) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        fn()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_queued_request_goes_to_the_engine_once_the_pool_opens(plane: Plane) -> None:
    plane.set("a", Mode.QUEUE, "reloading to b.gguf")
    opener = later(0.2, lambda: plane.set("a", Mode.OPEN, "ready"))
    started = time.monotonic()
    response = httpx.post(plane.url + "/v1/completions", json={"model": "a", "prompt": "hi"})
    opener.join()
    assert response.status_code == 200 and response.json()["engine"] == "a"
    assert time.monotonic() - started >= 0.2
    assert plane.traffic("a").queued == 0


def test_a_request_queued_past_the_queue_timeout_is_a_503(plane: Plane, engine: FakeEngine) -> None:
    plane.set("a", Mode.QUEUE, "preloading")
    response = httpx.get(plane.url + "/pools/a/engine/health")
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "pool 'a' was not ready within 0.5 s (preloading)"
    assert response.headers["retry-after"] == "1"
    assert engine.requests == 0


def test_a_refusing_pool_answers_503_at_once_with_retry_after(plane: Plane, engine: FakeEngine) -> None:
    plane.set("a", Mode.REFUSE, "draining", 5)
    started = time.monotonic()
    response = httpx.post(plane.url + "/v1/chat/completions", json={"model": "a"})
    assert time.monotonic() - started < 0.4
    assert response.status_code == 503 and response.headers["retry-after"] == "5"
    assert response.json()["error"]["message"] == "pool 'a' is draining"
    assert response.json()["error"]["code"] == "pool_unavailable"
    assert engine.requests == 0
    wait_until(lambda: plane.traffic("a").stats.by_code == {503: 1}, what="the refusal recorded")


def test_a_cut_ends_a_streaming_answer_where_it_is_and_is_recorded_as_cut(
    plane: Plane, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="poolmgr.proxy")
    events = []
    with httpx.stream("GET", plane.url + "/pools/a/engine/stream?n=100&gap_ms=20") as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:])["i"])
                if len(events) == 3:
                    assert plane.call(plane.traffic("a").cut) == 1
    assert response.status_code == 200 and 3 <= len(events) < 100  # the body ended, short of its end
    wait_until(lambda: plane.traffic("a").stats.by_code == {503: 1}, what="the cut recorded")
    # the log line follows the record, on the server's thread
    wait_until(lambda: any(r.name == "poolmgr.proxy" for r in caplog.records), what="the cut logged")
    (record,) = [r for r in caplog.records if r.name == "poolmgr.proxy"]
    assert (record.outcome, record.status) == ("cut", 503)  # type: ignore[attr-defined]
    assert plane.traffic("a").in_flight == 0


def test_a_cut_before_the_answer_started_is_a_503(plane: Plane) -> None:
    later(0.3, lambda: plane.call(plane.traffic("a").cut))
    response = httpx.get(plane.url + "/pools/a/engine/slow?ms=5000")
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "cut: pool 'a' drained past its deadline"


def test_a_client_that_leaves_while_queued_is_recorded_as_499(plane: Plane) -> None:
    plane.call(lambda: setattr(plane.traffic("a"), "queue_timeout_s", 30.0))
    plane.set("a", Mode.QUEUE, "preloading")
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(plane.url + "/pools/a/engine/health", timeout=0.3)
    wait_until(lambda: plane.traffic("a").stats.by_code == {499: 1}, what="the abandoned request recorded")
    assert (plane.traffic("a").queued, plane.traffic("a").in_flight) == (0, 0)


@pytest.mark.e2e
def test_a_client_leaving_mid_stream_frees_the_engines_slot(
    engine_socket: str, plane_factory: Callable[..., Plane]
) -> None:
    plane = plane_factory(simple_app(), open_board(lambda _pool: engine_socket, "tiny"))
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 100_000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", plane.url + "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert all(next(lines) is not None for _ in range(6))
        assert plane.traffic("tiny").in_flight == 1
        assert any(slot["is_processing"] for slot in engine_get(engine_socket, "/slots"))
    wait_until(lambda: plane.traffic("tiny").stats.by_code == {499: 1}, what="the abandoned request recorded")
    assert plane.traffic("tiny").in_flight == 0
    wait_until(
        lambda: not any(slot["is_processing"] for slot in engine_get(engine_socket, "/slots")),
        timeout=5, what="the engine's slot free again",
    )  # fmt: skip


def test_a_request_to_an_engine_that_just_died_waits_for_the_next_engine(plane: Plane, engine: FakeEngine) -> None:
    traffic = plane.traffic("a")
    traffic.socket_path = str(engine.path) + ".gone"  # the engine died; its worker has not seen the exit yet

    def restarted() -> None:
        traffic.socket_path = str(engine.path)
        plane.set("a", Mode.OPEN, "ready")

    closer = later(0.1, lambda: plane.set("a", Mode.QUEUE, "restarting after a crash"))
    opener = later(0.3, restarted)
    response = httpx.post(plane.url + "/v1/completions", json={"model": "a", "prompt": "hi"})
    closer.join()
    opener.join()
    assert response.status_code == 200 and response.json()["engine"] == "a"


def test_an_open_pool_whose_engine_stays_unreachable_is_a_502(plane: Plane, engine: FakeEngine) -> None:
    plane.traffic("a").socket_path = str(engine.path) + ".gone"
    response = httpx.post(plane.url + "/v1/completions", json={"model": "a", "prompt": "hi"})
    assert response.status_code == 502 and "does not answer" in response.json()["error"]["message"]
