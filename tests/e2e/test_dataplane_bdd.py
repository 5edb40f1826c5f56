"""Steps for features/dataplane/dataplane.feature against a real serve, real llama-servers on unix sockets, and
requests sent only through the node's port."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from pytest_bdd import given, parsers, scenarios, then, when

from poolmgr.engines.tiny_model import write_tiny_model
from tests.e2e.conftest import Serve, engine_pids

pytestmark = pytest.mark.e2e

scenarios("dataplane/dataplane.feature")

LONG = {"prompt": "hello", "n_predict": 400, "ignore_eos": True}  # ~1-2 s of generation on this machine class


@dataclass
class World:
    srv: Serve | None = None
    pid: int | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    results: list[tuple[int, str]] = field(default_factory=list)
    out: dict[str, Any] = field(default_factory=dict)
    second: Path | None = None

    @property
    def serve(self) -> Serve:
        assert self.srv is not None
        return self.srv


@pytest.fixture
def world() -> Any:
    w = World()
    yield w
    w.stop.set()
    for t in w.threads:
        t.join(30)


@pytest.fixture(scope="session")
def second_tiny(shared_dir: Path) -> Path:
    path = write_tiny_model(shared_dir / "tiny-second.gguf", seed=1)
    path.chmod(0o644)
    return path


def _chat(model: str, tokens: int = 3) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, "ignore_eos": True}


@given(parsers.parse('a node serving a ready pool "{pool}" on the tiny model'))
def ready_pool(world: World, serve_factory: Any, sqlite_url: str, tiny_model: Path, pool: str) -> None:
    world.srv = serve_factory(sqlite_url)
    world.serve.write_pools({"id": pool, "model": str(tiny_model), "ctx_size": 2048, "extra_args": ["--threads", "1"]})
    world.serve.start()
    world.pid = world.serve.wait_state(pool, "ready")["pid"]


@given(parsers.parse('a node with breaker threshold {n:d} serving a pool "{pool}" whose model is missing'))
def broken_pool(world: World, serve_factory: Any, sqlite_url: str, shared_dir: Path, n: int, pool: str) -> None:
    world.srv = serve_factory(
        sqlite_url, POOL_MANAGERD_CIRCUIT_BREAKER_THRESHOLD=str(n), POOL_MANAGERD_CIRCUIT_BREAKER_TIMEOUT_SECS="3600"
    )
    world.serve.write_pools({"id": pool, "model": str(shared_dir / "no-such-model.gguf")})
    world.serve.start()


@given(parsers.parse('{n:d} clients sending chat completions to "{pool}" through the node without pause'))
def steady_clients(world: World, n: int, pool: str) -> None:
    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not world.stop.is_set():
                try:
                    resp = http.post(f"{world.serve.base}/v1/chat/completions", json=_chat(pool))
                    world.results.append((resp.status_code, resp.text[:200]))
                except httpx.HTTPError as exc:
                    world.results.append((0, f"{type(exc).__name__}: {exc}"))

    world.threads = [threading.Thread(target=client, daemon=True) for _ in range(n)]
    for t in world.threads:
        t.start()
    time.sleep(1.0)
    assert world.results and all(code == 200 for code, _ in world.results), world.results[:3]


@when(parsers.parse('"{pool}" is reloaded to the second tiny model through the API'))
def reload_second(world: World, pool: str, second_tiny: Path) -> None:
    world.second = second_tiny
    world.out["before"] = len(world.results)
    resp = world.serve.request("POST", f"/pools/{pool}/reload", json={"model": str(second_tiny)})
    assert resp.status_code == 202, resp.text


@then(parsers.parse('the new engine of "{pool}" serves the second tiny model'))
def new_engine_serves(world: World, pool: str) -> None:
    world.serve.wait_for(pool, lambda s: s["state"] == "ready" and s["pid"] != world.pid, what="the new engine")
    props = httpx.get(f"{world.serve.base}/pools/{pool}/engine/props", timeout=10).json()
    assert props["model_path"] == str(world.second)


@then(parsers.parse("after {seconds:d} more second every request the clients sent was answered 200"))
def none_failed(world: World, seconds: int) -> None:
    time.sleep(seconds)
    world.stop.set()
    for t in world.threads:
        t.join(60)
    failed = [r for r in world.results if r[0] != 200]
    assert failed == [], f"{len(failed)} of {len(world.results)} requests failed: {failed[:5]}"
    assert len(world.results) > world.out["before"] + 4, "requests were answered after the reload too"


@given(parsers.parse('a long generation running on "{pool}" through the node'))
def long_generation(world: World, pool: str) -> None:
    def run() -> None:
        try:
            resp = httpx.post(f"{world.serve.base}/pools/{pool}/engine/completion", json=LONG, timeout=60)
            world.out["status"] = resp.status_code
            world.out["tokens"] = resp.json().get("tokens_predicted") if resp.status_code == 200 else None
        except httpx.HTTPError as exc:
            world.out["error"] = f"{type(exc).__name__}: {exc}"

    world.threads.append(threading.Thread(target=run, daemon=True))
    world.threads[-1].start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        slots = httpx.get(f"{world.serve.base}/pools/{pool}/engine/slots", timeout=10).json()
        if any(s.get("is_processing") for s in slots):
            return
        time.sleep(0.01)
    raise AssertionError("the long generation never started")


@when(parsers.parse('"{pool}" is drained through the API with a deadline of {ms:d} ms'))
def drain(world: World, pool: str, ms: int) -> None:
    assert world.serve.request("POST", f"/pools/{pool}/drain", json={"deadline_ms": ms}).status_code == 202


@then(parsers.parse('a new request to "{pool}" is refused with 503 and Retry-After'))
def refused_while_draining(world: World, pool: str) -> None:
    resp = httpx.post(f"{world.serve.base}/v1/chat/completions", json=_chat(pool), timeout=10)
    assert resp.status_code == 503 and resp.headers.get("retry-after"), (resp.status_code, resp.text)
    assert "draining" in resp.json()["error"]["message"]


@then("the long generation ends with all its tokens")
def generation_complete(world: World) -> None:
    world.threads[-1].join(60)
    assert world.out == {"status": 200, "tokens": LONG["n_predict"]}, world.out


@then("the long generation ends without all its tokens")
def generation_cut(world: World) -> None:
    world.threads[-1].join(60)
    assert world.out.get("status") != 200 or world.out.get("tokens") != LONG["n_predict"], world.out


@then(parsers.parse('"{pool}" ends stopped with drain outcome "{outcome}" and {cut:d} cut requests'))
def drained(world: World, pool: str, outcome: str, cut: int) -> None:
    world.serve.wait_state(pool, "stopped")
    event = [e for e in world.serve.events(pool) if e["trigger"] == "drain_done"][-1]
    assert (event["detail"]["outcome"], event["detail"]["cut_requests"]) == (outcome, cut), event
    assert engine_pids(pool) == []


@then("the log of poolmgr says the request was cut")
def log_says_cut(world: World) -> None:
    assert "request(s) still running: cut them" in world.serve.log_path.read_text()


@given(parsers.parse('"{pool}" was drained'))
def was_drained(world: World, pool: str) -> None:
    assert world.serve.request("POST", f"/pools/{pool}/drain", json={"deadline_ms": 1000}).status_code == 202
    world.serve.wait_state(pool, "stopped")


@when(parsers.parse('"{pool}" is preloaded and a chat completion for "{model}" is sent through the node at once'))
def preload_and_ask(world: World, pool: str, model: str) -> None:
    assert world.serve.request("POST", f"/pools/{pool}/preload").status_code == 202
    started = time.monotonic()
    world.out["resp"] = httpx.post(f"{world.serve.base}/v1/chat/completions", json=_chat(model), timeout=60)
    world.out["waited_s"] = time.monotonic() - started


@then("the chat completion is answered 200 by the new engine")
def answered(world: World) -> None:
    resp = world.out["resp"]
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 3


@when(parsers.parse('the breaker of "{pool}" is open'))
def breaker_open(world: World, pool: str) -> None:
    world.serve.wait_state(pool, "breaker-open")


@then(parsers.parse('a chat completion for "{pool}" is refused at once with 503 naming the open breaker'))
def refused_breaker(world: World, pool: str) -> None:
    started = time.monotonic()
    resp = httpx.post(f"{world.serve.base}/v1/chat/completions", json=_chat(pool), timeout=10)
    assert time.monotonic() - started < 1.0
    assert resp.status_code == 503 and "breaker-open" in resp.json()["error"]["message"], resp.text


@given(parsers.parse('a node serving a ready pool "{pool}" with load_on_demand and idle_unload_s {idle:d}'))
def on_demand_pool(world: World, serve_factory: Any, sqlite_url: str, tiny_model: Path, pool: str, idle: int) -> None:
    world.srv = serve_factory(sqlite_url)
    world.serve.write_pools(
        {"id": pool, "model": str(tiny_model), "ctx_size": 2048, "extra_args": ["--threads", "1"],
         "load_on_demand": True, "idle_unload_s": idle}
    )  # fmt: skip
    world.serve.start()
    world.pid = world.serve.wait_state(pool, "ready")["pid"]
    world.out["ready_at"], world.out["idle_s"] = time.monotonic(), idle


@when(parsers.parse('"{pool}" has no request for a while'))
def no_request(world: World, pool: str) -> None:
    world.serve.wait_state(pool, "stopped", timeout=world.out["idle_s"] + 20)
    world.out["unloaded_after_s"] = time.monotonic() - world.out["ready_at"]


@then(parsers.parse('"{pool}" is unloaded as idle: stopped, no engine left, the audit saying idle_unload'))
def unloaded_as_idle(world: World, pool: str) -> None:
    assert world.out["unloaded_after_s"] >= world.out["idle_s"] - 0.5  # not before its idle time (less the poll)
    events = world.serve.events(pool)
    (unload,) = [e for e in events if e["reason"] == "idle_unload"]
    assert (unload["from_state"], unload["to_state"]) == ("ready", "draining")
    assert unload["detail"]["idle_s"] >= world.out["idle_s"]
    drained = [e for e in events if e["trigger"] == "drain_done"][-1]
    assert (drained["detail"]["reason"], drained["detail"]["outcome"]) == ("idle_unload", "drained")
    assert engine_pids(pool) == []
    assert "unloading it" in world.serve.log_path.read_text()


@when(parsers.parse('a chat completion for "{model}" is sent through the node'))
def ask(world: World, model: str) -> None:
    world.out["resp"] = httpx.post(f"{world.serve.base}/v1/chat/completions", json=_chat(model), timeout=60)


@then(parsers.parse('the audit of "{pool}" says the request started it (load_on_demand)'))
def started_on_demand(world: World, pool: str) -> None:
    events = world.serve.events(pool)
    (asked,) = [e for e in events if e["kind"] == "preload_requested"]
    assert asked["reason"] == "load_on_demand: preload requested in state stopped", asked
    assert asked["correlation_id"] == world.out["resp"].headers["x-correlation-id"]
    ready = [e for e in events if e["trigger"] == "preload_ok"]
    assert len(ready) == 2 and ready[-1]["id"] > asked["id"]  # started again after the request, once
