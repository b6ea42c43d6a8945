"""A body streamed upstream with a ``"stream_options": null`` replaced however late it streams;
the spool that holds the rest meanwhile reads back with the null's bytes replaced."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from llm_proxy.proxy.body_scan import OPTIONS_FOR_NULL, OPTIONS_HOLD_LIMIT, BodyInspector
from llm_proxy.proxy.body_spool import MEMORY_BYTES, BodySpool
from llm_proxy.proxy.usage_asked import usage_asked

STREAM_TRUE = b'"stream":true'


def late_body(padding: int, stream: bytes) -> bytes:
    content = b"x" * padding
    return b'{"stream_options":null,"messages":[{"content":"%s"}],"stream":%s}' % (content, stream)


async def _chunks(body: bytes, size: int, seen: list[int]) -> AsyncIterator[bytes]:
    for at in range(0, len(body), size):
        seen.append(at + size)
        yield body[at : at + size]


async def sent(body: bytes, size: int) -> tuple[list[tuple[int, bytes]], BodyInspector]:
    """What goes upstream, each piece with how much of the body had arrived when it went."""
    arrived: list[int] = []
    inspector = BodyInspector(inject_usage=True, defer_null=True)
    pieces = [
        (min(arrived[-1], len(body)), piece)
        async for piece in usage_asked(_chunks(body, size, arrived), inspector)
    ]
    return pieces, inspector


@pytest.mark.parametrize(
    ("size", "padding"),
    [
        (size, padding)
        for size in (1, 4096, 65_536, 1 << 20, 1 << 30)
        for padding in (OPTIONS_HOLD_LIMIT, 3 * MEMORY_BYTES)
        if size > 1 or padding == OPTIONS_HOLD_LIMIT  # (byte by byte: through one hold's worth)
    ],
)
async def test_a_null_is_replaced_when_the_stream_true_comes_after_the_hold_limit(
    size: int, padding: int
) -> None:
    body = late_body(padding, b"true")
    null = body.index(b"null")
    pieces, inspector = await sent(body, size)
    assert b"".join(piece for _, piece in pieces) == (
        body[:null] + OPTIONS_FOR_NULL + body[null + 4 :]
    )
    assert inspector.usage_injected
    # Nothing from the null on went upstream before the body said it streams.
    before = b"".join(piece for arrived, piece in pieces if arrived < body.index(STREAM_TRUE) + 13)
    assert len(before) <= null


@pytest.mark.parametrize("stream", [b"false", b"null"])
async def test_a_null_of_a_body_that_does_not_stream_goes_as_it_came(stream: bytes) -> None:
    body = late_body(3 * MEMORY_BYTES, stream)
    pieces, inspector = await sent(body, 65_536)
    assert b"".join(piece for _, piece in pieces) == body and not inspector.usage_injected


async def test_a_body_without_null_options_streams_as_it_arrives() -> None:
    body = b'{"messages":[{"content":"%s"}],"stream":true}' % (b"x" * 300_000)
    pieces, _ = await sent(body, 4096)
    # Each chunk goes on as it arrives (bar the final brace, before which the options go).
    total = 0
    for arrived, piece in pieces[:-1]:
        total += len(piece)
        assert arrived - total <= 1


async def read(spool: BodySpool) -> bytes:
    return b"".join([chunk async for chunk in spool])


@pytest.mark.parametrize(
    "pieces", [[b"ab", b"cd", b"ef"], [b"abcdef"], [bytes([c]) for c in b"abcdef"]]
)
@pytest.mark.parametrize("at", range(0, 3))
async def test_a_spool_reads_back_with_bytes_replaced_across_its_chunks(
    pieces: Sequence[bytes], at: int
) -> None:
    spool = BodySpool()
    for piece in pieces:
        spool.write(piece)
    spool.replace(at, 4, b"XYZXYZ")
    assert spool.size == 8
    body = b"abcdef"
    assert await read(spool) == body[:at] + b"XYZXYZ" + body[at + 4 :]


async def test_a_spool_on_disk_reads_back_with_bytes_replaced_across_its_reads() -> None:
    body = bytes(range(256)) * (3 * MEMORY_BYTES // 256)
    spool = BodySpool()
    for start in range(0, len(body), 100_000):
        spool.write(body[start : start + 100_000])
    at = 256 * 1024 - 2  # across the boundary of two reads from the file
    spool.replace(at, 4, OPTIONS_FOR_NULL)
    assert spool.size == len(body) + len(OPTIONS_FOR_NULL) - 4
    assert await read(spool) == body[:at] + OPTIONS_FOR_NULL + body[at + 4 :]
