"""Node.js applications: the openai npm package and fetch, unchanged, against the real proxy."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import Proxy

pytestmark = pytest.mark.process

CLIENTS = Path(__file__).resolve().parents[1] / "node" / "clients.mjs"


async def test_the_node_sdk_and_fetch_work_unchanged_with_20_mb_bodies(proxy: Proxy) -> None:
    node = shutil.which("node")
    assert node is not None, "node is installed by scripts/ensure-services.sh (make test)"
    token = await proxy.token()
    quota_token = await proxy.token(max_requests=1)
    process = await asyncio.create_subprocess_exec(
        node,
        str(CLIENTS),
        proxy.base_url + "/v1",
        token,
        quota_token,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 50)
    assert process.returncode == 0, err.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    # A 20 MB vision request streamed back, the usage chunk the proxy asked for hidden from it.
    assert result["vision"]["chunks"] > 1 and result["vision"]["usageChunks"] == 0
    assert result["vision"]["content"].startswith("Hello")
    # fetch with a ReadableStream body sends it chunked; it is forwarded whole.
    assert result["chunked"] == {"status": 200, "done": True}
    assert len(proxy.upstream.requests[1].body) > 20_000_000
    # One attempt on a hopeless refusal, though the client allows two retries.
    assert result["quota"] == {
        "refused": True,
        "status": 429,
        "code": "quota_exceeded",
        "attempts": 2,
    }
