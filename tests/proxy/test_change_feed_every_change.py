"""Every management change that stops a token reaches the other instances within a second, by
the push alone: not only a token's revocation, but its deactivation, its project's deactivation,
deletion and revoking of all its tokens (SPEC §6, §11)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import Proxy
from tests.proxy.test_change_feed import NO_TIMER, pushed, status_of, until

pytestmark = [pytest.mark.postgres, pytest.mark.process]

Change = Callable[[Proxy, dict[str, Any]], Awaitable[Any]]

CHANGES: dict[str, tuple[Change, str]] = {
    "token deactivated": (
        lambda p, t: p.manage("PATCH", f"/tokens/{t['id']}", {"is_active": False}),
        "token_inactive",
    ),
    "project deactivated": (
        lambda p, t: p.manage("PATCH", f"/projects/{t['project_id']}", {"is_active": False}),
        "project_inactive",
    ),
    "project's tokens revoked": (
        lambda p, t: p.manage("POST", f"/projects/{t['project_id']}/tokens/revoke"),
        "token_inactive",
    ),
    "project patched with revoke_tokens": (
        lambda p, t: p.manage("PATCH", f"/projects/{t['project_id']}", {"revoke_tokens": True}),
        "token_inactive",
    ),
    "project deleted": (
        lambda p, t: p.manage("DELETE", f"/projects/{t['project_id']}"),
        "token_not_found",
    ),
    "revoked by value": (
        lambda p, t: p.manage("DELETE", "/tokens", {"token": t["token"]}),
        "token_inactive",
    ),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
async def test_a_change_is_pushed_to_every_other_instance(
    postgres_url: str, proxy_factory: Any, change: str
) -> None:
    make, code = CHANGES[change]
    handler: Proxy = await proxy_factory(database_url=postgres_url, **NO_TIMER)
    other: Proxy = await proxy_factory(database_url=postgres_url, **NO_TIMER)
    await until(lambda: pushed(other), 5, "the push channel")
    issued = await handler.issue_token()
    assert await status_of(other, issued["token"]) == (200, None)  # cached there now
    status, answer = await make(handler, issued)
    assert status < 300, answer

    async def refused() -> bool:
        return await status_of(other, issued["token"]) == (
            401 if code != "project_inactive" else 403,
            code,
        )

    await until(refused, 1.0, f"the pushed change ({change})")
