"""Engine metrics: a llama-server's own /metrics (llamacpp:*) re-exposed with a pool_id label."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from poolmgr.engines._install import resolve_llama_server
from poolmgr.engines.tiny_model import write_tiny_model
from poolmgr.errors import EngineError
from poolmgr.observability._engines import EngineScraper, engine_api_keys, merge, relabel, target_for
from poolmgr.poolsfile import PoolSpec

from ._stack import FAKE_ENGINE, EngineFiles, Scrape
from .conftest import StackFactory

RECORDED = Path(__file__).parent / "fixtures" / "llama-server-b11434-metrics.txt"


def _expose(families: list[Metric]) -> Scrape:
    class _Fixed:
        def collect(self) -> Iterator[Metric]:
            yield from families

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Fixed())  # type: ignore[arg-type]
    return Scrape(generate_latest(reg).decode())


def test_a_recorded_llama_server_scrape_is_re_exposed_with_the_pool_label_and_the_engines_names() -> None:
    text = RECORDED.read_text()
    pairs = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    own = {name: float(value) for name, value in pairs}
    exposed = _expose(relabel(text, "tiny"))
    names = {s.name for s in exposed.samples}
    assert names == set(own)  # every engine name kept as is: llamacpp:n_tokens_max too (typed counter upstream)
    for name, value in own.items():
        assert exposed.value(name, pool_id="tiny") == value
    assert exposed.type_of("llamacpp:prompt_tokens") == "counter"
    assert exposed.type_of("llamacpp:requests_processing") == "gauge"
    assert exposed.type_of("llamacpp:n_tokens_max") == "unknown"


def test_only_llamacpp_families_pass_and_two_pools_share_one_family() -> None:
    text = (
        "# TYPE pool_slots_total gauge\npool_slots_total 99\n"
        '# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing{slot="0",pool_id="evil"} 2\n'
    )
    merged = merge([relabel(text, "a"), relabel(text.replace(" 2\n", " 5\n"), "b")])
    scrape = _expose(merged)
    assert [f.name for f in merged] == ["llamacpp:requests_processing"]
    assert scrape.value("llamacpp:requests_processing", pool_id="a", slot="0") == 2
    assert scrape.value("llamacpp:requests_processing", pool_id="b", slot="0") == 5
    assert (
        scrape.series("pool_slots_total") == [] and scrape.series("llamacpp:requests_processing", pool_id="evil") == []
    )


def test_engine_api_keys_come_from_the_flag_the_inline_flag_or_the_key_file(tmp_path: Path) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text("from-file-1\n\nfrom-file-2\n")
    spec = PoolSpec(
        id="k", model="/m.gguf",
        extra_args=("--temp", "0", "--api-key", "k1,k2", "--api-key=k3", "--api-key-file", str(keyfile)),
    )  # fmt: skip
    assert engine_api_keys(spec) == ["k1", "k2", "k3", "from-file-1", "from-file-2"]
    keyed = target_for("k", "http://h:9200/pools/k/engine/", spec, socket_path="/s/work/k/engine.sock")
    assert keyed.headers == {"Authorization": "Bearer k1"}
    assert (keyed.base_url, keyed.socket_path) == ("http://h:9200/pools/k/engine", "/s/work/k/engine.sock")
    plain = target_for("k", "http://h:9200/pools/k/engine", PoolSpec(id="k", model="/m"), socket_path="/s/k.sock")
    assert plain.headers == {}
    assert engine_api_keys(PoolSpec(id="k", model="/m", extra_args=("--api-key-file", "/nonexistent"))) == []


def _on_socket(sock: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://engine", trust_env=False)


@pytest.fixture
def keyed_engine(engine_files: EngineFiles) -> Iterator[str]:
    """The fake llama-server guarding its routes with an API key (as `--api-key` makes the real one do), on a
    unix socket as poolmgr runs engines: the socket's path once it serves."""
    model = engine_files.model("good.gguf")
    sock = os.path.join(tempfile.mkdtemp(prefix="keyed.", dir=engine_files.root), "engine.sock")
    proc = subprocess.Popen(
        ["/usr/bin/python3", str(FAKE_ENGINE), "-m", str(model), "--host", sock, "--metrics", "--api-key", "sk-1"],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with _on_socket(sock) as client:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/health").status_code == 200:
                        break
                time.sleep(0.02)
            else:
                raise AssertionError("the fake engine did not start")
        yield sock
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_scrape_presents_the_pools_engine_key_and_marks_a_refused_engine_down(keyed_engine: str) -> None:
    keyed = PoolSpec(id="keyed", model="/m", extra_args=("--api-key", "sk-1"))
    endpoint = "http://127.0.0.1:9200/pools/{}/engine"  # the registry's: never dialled, the socket is
    scraper = EngineScraper(timeout_s=2.0)
    try:
        families, up = scraper.scrape([target_for("keyed", endpoint.format("keyed"), keyed, socket_path=keyed_engine)])
        nokey = PoolSpec(id="nokey", model="/m")
        _, refused = scraper.scrape([target_for("nokey", endpoint.format("nokey"), nokey, socket_path=keyed_engine)])
    finally:
        scraper.close()
    assert up == {"keyed": True} and refused == {"nokey": False}
    assert _expose(families).value("llamacpp:requests_processing", pool_id="keyed") == 0
    with _on_socket(keyed_engine) as client:
        assert client.get("/metrics").status_code == 401


@pytest.mark.e2e
def test_a_real_llama_server_pools_metrics_are_re_exposed(
    stack_factory: StackFactory, engine_files: EngineFiles, sqlite_url: str
) -> None:
    try:
        binary = resolve_llama_server(os.environ.get("POOL_MANAGERD_LLAMA_SERVER", ""))
    except EngineError as exc:
        if os.environ.get("POOLMGR_TEST_E2E", "") == "required":
            pytest.fail(f"end-to-end tests are required (POOLMGR_TEST_E2E=required) but: {exc}")
        pytest.skip(f"no llama-server: {exc}")
    model = write_tiny_model(engine_files.root / "tiny-real.gguf")
    model.chmod(0o644)
    st = stack_factory(sqlite_url, [PoolSpec(id="obs-real", model=str(model))], POOL_MANAGERD_LLAMA_SERVER=binary)
    st.wait_state("obs-real", "ready", timeout=60)
    done = st.http.post("/pools/obs-real/engine/completion", json={"prompt": "hello", "n_predict": 4})
    assert done.status_code == 200  # through the data plane: an engine is re-fetched once it answered requests
    with st.engine("obs-real") as engine:
        own = {f.name: f for f in text_string_to_metric_families(engine.get("/metrics").text)}
    predicted = own["llamacpp:tokens_predicted"].samples[0].value
    assert predicted >= 4
    scrape = st.scrape_until(  # fetched in the background: a later fetch has the completion's tokens
        lambda s: s.value("llamacpp:tokens_predicted_total", pool_id="obs-real") == predicted, "the new tokens"
    )
    assert scrape.value("llamacpp:tokens_predicted_total", pool_id="obs-real") == predicted
    assert scrape.value("llamacpp:n_tokens_max", pool_id="obs-real") is not None
    assert scrape.value("pool_engine_metrics_up", pool_id="obs-real") == 1
