"""Usage aggregates on the pages: token detail, project detail and the dashboard's last hour/day."""

from __future__ import annotations

import re

from tests.admin_ui.conftest import AdminPages
from tests.conftest import Proxy
from tests.waiting import wait_for_usage

_CELL = re.compile(r'<td class="num usage-([a-z-]+)">([^<]*)</td>')


def tile(html: str, name: str) -> str:
    match = re.search(rf'id="usage-{name}">([^<]*)<', html)
    assert match, f"no usage-{name} on the page"
    return match.group(1)


def window_row(html: str, key: str) -> dict[str, str]:
    """The dashboard's usage row ``key`` (hour, day) as column → shown value."""
    row = html.split(f'<tr id="usage-{key}">', 1)[1].split("</tr>", 1)[0]
    return dict(_CELL.findall(row))


async def call(proxy: Proxy, token: str, upstream_status: int | None = None) -> int:
    """A chat completion, or (given ``upstream_status``) a moderation the upstream fails."""
    headers = {"Authorization": f"Bearer {token}"}
    if upstream_status is None:
        path = "/v1/chat/completions"
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one two"}]}
    else:
        path, body = "/v1/moderations", {"input": "x"}
        headers["X-Fake-Status"] = str(upstream_status)
    async with proxy.client.post(path, json=body, headers=headers) as response:
        return response.status


async def test_pages_show_usage_figures(admin: AdminPages, proxy: Proxy) -> None:
    page = await admin.get("/admin/")
    assert window_row(page.text, "hour") == {
        **dict.fromkeys(("requests", "prompt-tokens", "completion-tokens", "total-tokens"), "0"),
        "cost": "$0.00",
        "errors": "0",
    }
    project_id = await admin.create_project("usage")
    used = await proxy.issue_token(project_id)
    idle = await proxy.issue_token(project_id)
    assert tile((await admin.get(f"/admin/tokens/{used['id']}")).text, "total-tokens") == "0"

    assert [await call(proxy, used["token"]) for _ in range(2)] == [200, 200]
    assert await call(proxy, used["token"], upstream_status=503) == 503
    usage = await wait_for_usage(proxy, f"/tokens/{used['id']}", 3)
    assert usage["errors"] == 1 and usage["total_tokens"] > 0
    # gpt-4o-mini at $0.15 / $0.60 per 1M tokens is 150 / 600 nano-dollars a token; the failed
    # moderation names no model and costs nothing.
    spent = usage["prompt_tokens"] * 150 + usage["completion_tokens"] * 600
    assert usage["cost_usd"] == spent / 1e9 and spent < 10**7
    shown = {
        "requests": str(usage["requests"]),
        "prompt-tokens": f"{usage['prompt_tokens']:,}",
        "completion-tokens": f"{usage['completion_tokens']:,}",
        "total-tokens": f"{usage['total_tokens']:,}",
        "cost": f"$0.{spent:09d}".rstrip("0"),  # under a cent: shown to the nano-dollar
        "errors": "1",
    }

    token_page = (await admin.get(f"/admin/tokens/{used['id']}")).text
    project_page = (await admin.get(f"/admin/projects/{project_id}")).text
    for html in (token_page, project_page):
        assert {name: tile(html, name) for name in shown} == shown
        assert "last request just now" in " ".join(re.sub(r"<[^>]+>", " ", html).split())
    # The project's token table gives each token its tokens used and its spend.
    rows = project_page.split("<tbody>", 1)[1]
    used_row = rows.split(used["id"][:8], 1)[1].split("</tr>", 1)[0]
    idle_row = rows.split(idle["id"][:8], 1)[1].split("</tr>", 1)[0]
    assert f'<td class="num">{shown["total-tokens"]}</td>' in used_row
    assert f'<td class="num">{shown["cost"]}</td>' in used_row
    assert '<td class="num">0</td>' in idle_row and '<td class="num">$0.00</td>' in idle_row

    dashboard = (await admin.get("/admin/")).text
    assert window_row(dashboard, "hour") == window_row(dashboard, "day") == shown
