"""Structured logs (B-LOG): one JSON object per line, with the pool fields and the correlation id.

Fields passed with `extra={...}` land at the top level; the correlation id of the request or job at hand is
added from its context variable. Anything that looks like a secret is redacted before it is written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from poolmgr.api._context import CORRELATION_ID

POOL_FIELDS = ("pool_id", "engine", "engine_version", "device_mask", "restart_count", "backoff_ms", "last_error")
_STD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}
_SECRET_PATTERNS = [re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"), re.compile(r"(?i)(api[_-]?key[=:\s]+)\S+")]
_SECRETS: set[str] = set()


def register_secret(value: str) -> None:
    """Values that must never appear in a log line (the API token, engine API keys)."""
    if value:
        _SECRETS.add(value)


def redact(text: str) -> str:
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    for pat in _SECRET_PATTERNS:
        text = pat.sub(r"\1***", text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_"):
                doc[key] = redact(value) if isinstance(value, str) else value
        cid = CORRELATION_ID.get()
        if cid and "correlation_id" not in doc:
            doc["correlation_id"] = cid
        if record.exc_info:
            doc["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k in POOL_FIELDS or k == "correlation_id"}
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items() if v is not None)
        return redact(line)


def setup_logging(fmt: str = "json", level: str = "INFO", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "httpx", "httpcore", "transitions", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


__all__ = ["JsonFormatter", "TextFormatter", "redact", "register_secret", "setup_logging"]
