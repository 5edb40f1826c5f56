"""The fleet's client host: reads a JSON list of requests ({"method", "url", "json", "token"}) on stdin, sends
them one after the other and prints a JSON list of answers: {"status", "body"}, or {"error"} when the request
got no answer (no route, connection refused, timeout). Run inside the client's network namespace."""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx


def _send(http: httpx.Client, req: dict[str, Any]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {req['token']}"} if req.get("token") else {}
    try:
        resp = http.request(req.get("method", "GET"), req["url"], json=req.get("json"), headers=headers)
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    try:
        body: Any = resp.json()
    except ValueError:
        body = resp.text[:500]
    return {"status": resp.status_code, "body": body}


def main() -> None:
    requests = json.load(sys.stdin)
    with httpx.Client(timeout=httpx.Timeout(30, connect=3), trust_env=False) as http:
        json.dump([_send(http, req) for req in requests], sys.stdout)


if __name__ == "__main__":
    main()
