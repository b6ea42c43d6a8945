"""The request line, against the real server over real sockets: what llhttp would let through
and nginx refuses is answered 400 and never reaches the upstream; HTTP/1.0 and HTTP/1.1 lines are
served wherever they come on a connection.

One leniency stays: llhttp reads ``RTSP/1.0`` (and ``ICE/1.0`` after SOURCE) as HTTP/1.0 and
httptools does not say which protocol a line named. Telling them apart from the raw bytes cost
~1 % more instructions per request (bench/instructions_per_request.sh), for no gain in safety:
the proxy writes its own request line, ``HTTP/1.1``, to the upstream.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conftest import Proxy
from tests.http.test_smuggling import LIMITS, exchange


@pytest.fixture
async def armed(proxy_factory: Any) -> tuple[Proxy, bytes]:
    proxy: Proxy = await proxy_factory(site=LIMITS)
    return proxy, f"Authorization: Bearer {await proxy.token()}\r\n".encode()


def statuses(answer: bytes) -> list[int]:
    return [int(part[:3]) for part in answer.split(b"HTTP/1.1 ")[1:]]


def _get(line: bytes, auth: bytes) -> bytes:
    return line + b"\r\nHost: t\r\n" + auth + b"\r\n"


def _requests(before: bytes) -> int:
    return 1 if before.startswith((b"GET", b"POST")) else 0


_POSTED = b"POST /v1/files/upload HTTP/1.1\r\nHost: t\r\n"
# Where a request line may begin: what comes before it on the connection, in the same read.
BEFORE = {
    "first": lambda auth: b"",
    "after line breaks": lambda auth: b"\r\n\r\n",
    "pipelined": lambda auth: _get(b"GET /v1/models HTTP/1.1", auth),
    "after a body": lambda auth: _POSTED + auth + b"Content-Length: 5\r\n\r\nhello",
    "after a chunked body": lambda auth: (
        _POSTED + auth + b"Transfer-Encoding: chunked\r\n\r\n5;x=1\r\nhello\r\n0\r\nT: 1\r\n\r\n"
    ),
}


@pytest.mark.parametrize(
    ("target", "forwarded"),
    [
        (b"http://upstream/v1/models?limit=2", "/v1/models?limit=2"),
        (b"HTTPS://upstream:443/v1/models", "/v1/models"),
        (b"http://[::1]:8080/v1/models", "/v1/models"),
        (b"http://upstream?x=1", "/?x=1"),
    ],
)
async def test_an_absolute_form_target_with_a_host_is_served_by_its_path(
    armed: tuple[Proxy, bytes], target: bytes, forwarded: str
) -> None:
    proxy, auth = armed
    await exchange(proxy, _get(b"GET " + target + b" HTTP/1.1", auth + b"Connection: close\r\n"))
    await asyncio.sleep(0.05)
    assert [seen.path_qs for seen in proxy.upstream.requests] == (
        [forwarded] if forwarded.startswith("/v1/") else []
    )


@pytest.mark.parametrize("before", list(BEFORE))
async def test_an_http_request_line_is_served_wherever_it_comes(
    armed: tuple[Proxy, bytes], before: str
) -> None:
    proxy, auth = armed
    first = BEFORE[before](auth)
    lines = [b"GET /v1/models HTTP/1.1", b"GET  /v1/models  HTTP/1.0", b"GET /health HTTP/1.1"]
    answer = await exchange(
        proxy, first + b"".join(_get(line, auth) for line in lines[:-1]) + _get(lines[-1], b"")
    )
    earlier = _requests(first)
    # The HTTP/1.0 request closes the connection after its answer (no keep-alive asked for).
    assert statuses(answer) == [200] * (earlier + 2), answer[-300:]


# Probed against llhttp's leniencies: each is refused (400) by the parser or the policy, as nginx
# refuses it, and none reaches the upstream.
REFUSED = {
    "method in lower case": b"get /v1/models HTTP/1.1",
    "an RTSP method over HTTP": b"DESCRIBE /v1/models HTTP/1.1",
    "PRI outside the preface": b"PRI /v1/models HTTP/1.1",
    "the HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM",
    "authority form": b"GET upstream:443 HTTP/1.1",
    "asterisk form for OPTIONS": b"OPTIONS * HTTP/1.1",
    "empty target": b"GET  HTTP/1.1",
    "no protocol (HTTP/0.9)": b"GET /v1/models",
    "NUL in the target": b"GET /v1/mo\x00dels HTTP/1.1",
    "a control byte in the target": b"GET /v1/mo\x01dels HTTP/1.1",
    "DEL in the target": b"GET /v1/mo\x7fdels HTTP/1.1",
    "a tab in the target": b"GET /v1/mo\tdels HTTP/1.1",
    "a tab after the method": b"GET\t/v1/models HTTP/1.1",
    "a space before the method": b" GET /v1/models HTTP/1.1",
    "protocol in lower case": b"GET /v1/models http/1.1",
    "HTTP/1.10": b"GET /v1/models HTTP/1.10",
    "HTTP/01.1": b"GET /v1/models HTTP/01.1",
    "a space after the version": b"GET /v1/models HTTP/1.1 ",
    "whitespace before the first field": b"GET /v1/models HTTP/1.1\r\n X: y",
    "a tab before the first field": b"GET /v1/models HTTP/1.1\r\n\tX: y",
    "userinfo in an absolute target": b"GET http://user:secret@upstream/v1/models HTTP/1.1",
    "an absolute target without a host": b"GET http:///v1/models HTTP/1.1",
    "an absolute target's fragment": b"GET http://upstream#/v1/models HTTP/1.1",
}


@pytest.mark.parametrize("line", list(REFUSED.values()), ids=list(REFUSED))
async def test_other_leniencies_of_the_parser_are_refused(
    armed: tuple[Proxy, bytes], line: bytes
) -> None:
    proxy, auth = armed
    answer = await exchange(proxy, _get(line, auth))
    assert statuses(answer) == [400], answer[:300]
    await asyncio.sleep(0.05)
    assert proxy.upstream.requests == []
