"""Workers' pages over their private unix sockets: served, fetched, and left out when a worker
does not answer."""

from __future__ import annotations

import functools
import socket
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import Metric

from llm_proxy.runtime.settings import SettingsError
from llm_proxy.runtime.worker_metrics import (
    FETCH_SECONDS,
    WorkerPeers,
    prepare_sockets,
    socket_path,
)

COUNT = 3


def page_counting(requests: int) -> bytes:
    registry = CollectorRegistry()
    Counter("requests", "Requests.", registry=registry).inc(requests)
    return generate_latest(registry)


@pytest.fixture
async def serving(tmp_path: Path) -> AsyncIterator[list[WorkerPeers]]:
    """Workers 0 and 1 of three, serving pages that count 10 and 11 requests; 2 never started."""
    prepare_sockets(tmp_path, COUNT)
    peers = [WorkerPeers(tmp_path, n, COUNT) for n in range(2)]
    for n, peer in enumerate(peers):
        await peer.serve(functools.partial(page_counting, 10 + n))
    yield peers
    for peer in peers:
        await peer.close()


def requests_of(pages: list[list[Metric]]) -> list[float]:
    return [
        sample.value
        for families in pages
        for family in families
        for sample in family.samples
        if sample.name == "requests_total"
    ]


async def test_a_worker_fetches_every_sibling_that_answers(serving: list[WorkerPeers]) -> None:
    first, second = serving

    # Worker 2 has no socket and has served no page: nothing of it to add.
    pages, answered = await first.gather()
    assert (requests_of(pages), answered) == ([11.0], 1)
    pages, answered = await second.gather()
    assert (requests_of(pages), answered) == ([10.0], 1)


async def test_sockets_are_private_to_the_owner(tmp_path: Path, serving: list[WorkerPeers]) -> None:
    directory = socket_path(tmp_path, 0).parent
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for n in range(2):
        assert stat.S_IMODE(socket_path(tmp_path, n).stat().st_mode) == 0o600


async def test_a_stalled_sibling_is_left_out_after_the_fetch_timeout(
    tmp_path: Path, serving: list[WorkerPeers]
) -> None:
    # Worker 2 listens but never answers, as a worker whose loop is stuck would.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stalled:
        stalled.bind(str(socket_path(tmp_path, 2)))
        stalled.listen()
        started = time.monotonic()
        pages, answered = await serving[0].gather()
        elapsed = time.monotonic() - started

    assert (requests_of(pages), answered) == ([11.0], 1)
    assert FETCH_SECONDS <= elapsed < FETCH_SECONDS + 1.0


async def test_a_closed_worker_removes_its_socket(
    tmp_path: Path, serving: list[WorkerPeers]
) -> None:
    await serving[1].close()

    assert not socket_path(tmp_path, 1).exists()
    pages, answered = await serving[0].gather()
    assert (requests_of(pages), answered) == ([], 0)


def test_a_data_dir_too_long_for_a_unix_socket_is_refused_naming_data_dir(
    tmp_path: Path,
) -> None:
    with pytest.raises(SettingsError, match=r"^DATA_DIR: .* too long"):
        prepare_sockets(tmp_path / ("d" * 120), 2)
