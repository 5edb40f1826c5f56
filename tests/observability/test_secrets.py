"""No secret — the API token, an engine's API key, the database password — reaches a log line, an audit row, an
error body or /metrics."""

from __future__ import annotations

import io
import json
import logging

import httpx

from poolmgr.observability.logs import JsonFormatter, TextFormatter, redact, register_settings_secrets
from poolmgr.poolsfile import PoolSpec
from poolmgr.settings import PoolManagerConfig

from ._stack import EngineFiles, captured_logs
from .conftest import StackFactory

TOKEN = "tok-Zq81vXk3-operator-secret"
ENGINE_KEY = "ek-77Hh2Lp9-engine-secret"
POOL = "obs-secret"


def test_no_token_or_engine_key_reaches_logs_audit_rows_error_bodies_or_metrics(
    stack_factory: StackFactory, engine_files: EngineFiles, sqlite_url: str
) -> None:
    keyed = PoolSpec(id=POOL, model=str(engine_files.model("good.gguf")), extra_args=("--api-key", ENGINE_KEY))
    plain = PoolSpec(id="obs-plain", model=str(engine_files.model("good.gguf")))
    bodies: list[str] = []
    with captured_logs() as logs:
        st = stack_factory(sqlite_url, [keyed, plain], POOL_MANAGERD_API_TOKEN=TOKEN)
        st.wait_state("obs-plain", "ready")
        # The keyed engine answers 401 to poolmgr's own readiness probes today (its preload fails, with the
        # engine's error in last_error and the audit row): either way no key may show anywhere.
        st.wait_for(POOL, lambda s: s["state"] in ("ready", "breaker-open"), "ready or breaker-open")
        scrape = st.scrape_until(  # engines are fetched in the background: once it has been, with the key
            lambda s: s.value("pool_engine_metrics_up", pool_id="obs-plain") == 1, "the plain engine fetched"
        )
        bodies += [scrape.text, st.http.get(f"/pools/{POOL}/status").text]

        anonymous = httpx.Client(base_url=str(st.http.base_url), timeout=10)
        for client, method, path, body in (
            (anonymous, "GET", "/pools", None),
            (anonymous, "POST", f"/pools/{POOL}/drain", {"deadline_ms": 10}),
            (st.http, "GET", "/pools/missing/status", None),
            (st.http, "POST", f"/pools/{POOL}/reload", {"model": ""}),
            (st.http, "POST", f"/pools/{POOL}/leases", {"ttl_s": -1}),
            (st.http, "POST", f"/pools/{POOL}/breaker/reset", None),
            (st.http, "GET", f"/pools/{POOL}/events", None),
            (st.http, "POST", "/pools/obs-plain/drain", {"deadline_ms": 10}),
        ):
            wrong = {"Authorization": f"Bearer {TOKEN}x"} if client is anonymous else {}
            resp = client.request(method, path, json=body, headers=wrong)
            assert (resp.status_code == 401) == (client is anonymous), resp.text
            bodies.append(resp.text)
        anonymous.close()
        st.wait_state("obs-plain", "stopped")
        # Anything that slips into a log call is caught on the way out.
        logging.getLogger("poolmgr.test").warning(
            "argv %s",
            ["--api-key", ENGINE_KEY],
            extra={"pool_id": POOL, "headers": {"Authorization": f"Bearer {TOKEN}"}},
        )
        lines = list(logs.lines)
    assert len(bodies) == 10 and any('"unauthorized"' in b for b in bodies) and any('"not_found"' in b for b in bodies)
    audit = json.dumps([e.to_json() for e in st.events()])
    assert POOL in audit and any("argv" in line for line in lines)
    for secret in (TOKEN, ENGINE_KEY):
        assert secret not in audit
        assert not [b for b in bodies if secret in b]
        assert not [line for line in lines if secret in line]
    assert any('"--api-key", "***"' in line or "***" in line for line in lines if "argv" in line)


def test_the_database_password_and_bearer_tokens_are_redacted_in_json_and_text_lines() -> None:
    register_settings_secrets(
        PoolManagerConfig(database_url="postgresql://poolmgr:pg-Secret-42@db.internal:5432/poolmgr", api_token=TOKEN)
    )
    url = "postgresql://poolmgr:pg-Secret-42@db.internal/x"
    record = logging.makeLogRecord(
        {"name": "poolmgr.test", "levelno": logging.ERROR, "levelname": "ERROR", "msg": "cannot reach %s with %s",
         "args": (url, f"Bearer {TOKEN}"), "pool_id": "p", "last_error": f"api_key={ENGINE_KEY}"}
    )  # fmt: skip
    as_json = json.loads(JsonFormatter().format(record))
    as_text = TextFormatter().format(record)
    for out in (json.dumps(as_json), as_text):
        assert "pg-Secret-42" not in out and TOKEN not in out and ENGINE_KEY not in out
    assert as_json["message"] == "cannot reach postgresql://poolmgr:***@db.internal/x with Bearer ***"
    assert as_json["last_error"] == "api_key=***" and as_json["pool_id"] == "p"
    assert redact("--api-key=abc --api-key-file /etc/k") == "--api-key=*** --api-key-file ***"


def test_a_log_line_is_json_even_when_a_redacted_value_sits_inside_it() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("poolmgr.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning('quote " and api_key=abc", brace }', extra={"detail": {"nested": ["api-key: x"]}})
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    doc = json.loads(stream.getvalue())
    assert doc["message"] == 'quote " and api_key=*** brace }'
    assert doc["detail"] == {"nested": ["api-key: ***"]}
    assert doc["level"] == "warning" and doc["logger"] == "poolmgr.test.json"
