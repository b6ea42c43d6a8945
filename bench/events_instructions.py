"""User-space instructions per event of the events process, counted by valgrind's callgrind.

    .venv/bin/python bench/events_instructions.py [--events N] [CHECKOUT ...]

Runs ``python -m llm_proxy.runtime.events_process`` of each CHECKOUT (default: this one; another
checkout's code, this side of the pipe included, runs on this one's .venv through PYTHONPATH)
under callgrind, as the server starts it: the memory bus, usage aggregation into SQLite, the
prices of ``config/prices.yaml``. It sends the process exchanges shaped like the bench's chat
request through its pipe, in frames of 256 as the server's hand-off does; after 1,000 of them as
a warm-up, it counts the instructions from the next frame until the usage dispatcher has
delivered all N (the status line's metrics), divided by N. Frames, building, the bus, the settler
and the dispatcher are all in the count; the kernel is not. Unlike CPU time on a shared VM (see
``cpu_per_request.sh``), the count repeats to within a percent, so a cut of a few percent shows
in one run. Needs valgrind (apt-get install valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

from llm_proxy.events.config import EventsConfig
from llm_proxy.events.pipe import Launch, frame
from llm_proxy.pricing import load_prices
from llm_proxy.proxy.exchange import CappedBuffer, Exchange
from llm_proxy.runtime.app import EVENTS_PROCESS
from llm_proxy.store.opening import open_store

HERE = Path(__file__).resolve().parent.parent
REQUEST = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
)
RESPONSE = (
    b'{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
    b'"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant",'
    b'"content":"Hello from the mock."},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":5,"total_tokens":17},'
    b'"system_fingerprint":"fp_bench"}'
)
FRAME = 256
WARM_UP = 1000
_DELIVERED = re.compile(r'^llm_proxy_dispatcher_delivered_total\{[^}]*"usage"[^}]*\} (\S+)$', re.M)


UPSTREAM_KEY = b"sk-proj-" + b"k" * 156  # as long as the project keys OpenAI issues


def chat_exchange(serial: int) -> Exchange:
    request, response = CappedBuffer(65536), CappedBuffer(65536)
    request.add(REQUEST)
    response.add(RESPONSE)
    started = time.perf_counter()
    exchange = Exchange(
        f"{serial:032x}",
        time.time(),
        started,
        "POST",
        "/v1/chat/completions",
        "proj-bench",
        f"tok-bench-{serial % 50}",  # tallies of 50 tokens, as many clients would make
        request,
        response,
    )
    exchange.status = 200
    exchange.response_content_type = "application/json"
    exchange.upstream_started = started + 0.00002
    exchange.upstream_headers_at = exchange.first_byte_at = started + 0.00005
    exchange.ended = started + 0.00006
    # The server hands every answer's event the project's key to mask (an upstream may echo it).
    exchange.upstream_key_to_mask = UPSTREAM_KEY
    return exchange


def frames(first: int, count: int) -> bytes:
    serials = range(first, first + count)
    return b"".join(
        frame([chat_exchange(s).to_wire() for s in serials[i : i + FRAME]])
        for i in range(0, count, FRAME)
    )


class Status(threading.Thread):
    """Reads the status pipe as it comes (the process blocks when its lines are not read) and
    keeps how many events the usage dispatcher has delivered."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        super().__init__(daemon=True)
        assert process.stdout is not None
        self._lines = process.stdout
        self.ready = threading.Event()
        self.delivered = 0.0
        self.ended = False

    def run(self) -> None:
        while line := self._lines.readline():
            status = orjson.loads(line)
            if status.get("ready"):
                self.ready.set()
            found = _DELIVERED.search(status.get("metrics") or "")
            if found:
                self.delivered = float(found.group(1))
        self.ended = True
        self.ready.set()

    def wait_delivered(self, at_least: int) -> None:
        while self.delivered < at_least:
            if self.ended:
                raise SystemExit("the events process ended early")
            time.sleep(0.05)


def count(checkout: Path, events: int) -> float:
    with tempfile.TemporaryDirectory(prefix="events-instructions-") as scratch:
        return _count_in(checkout, events, Path(scratch))


# Under callgrind the program runs ~50 times slower, so the events process's timed hand-back
# (``SLICE_NS`` in events/courtesy.py) would come after nearly every item: the slice is scaled by
# as much, so that hand-backs come as often per unit of work as they do natively.
SLOWER_UNDER_CALLGRIND = 50
_LAUNCHER = (
    "import runpy\n"
    "from llm_proxy.events import courtesy\n"
    "if hasattr(courtesy, 'SLICE_NS'):\n"
    f"    courtesy.SLICE_NS *= {SLOWER_UNDER_CALLGRIND}\n"
    f"runpy.run_module({EVENTS_PROCESS!r}, run_name='__main__', alter_sys=True)\n"
)


def _count_in(checkout: Path, events: int, data: Path) -> float:
    url = f"sqlite:///{data}/proxy.db"
    asyncio.run(_migrate(url))  # the server migrates before it starts the events process
    launch = Launch(
        events=EventsConfig(data_dir=data),
        database_url=url,
        file_event_log=None,
        log_level="warning",
        log_format="json",
        # Each status line renders the metrics page: rarely, as it is no event's work (under
        # callgrind a second is ~50 times less work than outside it).
        status_seconds=5.0,
        prices=load_prices(checkout / "config" / "prices.yaml"),
    )
    out = data / "callgrind.out"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    process = subprocess.Popen(
        [*valgrind, sys.executable, "-c", _LAUNCHER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(checkout)},
        cwd=data,
    )
    assert process.stdin is not None
    status = Status(process)
    status.start()
    process.stdin.write(frame(launch))
    process.stdin.flush()
    status.ready.wait()
    if status.ended:
        raise SystemExit("the events process did not start")
    process.stdin.write(frames(0, WARM_UP))
    process.stdin.flush()
    status.wait_delivered(WARM_UP)
    # Framed before counting: the server's work, not the process's.
    measured = frames(WARM_UP, events)
    instrument = ["callgrind_control", "-i"]
    subprocess.run([*instrument, "on", str(process.pid)], check=True, capture_output=True)
    process.stdin.write(measured)
    process.stdin.flush()
    status.wait_delivered(WARM_UP + events)
    subprocess.run([*instrument, "off", str(process.pid)], check=True, capture_output=True)
    process.stdin.close()
    process.wait(120)
    totals = [
        int(line.split()[1])
        for path in data.glob("callgrind.out*")
        for line in path.read_text().splitlines()
        if line.startswith("totals:")
    ]
    return sum(totals) / events


async def _migrate(url: str) -> None:
    await (await open_store(url, pool_size=1, migrate=True)).close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--here", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("checkouts", nargs="*", type=Path, default=[HERE])
    arguments = parser.parse_args()
    if arguments.here:  # counting one checkout, in a process that imports its code
        print(count(arguments.checkouts[0], arguments.events))
        return
    for checkout in arguments.checkouts:
        # The launch frame and the exchanges are pickled with the counted checkout's own classes:
        # a field that one checkout's EventsConfig has and the other's lacks would otherwise
        # arrive in the wrong place and change what is counted.
        counted = subprocess.run(
            [sys.executable, __file__, "--here", "--events", str(arguments.events), checkout],
            env={**os.environ, "PYTHONPATH": str(checkout.resolve())},
            capture_output=True,
            text=True,
            check=True,
        )
        per_event = float(counted.stdout.split()[-1])
        print(f"{checkout}: {per_event:,.0f} instructions per event")


if __name__ == "__main__":
    main()
