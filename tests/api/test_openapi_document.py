"""The OpenAPI document tells the truth (issue 18): every route declares its error answers with the error schema,
/metrics is Prometheus text, request bodies refuse unknown fields and wrong types (422), a 405 names the allowed
methods. The real app on a real database, called over ASGI; scripts/check-openapi runs schemathesis against a
live serve."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from poolmgr.api.app import create_app
from poolmgr.store import Registry

ERROR_REF = "#/components/schemas/ErrorBody"


def _app(db_url: str) -> tuple[Registry, Any]:
    registry = Registry(db_url, node_id="node-a")
    return registry, create_app(registry, api_token="t0ken", metrics=lambda: (b"# HELP x\n", "text/plain"))


def _calls(db_url: str, calls: list[tuple[str, str, Any]]) -> tuple[dict[str, Any], list[httpx.Response]]:
    registry, app = _app(db_url)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": "Bearer t0ken"}
        async with httpx.AsyncClient(transport=transport, base_url="http://poolmgr", headers=headers) as client:
            return [await client.request(m, p, json=b) for m, p, b in calls]

    try:
        return app.openapi(), asyncio.run(run())
    finally:
        registry.close()


def test_every_route_declares_its_errors_with_the_error_schema(db_url: str) -> None:
    doc, _ = _calls(db_url, [])
    error = doc["components"]["schemas"]["ErrorBody"]
    assert error["required"] == ["error"]
    assert set(doc["components"]["schemas"]["ErrorDetail"]["properties"]) == {"message", "type"}
    assert "HTTPValidationError" not in doc["components"]["schemas"]  # FastAPI's 422 shape is not what we send
    for path, ops in doc["paths"].items():
        assert not path.startswith("/v1") and "/engine" not in path  # the data plane's routes are not FastAPI's
        for method, op in ops.items():
            codes = set(op["responses"])
            assert "400" in codes, (method, path)  # a bad X-Correlation-Id, on every route
            if path not in ("/health", "/metrics"):
                assert {"401", "403"} <= codes, (method, path)
            if "{pool_id}" in path:
                assert {"404", "422", "503"} <= codes, (method, path)
            if method in ("post", "put", "delete"):
                assert "409" in codes, (method, path)
            for code in codes - {"200", "201", "202"}:
                content = op["responses"][code]["content"]["application/json"]["schema"]
                assert content == {"$ref": ERROR_REF}, (method, path, code)


def test_metrics_is_prometheus_text_and_bodies_refuse_unknown_fields(db_url: str) -> None:
    doc, (metrics, extra, wrong_type, lease_extra, put_extra, trace, options) = _calls(db_url, [
        ("GET", "/metrics", None),
        ("POST", "/pools/web/drain", {"deadline_ms": 10, "surprise": 1}),
        ("POST", "/pools/web/reload", {"model": "/m.gguf", "drain_deadline_ms": False}),
        ("POST", "/pools/web/leases", {"ttl_s": 5, "extra": True}),
        ("PUT", "/pools/web", {"model": "/m.gguf", "surprise": 1}),
        ("TRACE", "/health", None),
        ("OPTIONS", "/pools/web", None),
    ])  # fmt: skip
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in ("DrainBody", "ReloadBody", "LeaseBody"):
        assert doc["components"]["schemas"][name]["additionalProperties"] is False
    put_schema = doc["paths"]["/pools/{pool_id}"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert put_schema["additionalProperties"] is False and put_schema["required"] == ["model"]
    for response in (extra, wrong_type, lease_extra):
        assert response.status_code == 422, response.text
        assert response.json()["error"]["type"] == "invalid_request"
    assert put_extra.status_code == 400 and "surprise" in put_extra.json()["error"]["message"]
    assert trace.status_code == 405 and trace.headers["allow"] == "GET"
    assert trace.json() == {"error": {"message": "Method Not Allowed", "type": "http_error"}}
    assert options.status_code == 405 and options.headers["allow"] == "DELETE, PUT"
