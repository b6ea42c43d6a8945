"""A request body streamed upstream as it arrives, made on the way to ask for its stream's usage.

A :class:`BodyInspector` holds a top-level ``"stream_options": null`` back in memory until the body
says whether it streams, the null to be replaced only if it does (the API refuses
``stream_options`` on a request that does not stream). A client may well say so last, after
megabytes of images: then what comes from the null on waits in a :class:`BodySpool` (on disk beyond
a megabyte, as long as the request body limit lets the body be), and the upstream gets none of it
until the null is decided. Only such a body pays for this; any other streams through as before.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Final

from llm_proxy.proxy.body_scan import OPTIONS_FOR_NULL, BodyInspector
from llm_proxy.proxy.body_spool import BodySpool

_NULL_BYTES: Final = len(b"null")


async def _passed(chunks: AsyncIterable[bytes], inspector: BodyInspector) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        yield inspector.feed(chunk)
    yield inspector.finish()


async def usage_asked(
    chunks: AsyncIterable[bytes], inspector: BodyInspector
) -> AsyncIterator[bytes]:
    """``chunks`` as ``inspector`` (made with ``inject_usage`` and ``defer_null``) lets them go,
    with a null it deferred held from its first byte until it is decided, then sent replaced or
    as it was."""
    held: BodySpool | None = None
    given = 0  # bytes the inspector let go so far
    try:
        async for passed in _passed(chunks, inspector):
            start, given = given, given + len(passed)
            if held is None and start <= inspector.null_at < given:
                # (A deferred null goes out whole in one piece, with what was held before it.)
                cut = inspector.null_at - start
                if cut:
                    yield passed[:cut]
                passed = passed[cut:]
                held = BodySpool()
            if held is None:
                if passed:
                    yield passed
                continue
            held.write(passed)
            if not inspector.null_pending:
                if inspector.null_replaced:
                    held.replace(0, _NULL_BYTES, OPTIONS_FOR_NULL)
                async for part in held:
                    yield part
                held = None
    finally:
        if held is not None:
            held.close()
