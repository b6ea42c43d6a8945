#!/usr/bin/env python3
"""floorplus: the pure-Python floor plus llm-proxy's per-request guarantees, at their cheapest.

A lab anchor for the performance issue (bench/README.md, "sixth step"). It answers one question:
what does the least Python that keeps the proxy's per-request guarantees cost, against the floor
(``../shared/bench/anchors/pyfloor.py``, which it extends)? It is written for that and nothing
else: callbacks only (no task, no future, no await per request), one upstream, one token, no
store, no limits, and errors answered with a bare JSON body. Not a server to run.

On top of the floor, per request: the head timers and size limit; the framing policy of
``llm_proxy/http/policy.py`` (one Host, Transfer-Encoding only ``chunked``, digits in
Content-Length, no fragment or encoded control character in the target, the control-path test,
field sorting with dropped names and their ``_`` spellings); the token's SHA-256 looked up in a
cache, with its expiry; the path's canonical-form test and allowlist; the method check; a request
id, sent upstream as X-Request-ID; the response field filter; LLM-Proxy-Request-ID, X-Request-ID
and Server-Timing to the client; captures of both bodies; an exchange record, handed off once per
loop iteration as one pickled batch written to a file descriptor; metrics folded from the batch.

``FLOORPLUS_WITHOUT`` (comma-separated: events, hash, ids, policy, timers, capture) leaves parts
out, to price them one by one with ``bench/instructions_per_request.sh``.

  floorplus.py --port 18098 --upstream http://127.0.0.1:18080 --upstream-key K --token T
"""

import argparse
import asyncio
import hashlib
import http
import os
import pickle
import random
import re
import time
from urllib.parse import urlsplit

import httptools
import uvloop

WITHOUT = set(filter(None, os.environ.get("FLOORPLUS_WITHOUT", "").split(",")))
EVENTS, HASH, IDS, POLICY, TIMERS, CAPTURE = (
    part not in WITHOUT for part in ("events", "hash", "ids", "policy", "timers", "capture")
)

REASON = {s.value: s.phrase.encode() for s in http.HTTPStatus}
# As llm_proxy/http/policy.py: never forwarded (Content-Length is rewritten).
DROPPED = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
        b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade", b"expect",
        b"host", b"authorization", b"x-request-id", b"forwarded", b"x-forwarded-for",
        b"x-forwarded-host", b"x-forwarded-proto", b"x-forwarded-port", b"x-forwarded-server",
        b"x-original-forwarded-for", b"x-real-ip", b"true-client-ip", b"x-client-ip",
        b"client-ip", b"x-cluster-client-ip", b"fastly-client-ip", b"x-originating-ip",
        b"x-remote-ip", b"x-remote-addr", b"content-length",
    }
)  # fmt: skip
NOTED = frozenset(
    {
        b"authorization", b"content-length", b"transfer-encoding", b"host", b"connection",
        b"expect", b"origin", b"x-request-id",
    }
)  # fmt: skip
SINGLE = frozenset({b"content-length", b"transfer-encoding", b"host"})
CONTROL = (b"/manage", b"/admin", b"/health", b"/ready", b"/metrics")
ENCODED_CONTROL = re.compile(rb"%(?:[01][0-9a-fA-F]|7[fF])")
DROP, CONTENT_TYPE, CONTENT_LENGTH, REQUEST_ID = range(4)
RESPONSE_FIELDS = {
    **dict.fromkeys(
        (
            b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-connection", b"te",
            b"trailer", b"transfer-encoding", b"upgrade", b"server-timing",
        ),
        DROP,
    ),
    b"content-type": CONTENT_TYPE,
    b"content-length": CONTENT_LENGTH,
    b"x-request-id": REQUEST_ID,
}  # fmt: skip
CAPTURE_BYTES = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024
ALLOWED_PATHS = frozenset({"/v1/chat/completions", "/v1/models"})
ALLOWED_METHODS = frozenset({"GET", "POST"})
BAD_REQUEST = b'{"error":{"message":"bad request"}}'


class Refused(Exception):
    """Raised in a parser callback: the request is answered 400 (the parser stops)."""


class Grant:
    __slots__ = ("expires_at", "project_id", "token_id", "upstream_authorization")

    def __init__(self, token_id, project_id, key, expires_at):
        self.token_id, self.project_id = token_id, project_id
        self.upstream_authorization = b"Bearer " + key
        self.expires_at = expires_at


class Events:
    """Exchange records, handed off once per loop iteration as one pickled batch."""

    def __init__(self, loop):
        self.loop, self.batch, self.metrics = loop, [], {}
        self.fd = os.open(os.devnull, os.O_WRONLY)

    def add(self, record):
        if not self.batch:
            self.loop.call_soon(self.flush)
        self.batch.append(record)

    def flush(self):
        batch, self.batch = self.batch, []
        metrics = self.metrics
        for record in batch:  # counted after the iteration's answers went out
            key = (record[5], record[7])
            metrics[key] = metrics.get(key, 0) + 1
        os.write(self.fd, pickle.dumps(batch, protocol=5))


class Pool:
    """Idle keep-alive connections to the one upstream; a new one is opened when none is idle."""

    def __init__(self, host, port):
        self.host, self.port, self.idle = host, port, []

    def send(self, client, data):
        while self.idle:
            up = self.idle.pop()
            if not up.closed:
                return up.start(client, data)
        asyncio.get_running_loop().create_task(self._connect(client, data))

    async def _connect(self, client, data):
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(lambda: Upstream(self), self.host, self.port)
        except OSError:
            return client.upstream_failed()
        up.start(client, data)


class Upstream(asyncio.Protocol):
    def __init__(self, pool):
        self.pool, self.closed, self.client, self.transport = pool, False, None, None
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport):
        self.transport = transport

    def start(self, client, data):
        if client.transport.is_closing():  # the client left while we were connecting
            return self.pool.idle.append(self)
        self.client, client.up = client, self
        self.headers, self.chunked, self.out = [], False, []
        self.transport.write(data)

    def data_received(self, data):  # whatever one read yields goes to the client in one write
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()
        if self.out and self.client is not None:
            self.client.transport.write(b"".join(self.out))
        self.out = []

    def on_header(self, name, value):
        self.headers.append((name, value))

    def on_headers_complete(self):
        c = self.client
        now = time.perf_counter()
        c.status = status = self.parser.get_status_code()
        out = [b"HTTP/1.1 %d %s\r\n" % (status, REASON.get(status, b"Unknown"))]
        length = None
        for name, value in self.headers:
            action = RESPONSE_FIELDS.get(name.lower())
            if action is not None:
                if action == DROP:
                    continue
                if action == CONTENT_LENGTH:
                    length = value
                    continue
                if action == CONTENT_TYPE:
                    c.content_type = value
                else:
                    c.upstream_request_id = value
            out.append(b"%s: %s\r\n" % (name, value))
        if IDS:
            out.append(b"LLM-Proxy-Request-ID: %s\r\n" % c.request_id)
            if c.upstream_request_id is None:
                out.append(b"X-Request-ID: %s\r\n" % c.request_id)
            proxy_ms = (c.upstream_started - c.started) * 1000
            upstream_ms = (now - c.upstream_started) * 1000
            out.append(
                b"Server-Timing: proxy;dur=%.3f, upstream;dur=%.3f\r\n" % (proxy_ms, upstream_ms)
            )
        if length is not None:
            out.append(b"Content-Length: %s\r\n" % length)
        elif status >= 200 and status not in (204, 304):
            self.chunked = True
            out.append(b"Transfer-Encoding: chunked\r\n")
        if not c.keep:
            out.append(b"Connection: close\r\n")
        out.append(b"\r\n")
        c.head_sent = True
        self.out += out

    def on_body(self, body):
        c = self.client
        if CAPTURE and c.captured < CAPTURE_BYTES:
            c.response_capture.append(body[: CAPTURE_BYTES - c.captured])
            c.captured += len(body)
        if not c.first_byte_at:
            c.first_byte_at = time.perf_counter()
        self.out.append(b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body)

    def on_message_complete(self):
        c, self.client = self.client, None
        c.up = None
        if self.chunked:
            self.out.append(b"0\r\n\r\n")
        c.transport.write(b"".join(self.out))
        self.out = []
        if self.parser.should_keep_alive() and not self.closed:
            self.pool.idle.append(self)
        else:
            self.transport.close()
        c.finished()

    def connection_lost(self, exc):
        self.closed = True
        if self in self.pool.idle:
            self.pool.idle.remove(self)
        if self.client is not None:
            c, self.client = self.client, None
            c.up = None
            c.upstream_failed()


class Client(asyncio.Protocol):
    def __init__(self, app):
        self.app, self.parser = app, httptools.HttpRequestParser(self)
        self.queue, self.busy, self.up, self.keep = [], False, None, True
        self.idle_since = self.head_since = self.body_since = 0.0

    def connection_made(self, transport):
        self.transport = transport
        self.head_since = time.monotonic()

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.busy:
                return self.transport.close()
            self.keep = False
            self.reply(400, BAD_REQUEST)

    def on_message_begin(self):
        if TIMERS:
            self.idle_since = 0.0
            self.head_since = time.monotonic()
        self.url, self.noted, self.fields, self.body = b"", {}, [], []
        self.size, self.duplicate = 0, None

    def on_url(self, url):
        self.url += url
        self.size += len(url)
        if self.size > MAX_HEAD_BYTES:
            raise Refused

    def on_header(self, name, value):
        lower = name.lower()
        if not POLICY:
            if lower in NOTED:
                self.noted[lower] = value
            if lower not in DROPPED:
                self.fields.append(b"%s: %s\r\n" % (name, value))
            return
        self.size += len(name) + len(value)
        if self.size > MAX_HEAD_BYTES:
            raise Refused
        if lower in NOTED:
            noted = self.noted
            if lower not in noted:
                noted[lower] = value
            elif lower in SINGLE:
                self.duplicate = lower
        if lower in DROPPED or lower.startswith(b"cf-"):
            return
        if lower.find(b"_") >= 0:
            spelled = lower.replace(b"_", b"-")
            if spelled in DROPPED or spelled.startswith(b"cf-"):
                return
        self.fields.append(b"%s: %s\r\n" % (name, value))

    def on_headers_complete(self):
        parser, noted, url = self.parser, self.noted, self.url
        if parser.should_upgrade() or parser.get_http_version() not in ("1.1", "1.0"):
            raise Refused
        if self.duplicate is not None or b"host" not in noted:
            raise Refused
        coding = noted.get(b"transfer-encoding")
        if coding is not None and coding.strip().lower() != b"chunked":
            raise Refused
        length = noted.get(b"content-length")
        if length is not None and not length.isdigit():
            raise Refused
        if url[:1] != b"/" or url.find(b"#") >= 0:
            raise Refused
        if url.find(b"%") >= 0 and ENCODED_CONTROL.search(url):
            raise Refused
        self.control = url.startswith(CONTROL)
        if TIMERS:
            self.head_since = 0.0
            self.body_since = time.monotonic()

    def on_body(self, body):
        if TIMERS:
            self.body_since = time.monotonic()
        self.body.append(body)

    def on_message_complete(self):
        self.body_since = 0.0
        parser = self.parser
        body = b"".join(self.body)
        keep = parser.should_keep_alive()
        self.queue.append((parser.get_method(), self.url, self.noted, self.fields, body, keep))
        if not self.busy:
            self.next()

    def next(self):
        if not self.queue or self.transport.is_closing():
            self.busy = False
            self.idle_since = time.monotonic()
            return
        self.busy, self.head_sent = True, False
        self.started, self.started_at = time.perf_counter(), time.time()
        method, url, noted, fields, body, self.keep = self.queue.pop(0)
        if url == b"/health":
            return self.reply(200, b'{"status":"ok"}')
        target = url.decode("utf-8", "surrogateescape")
        path = target.partition("?")[0]
        canonical = not path.endswith("/") and "//" not in path and "%" not in path
        if not (canonical and "/." not in path and "\\" not in path and path in ALLOWED_PATHS):
            return self.reply(404, b'{"error":{"message":"endpoint not allowed"}}')
        self.method = method.decode("latin-1")
        if self.method not in ALLOWED_METHODS:
            return self.reply(405, b'{"error":{"message":"method not allowed"}}')
        credential = noted.get(b"authorization", b"")
        grant = None
        if credential[:7].lower() == b"bearer ":
            token = credential[7:].strip()
            grant = self.app.tokens.get(hashlib.sha256(token).digest() if HASH else token)
        if grant is None or grant.expires_at <= time.time():
            return self.reply(401, b'{"error":{"message":"invalid token"}}')
        self.grant, self.path = grant, path
        self.request_id = random.randbytes(16).hex().encode() if IDS else b"-"
        self.upstream_request_id = self.content_type = None
        self.request_capture = body[:CAPTURE_BYTES] if CAPTURE else b""
        self.response_capture, self.captured, self.first_byte_at = [], 0, 0.0
        head = (
            b"%s %s HTTP/1.1\r\nHost: %s\r\nAuthorization: %s\r\nX-Request-ID: %s\r\n"
            b"Content-Length: %d\r\n%s\r\n"
        ) % (
            method,
            url,
            self.app.host,
            grant.upstream_authorization,
            self.request_id,
            len(body),
            b"".join(fields),
        )
        self.upstream_started = time.perf_counter()
        self.app.pool.send(self, head + body)

    def finished(self):
        if EVENTS:
            grant = self.grant
            record = (
                self.request_id, self.started_at, self.started, self.upstream_started,
                self.method, self.path, grant.project_id, self.status, grant.token_id,
                self.request_capture, b"".join(self.response_capture), self.content_type,
                self.upstream_request_id, self.first_byte_at, time.perf_counter(),
            )  # fmt: skip
            self.app.events.add(record)
        self.done()

    def reply(self, status, body):
        close = b"" if self.keep else b"Connection: close\r\n"
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
            % (status, REASON[status], len(body), close, body)
        )
        self.done()

    def done(self):
        if self.keep:
            self.next()
        else:
            self.transport.close()

    def upstream_failed(self):
        if self.head_sent:  # mid-response: all we can do is cut the client off
            self.transport.close()
        else:
            self.keep = False
            self.reply(502, b'{"error":{"message":"upstream unavailable"}}')

    def pause_writing(self):  # the client reads slower than the upstream writes
        if self.up and not self.up.closed:
            self.up.transport.pause_reading()

    def resume_writing(self):
        if self.up and not self.up.closed:
            self.up.transport.resume_reading()

    def connection_lost(self, exc):
        if self.up is not None:  # don't reuse a connection with an unfinished answer on it
            self.up.client = None
            self.up.transport.close()
            self.up = None


async def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18098)
    parser.add_argument("--upstream", default=os.environ.get("MOCK_UPSTREAM_URL", ""))
    parser.add_argument("--upstream-key", default=os.environ.get("MOCK_UPSTREAM_KEY", ""))
    parser.add_argument("--token", action="append", default=None)
    args = parser.parse_args()
    upstream = urlsplit(args.upstream)
    loop = asyncio.get_running_loop()
    grant = Grant("token-1", "project-1", args.upstream_key.encode(), time.time() + 86400)
    tokens = {}
    for token in args.token or ["sk-pyfloor-bench-0123456789abcdef"]:
        tokens[hashlib.sha256(token.encode()).digest() if HASH else token.encode()] = grant
    app = argparse.Namespace(
        host=upstream.netloc.encode(),
        pool=Pool(upstream.hostname, upstream.port or 80),
        events=Events(loop),
        tokens=tokens,
    )
    server = await loop.create_server(lambda: Client(app), args.host, args.port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())
