"""Latency of requests that come one at a time with a pause between them, as a quiet proxy sees them.

    python3 bench/quiet_latency.py [--pause-ms 5] [--requests 400] [--rounds 3] [--stream]
        [--split] [--like-probe] NAME=PORT:TOKEN ...

The harness's c=1 column sends each request the moment the last answer arrived, so every request
finds the proxy's code and data still in the CPU's caches. Most proxies see traffic with gaps,
in which other processes run and the caches turn over; the first request after a pause runs
several times slower (bench/README.md, "The first request after a pause"). Each target gets
``--requests`` sequential requests on one keep-alive connection (raw sockets, so that the client
adds little), ``--pause-ms`` apart, in ``--rounds`` rounds (the reference first, the others in
turn, their order reversed every other round); printed per round: the
median time from sending a request to its complete answer (``--stream``: to its first SSE
``data:`` line), and the proxy's own part before the upstream when its ``Server-Timing`` says.
The first target is the reference (direct to the upstream): the others' ``+`` column is their
median less its median in the same round.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import time

_PROXY_DUR = re.compile(rb"proxy;dur=([0-9.]+)")


def _probe_request(token: str) -> bytes:
    """The request the harness's stream probe sends, byte for byte (aiohttp 3.14.5, one write)."""
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": 64,
            "messages": [{"role": "user", "content": "Count to twenty."}],
        }
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\n"
        b"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        b"Accept-Encoding: gzip, deflate\r\nUser-Agent: Python/3.11 aiohttp/3.14.5\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


def _request(token: str, stream: bool) -> bytes:
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream else {}),
            "messages": [{"role": "user", "content": "Say hello."}],
        }
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )


def _answered(buffer: bytes, stream: bool) -> bool:
    if stream:
        return buffer.endswith(b"0\r\n\r\n") and b"[DONE]" in buffer
    head, sep, body = buffer.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length: *(\d+)", head)
    return bool(sep and match and len(body) >= int(match[1]))


def measure(
    port: int,
    token: str,
    count: int,
    pause: float,
    stream: bool,
    split: bool = False,
    like_probe: bool = False,
) -> tuple[float, float]:
    """Median latency and median proxy part (NaN without Server-Timing), in milliseconds. With
    ``split`` the head and the body go in two writes; with ``like_probe`` the request is the
    harness's stream probe's."""
    request = _probe_request(token) if like_probe else _request(token, stream)
    head, _, body = request.partition(b"\r\n\r\n")
    pieces = [head + b"\r\n\r\n", body] if split else [request]
    latencies: list[float] = []
    proxy_parts: list[float] = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for n in range(count + 3):  # three to open the connection and warm the path
            time.sleep(pause)
            sent = time.perf_counter_ns()
            for piece in pieces:
                sock.sendall(piece)
            buffer = b""
            first = 0
            while not _answered(buffer, stream):
                data = sock.recv(65536)
                if not data:
                    raise SystemExit(f"port {port} closed the connection")
                buffer += data
                if not first and (not stream or b"data:" in buffer):
                    first = time.perf_counter_ns()
            if not buffer.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"port {port} answered {buffer[:200]!r}")
            if n >= 3:
                latencies.append((first - sent) / 1e6)
                part = _PROXY_DUR.search(buffer)
                if part:
                    proxy_parts.append(float(part[1]))
    median_part = statistics.median(proxy_parts) if proxy_parts else float("nan")
    return statistics.median(latencies), median_part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="+", help="NAME=PORT:TOKEN; the first is the reference")
    parser.add_argument("--pause-ms", type=float, default=5.0)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream", action="store_true", help="time to the first data: line")
    parser.add_argument("--split", action="store_true", help="head and body in two writes")
    parser.add_argument("--like-probe", action="store_true", help="the harness probe's request")
    args = parser.parse_args()
    targets = []
    for spec in args.targets:
        name, _, rest = spec.partition("=")
        port, _, token = rest.partition(":")
        targets.append((name, int(port), token))
    print(f"pause {args.pause_ms} ms, {args.requests} requests per target and round")
    for round_ in range(1, args.rounds + 1):
        # The others in turn, in the opposite order every other round: a host that warms up or
        # slows down during the run favours none of them.
        order = targets[1:] if round_ % 2 else targets[:0:-1]
        measured = {}
        for name, port, token in [targets[0], *order]:
            measured[name] = measure(
                port,
                token,
                args.requests,
                args.pause_ms / 1000,
                args.stream,
                args.split,
                args.like_probe,
            )
        figures = [(name, *measured[name]) for name, _, _ in targets]
        reference = figures[0][1]
        cells = [
            f"{name} {latency:.3f}"
            + (f" (+{latency - reference:.3f})" if i else "")
            + (f" proxy {part:.3f}" if part == part else "")
            for i, (name, latency, part) in enumerate(figures)
        ]
        print(f"round {round_}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
