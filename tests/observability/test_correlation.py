"""X-Correlation-Id: accepted (validated) on every request, generated when absent, returned, and carried into
the log lines and audit rows of the work the request started (drain, reload, preload)."""

from __future__ import annotations

import re

from poolmgr.poolsfile import PoolSpec

from ._stack import EngineFiles, Stack, captured_logs
from .conftest import StackFactory

POOL = "obs-corr"


def _post(st: Stack, path: str, cid: str, body: dict[str, object] | None = None) -> dict[str, object]:
    resp = st.http.post(path, json=body, headers={"X-Correlation-Id": cid})
    assert resp.status_code == 202, resp.text
    assert resp.headers["x-correlation-id"] == cid
    assert resp.json()["correlation_id"] == cid
    return dict(resp.json())


def test_a_drain_reload_and_preload_carry_the_callers_correlation_id_into_logs_and_audit_rows(
    stack_factory: StackFactory, engine_files: EngineFiles, sqlite_url: str
) -> None:
    good = str(engine_files.model("good.gguf"))
    with captured_logs() as logs:
        st = stack_factory(sqlite_url, [PoolSpec(id=POOL, model=good)])
        st.wait_state(POOL, "ready")

        _post(st, f"/pools/{POOL}/reload", "reload-7f3a", {"model": str(engine_files.model("next.gguf"))})
        st.wait_event(POOL, lambda e: e.kind == "preload_ok" and e.correlation_id == "reload-7f3a", "reload done")
        _post(st, f"/pools/{POOL}/drain", "drain-1c2d", {"deadline_ms": 5000})
        st.wait_state(POOL, "stopped")
        _post(st, f"/pools/{POOL}/preload", "preload-9e8f")
        st.wait_event(POOL, lambda e: e.kind == "preload_ok" and e.correlation_id == "preload-9e8f", "preloaded")

        rows = {(e.kind, e.correlation_id) for e in st.events(POOL)}
        assert {("reload_requested", "reload-7f3a"), ("drained", "reload-7f3a"), ("preload_ok", "reload-7f3a")} <= rows
        assert {("drain", "drain-1c2d"), ("drained", "drain-1c2d")} <= rows
        assert {("preload_requested", "preload-9e8f"), ("preload_ok", "preload-9e8f")} <= rows

        for cid, message in (
            ("reload-7f3a", f"pool {POOL} drained"),
            ("reload-7f3a", f"pool {POOL} ready at "),
            ("drain-1c2d", f"pool {POOL} drained"),
            ("preload-9e8f", f"pool {POOL}: engine spawned"),
            ("preload-9e8f", f"pool {POOL} ready at "),
        ):
            line = logs.wait_for(
                lambda r, c=cid, m=message: r.get("correlation_id") == c and str(r["message"]).startswith(m),
                f"{message!r} with correlation id {cid}",
            )
            assert line["pool_id"] == POOL and line["engine"] == "llamacpp"


def test_a_request_without_a_correlation_id_gets_one_and_a_malformed_one_is_refused(
    stack_factory: StackFactory, engine_files: EngineFiles, sqlite_url: str
) -> None:
    st = stack_factory(sqlite_url, [PoolSpec(id=POOL, model=str(engine_files.model("good.gguf")))])
    generated = st.http.get(f"/pools/{POOL}/status").headers["x-correlation-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", generated)
    assert st.http.get(f"/pools/{POOL}/status").headers["x-correlation-id"] != generated
    echoed = st.http.get("/pools/nope/status", headers={"X-Correlation-Id": "ab.c:1-2_3"})
    assert echoed.status_code == 404 and echoed.headers["x-correlation-id"] == "ab.c:1-2_3"
    for bad in ("has space", "x" * 129, "semi;colon"):
        resp = st.http.post(f"/pools/{POOL}/drain", json={}, headers={"X-Correlation-Id": bad})
        assert resp.status_code == 400
        assert "X-Correlation-Id" in resp.json()["error"]["message"]
    assert not any(e.kind in ("drain", "stop_requested") for e in st.events(POOL))  # nothing was started
