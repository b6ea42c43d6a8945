"""Upstream egress: HTTP CONNECT proxies from ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY``.

The proxy decision is made once per origin (scheme, host, port) and cached with the CONNECT request
bytes, so opening a tunnel costs no parsing. Proxy credentials only ever appear in the
``Proxy-Authorization`` header of a CONNECT: never in a repr, a log line or an error message.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote, urlsplit

from llm_proxy.errors import UpstreamUnavailable

# A CONNECT answer is a status line and a few headers; anything longer is not a proxy talking.
_MAX_CONNECT_ANSWER = 16 * 1024
_PROXY_URL_SHAPE = "expected http://[user:password@]host[:port]"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class EgressProxy:
    """An HTTP proxy that upstream connections are tunnelled through with CONNECT."""

    host: str
    port: int
    # "Basic …" when the URL carried user:password; repr=False keeps it out of every log line.
    authorization: str | None = field(default=None, repr=False)


def parse_proxy_url(value: str) -> EgressProxy:
    """``http://[user:password@]host[:port]`` (or ``host:port``, as curl reads it) → a proxy.

    Raises ValueError with a message that never repeats the URL, which may carry a password.
    """
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme.lower() != "http":
        raise ValueError(f"{_PROXY_URL_SHAPE}; a {parts.scheme}:// proxy is not supported")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{_PROXY_URL_SHAPE}; the port is not a number up to 65535") from None
    if not parts.hostname:
        raise ValueError(f"{_PROXY_URL_SHAPE}; no host given")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{_PROXY_URL_SHAPE}; a proxy URL has no path or query")
    if port == 0:
        raise ValueError(f"{_PROXY_URL_SHAPE}; port 0 cannot be connected to")
    authorization = None
    if parts.username is not None or parts.password is not None:
        # curl percent-decodes the credentials of a proxy URL; so must we, to send the same ones.
        pair = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
    return EgressProxy(parts.hostname, port or 80, authorization)


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address → host and optional port."""
    if entry.startswith("["):
        end = entry.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {entry!r}")
        host, rest = entry[1:end], entry[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError(f"unexpected text after ']' in {entry!r}")
        port_text = rest[1:]
    elif entry.count(":") == 1:
        host, port_text = entry.split(":")
    else:
        return entry, None  # a name, an IPv4 address or network, or a bare IPv6 one
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError(f"bad port in {entry!r}")
    return host, int(port_text)


class NoProxy:
    """Which hosts are reached directly, as curl reads ``NO_PROXY``.

    Comma (or space) separated entries: ``*`` (everything); a domain, with or without a leading dot,
    matching itself and its subdomains; an IP address or CIDR network, matching IP-literal hosts;
    each optionally with ``:port``. Names are not resolved: ``localhost`` does not match
    ``127.0.0.1``.
    """

    __slots__ = ("_domains", "_everything", "_networks")

    def __init__(self, value: str | None) -> None:
        self._everything = False
        self._domains: list[tuple[str, int | None]] = []
        self._networks: list[tuple[IpNetwork, int | None]] = []
        for entry in (value or "").replace(",", " ").lower().split():
            if entry == "*":
                self._everything = True
                continue
            host, port = _split_port(entry)
            try:
                self._networks.append((ipaddress.ip_network(host, strict=False), port))
            except ValueError:
                if "/" in host:
                    raise ValueError(f"bad network {host!r}") from None
                domain = host.strip(".")
                if domain:
                    self._domains.append((domain, port))

    def matches(self, host: str, port: int) -> bool:
        if self._everything:
            return True
        host = host.lower().rstrip(".")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return any(
                (host == domain or host.endswith("." + domain)) and wanted in (None, port)
                for domain, wanted in self._domains
            )
        return any(
            address in network and wanted in (None, port) for network, wanted in self._networks
        )


@dataclass(frozen=True, slots=True)
class Tunnel:
    """How to reach one origin through a proxy: where the proxy is and the CONNECT to send it."""

    proxy: EgressProxy
    request: bytes = field(repr=False)


class Egress:
    """The egress proxies of upstream connections: ``https`` origins go through ``https_proxy``,
    ``http`` origins through ``http_proxy`` (a CONNECT tunnel too), except hosts ``no_proxy``
    names. Loopback is tunnelled like any other host unless ``no_proxy`` names it.
    """

    __slots__ = ("_no_proxy", "_proxies", "_tunnels")

    def __init__(
        self,
        *,
        https_proxy: EgressProxy | None = None,
        http_proxy: EgressProxy | None = None,
        no_proxy: NoProxy | None = None,
    ) -> None:
        self._proxies = {"https": https_proxy, "http": http_proxy}
        self._no_proxy = no_proxy or NoProxy(None)
        self._tunnels: dict[tuple[str, str, int], Tunnel | None] = {}

    @classmethod
    def from_values(
        cls, https_proxy: str | None, http_proxy: str | None, no_proxy: str | None
    ) -> Egress | None:
        """From the variables' values; None when no proxy is set, so connections stay direct."""
        if not https_proxy and not http_proxy:
            return None
        return cls(
            https_proxy=parse_proxy_url(https_proxy) if https_proxy else None,
            http_proxy=parse_proxy_url(http_proxy) if http_proxy else None,
            no_proxy=NoProxy(no_proxy),
        )

    def tunnel_for(self, scheme: str, host: str, port: int) -> Tunnel | None:
        """The tunnel to reach this origin through, or None to connect directly."""
        key = (scheme, host, port)
        try:
            return self._tunnels[key]
        except KeyError:
            pass
        proxy = self._proxies.get(scheme)
        tunnel = None
        if proxy is not None and not self._no_proxy.matches(host, port):
            name = host if host.isascii() else host.encode("idna").decode("ascii")
            authority = f"[{name}]:{port}" if ":" in name else f"{name}:{port}"
            lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
            if proxy.authorization is not None:
                lines.append(f"Proxy-Authorization: {proxy.authorization}")
            tunnel = Tunnel(proxy, ("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        self._tunnels[key] = tunnel
        return tunnel


def _refused(message: str) -> UpstreamUnavailable:
    return UpstreamUnavailable(message, reached_upstream=False)


async def open_tunnel(loop: asyncio.AbstractEventLoop, tunnel: Tunnel) -> socket.socket:
    """A connected socket through which bytes reach the origin, after the proxy accepted CONNECT.

    The caller bounds the time taken. Raises UpstreamUnavailable (``reached_upstream`` False) when
    the proxy cannot be reached or refuses (naming its status), and OSError when the connection to
    it fails midway.
    """
    proxy = tunnel.proxy
    sock = await _connect_socket(loop, proxy.host, proxy.port)
    try:
        await loop.sock_sendall(sock, tunnel.request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk:
                raise _refused("egress proxy closed the connection before answering CONNECT")
            answer += chunk
            if len(answer) > _MAX_CONNECT_ANSWER:
                raise _refused("egress proxy sent an overlong answer to CONNECT")
        head, _, rest = answer.partition(b"\r\n\r\n")
        fields = head.split(b"\r\n", 1)[0].split(None, 2)
        # A status code is three digits (RFC 9110 §15): int() refuses thousands of them.
        code = fields[1] if len(fields) >= 2 else b""
        if len(code) != 3 or not code.isdigit() or not fields[0].startswith(b"HTTP/"):
            raise _refused("egress proxy sent an invalid answer to CONNECT")
        status = int(code)
        if not 200 <= status < 300:
            # The standard phrase, not the proxy's: its reason text is not ours to repeat.
            try:
                phrase = f" {HTTPStatus(status).phrase}"
            except ValueError:
                phrase = ""
            raise _refused(f"egress proxy refused CONNECT: {status}{phrase}")
        if rest:
            # The origin cannot have spoken first (HTTP and TLS clients do), so the stream is broken.
            raise _refused("egress proxy sent data after accepting CONNECT")
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket connected to the first address of host that accepts."""
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _refused(f"cannot resolve the egress proxy ({type(exc).__name__})") from exc
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    name = type(error).__name__ if error is not None else "no address"
    raise _refused(f"cannot connect to the egress proxy ({name})")


def upstream_ssl_context() -> ssl.SSLContext:
    """Upstream TLS trust: the system store, plus ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` when set."""
    # OpenSSL itself reads SSL_CERT_FILE / SSL_CERT_DIR when loading its default locations...
    context = ssl.create_default_context()
    paths = ssl.get_default_verify_paths()
    # ...but in place of the system store, which is to stay trusted as well.
    if paths.cafile != paths.openssl_cafile and os.path.isfile(paths.openssl_cafile):
        context.load_verify_locations(cafile=paths.openssl_cafile)
    if paths.capath != paths.openssl_capath and os.path.isdir(paths.openssl_capath):
        context.load_verify_locations(capath=paths.openssl_capath)
    return context
