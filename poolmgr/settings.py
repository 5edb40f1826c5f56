"""Daemon settings from `POOL_MANAGERD_*` environment variables (layer 1).

Every value is validated up front; a bad one raises `ConfigError` with one line naming the variable, the
value and what is allowed. The CLI turns that into exit code 2 and no traceback.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from poolmgr.errors import ConfigError

PREFIX = "POOL_MANAGERD_"


def default_state_dir() -> Path:
    """/var/lib/poolmgr for root (engines run as another user and must reach their files), else XDG."""
    if os.geteuid() == 0 and not os.environ.get("XDG_STATE_HOME"):
        return Path("/var/lib/poolmgr")
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "poolmgr"


@dataclass(frozen=True)
class PoolManagerConfig:
    addr: str = "127.0.0.1:9200"
    state_dir: Path = field(default_factory=default_state_dir)
    database_url: str = ""
    config: Path | None = None
    node_id: str = field(default_factory=socket.gethostname)
    health_check_interval_ms: int = 1000
    health_check_timeout_ms: int = 2000
    health_failure_threshold: int = 3
    preload_timeout_ms: int = 120_000
    backoff_initial_ms: int = 1000
    backoff_max_ms: int = 60_000
    backoff_stable_secs: int = 300
    circuit_breaker_threshold: int = 5
    circuit_breaker_timeout_secs: int = 300
    restart_rate_limit: int = 10
    restart_window_secs: int = 60
    stop_grace_ms: int = 5000
    vram_refresh_secs: int = 10
    audit_retention_days: int = 90
    llama_server: str = ""
    log_format: str = "json"
    log_level: str = "INFO"
    api_token: str = field(default="", repr=False)
    engine_user: str = ""
    keep_engines: bool = False
    fake_nvml: str = ""

    # Fields that must never reach a log line, an error body or /metrics.
    SECRET_FIELDS = ("api_token",)

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.state_dir / 'poolmgr.db'}"

    @property
    def host(self) -> str:
        return parse_addr(self.addr)[0]

    @property
    def port(self) -> int:
        return parse_addr(self.addr)[1]

    @property
    def is_loopback(self) -> bool:
        host = self.host
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def bind_problem(self) -> str | None:
        """Why serve must not bind this address, if it must not: a non-loopback address without an API token
        (anyone who reaches the port could start processes). `validate` and `serve` both apply it."""
        if self.is_loopback or self.api_token:
            return None
        return (
            f"{PREFIX}ADDR={self.addr}: refusing to serve on non-loopback address {self.addr} without "
            f"{PREFIX}API_TOKEN (anyone who reaches the port could start processes)"
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PoolManagerConfig:
        env = os.environ if env is None else env
        kwargs: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is None or (raw == "" and f.name not in ("database_url",)):
                continue
            kwargs[f.name] = _convert(f.name, raw, f.type)
        cfg = cls(**kwargs)  # type: ignore[arg-type]
        cfg.validate()
        return cfg

    def validate(self) -> None:
        parse_addr(self.addr, var=PREFIX + "ADDR")
        positive = (
            "health_check_interval_ms",
            "health_check_timeout_ms",
            "health_failure_threshold",
            "preload_timeout_ms",
            "backoff_max_ms",
            "circuit_breaker_threshold",
            "circuit_breaker_timeout_secs",
            "restart_rate_limit",
            "restart_window_secs",
            "vram_refresh_secs",
            "audit_retention_days",
        )
        for name in positive:
            value = getattr(self, name)
            if value <= 0:
                raise ConfigError(f"{_var(name)}={value}: must be a positive integer")
        for name in ("backoff_initial_ms", "stop_grace_ms", "backoff_stable_secs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_var(name)}={getattr(self, name)}: must be zero or a positive integer")
        if self.backoff_initial_ms > self.backoff_max_ms:
            raise ConfigError(
                f"{_var('backoff_initial_ms')}={self.backoff_initial_ms}: must not exceed "
                f"{_var('backoff_max_ms')}={self.backoff_max_ms}"
            )
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"{_var('log_format')}={self.log_format}: allowed values are json, text")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"{_var('log_level')}={self.log_level}: allowed values are DEBUG, INFO, WARNING, ERROR")
        if self.database_url and not self.database_url.startswith(("sqlite", "postgresql")):
            raise ConfigError(
                f"{_var('database_url')}={_redact_url(self.database_url)}: must be a sqlite:/// or postgresql:// URL"
            )


def _var(name: str) -> str:
    return PREFIX + name.upper()


def _redact_url(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _convert(name: str, raw: str, typ: object) -> object:
    t = str(typ)
    if t == "int":
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(f"{_var(name)}={raw!r}: must be an integer") from None
    if t == "bool":
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{_var(name)}={raw!r}: allowed values are 1/0, true/false, yes/no, on/off")
    if "Path" in t:
        return Path(raw).expanduser()
    return raw


def parse_addr(addr: str, *, var: str = PREFIX + "ADDR") -> tuple[str, int]:
    """Parse `host:port` (IPv6 as `[::1]:9200`). Raises ConfigError with one line."""
    text = addr.strip()
    host: str
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or not text[end + 1 :].startswith(":"):
            raise ConfigError(f"{var}={addr!r}: not a valid address, expected HOST:PORT such as 127.0.0.1:9200")
        host, port_s = text[1:end], text[end + 2 :]
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ConfigError(f"{var}={addr!r}: not a valid address, expected HOST:PORT such as 127.0.0.1:9200")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _is_hostname(host):
                raise ConfigError(f"{var}={addr!r}: {host!r} is not an IP address or host name") from None
    if not port_s.isdigit():
        raise ConfigError(f"{var}={addr!r}: port {port_s!r} is not a number (allowed 1-65535)")
    port = int(port_s)
    if not 1 <= port <= 65535:
        raise ConfigError(f"{var}={addr!r}: port {port} is out of range (allowed 1-65535)")
    return host, port


def _is_hostname(host: str) -> bool:
    if len(host) > 253:
        return False
    labels = host.split(".")
    return all(
        0 < len(label) <= 63 and label.replace("-", "").isalnum() and not label.startswith("-") for label in labels
    )


__all__ = ["PREFIX", "PoolManagerConfig", "default_state_dir", "parse_addr"]
