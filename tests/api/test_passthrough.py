"""`/pools/{id}/engine/{path}`: any method and path to the pool's engine, streamed both ways."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from ._plane import FakeEngine, Plane, open_board, simple_app, wait_until


@pytest.fixture
def plane(engine: FakeEngine, plane_factory: Callable[..., Plane]) -> Plane:
    return plane_factory(simple_app(), open_board(lambda _pool: str(engine.path), "a"))


@pytest.mark.e2e
def test_health_and_props_of_a_real_engine_pass_through(
    engine_socket: str, plane_factory: Callable[..., Plane]
) -> None:
    plane = plane_factory(simple_app(), open_board(lambda _pool: engine_socket, "tiny"))
    health = httpx.get(plane.url + "/pools/tiny/engine/health")
    props = httpx.get(plane.url + "/pools/tiny/engine/props")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert props.status_code == 200 and props.json()["build_info"].startswith("b11434")
    assert "keep-alive" not in health.headers  # llama-server sends one: hop-by-hop, not passed on
    wait_until(lambda: plane.traffic("tiny").stats.by_code == {200: 2}, what="both requests recorded")


def test_hop_by_hop_headers_are_dropped_both_ways_and_the_token_stays_with_poolmgr(plane: Plane) -> None:
    sent = {
        "Authorization": "Bearer poolmgr-token", "Connection": "keep-alive, X-Private", "X-Private": "1",
        "Keep-Alive": "timeout=5", "TE": "trailers", "Proxy-Authorization": "Basic eA==", "X-Kept": "yes",
    }  # fmt: skip
    response = httpx.get(plane.url + "/pools/a/engine/echo", headers=sent)
    got = dict(response.json()["headers"])
    assert got["x-kept"] == "yes" and got["connection"] == "close" and got["host"] == "localhost"
    for name in ("authorization", "x-private", "keep-alive", "te", "proxy-authorization"):
        assert name not in got, name
    # The engine's own hop-by-hop headers (keep-alive, proxy-authenticate, x-hop named by its Connection) stay too.
    assert response.headers["x-end-to-end"] == "kept"
    for name in ("keep-alive", "x-hop", "proxy-authenticate"):
        assert name not in response.headers, name


def test_method_path_query_and_body_reach_the_engine_as_sent(plane: Plane) -> None:
    response = httpx.request("PATCH", plane.url + "/pools/a/engine/echo/a%20b?x=1&y=%2F", content=b"z" * 10_000)
    doc = response.json()
    assert (doc["method"], doc["target"], doc["body_bytes"]) == ("PATCH", "/echo/a%20b?x=1&y=%2F", 10_000)
    assert dict(doc["headers"])["content-length"] == "10000"
    assert httpx.get(plane.url + "/pools/a/engine").json()["target"] == "/"


def test_a_request_body_of_unknown_length_streams_up_chunked(plane: Plane) -> None:
    def pieces() -> Iterator[bytes]:
        for _ in range(20):
            yield b"y" * 5000

    doc = httpx.post(plane.url + "/pools/a/engine/upload", content=pieces()).json()
    assert doc["body_bytes"] == 100_000
    assert dict(doc["headers"])["transfer-encoding"] == "chunked"


def test_server_sent_events_reach_the_client_as_the_engine_sends_them(plane: Plane) -> None:
    arrivals = []
    with httpx.stream("GET", plane.url + "/pools/a/engine/stream?n=5&gap_ms=150") as response:
        assert response.headers["content-type"] == "text/event-stream"
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic(), json.loads(line[6:])["t"]))
    assert len(arrivals) == 5
    # Each event arrives within a fraction of the gap after the engine wrote it: nothing waits for the next one.
    assert all(arrived - sent < 0.1 for arrived, sent in arrivals), arrivals
    wait_until(lambda: plane.traffic("a").stats.first_byte.count == 1, what="the request recorded")


def test_correlation_id_is_passed_on_and_echoed_or_made_up(plane: Plane) -> None:
    given = httpx.get(plane.url + "/pools/a/engine/echo", headers={"X-Correlation-Id": "req-42"})
    assert given.headers["x-correlation-id"] == "req-42"
    assert dict(given.json()["headers"])["x-correlation-id"] == "req-42"
    made = httpx.get(plane.url + "/pools/a/engine/echo")
    assert made.headers["x-correlation-id"] == dict(made.json()["headers"])["x-correlation-id"] != "req-42"
    bad = httpx.get(plane.url + "/pools/a/engine/echo", headers={"X-Correlation-Id": "a b"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "bad_request"


def test_an_unknown_pool_is_a_404_in_poolmgrs_shape(plane: Plane) -> None:
    response = httpx.get(plane.url + "/pools/nope/engine/health")
    assert response.status_code == 404
    assert response.json() == {"error": {"message": "pool 'nope' is not served by this node", "type": "not_found"}}


def test_an_engine_that_does_not_listen_is_a_502_that_says_so(
    sock_dir: Path, plane_factory: Callable[..., Plane]
) -> None:
    plane = plane_factory(simple_app(), open_board(lambda _pool: str(sock_dir / "gone.sock"), "gone"))
    response = httpx.get(plane.url + "/pools/gone/engine/health")
    assert response.status_code == 502
    assert "gone.sock does not answer" in response.json()["error"]["message"]
    wait_until(lambda: plane.traffic("gone").stats.by_code == {502: 1}, what="the 502 recorded")
    assert plane.traffic("gone").in_flight == 0


def test_other_routes_go_to_the_api_unchanged(plane: Plane) -> None:
    assert httpx.get(plane.url + "/health").json() == {"status": "ok"}
    assert httpx.get(plane.url + "/pools").json() == ["admin"]
    assert httpx.get(plane.url + "/pools/a/engineering").status_code == 404  # not the engine route
