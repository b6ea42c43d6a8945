"""Reading an upstream client's response body in tests: relayed, as the proxy handler reads it."""

from __future__ import annotations

from collections.abc import Callable

from llm_proxy.http.client import Http1Response


def keeping(chunks: list[bytes]) -> Callable[[bytes], bool]:
    """A relay sink that keeps what it is given and is never behind."""

    def sink(chunk: bytes) -> bool:
        chunks.append(chunk)
        return True

    return sink


async def never_behind() -> None:
    """The drain of a sink that never says it is behind."""
    raise AssertionError("the sink was never behind")


async def read_all(response: Http1Response) -> bytes:
    """The whole body, then the response closed (its connection pooled when it may be)."""
    chunks: list[bytes] = []
    try:
        await response.relay(keeping(chunks), never_behind)
    finally:
        await response.aclose()
    return b"".join(chunks)
