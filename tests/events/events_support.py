"""Test support shared by tests/events and tests/dispatcher: a real redis-server, synthetic
exchanges.

The redis-server is started per test on a free port with a temporary directory and no persistence; a
missing binary is an error (the suite must fail, not skip, without it: `make test` installs it).
"""

from __future__ import annotations

import gzip
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from llm_proxy.proxy.exchange import CappedBuffer, Exchange
from tests.processes import free_port


class RedisServer:
    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        *,
        durable: bool = False,
        unix_socket: Path | None = None,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.binary = binary
        self.directory = directory
        self.port = port or free_port()
        # durable: every write is in the append-only file before Redis acknowledges it, so a
        # restart keeps the streams and consumer groups, as a production Redis would.
        self.durable = durable
        # Also listening on this Unix socket (whose path must be short: 107 bytes at most).
        self.unix_socket = unix_socket
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        unix = ["--unixsocket", str(self.unix_socket)] if self.unix_socket else []
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.durable else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
                *unix,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def capped(data: bytes, limit: int = 1 << 20, chunk: int = 7, tail_limit: int = 0) -> CappedBuffer:
    buffer = CappedBuffer(limit, tail_limit)
    for i in range(0, len(data), chunk):
        buffer.add(data[i : i + chunk])
    return buffer


def exchange(
    *,
    path: str = "/v1/chat/completions",
    request: Any = None,
    response: bytes = b"",
    status: int = 200,
    content_type: str = "application/json",
    content_encoding: str = "",
    request_limit: int = 1 << 20,
    response_limit: int = 1 << 20,
    response_tail_limit: int = 0,
    error: str | None = None,
    started_at: float | None = None,
) -> Exchange:
    body = (
        request
        if isinstance(request, bytes)
        else orjson.dumps(request)
        if request is not None
        else b""
    )
    start = time.perf_counter()
    return Exchange(
        request_id=f"req-{uuid.uuid4().hex[:12]}",
        started_at=started_at if started_at is not None else time.time(),
        started=start,
        method="POST",
        path=path,
        project_id="proj-1",
        token_id="tok-1",
        request_body=capped(body, request_limit),
        response_body=capped(response, response_limit, tail_limit=response_tail_limit),
        status=status,
        response_content_type=content_type,
        response_content_encoding=content_encoding,
        upstream_started=start + 0.001,
        upstream_headers_at=start + 0.010,
        first_byte_at=start + 0.012 if status else 0.0,
        ended=start + 0.050,
        error=error,
    )


CHUNK_HEAD = {
    "id": "chatcmpl-abc",
    "object": "chat.completion.chunk",
    "created": 1700000000,
    "model": "gpt-4o-mini-2024-07-18",
    "system_fingerprint": "fp_1",
}


def sse(*payloads: Any, done: bool = True) -> bytes:
    out = b"".join(b"data: " + orjson.dumps(p) + b"\n\n" for p in payloads)
    return out + (b"data: [DONE]\n\n" if done else b"")


def chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any
) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
    return {**CHUNK_HEAD, "choices": [choice], **extra}


def usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    return {**CHUNK_HEAD, "choices": [], "usage": usage}


def gz(data: bytes) -> bytes:
    return gzip.compress(data)
