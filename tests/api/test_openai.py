"""The OpenAI Python client against poolmgr's data plane, in front of a real llama-server on a unix socket."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest

from poolmgr.lifecycle.traffic import Mode

from ._plane import Plane, open_board, simple_app, wait_until

pytestmark = pytest.mark.e2e
TOKEN = "inference-token-for-tests"
API_TOKEN = "api-token-for-tests"
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def plane(engine_socket: str, plane_factory: Callable[..., Plane]) -> Plane:
    board = open_board(lambda _pool: engine_socket, "tiny")
    board.get("tiny").names = frozenset({"tiny", "tiny-chat"})
    board.get("tiny").served_name = "tiny-chat"
    board.get("starting").set(Mode.QUEUE, "preloading")
    board.get("stopped").set(Mode.REFUSE, "stopped")
    return plane_factory(simple_app(), board, api_token=API_TOKEN, inference_tokens=[TOKEN])


def client(plane: Plane, token: str | None = TOKEN) -> openai.OpenAI:
    """The OpenAI client, presenting `token` (None: no Authorization header at all)."""
    if token is not None:
        return openai.OpenAI(base_url=plane.url + "/v1", api_key=token, max_retries=0, timeout=30)

    def strip(request: httpx.Request) -> None:  # the client insists on a key: it is taken off the wire here
        request.headers.pop("authorization", None)

    http = httpx.Client(event_hooks={"request": [strip]}, timeout=30)
    return openai.OpenAI(base_url=plane.url + "/v1", api_key="unused", max_retries=0, http_client=http)


def test_the_client_lists_the_models_of_open_and_queued_pools(plane: Plane) -> None:
    models = client(plane).models.list()
    assert sorted(m.id for m in models.data) == ["starting", "tiny-chat"]  # served names; "stopped" refuses
    assert {(m.object, m.owned_by) for m in models.data} == {("model", "poolmgr")}
    assert client(plane).models.retrieve("tiny-chat").id == "tiny-chat"


def test_the_client_completes_a_chat_through_the_pools_served_name(plane: Plane) -> None:
    answer = client(plane).chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant"
    assert answer.usage is not None and answer.usage.completion_tokens == 4
    wait_until(lambda: plane.traffic("tiny").stats.by_code == {200: 1}, what="the request recorded")


def test_the_client_completes_a_prompt_by_pool_id(plane: Plane) -> None:
    answer = client(plane).completions.create(model="tiny", prompt="one two", max_tokens=3)
    assert answer.usage is not None and answer.usage.completion_tokens == 3


def test_a_streamed_chat_arrives_chunk_by_chunk(plane: Plane) -> None:
    stream = client(plane).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, stream=True,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = list(stream)
    # The role, then the tokens (the engine holds back a token that ends inside a UTF-8 character, so some
    # events carry two), then the finish reason: each its own event.
    assert len(chunks) >= 6
    assert chunks[-1].choices[0].finish_reason == "length"


def test_without_a_token_the_client_gets_401(plane: Plane) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        client(plane, token=None).models.list()
    assert caught.value.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(plane, token="not-a-token").chat.completions.create(model="tiny", messages=MESSAGES)  # type: ignore[arg-type]


def test_the_api_token_opens_the_inference_routes_too(plane: Plane) -> None:
    assert [m.id for m in client(plane, token=API_TOKEN).models.list().data]


def test_an_unknown_model_is_a_404_in_openais_shape(plane: Plane) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client(plane).chat.completions.create(model="gpt-9", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert caught.value.type == "invalid_request_error"


def test_a_refusing_pool_is_a_503_with_its_reason(plane: Plane) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        client(plane).chat.completions.create(model="stopped", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.status_code == 503
    assert "stopped" in caught.value.message


def test_openai_errors_for_bad_requests(plane: Plane) -> None:
    plane.plane.max_body_bytes = 1024
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=plane.url, headers=headers, timeout=10) as http:
        cases = {
            "not json": http.post("/v1/chat/completions", content=b"{nope"),
            "no model": http.post("/v1/chat/completions", json={"messages": MESSAGES}),
            "GET": http.get("/v1/chat/completions"),
            "unknown route": http.get("/v1/assistants"),
            "too big": http.post("/v1/completions", content=b"x" * 2048, headers={"content-type": "application/json"}),
            "bad correlation id": http.get("/v1/models", headers={"x-correlation-id": "a b"}),
        }
    statuses = {name: r.status_code for name, r in cases.items()}
    assert statuses == {
        "not json": 400, "no model": 400, "GET": 405, "unknown route": 404, "too big": 413, "bad correlation id": 400,
    }  # fmt: skip
    for response in cases.values():
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["type"] == "invalid_request_error"
        assert response.headers["x-correlation-id"]
