"""Upstream error answers in a content coding, read whole and decoded so that the project's key
can be masked in them (SPEC §6) before the client sees them.

The relay masks the key in an error answer's bytes as they pass; in a compressed one the key is not
in the bytes to be found. Such an answer is small (an error message), so it is read whole, within
:data:`CODED_ERROR_LIMIT`, and decoded; one that cannot be (a coding not decodable here, a corrupt
or cut body, or one over the limit) is refused as the upstream's failure, never relayed with the key
possibly in it. Successful answers never come here: they pass as they came.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from llm_proxy import errors
from llm_proxy.content_coding import codings, decode
from llm_proxy.http.upstream import UpstreamResponse

# Compressed and decoded alike: an error message is a few hundred bytes; a larger one is no error
# message a client needs word for word, and a bound stops a decompression bomb.
CODED_ERROR_LIMIT = 1024 * 1024
# Decoded on the event loop, where a compressed error message is, without a thread hop: a short
# body in one gzip or deflate coding (deflate expands at most about a thousandfold, so even a bomb
# this short is a brief pause). Everything else is decoded in a worker thread, as it could stall
# every other client of the process: a long body of many blocks or frames, several codings, and
# brotli or zstd of any length (a few dozen bytes can have brotli fill a large window, or zstd
# decode a whole block, before the limit is looked at).
_ON_THE_LOOP_BYTES = 512
_ON_THE_LOOP_CODINGS = frozenset({"gzip", "x-gzip", "deflate"})


def content_coding(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The answer's codings, every Content-Encoding field's in order (two fields are one list)."""
    return ", ".join(
        value.decode("latin-1") for name, value in headers if name.lower() == b"content-encoding"
    )


async def whole_body(upstream: UpstreamResponse, status: int) -> bytes:
    """The answer's body as it came, or the upstream's failure once it grows over the limit."""
    body = upstream.complete_body()
    if body is None:
        parts: list[bytes] = []
        size = 0

        def keep(chunk: bytes) -> bool:
            nonlocal size
            parts.append(chunk)
            size += len(chunk)
            return size <= CODED_ERROR_LIMIT  # False: relay() waits on too_long(), which raises

        async def too_long() -> None:
            raise _refusal(status, "is too long to be read")

        await upstream.relay(keep, too_long)
        body = b"".join(parts)
    if len(body) > CODED_ERROR_LIMIT:
        raise _refusal(status, "is too long to be read")
    return body


async def decoded(body: bytes, coding: str, status: int) -> bytes:
    """``body`` with its content ``coding`` undone, or the upstream's failure when it cannot be."""
    if _quick_to_decode(body, coding):
        result = decode(body, coding, truncated=False, limit=CODED_ERROR_LIMIT)
    else:
        result = await asyncio.to_thread(
            decode, body, coding, truncated=False, limit=CODED_ERROR_LIMIT
        )
    if result.data is None:
        # (Its coding is not named: the message is the client's, and the field the upstream's.)
        raise _refusal(status, "is in a content coding the proxy could not decode")
    if result.truncated:
        raise _refusal(status, "is cut short, or too long once decoded")
    return result.data


def _quick_to_decode(body: bytes, coding: str) -> bool:
    if len(body) > _ON_THE_LOOP_BYTES:
        return False
    applied = [c for c in codings(coding) if c != "identity"]
    return len(applied) == 1 and applied[0] in _ON_THE_LOOP_CODINGS


def _refusal(status: int, why: str) -> errors.UpstreamUnavailable:
    return errors.UpstreamUnavailable(
        f"The upstream's error answer (HTTP {status}) {why}; it is not relayed, since it may quote"
        " the project's key."
    )
