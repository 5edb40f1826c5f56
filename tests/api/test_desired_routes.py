"""PUT /pools/{id} and DELETE /pools/{id} (desired state through the API), and ownership on every route that
changes a pool: another node's pool is a 409 naming its owner. The real app on a real database (SQLite and
PostgreSQL), called over ASGI."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from poolmgr.api.app import create_app
from poolmgr.devices import FakeNvmlBackend, discover
from poolmgr.poolsfile import PoolSpec
from poolmgr.store import Registry
from poolmgr.validation import validate_pools
from tests.observability._stack import H100_SNAPSHOT


def _calls(db_url: str, node_id: str, calls: list[tuple[str, str, Any]], **app_kw: Any) -> list[httpx.Response]:
    registry = Registry(db_url, node_id=node_id)
    kicked: list[str] = []
    app = create_app(registry, kick=kicked.append, **app_kw)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://poolmgr") as client:
            return [await client.request(m, p, json=b) for m, p, b in calls]

    try:
        return asyncio.run(run())
    finally:
        registry.close()


def test_put_creates_changes_and_delete_removes_a_pool(db_url: str) -> None:
    created, same, changed, bad, mismatch, gone = _calls(db_url, "node-a", [
        ("PUT", "/pools/web", {"model": "/m/one.gguf", "slots": 2}),
        ("PUT", "/pools/web", {"model": "/m/one.gguf", "slots": 2}),
        ("PUT", "/pools/web", {"model": "/m/two.gguf", "slots": 2}),
        ("PUT", "/pools/web", {"model": "/m/two.gguf", "slots": 0}),
        ("PUT", "/pools/web", {"id": "other", "model": "/m/two.gguf"}),
        ("DELETE", "/pools/web", None),
    ])  # fmt: skip
    assert created.status_code == 201 and created.json()["created"] is True
    status = created.json()["status"]
    assert (status["pool_id"], status["node_id"], status["source"], status["slots_total"]) == (
        "web",
        "node-a",
        "api",
        2,
    )
    assert same.status_code == 200 and same.json()["status"]["generation"] == 1  # nothing changed
    assert changed.status_code == 200 and changed.json()["status"]["model"] == "/m/two.gguf"
    assert changed.json()["status"]["generation"] == 2
    assert bad.status_code == 400 and "slots" in bad.json()["error"]["message"]  # the pools file's validation
    assert mismatch.status_code == 400 and "'other'" in mismatch.json()["error"]["message"]
    assert gone.status_code == 202 and gone.json()["status"]["removing"] is True


def test_another_nodes_pool_is_refused_with_409_naming_its_owner(db_url: str) -> None:
    owner = Registry(db_url, node_id="node-a")
    try:
        owner.register(PoolSpec(id="theirs", model="/m.gguf"))
    finally:
        owner.close()
    answers = _calls(db_url, "node-b", [
        ("PUT", "/pools/theirs", {"model": "/x.gguf"}),
        ("DELETE", "/pools/theirs", None),
        ("POST", "/pools/theirs/drain", {"deadline_ms": 10}),
        ("POST", "/pools/theirs/preload", None),
        ("POST", "/pools/theirs/leases", {"ttl_s": 10}),
        ("GET", "/pools/theirs/status", None),
    ])  # fmt: skip
    for resp in answers[:-1]:
        assert resp.status_code == 409, resp.text
        assert "belongs to node 'node-a'" in resp.json()["error"]["message"]
    assert answers[-1].status_code == 200 and answers[-1].json()["node_id"] == "node-a"  # reading is fine


def test_a_put_pool_is_checked_against_this_host_like_a_pools_file(sqlite_url: str) -> None:
    """The daemon passes `validate_pools` with its inventory (here: a recorded H100 node): a device mask naming a
    GPU the node does not have is a 400 naming it, and nothing is written."""
    inventory = discover(FakeNvmlBackend(H100_SNAPSHOT), warn=False)

    def check(spec: PoolSpec) -> None:
        validate_pools([spec], inventory, source=f"PUT /pools/{spec.id}")

    bad, good = _calls(sqlite_url, "node-a", [
        ("PUT", "/pools/gpu", {"model": "/m.gguf", "device_mask": "7"}),
        ("PUT", "/pools/gpu", {"model": "/m.gguf", "device_mask": "0"}),
    ], check_spec=check)  # fmt: skip
    assert bad.status_code == 400 and "PUT /pools/gpu" in bad.json()["error"]["message"], bad.text
    assert good.status_code == 201, good.text
