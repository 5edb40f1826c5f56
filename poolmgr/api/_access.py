"""Who may call what on the API port: the API token (POOL_MANAGERD_API_TOKEN) opens every route, an inference
token (one of POOL_MANAGERD_INFERENCE_TOKENS_FILE) opens the inference routes only (/v1/*, /pools/{id}/engine/*).

| configured                 | inference routes               | admin routes                                     |
|----------------------------|--------------------------------|--------------------------------------------------|
| nothing (loopback only)    | open                           | open                                             |
| API token only             | the API token                  | the API token (app.py's middleware)              |
| inference tokens only      | an inference token             | open (loopback only: serve refuses another bind) |
| both                       | the API token or an inference  | the API token; an inference token gets 403       |

Tokens are compared as SHA-256 digests with `hmac.compare_digest`, every token every time: the time taken says
nothing about how much of a token matched, nor which one.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from enum import Enum


class Verdict(Enum):
    ALLOWED = "allowed"
    MISSING = "missing"  # no token, or one poolmgr does not know: 401
    FORBIDDEN = "forbidden"  # an inference token on an admin route: 403


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class Access:
    def __init__(self, *, api_token: str = "", inference_tokens: Iterable[str] = ()) -> None:
        self._api = _digest(api_token.encode()) if api_token else None
        self._inference = tuple(_digest(t.encode()) for t in inference_tokens if t)
        self.guarded = self._api is not None or bool(self._inference)

    def inference(self, authorization: bytes | None) -> Verdict:
        """May a request with this Authorization header call an inference route?"""
        if not self.guarded:
            return Verdict.ALLOWED
        given = _bearer(authorization)
        if given is None:
            return Verdict.MISSING
        ok = self._is_api(given) | self._is_inference(given)
        return Verdict.ALLOWED if ok else Verdict.MISSING

    def admin(self, authorization: bytes | None) -> Verdict:
        """FORBIDDEN for an inference token on an admin route; anything else is for app.py's middleware to judge
        (it answers 401 to a missing or unknown token)."""
        if self._api is None or not self._inference:
            return Verdict.ALLOWED
        given = _bearer(authorization)
        if given is not None and not self._is_api(given) and self._is_inference(given):
            return Verdict.FORBIDDEN
        return Verdict.ALLOWED

    def _is_api(self, digest: bytes) -> bool:
        return self._api is not None and hmac.compare_digest(digest, self._api)

    def _is_inference(self, digest: bytes) -> bool:
        found = False
        for known in self._inference:
            found |= hmac.compare_digest(digest, known)
        return found


def _bearer(authorization: bytes | None) -> bytes | None:
    """The digest of the bearer token of an Authorization header, if it has one."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token:
        return None
    return _digest(token)


__all__ = ["Access", "Verdict"]
