"""The correlation id of the request (or job) at hand, carried into log lines and audit rows.

Layer 1 (imports nothing of poolmgr): the API sets it, observability's log formatters read it, and any layer
that starts work may carry it on.
"""

from __future__ import annotations

import re
import secrets
from contextvars import ContextVar

CORRELATION_ID: ContextVar[str | None] = ContextVar("correlation_id", default=None)
_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def valid_correlation_id(value: str) -> bool:
    return bool(_VALID.match(value))


def new_correlation_id() -> str:
    return secrets.token_hex(8)


__all__ = ["CORRELATION_ID", "new_correlation_id", "valid_correlation_id"]
