from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from events_support import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()
