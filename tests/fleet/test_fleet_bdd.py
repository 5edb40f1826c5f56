"""Steps for features/fleet/fleet.feature: the real path of tests/fleet/test_fleet_e2e.py (three nodes in their
own network namespaces on one PostgreSQL, a client in a fourth), told as the reachability and kill -9 story."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from tests.fleet.conftest import GRACE_S, all_routable_rows, running_fleet
from tests.fleet.netns import API_PORT, Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.slow]

scenarios("fleet/fleet.feature")

UNCHANGED = ("node_id", "state", "pid", "endpoint_url", "restart_count", "registry_version")


@pytest.fixture
def world() -> dict[str, Any]:
    return {}


@pytest.fixture
def fleet(fleet_engine: tuple[Path, Path]) -> Iterator[Fleet]:
    """A fleet of its own for the scenario (the e2e module's fleet is shared by its tests)."""
    with running_fleet(fleet_engine) as started:
        yield started


def _urls(fleet: Fleet, *node_ids: str) -> list[str]:
    rows = fleet.view()
    return [str(rows[fleet.nodes[n].pool_id]["endpoint_url"]) for n in node_ids or fleet.nodes]


@given("three nodes on their own hosts, each serving one ready tiny pool")
def three_nodes(fleet: Fleet) -> None:
    fleet.wait_view(lambda rows: all_routable_rows(fleet, rows), 60, "every node's pool ready")


@then("the client reaches every pool through its endpoint_url with an inference token")
def reaches_all(fleet: Fleet) -> None:
    answers = fleet.client([fleet.completion(url, fleet.cfg.inference_token) for url in _urls(fleet)])
    assert [a.get("status") for a in answers] == [200] * len(fleet.nodes), answers


@then("the client is refused with 401 without a token")
def refused_without_token(fleet: Fleet) -> None:
    answers = fleet.client([fleet.completion(url, None) for url in _urls(fleet)])
    assert [a.get("status") for a in answers] == [401] * len(fleet.nodes), answers


@then("no node's port answers on the loopback of another host")
def not_on_loopback(fleet: Fleet) -> None:
    for role in ("client", "node-b"):
        answer = fleet.client([{"url": f"http://127.0.0.1:{API_PORT}/health"}], role=role)[0]
        assert "ConnectError" in answer.get("error", ""), (role, answer)


@when(parsers.parse("the poolmgr of {node_id} is killed with signal 9"))
def kill_9(fleet: Fleet, world: dict[str, Any], node_id: str) -> None:
    world["before"] = fleet.wait_view(
        lambda rows: all(rows[n.pool_id]["routable"] for n in fleet.nodes.values()), 10, "every pool routable"
    )
    fleet.kill9(node_id)
    world["killed_at"] = time.monotonic()


@then(parsers.parse("the pool of {node_id} is not routable within the grace, and its engine still runs"))
def not_routable(fleet: Fleet, world: dict[str, Any], node_id: str) -> None:
    pool_id = fleet.nodes[node_id].pool_id
    rows = fleet.wait_view(lambda r: not r[pool_id]["routable"], GRACE_S + 3, f"{pool_id} not routable")
    elapsed = time.monotonic() - world["killed_at"]
    # within the grace, plus this poll's own latency on a loaded machine (as tests/fleet/test_fleet_e2e.py)
    assert elapsed <= GRACE_S + 1.0, f"{pool_id} was still routable {elapsed:.2f} s after the kill"
    assert rows[pool_id]["node_alive"] is False, rows[pool_id]
    os.kill(rows[pool_id]["pid"], 0)


@then(parsers.parse("the pools of {first} and {second} are routable, unchanged, with the same engines"))
def others_unchanged(fleet: Fleet, world: dict[str, Any], first: str, second: str) -> None:
    rows = fleet.view()
    for node_id in (first, second):
        pool_id = fleet.nodes[node_id].pool_id
        assert [rows[pool_id][k] for k in UNCHANGED] == [world["before"][pool_id][k] for k in UNCHANGED]
        assert (rows[pool_id]["node_alive"], rows[pool_id]["routable"]) == (True, True), rows[pool_id]


@then(parsers.parse("the client still reaches the pools of {first} and {second}"))
def still_reaches(fleet: Fleet, first: str, second: str) -> None:
    answers = fleet.client([fleet.completion(url, fleet.cfg.inference_token) for url in _urls(fleet, first, second)])
    assert [a.get("status") for a in answers] == [200, 200], answers
