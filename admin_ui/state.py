"""What the admin handlers share, kept on the admin sub-application under one typed key."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from admin_ui.handover import Handovers
from admin_ui.security import CsrfSigner
from llm_proxy.client_address import client_address
from llm_proxy.control.operations import Actor, Operations


@dataclass(frozen=True, slots=True)
class AdminState:
    operations: Operations
    admin_user: str
    admin_password: str = field(repr=False)
    csrf: CsrfSigner
    handovers: Handovers


ADMIN = web.AppKey("admin_ui", AdminState)


def state(request: web.Request) -> AdminState:
    return request.app[ADMIN]


def operations(request: web.Request) -> Operations:
    return request.app[ADMIN].operations


def actor(request: web.Request) -> Actor:
    """Every change made from the pages is audited under the admin user's name."""
    return Actor(
        name=request.app[ADMIN].admin_user,
        request_id=request.headers.get("X-Request-ID"),
        client_ip=client_address(request),
    )
