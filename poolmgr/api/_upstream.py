"""One HTTP/1.1 exchange with an engine over its unix socket: a lean client on asyncio streams.

httpx costs ~1 ms a request on the 2-core test machine (its own connection pool, anyio, the request and response
models), as much as the whole budget of the data plane; this costs ~0.1 ms. It has one peer (llama-server's
cpp-httplib) and one job: write the request as it comes, read the answer as it comes. Each exchange has a
connection of its own, closed after it (`Connection: close`): llama-server has few HTTP threads, and an idle
kept connection holds one — it would starve the health prober and the next client.

    exchange = await Exchange.open(path, timeout_s=1.0)   # EngineUnreachable if nothing listens there
    exchange.send_head(b"POST", b"/completion", headers, length=len(body)); exchange.send(body)
    head = await exchange.read_head()                     # EngineBroken if the engine closed without an answer
    while not exchange.done: chunk = await exchange.read()
    exchange.close()
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

_READ = 65536
_LIMIT = 256 * 1024  # the longest response head (status line and headers) accepted
_NO_BODY = frozenset({204, 304})
Headers = list[tuple[bytes, bytes]]


class EngineUnreachable(Exception):
    """Nothing accepts connections on the engine's socket (no file, refused, or no answer to connect in time)."""


class EngineBroken(Exception):
    """The engine closed the connection or answered something that is not HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class Head:
    status: int
    headers: Headers  # names in lower case, as received


class Exchange:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._chunked_up = False
        self._left: int | None = None  # body bytes still to read when the answer has a Content-Length
        self._chunked = False
        self._buf = bytearray()  # chunked answer: bytes read and not decoded yet
        self._need: int | None = None  # chunked answer: bytes left of the current chunk, its CRLF included
        self._trailers = False  # chunked answer: the last chunk was read, trailers follow
        self.done = False  # the answer's body was read to its end

    @classmethod
    async def open(cls, path: str, *, timeout_s: float) -> Exchange:
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_unix_connection(path, limit=_LIMIT)
        except (OSError, TimeoutError) as exc:
            why = "no answer to connect" if isinstance(exc, TimeoutError) else exc.strerror or str(exc)
            raise EngineUnreachable(f"the engine's socket {path} does not answer: {why}") from None
        return cls(reader, writer)

    # -- the request ------------------------------------------------------------------------------------------
    def send_head(self, method: bytes, target: bytes, headers: Iterable[tuple[bytes, bytes]], *,
                  length: int | None, body: bytes = b"") -> None:  # fmt: skip
        """The request line and headers (and `body`, when it is all there is): `length` None with a body to come
        sends it chunked."""
        parts = [method, b" ", target, b" HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if length is None:
            self._chunked_up = True
            parts.append(b"transfer-encoding: chunked\r\n")
        elif length or method not in (b"GET", b"HEAD", b"DELETE", b"OPTIONS"):
            parts += (b"content-length: ", str(length).encode(), b"\r\n")
        parts += (b"\r\n", body)
        self._writer.write(b"".join(parts))

    async def send(self, data: bytes) -> None:
        if self._chunked_up:
            if not data:
                return
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._writer.write(data)
        await self._writer.drain()

    async def end(self) -> None:
        if self._chunked_up:
            self._writer.write(b"0\r\n\r\n")
            await self._writer.drain()

    # -- the answer -------------------------------------------------------------------------------------------
    async def read_head(self, method: bytes) -> Head:
        try:
            while True:
                raw = await self._reader.readuntil(b"\r\n\r\n")
                head = _parse_head(raw)
                if not 100 <= head.status < 200:
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError) as exc:
            raise EngineBroken(f"the engine closed the connection before answering ({type(exc).__name__})") from None
        self._frame(head, method)
        return head

    def _frame(self, head: Head, method: bytes) -> None:
        if method == b"HEAD" or head.status in _NO_BODY:
            self.done = True
            return
        for name, value in head.headers:
            if name == b"transfer-encoding" and value.strip().lower().endswith(b"chunked"):
                self._chunked = True
                return
            if name == b"content-length":
                try:
                    self._left = int(value)
                except ValueError:
                    raise EngineBroken(f"the engine sent a bad Content-Length: {value!r}") from None
                self.done = self._left == 0
        # neither: the body runs until the engine closes the connection

    async def read(self) -> bytes:
        """The next piece of the answer's body: what has arrived (`done` once it is the last). A chunked answer
        is decoded from whatever is buffered, so several events that arrived together go on as one piece."""
        try:
            if self._chunked:
                return await self._read_chunked()
            data = await self._reader.read(_READ if self._left is None else min(self._left, _READ))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError, ValueError) as exc:
            raise EngineBroken(f"the engine's answer broke off ({type(exc).__name__})") from None
        if self._left is not None:
            if not data:
                raise EngineBroken(f"the engine's answer broke off {self._left} bytes before its end")
            self._left -= len(data)
            self.done = self._left == 0
        elif not data:
            self.done = True
        return data

    async def _read_chunked(self) -> bytes:
        while True:
            data = self._decode()
            if data or self.done:
                return data
            more = await self._reader.read(_READ)
            if not more:
                raise EngineBroken("the engine's chunked answer broke off before its last chunk")
            self._buf += more

    def _decode(self) -> bytes:
        """The chunk data in the buffer (whole chunks, and the start of one still arriving); `done` at the end."""
        buf, out = self._buf, []
        while buf:
            if self._trailers:  # after the last chunk: trailers (not passed on) up to an empty line
                if buf.startswith(b"\r\n") or b"\r\n\r\n" in buf:
                    self.done = True
                    buf.clear()
                break
            if self._need is None:
                if not self._chunk_size(buf):
                    break
                continue
            take = min(len(buf), self._need - 2)
            if take > 0:
                out.append(bytes(buf[:take]))
                del buf[:take]
                self._need -= take
            if self._need == 2 and len(buf) >= 2:  # the chunk's closing CRLF
                del buf[:2]
                self._need = None
            elif take == 0:
                break
        return b"".join(out)

    def _chunk_size(self, buf: bytearray) -> bool:
        """Read a chunk-size line off `buf` (False: not all there yet)."""
        end = buf.find(b"\r\n")
        if end < 0:
            return False
        size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
        del buf[: end + 2]
        if size:
            self._need = size + 2
        else:
            self._trailers = True
        return True

    def close(self) -> None:
        """Close the connection (llama-server stops a generation whose client went away)."""
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._writer.close()


def _parse_head(raw: bytes) -> Head:
    lines = raw[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code = rest[:3]
    if not version.startswith(b"HTTP/1.") or not code.isdigit():
        raise EngineBroken(f"the engine's answer is not HTTP/1.1: {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise EngineBroken(f"the engine sent a malformed header line: {line[:80]!r}")
        headers.append((name.strip().lower(), value.strip()))
    return Head(int(code), headers)


__all__ = ["EngineBroken", "EngineUnreachable", "Exchange", "Head", "Headers"]
