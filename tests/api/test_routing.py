"""Which pool an OpenAI request's `model` reaches (fake engines that say who answered)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from poolmgr.lifecycle.traffic import Mode

from ._plane import FakeEngine, Plane, fake_engines, open_board, simple_app


@pytest.fixture
def engines(sock_dir: Path) -> Iterator[dict[str, FakeEngine]]:
    with fake_engines(sock_dir, "a", "b", "c") as found:
        yield found


@pytest.fixture
def plane(engines: dict[str, FakeEngine], plane_factory: Callable[..., Plane]) -> Plane:
    board = open_board(lambda pool: str(engines[pool].path), "a", "b")
    board.get("c").set(Mode.QUEUE, "preloading")
    for pool in ("a", "b", "c"):
        board.get(pool).names = frozenset({pool, "shared"})
    return plane_factory(simple_app(), board)


def ask(plane: Plane, model: str, route: str = "/v1/chat/completions") -> str:
    response = httpx.post(plane.url + route, json={"model": model, "messages": []})
    assert response.status_code == 200, response.text
    doc = response.json()
    assert (doc["method"], doc["target"]) == ("POST", route)
    return str(doc["engine"])


def test_of_the_open_pools_serving_a_name_the_one_with_fewest_in_flight_gets_the_request(plane: Plane) -> None:
    plane.call(lambda: setattr(plane.traffic("a"), "in_flight", 3))
    first = ask(plane, "shared")
    plane.call(lambda: (setattr(plane.traffic("a"), "in_flight", 0), setattr(plane.traffic("b"), "in_flight", 2)))
    second = ask(plane, "shared")
    plane.call(lambda: setattr(plane.traffic("b"), "in_flight", 0))
    assert (first, second) == ("b", "a")  # c queues: never chosen while an open pool serves the name


def test_with_none_open_the_least_busy_queued_pool_waits_for_the_request(plane: Plane) -> None:
    plane.set("a", Mode.REFUSE, "draining", 5)
    plane.set("b", Mode.REFUSE, "stopped")
    plane.call(lambda: setattr(plane.traffic("c"), "queue_timeout_s", 0.2))
    response = httpx.post(plane.url + "/v1/completions", json={"model": "shared"})
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "pool 'c' was not ready within 0.2 s (preloading)"


def test_a_pool_id_names_its_pool_on_every_openai_route(plane: Plane) -> None:
    assert ask(plane, "b", "/v1/completions") == "b"
    assert ask(plane, "a", "/v1/embeddings") == "a"
    assert ask(plane, "a", "/v1/chat/completions") == "a"
