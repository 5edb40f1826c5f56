"""The engine side of the data plane's HTTP/1.1: answers framed by Content-Length, chunks or the connection's end,
arriving in any pieces."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poolmgr.api._upstream import EngineBroken, Exchange, Head


class _Writer:
    def close(self) -> None:
        pass


async def _answer(pieces: list[bytes], method: bytes = b"GET") -> tuple[Head, list[bytes]]:
    reader = asyncio.StreamReader()
    exchange = Exchange(reader, cast(Any, _Writer()))

    async def feed() -> None:
        for piece in pieces:
            reader.feed_data(piece)
            await asyncio.sleep(0)
        reader.feed_eof()

    feeding = asyncio.ensure_future(feed())
    try:
        head = await exchange.read_head(method)
        body = []
        while not exchange.done:
            body.append(await exchange.read())
        return head, body
    finally:
        await feeding


def answer(pieces: list[bytes], method: bytes = b"GET") -> tuple[Head, list[bytes]]:
    return asyncio.run(_answer(pieces, method))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if data[a:b]]


def chunked(chunks: list[bytes], trailers: bytes = b"") -> bytes:
    return b"".join(b"%x;ext=1\r\n%b\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n" + trailers + b"\r\n"


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(st.binary(min_size=0, max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=12),
    trailers=st.sampled_from([b"", b"X-Checksum: 1\r\n"]),
)
def test_a_chunked_answer_in_any_pieces_gives_its_data_in_order(
    chunks: list[bytes], cuts: list[int], trailers: bytes
) -> None:
    head, body = answer(split(HEAD + chunked(chunks, trailers), cuts))
    assert head.status == 200 and (b"content-type", b"text/event-stream") in head.headers
    assert b"".join(body) == b"".join(chunks)


def test_chunks_that_arrived_together_go_on_as_one_piece() -> None:
    _, body = answer([HEAD + chunked([b"data: 1\n\n", b"data: 2\n\n"]) + b"trailing garbage is never read"])
    assert body == [b"data: 1\n\ndata: 2\n\n"]


def test_a_content_length_answer_ends_with_its_last_byte() -> None:
    _, body = answer([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", b"lo"])
    assert b"".join(body) == b"hello"


def test_an_answer_without_length_runs_to_the_connections_end() -> None:
    _, body = answer([b"HTTP/1.1 200 OK\r\n\r\nall ", b"of it"])
    assert b"".join(body) == b"all of it"


@pytest.mark.parametrize(("status", "method"), [(204, b"GET"), (304, b"GET"), (200, b"HEAD")])
def test_answers_that_have_no_body(status: int, method: bytes) -> None:
    head, body = answer([b"HTTP/1.1 %d X\r\nContent-Length: 12\r\n\r\n" % status], method)
    assert head.status == status and body == []


def test_an_interim_100_continue_is_skipped() -> None:
    head, body = answer([b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"])
    assert head.status == 201 and body == [b"ok"]


@pytest.mark.parametrize(
    ("pieces", "why"),
    [
        ([b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"], "4 bytes before its end"),
        ([HEAD + b"5\r\nhello\r\n"], "before its last chunk"),
        ([HEAD + b"zz\r\n"], "ValueError"),
        ([b"SSH-2.0-OpenSSH\r\n\r\n"], "not HTTP/1.1"),
        ([b"HTTP/1.1 200 OK\r\n"], "before answering"),
    ],
)
def test_a_broken_answer_is_engine_broken(pieces: list[bytes], why: str) -> None:
    with pytest.raises(EngineBroken, match=why):
        answer(pieces)
