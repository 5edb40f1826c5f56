"""The API's answers when something unexpected breaks inside a route: still JSON, no internals, and the
request's X-Correlation-Id (README: returned on every request) so the log line can be found."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from poolmgr.api.app import create_app
from poolmgr.store import Registry


def test_an_unexpected_error_is_a_json_500_that_carries_the_correlation_id(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry(sqlite_url, node_id="node-a")

    def broken_devices() -> list[dict[str, object]]:
        raise RuntimeError("NVML blew up at /usr/lib/secret.so")

    app = create_app(registry, devices=broken_devices)

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://poolmgr") as client:
            return await client.get("/devices", headers={"X-Correlation-Id": "req-500"})

    try:
        with caplog.at_level(logging.ERROR, logger="poolmgr.api"):
            resp = asyncio.run(call())
    finally:
        registry.close()
    assert resp.status_code == 500
    assert resp.json() == {"error": {"message": "internal error (see poolmgr's log)", "type": "internal"}}
    assert "secret.so" not in resp.text
    assert resp.headers.get("x-correlation-id") == "req-500"
    assert any("RuntimeError" in r.getMessage() for r in caplog.records)
