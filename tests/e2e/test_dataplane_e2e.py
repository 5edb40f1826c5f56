"""The node data plane end to end (issue 15): `poolmgr serve` with real llama-servers on unix sockets, reached
only through poolmgr's one port — by the `openai` client with an inference token, across a reload under a steady
stream of requests, and through drains that wait for a generating request or cut it at their deadline (those
in features/dataplane/dataplane.feature, tests/e2e/test_dataplane_bdd.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

TOKEN = "admin-token-123456"
INFERENCE = "inference-token-abcdef"


def _pool(model: Path, **more: Any) -> dict[str, Any]:
    return {"id": "tiny", "model": str(model), "device_mask": "cpu", "ctx_size": 2048,
            "extra_args": ["--threads", "1"], **more}  # fmt: skip


def _tokens_file(srv: Any) -> Path:
    path = srv.workdir / "inference-tokens"
    path.write_text(f"# clients\n{INFERENCE}\n")
    return Path(path)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _inet_inodes() -> set[str]:
    """Inodes of every TCP and UDP socket on the host (IPv4 and IPv6), listening or not."""
    found = set()
    for name in ("tcp", "tcp6", "udp", "udp6"):
        lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        found |= {line.split()[9] for line in lines if len(line.split()) > 9}
    return found


def test_engine_listens_on_its_unix_socket_only_and_answers_through_the_node_port(
    serve_factory: Any, sqlite_url: str, tiny_model: Path
) -> None:
    srv = serve_factory(sqlite_url)
    srv.write_pools(_pool(tiny_model, served_model_name="tiny-chat"))
    srv.start()
    status = srv.wait_state("tiny", "ready")
    assert status["endpoint_url"] == f"{srv.base}/pools/tiny/engine"
    pid = status["pid"]
    sock = srv.workdir / "state" / "work" / "tiny" / "engine.sock"
    assert sock.is_socket()
    engine_sockets = _socket_inodes(pid)
    assert engine_sockets, "the engine holds its unix socket"
    assert not engine_sockets & _inet_inodes(), "the engine has a TCP or UDP socket"
    body = {"prompt": "hi", "n_predict": 4, "ignore_eos": True}  # the tiny model may say EOS at any token
    resp = httpx.post(status["endpoint_url"] + "/completion", json=body, timeout=30)
    assert resp.status_code == 200 and resp.json()["tokens_predicted"] == 4


def test_openai_client_lists_completes_and_streams_with_an_inference_token_and_is_refused_without(
    serve_factory: Any, sqlite_url: str, tiny_model: Path
) -> None:
    srv = serve_factory(sqlite_url, POOL_MANAGERD_API_TOKEN=TOKEN)
    srv.env["POOL_MANAGERD_INFERENCE_TOKENS_FILE"] = str(_tokens_file(srv))
    srv.headers = {"Authorization": f"Bearer {TOKEN}"}
    srv.write_pools(_pool(tiny_model, served_model_name="tiny-chat"))
    srv.start()
    srv.wait_state("tiny", "ready")
    client = openai.OpenAI(base_url=f"{srv.base}/v1", api_key=INFERENCE, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    chat = client.chat.completions.create(
        model="tiny-chat",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        extra_body={"ignore_eos": True},
    )
    assert chat.choices[0].message.content is not None and chat.usage is not None
    assert chat.usage.completion_tokens == 4
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=6,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{srv.base}/v1", api_key="wrong", max_retries=0).models.list()
    # an inference token reaches the engines, never the admin API
    assert srv.request("GET", "/pools", headers={"Authorization": f"Bearer {INFERENCE}"}).status_code in (401, 403)
    assert srv.request("GET", "/pools").status_code == 200
