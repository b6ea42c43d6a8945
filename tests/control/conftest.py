"""What the CLI tests share: a mock upstream and a real server process per module, and an
environment without the product's variables."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import (
    PRODUCT_VARIABLES,
    MockUpstream,
    ServerProcess,
    start_mock_upstream,
    start_server,
    write_api_config,
)


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockUpstream]:
    mock = start_mock_upstream(tmp_path_factory.mktemp("mock"))
    yield mock
    mock.process.stop()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, upstream: MockUpstream
) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("proxy")
    api_config = write_api_config(root / "api_providers.yaml", upstream.base_url)
    started = start_server(root / "data", api_config, root / "logs")
    yield started
    started.stop()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in PRODUCT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # `manage` falls back on ./data/management_token: a checkout's own data/ must not answer.
    monkeypatch.chdir(tmp_path)
