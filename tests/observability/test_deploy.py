"""deploy/: the Prometheus alert rules and the Grafana dashboard name only metrics poolmgr exposes, parse, and
(with promtool installed: Debian package `prometheus`) pass `promtool check` and the rules' unit tests."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from poolmgr.devices import FakeNvmlBackend, discover
from poolmgr.observability._engines import relabel
from poolmgr.observability.metrics import MetricsEndpoint, PoolMetricsCollector
from poolmgr.poolsfile import PoolSpec
from poolmgr.store import Registry

from ._stack import H100_SNAPSHOT, Scrape

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "prometheus" / "poolmgr-alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "poolmgr-alerts.test.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "poolmgr-dashboard.json"
ENGINE_RECORDING = Path(__file__).parent / "fixtures" / "llama-server-b11434-metrics.txt"
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*[{\[]")


@pytest.fixture(scope="module")
def exposed_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every sample name a poolmgr with one pool and one GPU exposes, engine metrics included."""
    from poolmgr.store import migrate

    url = f"sqlite:///{tmp_path_factory.mktemp('deploy') / 'db.sqlite'}"
    migrate(url)
    registry = Registry(url, node_id="n")
    registry.register(PoolSpec(id="p", model="/m.gguf"))
    inventory = discover(FakeNvmlBackend(H100_SNAPSHOT), warn=False)
    endpoint = MetricsEndpoint(PoolMetricsCollector(registry, node_id="n", inventory=lambda: inventory))
    try:
        text = endpoint()[0].decode()
    finally:
        endpoint.close()
        registry.close()
    names = {s.name for s in Scrape(text).samples}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):  # families with no sample yet
        names |= {name + suffix for suffix in ("_bucket", "_count", "_sum")} if kind == "histogram" else {name}
    return names | {s.name for fam in relabel(ENGINE_RECORDING.read_text(), "p") for s in fam.samples}


def _metrics_in(expr: str) -> set[str]:
    """Metric names of the selectors in a PromQL expression (a name followed by `{` or `[`)."""
    return set(_SELECTOR.findall(expr))


def _dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_every_alert_and_dashboard_query_names_a_metric_poolmgr_exposes(exposed_names: set[str]) -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [r["expr"] for r in rules] + _dashboard_exprs(dashboard)
    used = set().union(*(_metrics_in(e) for e in exprs))
    assert {"circuit_breaker_state", "restart_storm_total", "pool_ready", "device_vram_free_bytes"} <= used
    missing = {n for n in used if n not in exposed_names}
    assert not missing, f"queries name metrics poolmgr does not expose: {sorted(missing)}"
    assert {r["alert"] for r in rules} >= {
        "PoolmgrCircuitBreakerOpen", "PoolmgrRestartStorm", "PoolmgrPoolNotReady", "PoolmgrVramNearlyFull",
        "PoolmgrEngineOomKilled", "PoolmgrGpuLost",
    }  # fmt: skip
    # What needs a person pages (critical), the same events the daemon logs at critical.
    severity = {r["alert"]: r["labels"]["severity"] for r in rules}
    for name in ("PoolmgrCircuitBreakerOpen", "PoolmgrRestartStorm", "PoolmgrEngineOomKilled", "PoolmgrGpuLost"):
        assert severity[name] == "critical", name
    assert dashboard["uid"] and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(p.get("targets") for p in dashboard["panels"] if p["type"] != "row")


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    return found


def _run(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_promtool_accepts_the_rules_and_config_and_the_rule_unit_tests_pass() -> None:
    promtool = _promtool()
    assert "SUCCESS: 7 rules found" in _run(promtool, "check", "rules", str(RULES))
    assert "SUCCESS" in _run(promtool, "test", "rules", str(RULE_TESTS))
    assert "is valid prometheus config file syntax" in _run(promtool, "check", "config", str(PROM_CONFIG))


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    promtool = _promtool()
    exprs = _dashboard_exprs(json.loads(DASHBOARD.read_text()))
    grafana_vars = {"$__rate_interval": "5m", "$pool": ".*"}
    rules = []
    for n, expr in enumerate(exprs):
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        rules.append({"record": f"dashboard:query_{n}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert f"SUCCESS: {len(exprs)} rules found" in _run(promtool, "check", "rules", str(path))
