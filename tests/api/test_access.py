"""Who may call what: the API token opens everything, an inference token the inference routes only."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from poolmgr.api.app import create_app
from poolmgr.store import Registry

from ._plane import FakeEngine, Plane, open_board, simple_app

API, INFERENCE, OTHER = "api-token-x", "inference-token-y", "inference-token-z"
ROUTES = {"models": "/v1/models", "engine": "/pools/a/engine/echo", "admin": "/pools", "health": "/health"}


def statuses(plane: Plane, token: str | None) -> dict[str, int]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return {name: httpx.get(plane.url + path, headers=headers).status_code for name, path in ROUTES.items()}


def test_with_both_kinds_of_token_an_inference_token_opens_the_inference_routes_only(
    engine: FakeEngine, plane_factory: Callable[..., Plane]
) -> None:
    board = open_board(lambda _pool: str(engine.path), "a")
    plane = plane_factory(simple_app(), board, api_token=API, inference_tokens=[INFERENCE, OTHER])
    assert statuses(plane, INFERENCE) == {"models": 200, "engine": 200, "admin": 403, "health": 200}
    assert statuses(plane, OTHER) == {"models": 200, "engine": 200, "admin": 403, "health": 200}
    assert statuses(plane, None) == {"models": 401, "engine": 401, "admin": 200, "health": 200}  # simple_app: no guard
    assert statuses(plane, "wrong")["models"] == 401
    forbidden = httpx.get(plane.url + "/pools", headers={"Authorization": f"Bearer {INFERENCE}"})
    assert forbidden.json()["error"]["type"] == "forbidden"
    missing = httpx.get(plane.url + "/pools/a/engine/echo")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"] == {"message": "missing or invalid bearer token", "type": "unauthorized"}


def test_the_api_token_opens_every_route_of_the_real_api(
    engine: FakeEngine, plane_factory: Callable[..., Plane], sqlite_url: str
) -> None:
    registry = Registry(sqlite_url, node_id="node-a")
    try:
        app = create_app(registry, api_token=API)
        plane = plane_factory(app, open_board(lambda _pool: str(engine.path), "a"), api_token=API,
                              inference_tokens=[INFERENCE])  # fmt: skip
        assert statuses(plane, API) == {"models": 200, "engine": 200, "admin": 200, "health": 200}
        assert statuses(plane, INFERENCE) == {"models": 200, "engine": 200, "admin": 403, "health": 200}
        assert statuses(plane, None) == {"models": 401, "engine": 401, "admin": 401, "health": 200}
    finally:
        registry.close()


def test_the_client_token_never_reaches_the_engine(engine: FakeEngine, plane_factory: Callable[..., Plane]) -> None:
    plane = plane_factory(simple_app(), open_board(lambda _pool: str(engine.path), "a"), inference_tokens=[INFERENCE])
    doc = httpx.get(plane.url + "/pools/a/engine/echo", headers={"Authorization": f"Bearer {INFERENCE}"}).json()
    assert "authorization" not in dict(doc["headers"])


def test_an_engine_with_an_api_key_gets_its_own_key(engine: FakeEngine, plane_factory: Callable[..., Plane]) -> None:
    board = open_board(lambda _pool: str(engine.path), "a")
    board.get("a").engine_headers = [(b"authorization", b"Bearer engine-key")]
    plane = plane_factory(simple_app(), board, inference_tokens=[INFERENCE])
    doc = httpx.get(plane.url + "/pools/a/engine/echo", headers={"Authorization": f"Bearer {INFERENCE}"}).json()
    assert dict(doc["headers"])["authorization"] == "Bearer engine-key"


def test_inference_tokens_alone_guard_the_inference_routes_and_leave_the_loopback_api_open(
    engine: FakeEngine, plane_factory: Callable[..., Plane]
) -> None:
    plane = plane_factory(simple_app(), open_board(lambda _pool: str(engine.path), "a"), inference_tokens=[INFERENCE])
    assert statuses(plane, None) == {"models": 401, "engine": 401, "admin": 200, "health": 200}
    assert statuses(plane, INFERENCE) == {"models": 200, "engine": 200, "admin": 200, "health": 200}


def test_with_no_token_configured_everything_is_open_as_before(
    engine: FakeEngine, plane_factory: Callable[..., Plane]
) -> None:
    plane = plane_factory(simple_app(), open_board(lambda _pool: str(engine.path), "a"))
    assert statuses(plane, None) == {"models": 200, "engine": 200, "admin": 200, "health": 200}
    assert statuses(plane, "anything") == {"models": 200, "engine": 200, "admin": 200, "health": 200}
