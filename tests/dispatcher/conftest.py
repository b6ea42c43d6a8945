from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The redis-server and exchange helpers live with the events tests; share them rather than copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "events"))

from events_support import RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()
