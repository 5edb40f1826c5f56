"""Daemon settings from `POOL_MANAGERD_*` environment variables (layer 1).

Every value is validated up front; a bad one raises `ConfigError` with one line naming the variable, the
value and what is allowed. The CLI turns that into exit code 2 and no traceback.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from poolmgr.errors import ConfigError

PREFIX = "POOL_MANAGERD_"
_ANY_HOST = frozenset({"0.0.0.0", "::", ""})


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
    # A hung engine is found threshold x timeout after its first unanswered probe (at most an interval after it
    # hung): 6-8 s with these defaults. A shorter interval finds no hang much sooner; it probes more (issue 14).
    health_check_interval_ms: int = 2000
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
    inference_tokens_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    queue_timeout_ms: int = 30_000
    advertise_url: str = ""
    node_heartbeat_ms: int = 1000
    node_grace_ms: int = 5000
    spawner: str = "auto"  # read by poolmgr.isolation itself (it has no settings object); checked here

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

    @property
    def advertised_url(self) -> str:
        """The node's address as clients elsewhere reach it (no trailing slash): ADVERTISE_URL, else from ADDR,
        with a wildcard host (0.0.0.0, ::) replaced by this host's fully qualified name."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.host
        if host in _ANY_HOST:
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.tls_cert is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    def inference_tokens(self) -> frozenset[str]:
        """The tokens of INFERENCE_TOKENS_FILE (none without one); ConfigError when it cannot be read or holds none."""
        if self.inference_tokens_file is None:
            return frozenset()
        return read_tokens_file(self.inference_tokens_file, var=_var("inference_tokens_file"))

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
            "node_heartbeat_ms",
            "node_grace_ms",
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
        self._validate_choices()
        if self.database_url and not self.database_url.startswith(("sqlite", "postgresql")):
            raise ConfigError(
                f"{_var('database_url')}={_redact_url(self.database_url)}: must be a sqlite:/// or postgresql:// URL"
            )
        if self.node_grace_ms <= self.node_heartbeat_ms:
            raise ConfigError(
                f"{_var('node_grace_ms')}={self.node_grace_ms}: must exceed {_var('node_heartbeat_ms')}="
                f"{self.node_heartbeat_ms} (a node is alive while its last heartbeat is younger than the grace)"
            )
        self._validate_data_plane()

    def _validate_choices(self) -> None:
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"{_var('log_format')}={self.log_format}: allowed values are json, text")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"{_var('log_level')}={self.log_level}: allowed values are DEBUG, INFO, WARNING, ERROR")
        if self.spawner not in ("auto", "python"):
            raise ConfigError(f"{_var('spawner')}={self.spawner}: allowed values are auto, python")

    def _validate_data_plane(self) -> None:
        if self.queue_timeout_ms <= 0:
            raise ConfigError(f"{_var('queue_timeout_ms')}={self.queue_timeout_ms}: must be a positive integer")
        self.inference_tokens()
        _check_tls(self.tls_cert, self.tls_key)
        if self.advertise_url:
            _check_advertise_url(self.advertise_url)


def read_tokens_file(path: Path, *, var: str) -> frozenset[str]:
    """One token a line; blank lines and `#` comments ignored. At least one token, none with a space inside."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigError(f"{var}={path}: cannot read the tokens file: {why}") from None
    tokens = set()
    for n, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if any(c.isspace() for c in token):
            raise ConfigError(f"{var}={path}: line {n}: a token must not contain spaces")
        tokens.add(token)
    if not tokens:
        raise ConfigError(f"{var}={path}: the file holds no token (one a line; blank lines and # comments ignored)")
    return frozenset(tokens)


def _check_tls(cert: Path | None, key: Path | None) -> None:
    """Both files or neither; both readable; the key unencrypted and matching the certificate (checked now: uvicorn
    would find out only when it binds, and would prompt on the terminal for an encrypted key's passphrase)."""
    if (cert is None) != (key is None):
        given, missing = ("tls_cert", "tls_key") if cert is not None else ("tls_key", "tls_cert")
        raise ConfigError(f"{_var(given)} is set but {_var(missing)} is not: TLS needs both, or neither")
    if cert is None or key is None:
        return
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        if not path.is_file() or not os.access(path, os.R_OK):
            raise ConfigError(f"{_var(name)}={path}: not a readable file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{_var('tls_cert')}={cert}, {_var('tls_key')}={key}: not a PEM certificate with its unencrypted "
            f"private key ({exc})"
        ) from None


def _check_advertise_url(url: str) -> None:
    var = _var("advertise_url")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    ok = (
        parts.scheme in ("http", "https") and bool(parts.hostname) and parts.path in ("", "/")
        and not parts.query and not parts.fragment and "@" not in parts.netloc and port != -1
    )  # fmt: skip
    if not ok:
        raise ConfigError(
            f"{var}={url!r}: must be http://HOST[:PORT] or https://HOST[:PORT], without a path "
            "(e.g. https://gpu-node-1.example.com:9200)"
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


__all__ = ["PREFIX", "PoolManagerConfig", "default_state_dir", "parse_addr", "read_tokens_file"]
