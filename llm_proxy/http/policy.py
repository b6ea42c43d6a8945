"""The front door's policy for a request head: what is refused, what is forwarded.

``httptools`` (llhttp) already refuses most malformed input: bad chunk sizes, bare LF line ends,
``Content-Length`` together with ``Transfer-Encoding``, two lengths. This module adds what llhttp
lets through and nginx does not: a transfer coding other than exactly ``chunked`` (also one spread
over two header lines), a missing or repeated ``Host``, a fragment or an encoded control character
in the target, an HTTP version other than 1.0 and 1.1. It also sorts the header fields as they are
parsed: the few the server reads are noted, and those never forwarded (hop-by-hop, the client's
credential, every spelling of a client-IP header) are left out; the rest go upstream as the bytes
they came as.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

from llm_proxy import errors

# Paths served by the aiohttp application (the control plane), matched on segment boundaries.
CONTROL_PREFIXES = (b"/manage", b"/admin", b"/health", b"/ready", b"/metrics")

# Never forwarded upstream: hop-by-hop fields, our own credential, what identifies the client,
# the request id (replaced by the proxy's), and the fields some frameworks take as the request's
# real method (a POST that an upstream would run as a DELETE the allowlist refuses). Lower case;
# every ``CF-*`` field is dropped as well.
DROPPED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"host",
        b"authorization",
        b"x-request-id",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-port",
        b"x-forwarded-server",
        b"x-original-forwarded-for",
        b"x-real-ip",
        b"true-client-ip",
        b"x-client-ip",
        b"client-ip",
        b"x-cluster-client-ip",
        b"fastly-client-ip",
        b"x-originating-ip",
        b"x-remote-ip",
        b"x-remote-addr",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
    }
)
# With ``_`` for ``-``, as some servers and CGI-style frameworks read them: also never forwarded,
# nor a second ``Content-Length`` spelled that way.
_DROPPED_SPELLINGS = DROPPED | {b"content-length"}

# Fields the server reads (first value; Connection's and Authorization's combined), and those whose
# repetition is refused.
_NOTED = frozenset(
    {
        b"authorization",
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"connection",
        b"expect",
        b"origin",
        b"x-request-id",
    }
)
_SINGLE = frozenset({b"content-length", b"transfer-encoding", b"host"})
# A percent-encoded control character (C0 or DEL) anywhere in the target.
_ENCODED_CONTROL = re.compile(rb"%(?:[01][0-9a-fA-F]|7[fF])")
# RFC 9112 §3.2's Host: ``uri-host [ ":" port ]`` (RFC 3986), an IP literal being IPv6 (checked
# by ipaddress). An invalid one is refused 400 here rather than left to a page that builds a URL
# from it: the admin pages' redirect did, and answered 500.
_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[\w\-.~!$&'()*+,;=%]*)(?::([0-9]{0,5}))?")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_KEPT_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive"})
# What a head holds besides its method, target and fields: " ", " HTTP/1.1", the request line's
# CRLF and the empty line that ends the head.
_HEAD_FRAME_BYTES = len(b"  HTTP/1.1\r\n\r\n")
# The most header fields a request may keep (those forwarded, or a control request's). A field
# held costs ~100 bytes however short it was sent: 64 KiB of "a:" lines would hold ~1.5 MB per
# connection for the head's 30 s, which the count bounds (Apache's LimitRequestFields is 100).
MAX_HEAD_FIELDS = 256


class HeadFields:
    """The head of the request being parsed: its target and header fields, sorted as they arrive."""

    __slots__ = (
        "all_headers",
        "complete",
        "control",
        "duplicate",
        "forward",
        "max_bytes",
        "noted",
        "received",
        "size",
        "url",
    )

    def __init__(self, max_bytes: int) -> None:
        # The most bytes a head may have, counted as the client sent them (request line and field
        # lines with their separators, as nginx's header buffers hold them), so a head of many
        # empty fields is bounded like any other. The parser drops the whitespace before a value:
        # it is counted as the usual one space, and more of it (never forwarded) is not counted.
        self.max_bytes = max_bytes
        self.reset()

    def reset(self) -> None:
        """Start on the next request's head (what the last one handed out is left alone)."""
        self.url = b""  # the request target, as received
        self.complete = False  # every header field arrived (later fields are trailers)
        self.size = _HEAD_FRAME_BYTES  # bytes of the head so far, for its size limit
        self.received = 0  # bytes of the reads after the one it began in (see FrontProtocol)
        self.control = False  # the target is a control-plane path
        self.noted: dict[bytes, bytes] = {}
        self.duplicate: bytes | None = None  # a field that must appear once, seen twice
        self.forward: list[tuple[bytes, bytes]] = []  # proxy requests: the fields to forward
        self.all_headers: list[tuple[bytes, bytes]] = []  # control requests: every field

    def too_many_fields(self) -> bool:
        """More fields kept than :data:`MAX_HEAD_FIELDS` (one of the two lists is empty)."""
        return len(self.forward) + len(self.all_headers) > MAX_HEAD_FIELDS

    def add_url(self, url: bytes) -> None:
        """A piece of the request target, as parsed."""
        self.url += url
        self.size += len(url)
        if self.size > self.max_bytes:
            raise errors.UriTooLong("Request target too long.")
        self.control = is_control_target(self.url)

    def add(self, name: bytes, value: bytes) -> None:
        """A header field as parsed (the parser calls this directly), or a trailer field."""
        size = self.size = self.size + len(name) + len(value) + 4  # with ": " and CRLF
        if size > self.max_bytes:
            raise errors.HeadTooLarge("Request header fields too large.")
        if self.complete:
            return  # a trailer field: never forwarded and never a header; it counts to the limit
        lower = name.lower()
        if lower in _NOTED:
            # What the server reads of a value is without the whitespace after it, which llhttp
            # leaves on (RFC 9110 §5.5: not part of the value); what is forwarded is as sent.
            read = value.rstrip(b" \t")
            noted = self.noted
            if lower not in noted:
                noted[lower] = read
            elif lower == b"connection":
                noted[lower] += b"," + read
            elif lower == b"authorization":
                # Combined, as a repeated field is (RFC 9110 §5.3): no single bearer token, so
                # neither is taken, whichever a proxy in front may have judged.
                noted[lower] += b", " + read
            elif lower in _SINGLE:
                self.duplicate = lower
        if self.control:
            self.all_headers.append((name, value))
            return
        if lower in DROPPED or lower.startswith(b"cf-"):
            return
        # find(), not ``in``: bytes.__contains__ first tries its operand as an int, raising and
        # clearing a TypeError on every call, which costs more than the search.
        if lower.find(b"_") >= 0:
            spelled = lower.replace(b"_", b"-")
            if spelled in _DROPPED_SPELLINGS or spelled.startswith(b"cf-"):
                return
        self.forward.append((name, value))

    def forwarded(self) -> list[tuple[bytes, bytes]]:
        """The fields to forward, without those the client named in ``Connection``."""
        connection = self.noted.get(b"connection")
        if connection is None:
            return self.forward
        named = {option.strip().lower() for option in connection.split(b",")}
        named -= _KEPT_CONNECTION_OPTIONS
        if not named:
            return self.forward
        return [(name, value) for name, value in self.forward if name.lower() not in named]


_TOO_MANY_FIELDS = f"Too many request header fields (at most {MAX_HEAD_FIELDS})."


def too_many_fields() -> errors.ProxyError:
    """The refusal of a head with more than :data:`MAX_HEAD_FIELDS` fields."""
    return errors.HeadTooLarge(_TOO_MANY_FIELDS)


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs several times more
class Frame:
    """How a request is framed, decided once from its head."""

    method: str
    target: str  # origin form (path and query), exactly as sent
    http10: bool
    content_length: int | None
    has_body: bool
    expect_continue: bool


def frame_request(head: HeadFields, version: str, method: bytes) -> Frame:
    """Decide the framing of a request, or raise the error it is refused with."""
    if head.size + len(method) > head.max_bytes:
        raise errors.HeadTooLarge("Request header fields too large.")
    if head.too_many_fields():
        raise too_many_fields()
    if version not in ("1.1", "1.0"):
        # 400 rather than nginx's 505: nothing a client sends may draw a 5xx from the proxy itself.
        raise errors.MalformedRequest(f"HTTP/{version} is not supported; use HTTP/1.1.")
    http10 = version == "1.0"
    if head.duplicate is not None:
        name = head.duplicate.decode("latin-1")
        raise errors.MalformedRequest(f"The {name} header may appear only once.")
    noted = head.noted
    host = noted.get(b"host")
    if host is None:
        if not http10:
            raise errors.MalformedRequest("An HTTP/1.1 request needs a Host header.")
    elif not (_known_host(host) if len(host) <= _CACHED_HOST_BYTES else _is_host(host)):
        raise errors.MalformedRequest("Invalid Host header.")
    chunked = False
    coding = noted.get(b"transfer-encoding")
    if coding is not None:
        if http10 or coding.strip().lower() != b"chunked":
            raise errors.MalformedRequest("Only the chunked transfer coding is supported.")
        chunked = True
    content_length: int | None = None
    length_text = noted.get(b"content-length")
    if length_text is not None:
        if not length_text.isdigit():
            raise errors.MalformedRequest("Invalid Content-Length.")
        # Without its leading zeros (legal, and as many as the head holds): llhttp bounded the
        # digits that are left, but not the text, which int() refuses past 4,300 digits.
        content_length = int(length_text.lstrip(b"0") or b"0")
    has_body = chunked or bool(content_length)
    expect = noted.get(b"expect")
    expect_continue = (
        has_body and not http10 and expect is not None and expect.lower() == b"100-continue"
    )
    return Frame(
        method.decode("latin-1"),
        request_target(head.url),
        http10,
        content_length,
        has_body,
        expect_continue,
    )


def _is_host(value: bytes) -> bool:
    match = _HOST.fullmatch(value)
    if match is None:
        return False
    name, port = match.groups()
    if port and int(port) > 65535:
        return False
    if name[:1] == b"[":
        try:
            ipaddress.IPv6Address(name[1:-1].decode("ascii"))
        except ValueError:
            return False
    elif name.find(b"%") >= 0 and _BAD_ESCAPE.search(name):  # (find(): see HeadFields.add)
        return False
    return True


# Cached: a server sees few Host values, and a lookup costs much less than a check on every request.
# Not a long value, which no host name is (RFC 1035: at most 253 characters), so that the cache
# holds little whatever clients send.
_known_host = functools.lru_cache(maxsize=256)(_is_host)
_CACHED_HOST_BYTES = 300


def request_target(url: bytes) -> str:
    """The origin form of a request target; absolute form is accepted, as RFC 9112 requires."""
    if url[:1] != b"/":
        url = _absolute_path(url)
    if url.find(b"#") >= 0:  # (find(), not ``in``: see HeadFields.add)
        raise errors.MalformedRequest("A request target cannot carry a fragment.")
    if url.find(b"%") >= 0 and _ENCODED_CONTROL.search(url):
        raise errors.MalformedRequest("The request target contains a control character.")
    return url.decode("utf-8", "surrogateescape")


def _absolute_path(url: bytes) -> bytes:
    lowered = url[:8].lower()
    if lowered.startswith(b"http://"):
        rest = url[7:]
    elif lowered.startswith(b"https://"):
        rest = url[8:]
    else:
        raise errors.MalformedRequest("Invalid request target.")
    ends = [at for at in (rest.find(b"/"), rest.find(b"?"), rest.find(b"#")) if at >= 0]
    authority = rest[: min(ends)] if ends else rest
    # An http(s) URI names a host, and userinfo in one is an error (RFC 9110 §4.2.1 and §4.2.4;
    # nginx refuses both): not dropped silently on the way to the path.
    if not authority or not (
        _known_host(authority) if len(authority) <= _CACHED_HOST_BYTES else _is_host(authority)
    ):
        raise errors.MalformedRequest("Invalid request target.")
    if not ends:
        return b"/"
    path = rest[min(ends) :]
    return path if path.startswith(b"/") else b"/" + path


def is_control_target(url: bytes) -> bool:
    """True when the target is a control-plane path (not forwarded; served by aiohttp)."""
    if url[:1] != b"/":
        try:
            url = _absolute_path(url)
        except errors.ProxyError:
            return False
    if not url.startswith(CONTROL_PREFIXES):
        return False  # the proxy path, told in one call
    for prefix in CONTROL_PREFIXES:
        if url.startswith(prefix) and (len(url) == len(prefix) or url[len(prefix)] in b"/?"):
            return True
    return False
