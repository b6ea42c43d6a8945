"""``LISTEN_ADDR``: the address the server listens on, read one way by the server and by the
``manage`` CLI that finds it there."""

from __future__ import annotations

import ipaddress
import re

_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits: int() would take "٢٢٠٠١" too


def parse_listen_addr(value: str) -> tuple[str, int]:
    """``host:port``, ``:port`` (every interface) or ``[IPv6]:port``; raises ValueError naming
    LISTEN_ADDR."""
    host, sep, port_text = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
    if bracketed:
        host = host[1:-1]
    if (
        not sep
        or not _PORT.fullmatch(port_text)
        or int(port_text) > 65535
        or any(char.isspace() for char in value)
        or "[" in host
        or "]" in host
        or (bracketed and not _is_ipv6(host))
    ):
        raise ValueError(
            f"LISTEN_ADDR: expected host:port (an IPv6 address in brackets, as [::1]:8080),"
            f" got {value!r}"
        )
    return host or "0.0.0.0", int(port_text)


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def host_port(host: str, port: int) -> str:
    """``host:port`` as a URL or a log line writes it: an IPv6 address goes in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_url(host: str, port: int) -> str:
    """The URL a listening address answers at."""
    return f"http://{host_port(host, port)}"
