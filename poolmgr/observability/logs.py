"""Structured logs (B-LOG-001..008): one JSON object per line, with the pool fields and the correlation id.

    {"timestamp": "2026-01-01T00:00:00.000+00:00", "level": "info", "logger": "poolmgr.pool",
     "message": "pool tiny backing off 52 ms", "pool_id": "tiny", "engine": "llamacpp",
     "engine_version": "b11434-unknown", "device_mask": "cpu", "backoff_ms": 52, "restart_count": 0}

Fields passed with `extra={...}` land at the top level (pool lines carry pool_id, engine, engine_version,
device_mask; restart_count on restarts, backoff_ms on backoff, last_error on failures). The correlation id of
the request at hand is added from its context variable; work a request started (a drain, a reload, a
preload) carries it in `extra`. Secrets — the API token, the inference tokens, engine API keys, the database
password — are replaced by `***` in every string of the line, nested ones included, before it is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from poolmgr.correlation import CORRELATION_ID
from poolmgr.errors import ConfigError
from poolmgr.logfields import PoolFieldsFilter
from poolmgr.observability._engines import engine_api_keys
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig

POOL_FIELDS = (
    "pool_id", "engine", "engine_version", "device_mask", "restart_count", "backoff_ms", "next_restart_at",
    "last_error", "exit_code", "signal", "uptime_s", "from_state", "to_state", "consecutive_failures",
)  # fmt: skip
FORMATS = ("json", "text")
# LogRecord attributes, and uvicorn's ANSI-coloured copy of its message: not fields of a line.
_STD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName", "color_message"}
_SECRET_PATTERNS = [
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"(?i)(--api-key(?:-file)?[=\s]+)\S+"),
    re.compile(r"(?i)(api[_-]?key[=:\s]+)\S+"),
    re.compile(r"(?i)(://[^:/@\s]+:)[^@\s]+(@)"),
]
# Only a string with one of these in it can match a pattern above: the patterns run on those alone (a log line
# has a dozen strings; running four patterns on each was most of the cost of a line).
_MAY_MATCH = re.compile(r"(?i)bearer|api|://")
_SECRETS: set[str] = set()
_LONGEST_FIRST: list[str] = []


def register_secret(value: str | None) -> None:
    """A value that must never appear in a log line (the API token, an inference token, an engine API key, a
    password)."""
    if value and value not in _SECRETS:
        _SECRETS.add(value)
        _LONGEST_FIRST[:] = sorted(_SECRETS, key=len, reverse=True)


def register_settings_secrets(cfg: PoolManagerConfig) -> None:
    """Every field the settings mark secret, the inference tokens, and the password of the database URL."""
    for name in cfg.SECRET_FIELDS:
        register_secret(str(getattr(cfg, name) or ""))
    with contextlib.suppress(ConfigError):  # settings read from the environment were checked already
        for token in cfg.inference_tokens():
            register_secret(token)
    if cfg.database_url:
        with contextlib.suppress(ArgumentError):
            password = make_url(cfg.database_url).password
            register_secret(str(password) if password else None)


def register_pool_secrets(specs: Iterable[PoolSpec]) -> None:
    """The engine API keys of these pools (`--api-key`, `--api-key-file` in extra_args)."""
    for spec in specs:
        for key in engine_api_keys(spec):
            register_secret(key)


def redact(text: str) -> str:
    for secret in _LONGEST_FIRST:
        if secret in text:
            text = text.replace(secret, "***")
    if not _MAY_MATCH.search(text):
        return text
    for pat in _SECRET_PATTERNS:
        text = pat.sub(lambda m: m.group(1) + "***" + (m.group(2) if m.lastindex == 2 else ""), text)
    return text


def _redact_value(value: Any) -> Any:
    """Strings redacted; containers walked; anything else JSON cannot hold becomes its redacted str()."""
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, dict):
        return {redact(str(k)): _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    return redact(str(value))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STD and not key.startswith("_") and not (key == "correlation_id" and value is None):
                doc[key] = value
        cid = CORRELATION_ID.get()
        if cid and "correlation_id" not in doc:
            doc["correlation_id"] = cid
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(_redact_value(doc))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k in POOL_FIELDS or k == "correlation_id"}
        cid = CORRELATION_ID.get()
        if cid and extras.get("correlation_id") is None:
            extras["correlation_id"] = cid
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items() if v is not None)
        return redact(line)


def setup_logging(fmt: str = "json", level: str = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Send every log line through one handler in `fmt` (json | text); returns that handler."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(PoolFieldsFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("uvicorn.access", "httpx", "httpcore", "transitions", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


__all__ = [
    "FORMATS",
    "POOL_FIELDS",
    "JsonFormatter",
    "TextFormatter",
    "redact",
    "register_pool_secrets",
    "register_secret",
    "register_settings_secrets",
    "setup_logging",
]
