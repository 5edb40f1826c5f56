"""Health probes of running engines at a bounded cost: one thread, one epoll set, one short HTTP/1.0 request per
engine per interval over a fresh connection, each engine at its own phase of the interval, sent in batches at
most 0.5 s (a quarter of the interval) apart: the thread wakes twice a batch (send; read the answers after a
10 ms settle), not twice a probe, and a thousand engines never probe at once. Not a kept-alive connection:
llama-server's HTTP library waits for the next request on an idle keep-alive connection by waking every 10 ms
(cpp-httplib's keep-alive check interval), 100 wake-ups a second per engine — far more than the probe it would
save. One probe is in flight per engine at a time; after one that timed out the next goes at once, so a hung
engine is found `threshold` x `timeout` after its first unanswered probe, which goes at most an interval and a
batch after it hung (refused or bad answers: one probe an interval).

The cadence is the caller's clock (`clock()`, monotonic seconds: the lifecycle's injected clock), the answer's
timeout is real time (it is the engine's I/O). Nothing is reported while an engine answers: only when
`threshold` probes in a row went unanswered, refused or not 200, `on_hung(text)` is called — once, from the
prober's thread (the caller hands it to its event loop). So a thousand healthy engines cost the probes alone:
no task wake-up, no database read or write, no thread hop per probe.
"""

from __future__ import annotations

import _socket
import contextlib
import errno
import heapq
import select
import socket
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

Address = tuple[str, int] | str  # (host, port) over TCP, or the path of a unix socket
_REQUEST = b"GET /health HTTP/1.0\r\nHost: engine\r\n\r\n"
_MIN_WAIT_S = 0.002  # the shortest wait for an answer's timeout
_SETTLE_S = 0.01  # after sending a batch, the wait before reading its answers
_BATCH_S = 0.5  # due probes are sent in batches this far apart at most (a quarter of the interval when shorter):
# a wake-up sends several and their answers come back together: two wake-ups a batch, not two a probe


@dataclass(eq=False)
class _Target:
    key: str
    address: Address
    on_hung: Callable[[str], None]
    due: float
    misses: int = 0
    sock: _socket.socket | None = None
    sent_at: float = 0.0  # real time the probe started (its timeout is I/O)
    buf: bytes = b""
    done: bool = False  # reported hung, or unwatched
    last_text: str = ""
    generation: int = 0
    connected: bool = field(default=False)


class HealthProber:
    def __init__(
        self,
        *,
        interval_s: float,
        timeout_s: float,
        threshold: int,
        clock: Callable[[], float] = time.monotonic,
        poll_s: float | None = None,
    ) -> None:
        """`clock`: the cadence's clock; a clock that moves only when told (a test's) needs `poll_s`, how often
        the thread looks at it. Without it the thread sleeps until the next probe is due."""
        self.interval_s = interval_s
        self._poll_s = poll_s
        self.timeout_s = timeout_s
        self.threshold = threshold
        self.clock = clock
        self._batch_s = min(_BATCH_S, interval_s / 4)
        self._settle_s = min(_SETTLE_S, timeout_s / 10)
        self._targets: dict[str, _Target] = {}
        self._by_fd: dict[int, _Target] = {}
        self._sent: list[_Target] = []  # connected and asked, not yet read nor in the epoll set
        self._heap: list[tuple[float, int, _Target]] = []
        self._seq = 0
        self._lock = threading.Lock()
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._epoll.register(self._wake_r.fileno(), select.EPOLLIN)
        self._closed = False
        self.probes_sent = 0
        self._thread = threading.Thread(target=self._run, name="health-prober", daemon=True)
        self._thread.start()

    # -- the caller's side ------------------------------------------------------------------------------
    def watch(self, key: str, address: Address, on_hung: Callable[[str], None]) -> None:
        """Probe `address` every interval from now on (first at a phase of the interval fixed by `key`)."""
        phase = (zlib.crc32(key.encode()) % 1000) / 1000.0 * self.interval_s
        target = _Target(key, address, on_hung, due=self.clock() + phase)
        with self._lock:
            old = self._targets.pop(key, None)
            if old is not None:
                old.done = True
            self._targets[key] = target
            self._push(target)
        self._wake()

    def unwatch(self, key: str) -> None:
        with self._lock:
            target = self._targets.pop(key, None)
            if target is not None:
                target.done = True
        self._wake()

    def watching(self) -> int:
        return len(self._targets)

    def close(self) -> None:
        self._closed = True
        self._wake()
        self._thread.join(timeout=5)
        for target in list(self._by_fd.values()):
            self._end_probe(target)
        self._epoll.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _push(self, target: _Target) -> None:
        self._seq += 1  # (the tie-breaker: targets do not compare)
        heapq.heappush(self._heap, (target.due, self._seq, target))

    # -- the prober's thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed:
            if self._send_due():
                time.sleep(self._settle_s)  # let the batch's answers arrive: one wake-up reads them all
                self._take_sent(read=True)
            wait = self._wait_s()
            self._take_sent(read=False)
            for fd, events in self._epoll.poll(wait):
                if fd == self._wake_r.fileno():
                    with contextlib.suppress(BlockingIOError):
                        self._wake_r.recv(4096)
                    continue
                target = self._by_fd.get(fd)
                if target is not None:
                    try:
                        self._on_event(target, events)
                    except OSError as exc:  # the thread never dies of one engine's socket
                        self._verdict(target, False, f"{type(exc).__name__}: {exc.strerror or exc}")

    def _wait_s(self) -> float:
        """Until the next probe is due or the oldest one in flight times out (expiring those that did first);
        -1: nothing to wait for but a wake-up."""
        if self._by_fd and time.monotonic() - min(t.sent_at for t in self._by_fd.values()) >= self.timeout_s:
            self._expire(time.monotonic())
        with self._lock:
            next_due = self._heap[0][0] if self._heap else None
        wait = -1.0 if next_due is None else max(self._batch_s, next_due - self.clock())
        if self._poll_s is not None:
            wait = self._poll_s if wait < 0 else min(wait, self._poll_s)
        if self._by_fd:
            left = min(t.sent_at for t in self._by_fd.values()) + self.timeout_s - time.monotonic()
            wait = max(_MIN_WAIT_S, left) if wait < 0 else max(_MIN_WAIT_S, min(wait, left))
        return wait

    def _send_due(self) -> int:
        """Start the probes that are due: how many."""
        now = self.clock()
        due: list[_Target] = []
        with self._lock:
            while self._heap and self._heap[0][0] <= now:
                target = heapq.heappop(self._heap)[2]
                if not target.done and self._targets.get(target.key) is target:  # (one entry per target)
                    due.append(target)
        for target in due:
            if target.sock is None:  # one probe in flight per engine at most
                self._start_probe(target)
            target.due = max(target.due + self.interval_s, now)  # no drift; never a catch-up burst
        with self._lock:
            for target in due:
                if not target.done:
                    self._push(target)
        return len(due)

    def _start_probe(self, target: _Target) -> None:
        family = socket.AF_UNIX if isinstance(target.address, str) else socket.AF_INET
        # the C socket type: socket.socket's Python-level wrapper costs more than the kernel's work on a probe
        sock = _socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        target.sock, target.buf, target.sent_at, target.connected = sock, b"", time.monotonic(), False
        self.probes_sent += 1
        err = sock.connect_ex(target.address)
        if err not in (0, errno.EINPROGRESS):
            self._verdict(target, False, f"connection refused: {errno.errorcode.get(err, str(err))}")
            return
        self._by_fd[sock.fileno()] = target
        # On a unix socket or loopback the connection is usually there at once: send now and wait only for the
        # answer (one wake-up a probe, not two).
        try:
            target.connected = sock.send(_REQUEST) == len(_REQUEST)
        except BlockingIOError:
            pass  # still connecting: EPOLLOUT says when
        except OSError as exc:
            self._verdict(target, False, f"connection refused: {exc.strerror or exc}")
            return
        if target.connected:
            self._sent.append(target)  # its answer is read after the batch's settle; epoll only if not there
        else:
            self._epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLOUT)

    def _take_sent(self, *, read: bool) -> None:
        """The probes sent since the last look: read their answers now (`read`), or wait for them with epoll."""
        sent, self._sent = self._sent, []
        for target in sent:
            try:
                if target.sock is not None and not (read and self._receive(target)):
                    self._epoll.register(target.sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            except OSError as exc:  # the thread never dies of one engine's socket
                self._verdict(target, False, f"{type(exc).__name__}: {exc.strerror or exc}")

    def _on_event(self, target: _Target, events: int) -> None:
        sock = target.sock
        if sock is None:
            return
        if events & select.EPOLLOUT and not target.connected:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._verdict(target, False, f"connection refused: {errno.errorcode.get(err, str(err))}")
                return
            target.connected = True
            sock.send(_REQUEST)
            self._epoll.modify(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            return
        if events & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
            self._receive(target)

    def _receive(self, target: _Target) -> bool:
        """Read what has come of the answer: whether the probe is over (False: the status line is not all there)."""
        assert target.sock is not None
        try:
            chunk = target.sock.recv(512)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._verdict(target, False, f"{type(exc).__name__}: {exc}")
            return True
        target.buf += chunk
        line, sep, _ = target.buf.partition(b"\r\n")
        if sep or not chunk:
            self._status_line(target, line)
            return True
        return False

    def _status_line(self, target: _Target, line: bytes) -> None:
        parts = line.split(b" ", 2)
        ok = len(parts) >= 2 and parts[1] == b"200"
        text = line.decode("latin-1", "replace") if line else "connection closed without an answer"
        self._verdict(target, ok, "ok" if ok else text)

    def _expire(self, now: float) -> None:
        for target in [t for t in self._by_fd.values() if now - t.sent_at >= self.timeout_s]:
            self._verdict(target, False, f"no answer within {self.timeout_s:g} s")
            if not target.done:  # it has been silent a whole timeout already: the next probe goes now, not at
                self._start_probe(target)  # its next slot (a hang is found after threshold x timeout)

    def _verdict(self, target: _Target, ok: bool, text: str) -> None:
        self._end_probe(target)
        if target.done:
            return
        target.last_text = text
        target.misses = 0 if ok else target.misses + 1
        if target.misses >= self.threshold:
            target.done = True
            with self._lock:
                if self._targets.get(target.key) is target:
                    del self._targets[target.key]
            target.on_hung(f"health check failed {target.misses} times in a row: {text}")

    def _end_probe(self, target: _Target) -> None:
        sock, target.sock = target.sock, None
        if sock is None:
            return
        self._by_fd.pop(sock.fileno(), None)
        sock.close()  # closing the (never duplicated) descriptor also takes it out of the epoll set


__all__ = ["Address", "HealthProber"]
