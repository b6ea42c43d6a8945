"""Waiting for what the proxy does off the request path: event-log lines and usage aggregates."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from tests.conftest import Proxy


async def wait_for_lines(path: Path, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The JSON lines of ``path`` once there are ``count`` of them (or the deadline passed).

    Only complete lines count: the file log may be writing the next one as this reads."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        lines = text[: text.rfind("\n") + 1].splitlines()
        if len(lines) >= count or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        await asyncio.sleep(0.05)


async def wait_for_usage(
    proxy: Proxy, path: str, requests: int, timeout: float = 10.0
) -> dict[str, Any]:
    """The ``usage`` of ``GET /manage{path}`` once it counts ``requests`` (or the deadline passed)."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = await proxy.manage("GET", path)
        assert status == 200, body
        usage: dict[str, Any] = body["usage"]
        if usage["requests"] >= requests or time.monotonic() > deadline:
            return usage
        await asyncio.sleep(0.05)
