"""The OpenAI-compatible face of the node: which pool a request's `model` means, GET /v1/models, and OpenAI's
error shape (`{"error": {"message", "type", "param", "code"}}`, which OpenAI's clients turn into their typed
exceptions: 401 AuthenticationError, 404 NotFoundError, ...).

A `model` names a pool by its id or by its served model name (`served_model_name` in the pools file). Several
pools may serve one name: an open one with the fewest requests in flight gets the request; with none open, the
least busy queued one (its request waits for it to open); with none queued, a stopped one with `load_on_demand`
(the request starts it and waits); with only refusing ones, one of them (503 with its reason).
"""

from __future__ import annotations

import json

from starlette.types import Receive

from poolmgr.api._proxy import ClientGone
from poolmgr.lifecycle.traffic import Mode, PoolTraffic, TrafficBoard

CHAT, COMPLETIONS, EMBEDDINGS, MODELS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"
MODEL_ROUTES = frozenset({CHAT, COMPLETIONS, EMBEDDINGS})
# poolmgr's error kinds as OpenAI codes, where OpenAI has a name of its own for them.
_CODES = {"unauthorized": "invalid_api_key", "forbidden": "permission_denied", "unavailable": "pool_unavailable"}


class BadRequest(Exception):
    """A request the OpenAI routes refuse before choosing a pool."""

    def __init__(self, status: int, message: str, kind: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def openai_error(status: int, message: str, kind: str, *, param: str | None = None) -> bytes:
    kind_of = "invalid_request_error" if status < 500 else "server_error"
    error = {"message": message, "type": kind_of, "param": param, "code": _CODES.get(kind, kind)}
    return json.dumps({"error": error}).encode()


async def read_body(receive: Receive, *, limit: int, declared: int | None) -> bytes:
    """The whole request body (at most `limit` bytes: else 413)."""
    if declared is not None and declared > limit:
        raise BadRequest(413, f"the request body is {declared} bytes; at most {limit} are accepted", "too_large")
    parts, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"the request body is over {limit} bytes", "too_large")
        parts.append(chunk)
        more = bool(message.get("more_body", False))
    return parts[0] if len(parts) == 1 else b"".join(parts)


def requested_model(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(400, "the request body is not JSON", "invalid_json") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, str) or not model:
        raise BadRequest(400, "the request body has no `model` (a pool id or served model name)", "missing_model",
                         param="model")  # fmt: skip
    return model


def choose(board: TrafficBoard, model: str) -> PoolTraffic:
    found = board.serving(model)
    if not found:
        names = ", ".join(served_names(board)) or "none"
        raise BadRequest(404, f"The model `{model}` does not exist on this node (models: {names})",
                         "model_not_found", param="model")  # fmt: skip
    open_ = [t for t in found if t.mode is Mode.OPEN]
    queueing = [t for t in found if t.mode is Mode.QUEUE]  # rather one already starting than start another
    return min(open_ or queueing or found, key=lambda t: t.in_flight + t.queued)


def served_names(board: TrafficBoard) -> list[str]:
    """The served model names of the pools that take requests (open, queueing them until they open, or stopped
    with load_on_demand); a pool's id routes too, but is not listed unless it is its served name."""
    names = {t.served_name for t in board.pools.values() if t.takes_requests}
    return sorted(names)


def model_object(name: str, created: int) -> dict[str, object]:
    return {"id": name, "object": "model", "created": created, "owned_by": "poolmgr"}


def model_list(board: TrafficBoard, created: int) -> bytes:
    data = [model_object(name, created) for name in served_names(board)]
    return json.dumps({"object": "list", "data": data}).encode()


__all__ = [
    "CHAT",
    "COMPLETIONS",
    "EMBEDDINGS",
    "MODELS",
    "MODEL_ROUTES",
    "BadRequest",
    "choose",
    "model_list",
    "model_object",
    "openai_error",
    "read_body",
    "requested_model",
    "served_names",
]
