"""The pipe between a server process and its events process (:mod:`llm_proxy.events.offload`).

Protocol, all on pipes to the server:

- stdin: frames of a 4-byte big-endian length and a pickle. The first frame is a :class:`Launch`,
  every later one a list of :meth:`Exchange.to_wire` tuples. End of input means drain and exit;
  so does the server's end (``runtime/parent_watch.py``), whatever else holds its end of the pipe.
- the status pipe (the process's original stdout; ``sys.stdout`` is pointed at stderr so that no
  stray print can corrupt it): one JSON object per line, each a status
  ``{"done": n, "waiting": {...}, "bus_reachable": bool, "metrics": "<Prometheus text>"}``, where
  ``done`` counts exchanges that became published events or counted drops (on the memory bus,
  events every in-process dispatcher finished with: until then they die with the process), and
  ``waiting`` is what the process would lose if it died now (``metrics.left_waiting``). The first
  line is the ready line, a status with ``"ready": true`` (or only ``{"error": "..."}``); then one
  every ``status_seconds`` and once more at exit; ``{"done": n, "waiting": {...}}`` each time
  ``done`` grows (a batch published, or dropped); and, as soon as a batch's settlement is done,
  ``{"settled": [[token_id, request_id], ...]}`` for its exchanges that settle a tpm window or a
  budget hold (settled, or never to be).
- stderr: the log, as configured for the server.
"""

from __future__ import annotations

import asyncio
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_proxy.events.config import EventsConfig
from llm_proxy.pricing import Prices

FRAME_HEADER = 4


@dataclass(frozen=True, slots=True)
class Launch:
    """What the events process needs to know; sent as the first frame (it may hold a Redis
    password, which must not appear on a command line)."""

    events: EventsConfig
    database_url: str = field(repr=False)  # may carry a password
    file_event_log: Path | None
    log_level: str
    log_format: str
    status_seconds: float = 1.0
    # The server's prices, and where to read them again on SIGHUP (which the server forwards).
    prices: Prices = field(default_factory=Prices)
    # The secrets the server was configured with: its logs mask them, and so must this one's.
    log_secrets: tuple[str, ...] = field(default=(), repr=False)


def frame(payload: object) -> bytes:
    data = pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(FRAME_HEADER, "big") + data


async def read_frame(reader: asyncio.StreamReader) -> Any | None:
    """The next frame's object, or None at the end of input."""
    sized = await read_sized_frame(reader)
    return None if sized is None else sized[0]


async def read_sized_frame(reader: asyncio.StreamReader) -> tuple[Any, int] | None:
    """The next frame's object and its size in bytes, or None at the end of input."""
    try:
        header = await reader.readexactly(FRAME_HEADER)
        data = await reader.readexactly(int.from_bytes(header, "big"))
    except asyncio.IncompleteReadError:
        return None
    return pickle.loads(data), len(data)
