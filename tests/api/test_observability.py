"""What the data plane leaves behind: request metrics on /metrics, one log line a request (never a token)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

import httpx
import pytest
from prometheus_client import generate_latest

from poolmgr.api.app import create_app
from poolmgr.devices import Inventory
from poolmgr.lifecycle.traffic import BUCKETS, Mode, TrafficBoard
from poolmgr.observability.logs import JsonFormatter, register_secret
from poolmgr.observability.metrics import MetricsEndpoint, PoolMetricsCollector
from poolmgr.store import Registry
from tests.observability._stack import Scrape

from ._plane import FakeEngine, Plane, open_board, simple_app, wait_until

TOKEN = "inference-secret-123"


@pytest.fixture
def registry(sqlite_url: str) -> Iterator[Registry]:
    reg = Registry(sqlite_url, node_id="node-a")
    yield reg
    reg.close()


def test_request_metrics_appear_on_metrics_for_pools_with_requests(
    engine: FakeEngine, registry: Registry, plane_factory: Callable[..., Plane]
) -> None:
    board = open_board(lambda _pool: str(engine.path), "a", "idle")
    board.get("shut").set(Mode.REFUSE, "stopped")
    endpoint = MetricsEndpoint(PoolMetricsCollector(registry, node_id="node-a", inventory=Inventory, traffic=board))
    plane = plane_factory(create_app(registry, metrics=endpoint), board)
    for _ in range(2):
        assert httpx.get(plane.url + "/pools/a/engine/echo").status_code == 200
    assert httpx.get(plane.url + "/pools/shut/engine/echo").status_code == 503
    wait_until(lambda: sum(board.get("shut").stats.by_code.values()) == 1, what="the refusal recorded")
    scrape = Scrape(httpx.get(plane.url + "/metrics").text)
    assert scrape.type_of("pool_requests") == "counter"
    assert scrape.value("pool_requests_total", pool_id="a", code="200") == 2
    assert scrape.value("pool_requests_total", pool_id="shut", code="503") == 1
    assert scrape.label_values("pool_requests_total", "pool_id") == {"a", "shut"}
    assert scrape.value("pool_requests_in_flight", pool_id="idle") == 0
    assert scrape.value("pool_requests_queued", pool_id="a") == 0
    assert scrape.value("pool_request_duration_seconds_count", pool_id="a") == 2
    assert scrape.value("pool_request_duration_seconds_bucket", pool_id="a", le="+Inf") == 2
    assert scrape.value("pool_request_ttfb_seconds_count", pool_id="a") == 2
    assert scrape.value("pool_request_ttfb_seconds_count", pool_id="shut") is None  # no body: no first byte
    assert scrape.label_values("pool_request_duration_seconds_count", "pool_id") == {"a", "shut"}  # not idle
    body, _ = endpoint()
    assert generate_latest(endpoint.registry) == body  # byte for byte what prometheus_client writes


def test_request_histograms_count_the_slowest_requests_in_plus_inf_only(registry: Registry) -> None:
    board = TrafficBoard(queue_timeout_s=1, socket_for=lambda _pool: "")
    board.get("a").record(200, BUCKETS[-1] * 2, 0.001)
    board.get("a").record(200, 0.001, None)
    endpoint = MetricsEndpoint(PoolMetricsCollector(registry, node_id="node-a", inventory=Inventory, traffic=board))
    scrape = Scrape(endpoint()[0].decode())
    assert scrape.value("pool_request_duration_seconds_bucket", pool_id="a", le=repr(BUCKETS[-1])) == 1
    assert scrape.value("pool_request_duration_seconds_bucket", pool_id="a", le="+Inf") == 2
    assert scrape.value("pool_request_ttfb_seconds_count", pool_id="a") == 1


def test_every_proxied_request_logs_one_json_line_without_token_or_body(
    engine: FakeEngine, plane_factory: Callable[..., Plane], caplog: pytest.LogCaptureFixture
) -> None:
    register_secret(TOKEN)
    caplog.set_level(logging.INFO, logger="poolmgr.proxy")
    plane = plane_factory(simple_app(), open_board(lambda _pool: str(engine.path), "a"), inference_tokens=[TOKEN])
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Correlation-Id": "cid-7"}
    prompt = "a prompt that must not be logged"
    httpx.post(plane.url + "/v1/chat/completions", headers=headers, json={"model": "a", "messages": prompt})
    httpx.get(plane.url + "/pools/a/engine/echo?x=1", headers=headers)
    wait_until(lambda: len([r for r in caplog.records if r.name == "poolmgr.proxy"]) == 2, what="two log lines")
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records if r.name == "poolmgr.proxy"]
    docs = [json.loads(line) for line in lines]
    assert [(d["route"], d["method"], d["status"], d["outcome"]) for d in docs] == [
        ("/v1/chat/completions", "POST", 200, "ok"), ("/pools/a/engine/echo", "GET", 200, "ok"),
    ]  # fmt: skip
    assert docs[1]["message"].startswith("GET /pools/a/engine/echo -> 200 (ok) in ")
    for doc in docs:
        assert (doc["pool_id"], doc["correlation_id"], doc["logger"]) == ("a", "cid-7", "poolmgr.proxy")
        assert doc["duration_ms"] >= doc["ttfb_ms"] > 0
    text = "\n".join(lines) + caplog.text
    assert TOKEN not in text and prompt not in text
