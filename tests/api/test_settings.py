"""The data plane's settings: inference tokens file, TLS, queue timeout, advertised URL — each bad value one line."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from poolmgr.api.dataplane import uvicorn_tls
from poolmgr.errors import ConfigError
from poolmgr.observability.logs import redact, register_settings_secrets
from poolmgr.settings import PoolManagerConfig

from ._plane import Plane, open_board, simple_app


def cfg(**env: str) -> PoolManagerConfig:
    return PoolManagerConfig.from_env({f"POOL_MANAGERD_{k.upper()}": v for k, v in env.items()})


def problem(**env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        cfg(**env)
    text = str(caught.value)
    assert "\n" not in text
    return text


@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a test certificate")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_the_inference_tokens_file_holds_one_token_a_line(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# clients of team A\nalpha-1\n\n  beta-2  \n# retired: gamma\nalpha-1\n")
    assert cfg(inference_tokens_file=str(path)).inference_tokens() == frozenset({"alpha-1", "beta-2"})
    assert cfg().inference_tokens() == frozenset()


def test_the_inference_tokens_are_secrets_of_the_settings(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("tok-visible-nowhere-1\ntok-visible-nowhere-2\n")
    register_settings_secrets(cfg(inference_tokens_file=str(path)))
    assert redact("got tok-visible-nowhere-2 and tok-visible-nowhere-1") == "got *** and ***"


def test_a_missing_empty_or_odd_tokens_file_stops_poolmgr_with_one_line(tmp_path: Path) -> None:
    missing = problem(inference_tokens_file=str(tmp_path / "nope"))
    assert missing == f"POOL_MANAGERD_INFERENCE_TOKENS_FILE={tmp_path / 'nope'}: cannot read the tokens file: " + (
        "No such file or directory"
    )
    (tmp_path / "empty").write_text("# nobody yet\n\n")
    assert "holds no token" in problem(inference_tokens_file=str(tmp_path / "empty"))
    (tmp_path / "spaced").write_text("one token\n")
    assert "line 1: a token must not contain spaces" in problem(inference_tokens_file=str(tmp_path / "spaced"))


def test_tls_needs_both_files_readable_and_matching(tmp_path: Path, cert_pair: tuple[Path, Path]) -> None:
    cert, key = cert_pair
    assert "TLS_CERT is set but POOL_MANAGERD_TLS_KEY is not" in problem(tls_cert=str(cert))
    assert "TLS_KEY is set but POOL_MANAGERD_TLS_CERT is not" in problem(tls_key=str(key))
    assert problem(tls_cert=str(tmp_path / "x.pem"), tls_key=str(key)).endswith("x.pem: not a readable file")
    assert "not a PEM certificate with its unencrypted private key" in problem(tls_cert=str(cert), tls_key=str(cert))
    ok = cfg(tls_cert=str(cert), tls_key=str(key))
    assert uvicorn_tls(ok) == {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    assert uvicorn_tls(cfg()) == {}


def test_queue_timeout_must_be_positive() -> None:
    assert cfg().queue_timeout_ms == 30_000
    assert cfg(queue_timeout_ms="250").queue_timeout_ms == 250
    assert problem(queue_timeout_ms="0") == "POOL_MANAGERD_QUEUE_TIMEOUT_MS=0: must be a positive integer"


@pytest.mark.parametrize(
    "url", ["gpu-1:9200", "ftp://gpu-1", "https://gpu-1:9200/api", "https://", "http://u:p@gpu-1", "http://h:99999"]
)
def test_a_bad_advertise_url_is_refused(url: str) -> None:
    assert problem(advertise_url=url).startswith(f"POOL_MANAGERD_ADVERTISE_URL={url!r}: must be http://HOST[:PORT]")


def test_the_advertised_url_is_the_setting_or_derived_from_the_bind_address(cert_pair: tuple[Path, Path]) -> None:
    cert, key = cert_pair
    assert cfg(advertise_url="https://gpu-1.example.com:8443/").advertised_url == "https://gpu-1.example.com:8443"
    assert cfg(addr="10.0.0.5:9200").advertised_url == "http://10.0.0.5:9200"
    assert cfg(addr="[::1]:9200").advertised_url == "http://[::1]:9200"
    assert cfg(addr="0.0.0.0:9200").advertised_url == f"http://{socket.getfqdn()}:9200"
    assert cfg(addr="127.0.0.1:9443", tls_cert=str(cert), tls_key=str(key)).advertised_url == "https://127.0.0.1:9443"


def test_the_data_plane_serves_over_tls(cert_pair: tuple[Path, Path], plane_factory: Callable[..., Plane]) -> None:
    cert, key = cert_pair
    settings = cfg(tls_cert=str(cert), tls_key=str(key))
    plane = plane_factory(simple_app(), open_board(lambda _pool: "/nonexistent.sock"), tls=uvicorn_tls(settings))
    assert plane.url.startswith("https://")
    context = ssl.create_default_context(cafile=str(cert))
    assert httpx.get(plane.url + "/v1/models", verify=context).json() == {"object": "list", "data": []}
    with pytest.raises(httpx.ConnectError):
        httpx.get(plane.url + "/v1/models")  # not trusted by default
