"""The client's address where the operator surfaces record one (audit entries, refused sign-ins,
refused admin forms).

Behind a reverse proxy or load balancer the TCP peer is the balancer, and the client is named in
the ``X-Forwarded-For`` the balancer appends to. Whoever reaches the port can write that header
too, so it is believed only from a peer ``FORWARDED_ALLOW_IPS`` trusts, as uvicorn's
``--forwarded-allow-ips`` and gunicorn's do. It is read only where an address is recorded, never
per proxied request: the proxy path neither reads nor forwards it (``http/policy.py`` drops it).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_EVERY_PEER = "*"
# More proxies than any real chain has: a longer run of trusted entries is not walked to its end.
# A trusted host could otherwise send a header of thousands, each one parsed, to hold the event
# loop (the proxy path's too) for many times what the request itself costs.
_MAX_HOPS = 16
_PORT = re.compile(r":[0-9]{1,5}")  # ASCII digits: isdigit() takes other scripts' too


@dataclass(frozen=True, slots=True)
class ForwardedTrust:
    """The proxies whose ``X-Forwarded-For`` is believed; by default none."""

    networks: tuple[Network, ...] = ()
    # "*": whatever peer reached the port is taken for the balancer (the port is reachable
    # through it alone). The header's entries are still skipped only when ``networks`` lists
    # them: "*" alone takes the address the balancer appended, never one the client wrote.
    every_peer: bool = False

    @classmethod
    def parse(cls, value: str) -> ForwardedTrust:
        """``FORWARDED_ALLOW_IPS``: comma-separated IP addresses and CIDR networks, or ``*``;
        empty trusts no one. Raises ValueError naming the entry that is neither."""
        networks: list[Network] = []
        every_peer = False
        for entry in (part.strip() for part in value.split(",")):
            if not entry:
                continue
            if entry == _EVERY_PEER:
                every_peer = True
                continue
            try:
                networks.append(_network(entry))
            except ValueError:
                raise ValueError(_refusal(entry)) from None
        return cls(tuple(networks), every_peer)

    def client(self, peer: str | None, forwarded_for: Iterable[str]) -> str | None:
        """Who sent the request that ``peer`` passed on with these ``X-Forwarded-For`` values.

        From a trusted peer, the header is walked from the right (each proxy appends the address
        it was reached from) past the proxies trusted here, to the first address that is not
        one: everything left of it was written by the client or before it. A malformed entry
        on that walk, or more trusted entries than ``_MAX_HOPS``, means the chain cannot be
        read, and the peer is named instead.
        """
        peer_address = _address(peer) if peer is not None else None
        if peer_address is None:
            return peer
        peer = str(peer_address)
        if not (self.every_peer or self._listed(peer_address)):
            return peer
        found = peer
        # From the right, split no further than the walk may go.
        entries = (
            part
            for value in reversed(list(forwarded_for))
            for part in reversed(value.rsplit(",", _MAX_HOPS))
        )
        for hops, entry in enumerate(entries):
            if hops == _MAX_HOPS:
                return peer
            address = _forwarded_address(entry.strip())
            if address is None:
                return peer
            found = str(address)
            if not self._listed(address):
                break
        # Every entry a trusted proxy: the left-most, the first to have been written, was the
        # client (a host inside the trusted networks).
        return found

    def _listed(self, address: Address) -> bool:
        return any(address in network for network in self.networks)


def _refusal(entry: str) -> str:
    try:
        network = ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return (
            f"FORWARDED_ALLOW_IPS: {entry!r} is not an IP address or a CIDR network (such as"
            " 10.0.0.0/8); give the balancer's addresses, comma-separated, or * for every peer"
        )
    # Accepting it as the network around it would trust more than was written.
    return f"FORWARDED_ALLOW_IPS: {entry!r} has host bits set; did you mean {network}?"


def _network(entry: str) -> Network:
    network = ipaddress.ip_network(entry)
    mapped = network.network_address.ipv4_mapped if network.version == 6 else None
    if mapped is not None and network.prefixlen >= 96:
        # ::ffff:10.0.0.5, as a dual-stack listener shows an IPv4 balancer: peers are matched as
        # the IPv4 addresses they are, which an IPv6 network would never hold.
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        # A dual-stack socket names an IPv4 peer as ::ffff:a.b.c.d, and so may a balancer: matched
        # and recorded as the IPv4 address it is, not ::ffff:cb00:7107.
        return address.ipv4_mapped
    return address


def _forwarded_address(entry: str) -> Address | None:
    """An ``X-Forwarded-For`` entry: an address, ``[IPv6]``, or either with a port (some cloud
    balancers append ``a.b.c.d:port``)."""
    host, port = entry, ""
    if entry.startswith("["):
        host, bracket, port = entry[1:].partition("]")
        if not bracket:
            return None
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
        port = ":" + port
    # A scope (fe80::1%eth0) names an interface of the writer's, and takes any text, control
    # characters included: never an address to record.
    if (port and not _PORT.fullmatch(port)) or "%" in host:
        return None
    return _address(host)


TRUST_NO_ONE = ForwardedTrust()
FORWARDED_TRUST = web.AppKey("forwarded_trust", ForwardedTrust)


def client_address(request: web.Request) -> str | None:
    """The address to record for ``request``: the TCP peer, or the client a trusted proxy names
    (see :class:`ForwardedTrust`; the root application holds it under ``FORWARDED_TRUST``)."""
    trust = request.config_dict.get(FORWARDED_TRUST)
    if trust is None:
        return request.remote
    return trust.client(request.remote, request.headers.getall("X-Forwarded-For", ()))
