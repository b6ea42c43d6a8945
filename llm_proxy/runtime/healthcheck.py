"""``llm-proxy healthcheck``: is the server on this machine answering ``GET /health``?

The container's HEALTHCHECK runs it as ``python -m llm_proxy.runtime.healthcheck``, which imports
only this module (the full CLI takes a second to import, every interval). It reads LISTEN_ADDR
through the very option ``llm-proxy server`` declares, so an empty variable means the default for
both, and parses it with the server's own parser: an address the server would refuse fails the
check instead of probing some other port. Exit status as Docker reads it: 0 healthy, 1 not.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import sys
import threading
from collections.abc import Callable
from typing import TypeVar

import click

from llm_proxy.listen_addr import host_port, parse_listen_addr

DEFAULT_LISTEN_ADDR = "127.0.0.1:8080"
_Command = TypeVar("_Command", bound=Callable[..., object])


def listen_addr_option(func: _Command) -> _Command:
    """``--listen-addr`` / LISTEN_ADDR, declared once for the server and for this check."""
    return click.option(
        "--listen-addr",
        envvar="LISTEN_ADDR",
        default=DEFAULT_LISTEN_ADDR,
        show_envvar=True,
        help="host:port the proxy, the management API and the admin pages listen on"
        " (0.0.0.0:PORT: every interface).",
    )(func)


class Unhealthy(Exception):
    """Why the check failed, in one line."""


def probe_address(listen_addr: str) -> tuple[str, int]:
    """The address a client on this machine reaches a server listening at ``listen_addr`` on:
    the server's own parse, its bind's name resolution, a wildcard through loopback."""
    try:
        host, port = parse_listen_addr(listen_addr)
    except ValueError as exc:
        raise Unhealthy(f"the server refuses this address: {exc}") from None
    if port == 0:
        raise Unhealthy("LISTEN_ADDR: port 0 (any free port) cannot be checked; give the port")
    # Resolved as the server's bind resolves it: an IPv4 socket unless the host holds a colon.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except OSError as exc:
        raise Unhealthy(f"LISTEN_ADDR: cannot resolve {host!r}: {exc.strerror}") from None
    address = ipaddress.ip_address(str(infos[0][4][0]).partition("%")[0])
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return str(address), port


def check_health(listen_addr: str, timeout: float) -> None:
    """``GET /health`` straight to the server (never through HTTP_PROXY, which is the upstream's
    egress); raises Unhealthy unless it answers 200 within ``timeout`` seconds in all.

    A socket's timeout bounds each read, not the answer: a server dripping a byte a second would
    hold the check until Docker killed it, with no word of why. So the request runs in a thread
    the check stops waiting for."""
    host, port = probe_address(listen_addr)
    failure: list[Unhealthy] = []

    def ask() -> None:
        try:
            _ask(host, port, timeout)
        except Unhealthy as exc:
            failure.append(exc)

    asking = threading.Thread(target=ask, daemon=True)
    asking.start()
    asking.join(timeout)
    if asking.is_alive():
        raise Unhealthy(f"http://{host_port(host, port)}/health: no answer within {timeout:g} s")
    if failure:
        raise failure[0]


def _ask(host: str, port: int, timeout: float) -> None:
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/health")
        status = connection.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise Unhealthy(f"http://{host_port(host, port)}/health: {reason}") from None
    finally:
        connection.close()
    if status != 200:
        raise Unhealthy(f"http://{host_port(host, port)}/health answered {status}")


@click.command("healthcheck")
@listen_addr_option
@click.option("--timeout", default=3.0, show_default=True, help="Seconds to wait for the answer.")
def healthcheck_command(listen_addr: str, timeout: float) -> None:
    """Exit 0 when the server at LISTEN_ADDR answers GET /health, else 1 (the image's check)."""
    try:
        check_health(listen_addr, timeout)
    except Unhealthy as exc:
        click.echo(f"llm-proxy healthcheck: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    healthcheck_command(prog_name="llm-proxy healthcheck")
