from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from moto.server import ThreadedMotoServer

from tests.dispatcher.aws import moto_auth, moto_post, writer_keys


@pytest.fixture
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    # moto keeps its state per process, not per server: start every test from nothing.
    moto_post(url, "/moto-api/reset")
    yield url
    server.stop()


@pytest.fixture
async def keys(moto_url: str) -> AsyncIterator[list[dict[str, str]]]:
    """Two access keys of an IAM user that may write logs, with moto checking every request's
    credentials until the test ends."""
    created = await writer_keys(moto_url)
    moto_auth(moto_url, "0")
    try:
        yield created
    finally:
        moto_auth(moto_url, "inf")
