"""Issue 16's end-to-end test: three nodes, each in its own network namespace (its own host) with its own state
dir and a real llama-server, on one PostgreSQL; a client in a fourth namespace reaches every pool through its
node's `endpoint_url` with a token. Then: kill -9 of node-b makes its pool not routable within the grace and
changes nothing else; restarting node-b re-adopts the same engine; a pool added through node-a's API runs there
and shows in the fleet view; the same id asked of node-c is refused naming node-a.

The tests share one fleet (module scope) and run in the order written."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from tests.e2e.conftest import engine_pids
from tests.fleet.conftest import GRACE_S, HEARTBEAT_S
from tests.fleet.netns import API_PORT, Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.slow]

# What nobody may change while node-b is dead (registry_version: no row is written for anyone).
STABLE = ("node_id", "state", "pid", "endpoint_url", "restart_count", "model", "registry_version")


@pytest.fixture(scope="module")
def memo() -> dict[str, Any]:
    """What an earlier test of the module saw (the tests run in order on one fleet)."""
    return {}


def _stable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in STABLE}


def _endpoints(fleet: Fleet) -> dict[str, str]:
    rows = fleet.view()
    return {n.node_id: str(rows[n.pool_id]["endpoint_url"]) for n in fleet.nodes.values()}


def test_a_the_client_reaches_every_pool_through_its_node_with_a_token(fleet: Fleet) -> None:
    rows = fleet.view()
    for node in fleet.nodes.values():
        row = rows[node.pool_id]
        assert (row["node_id"], row["state"]) == (node.node_id, "ready"), row
        assert row["endpoint_url"] == f"http://{node.ip}:{API_PORT}/pools/{node.pool_id}/engine", row
    urls = list(_endpoints(fleet).values())
    token = fleet.cfg.inference_token
    answers = fleet.client([fleet.completion(url, token) for url in urls] + [fleet.completion(u, None) for u in urls])
    with_token, without = answers[: len(urls)], answers[len(urls) :]
    for url, answer in zip(urls, with_token, strict=True):
        assert answer.get("status") == 200, (url, answer)
        assert answer["body"]["tokens_predicted"] == 2, (url, answer)
    assert [a.get("status") for a in without] == [401] * len(urls), without


def test_a_each_node_is_its_own_host(fleet: Fleet) -> None:
    """A node's port answers on its own address, not on the loopback of another namespace."""
    health = [{"url": f"http://127.0.0.1:{API_PORT}/health"}]
    for role in ("client", "node-b"):
        answer = fleet.client(health, role=role)[0]
        assert "error" in answer and "ConnectError" in answer["error"], (role, answer)
    remote = fleet.client([{"url": f"{fleet.nodes['node-a'].base}/health"}], role="node-b")[0]
    assert remote.get("status") == 200, remote


def test_b_kill_9_of_a_node_makes_its_pool_not_routable_within_the_grace(fleet: Fleet, memo: dict[str, Any]) -> None:
    pools = {n.node_id: n.pool_id for n in fleet.nodes.values()}
    before = fleet.wait_view(lambda r: all(r[p]["routable"] for p in pools.values()), 10, "every pool routable")
    assert all(before[p]["node_alive"] for p in pools.values()), before
    memo["before"] = before
    fleet.kill9("node-b")
    killed = time.monotonic()
    rows = fleet.wait_view(lambda r: not r[pools["node-b"]]["routable"], GRACE_S + 3, "node-b's pool not routable")
    elapsed = time.monotonic() - killed
    # not before the grace (less one beat), and within it (plus this poll's own latency on a loaded machine)
    assert GRACE_S - HEARTBEAT_S - 0.3 <= elapsed <= GRACE_S + 1.0, f"not routable after {elapsed:.2f} s"
    dead = rows[pools["node-b"]]
    assert (dead["node_alive"], dead["routable"]) == (False, False), dead
    assert _stable(dead) == _stable(before[pools["node-b"]]), "nobody writes for a dead node's pool"
    os.kill(dead["pid"], 0)  # its engine still runs (its own session), unsupervised meanwhile
    time.sleep(HEARTBEAT_S * 2)
    rows = fleet.view()
    assert rows[pools["node-b"]]["node_heartbeat_at"] == dead["node_heartbeat_at"], "a dead node does not beat"
    for node_id in ("node-a", "node-c"):
        row = rows[pools[node_id]]
        assert _stable(row) == _stable(before[pools[node_id]]), (node_id, row)
        assert (row["node_alive"], row["routable"]) == (True, True), (node_id, row)
        assert row["node_heartbeat_at"] > before[pools[node_id]]["node_heartbeat_at"], (node_id, row)
    urls = _endpoints(fleet)
    answers = fleet.client([fleet.completion(urls[n], fleet.cfg.inference_token) for n in ("node-a", "node-c")])
    assert [a.get("status") for a in answers] == [200, 200], answers


def test_c_restarting_the_node_re_adopts_the_same_engine(fleet: Fleet, memo: dict[str, Any]) -> None:
    assert "before" in memo, "test_b did not get as far as the kill (this test restarts what it killed)"
    node = fleet.nodes["node-b"]
    before = memo["before"][node.pool_id]
    fleet.start("node-b")
    rows = fleet.wait_view(lambda r: r[node.pool_id]["routable"], 30, "node-b's pool routable again")
    row = rows[node.pool_id]
    assert (row["node_alive"], row["state"], row["pid"]) == (True, "ready", before["pid"]), row
    assert row["endpoint_url"] == before["endpoint_url"], row
    assert engine_pids(node.pool_id) == [before["pid"]], "no second engine was started"
    answer = fleet.client([fleet.completion(str(row["endpoint_url"]), fleet.cfg.inference_token)])[0]
    assert answer.get("status") == 200, answer
    for other in ("node-a", "node-c"):
        pool_id = fleet.nodes[other].pool_id
        assert rows[pool_id]["pid"] == memo["before"][pool_id]["pid"], (other, rows[pool_id])


def test_d_a_pool_added_through_the_api_runs_on_its_node_and_its_id_is_taken(fleet: Fleet) -> None:
    pool_id = f"added-{fleet.net.tag}"
    spec = {"model": str(fleet.cfg.model), "slots": 1, "ctx_size": 512, **fleet.pool_extras()}
    resp = fleet.api("node-a", "PUT", f"/pools/{pool_id}", json=spec)
    assert resp.is_success, (resp.status_code, resp.text)
    rows = fleet.wait_view(lambda r: pool_id in r and r[pool_id]["routable"], 30, f"{pool_id} routable")
    row = rows[pool_id]
    assert (row["node_id"], row["state"], row["node_alive"]) == ("node-a", "ready", True), row
    assert row["endpoint_url"] == f"{fleet.nodes['node-a'].base}/pools/{pool_id}/engine", row
    assert set(rows) == {pool_id, *(n.pool_id for n in fleet.nodes.values())}, "the fleet view shows all four"
    assert row["pid"] in fleet.net.pids("node-a"), "its engine runs on node-a (in node-a's namespace)"
    answer = fleet.client([fleet.completion(str(row["endpoint_url"]), fleet.cfg.inference_token)])[0]
    assert answer.get("status") == 200, answer

    clash = fleet.api("node-c", "PUT", f"/pools/{pool_id}", json=spec)
    assert clash.status_code == 409, (clash.status_code, clash.text)
    assert "node-a" in clash.json()["error"]["message"], clash.text
    after = fleet.view()
    assert _stable(after[pool_id]) == _stable(row), "the refused PUT changed nothing"
    assert engine_pids(pool_id) == [row["pid"]], "node-c started no engine for it"
