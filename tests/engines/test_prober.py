"""The health prober (engines.HealthProber) against real sockets: a healthy engine is probed once per interval and
never reported; a silent, refusing or failing one is reported once after `threshold` misses; the cadence is the
given clock's, and a unix socket works like TCP."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from poolmgr.engines import HealthProber


class _Health(BaseHTTPRequestHandler):
    status = 200
    hits: list[float] = []

    def do_GET(self) -> None:
        type(self).hits.append(time.monotonic())
        body = b'{"status":"ok"}' if self.status == 200 else b'{"error":{"message":"Loading model"}}'
        self.send_response(self.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    handler = type("Handler", (_Health,), {"status": 200, "hits": []})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _until(pred: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_healthy_engine_is_probed_each_interval_and_never_reported(server: ThreadingHTTPServer) -> None:
    reported: list[str] = []
    prober = HealthProber(interval_s=0.05, timeout_s=0.5, threshold=2)
    try:
        prober.watch("ok", server.server_address[:2], reported.append)  # type: ignore[arg-type]
        time.sleep(0.6)
    finally:
        prober.close()
    hits = server.RequestHandlerClass.hits  # type: ignore[attr-defined]
    assert 8 <= len(hits) <= 14 and reported == []  # ~12 in 0.6 s at one per 50 ms: no burst, no drift


def test_an_engine_answering_503_is_reported_once_after_the_threshold(server: ThreadingHTTPServer) -> None:
    server.RequestHandlerClass.status = 503  # type: ignore[attr-defined]
    reported: list[str] = []
    prober = HealthProber(interval_s=0.05, timeout_s=0.5, threshold=3)
    try:
        prober.watch("loading", server.server_address[:2], reported.append)  # type: ignore[arg-type]
        assert _until(lambda: bool(reported), 2)
        time.sleep(0.3)
    finally:
        prober.close()
    assert reported == ["health check failed 3 times in a row: HTTP/1.0 503 Service Unavailable"]
    assert prober.watching() == 0


def test_a_silent_engine_is_reported_after_threshold_timeouts() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        reported: list[str] = []
        prober = HealthProber(interval_s=0.05, timeout_s=0.1, threshold=3)
        started = time.monotonic()
        try:
            prober.watch("hung", silent.getsockname(), reported.append)
            assert _until(lambda: bool(reported), 3)
        finally:
            prober.close()
    assert reported == ["health check failed 3 times in a row: no answer within 0.1 s"]
    assert 0.3 <= time.monotonic() - started < 1.5


def test_after_a_timed_out_probe_the_next_goes_at_once_not_at_the_next_interval() -> None:
    """A long interval does not slow hang detection: the engine has already been silent a whole timeout, so the
    next probe goes then — found after threshold x timeout (0.6 s), not threshold x (interval + timeout)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        reported: list[str] = []
        prober = HealthProber(interval_s=5.0, timeout_s=0.2, threshold=3)
        try:
            prober.watch("hung", silent.getsockname(), reported.append)  # first probe within the first interval
            first = time.monotonic()
            assert _until(lambda: prober.probes_sent >= 1, 6)
            sent_at = time.monotonic()
            assert _until(lambda: bool(reported), 3)
            found = time.monotonic()
        finally:
            prober.close()
    assert reported == ["health check failed 3 times in a row: no answer within 0.2 s"]
    assert prober.probes_sent == 3
    assert 0.5 <= found - sent_at < 1.5, (found - sent_at, sent_at - first)


def test_a_refusing_engine_is_reported_and_an_unwatched_one_never() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()  # nothing listens there once this socket is closed
    reported: list[str] = []
    prober = HealthProber(interval_s=0.02, timeout_s=0.5, threshold=2)
    try:
        prober.watch("gone", closed, reported.append)
        prober.watch("dropped", closed, lambda text: reported.append("dropped: " + text))
        prober.unwatch("dropped")
        assert _until(lambda: bool(reported), 2)
        time.sleep(0.2)
    finally:
        prober.close()
    assert len(reported) == 1 and reported[0].startswith("health check failed 2 times in a row: connection refused")


def test_probes_follow_the_given_clock_not_the_wall(server: ThreadingHTTPServer) -> None:
    now = [100.0]
    prober = HealthProber(interval_s=10.0, timeout_s=0.5, threshold=2, clock=lambda: now[0], poll_s=0.05)
    hits = server.RequestHandlerClass.hits  # type: ignore[attr-defined]
    try:
        prober.watch("p", server.server_address[:2], lambda text: None)  # type: ignore[arg-type]
        now[0] += 10.0  # past the first probe's phase
        assert _until(lambda: len(hits) == 1, 2)
        time.sleep(0.3)  # wall time passes, the clock does not: no probe
        assert len(hits) == 1
        for n in (2, 3):
            now[0] += 10.0
            assert _until(lambda n=n: len(hits) == n, 2)  # type: ignore[misc]
    finally:
        prober.close()


@contextlib.contextmanager
def _unix_engine(path: Path, answer: Callable[[socket.socket], None]) -> Iterator[None]:
    """An engine on a unix socket: each connection is handed to `answer` (in a thread) until the block ends."""
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(path))
        srv.listen(8)

        def serve() -> None:
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:  # the block is over: its socket shut down
                    return
                with conn, contextlib.suppress(OSError):  # (the prober may close first: close())
                    answer(conn)

        threading.Thread(target=serve, daemon=True).start()
        try:
            yield
        finally:
            srv.shutdown(socket.SHUT_RDWR)  # wakes the serving thread's accept: it returns


def test_a_unix_socket_engine_is_probed_like_a_tcp_one(tmp_path: Path) -> None:
    hits: list[bytes] = []

    def answer(conn: socket.socket) -> None:
        hits.append(conn.recv(1024))
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    reported: list[str] = []
    with _unix_engine(tmp_path / "engine.sock", answer):
        prober = HealthProber(interval_s=0.05, timeout_s=0.5, threshold=2)
        try:
            prober.watch("u", str(tmp_path / "engine.sock"), reported.append)
            assert _until(lambda: len(hits) == 3, 2)
        finally:
            prober.close()
    assert reported == [] and hits[0].startswith(b"GET /health HTTP/1.0\r\n")


def test_an_answer_in_pieces_is_read_whole_and_close_ends_the_probes_in_flight(tmp_path: Path) -> None:
    """An engine slower than the batch's settle: the status line arrives in two pieces, 50 ms apart; the probe
    waits for the rest (epoll) and counts it healthy. Closing the prober with a probe in flight ends it."""
    served: list[int] = []

    def answer(conn: socket.socket) -> None:
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 2")
        time.sleep(0.05)
        conn.sendall(b"00 OK\r\nContent-Length: 2\r\n\r\nok")
        served.append(1)

    reported: list[str] = []
    with _unix_engine(tmp_path / "engine.sock", answer):
        prober = HealthProber(interval_s=0.2, timeout_s=5.0, threshold=1)
        prober.watch("slow", str(tmp_path / "engine.sock"), reported.append)
        assert _until(lambda: len(served) >= 3, 5)
        time.sleep(0.1)
        assert reported == []  # each split answer was read whole: 200, never a miss (threshold 1)
        with socket.socket(socket.AF_UNIX) as silent_srv:  # a silent engine: its probe stays in flight
            silent = tmp_path / "silent.sock"
            silent_srv.bind(str(silent))
            silent_srv.listen(8)
            prober.watch("silent", str(silent), reported.append)
            assert _until(lambda: prober.probes_sent >= 4, 2)
            prober.close()  # ends the probe in flight (its socket closed), reports nothing
    assert reported == []
