"""The charts of the dashboard, a project and a token count the requests made through the proxy."""

from __future__ import annotations

import re
from datetime import datetime

from llm_proxy.models import hour_start, utcnow
from tests.admin_ui.conftest import AdminPages
from tests.admin_ui.test_usage_pages import call
from tests.conftest import Proxy
from tests.waiting import wait_for_usage

METRICS = ("requests", "tokens", "errors", "spend")
_BAR = re.compile(r'<g class="bar" data-bucket="([^"]+)" data-value="(\d+)">')


def bars(html: str, chart_id: str) -> dict[str, int]:
    """Bucket → value of the chart ``chart_id`` on the page."""
    match = re.search(rf'<svg class="chart" id="{chart_id}".*?</svg>', html, re.DOTALL)
    assert match, f"no chart {chart_id}"
    return {bucket: int(value) for bucket, value in _BAR.findall(match.group(0))}


def key(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%MZ")


def expected(usage: dict[str, int | float]) -> dict[str, int]:
    return {
        "requests": int(usage["requests"]),
        "tokens": int(usage["total_tokens"]),
        "errors": int(usage["errors"]),
        "spend": round(float(usage["cost_usd"]) * 1e9),
    }


def assert_charts_show(html: str, wanted: dict[str, int], hours: set[str], days: set[str]) -> None:
    """Each metric's hourly and daily charts hold ``wanted`` in total, in the buckets of now."""
    for metric in METRICS:
        hourly = bars(html, f"chart-24h-{metric}")
        daily = bars(html, f"chart-30d-{metric}")
        assert (len(hourly), len(daily)) == (24, 30)
        assert sum(hourly.values()) == sum(daily.values()) == wanted[metric], metric
        assert {b for b, v in hourly.items() if v} <= hours, metric
        assert {b for b, v in daily.items() if v} <= days, metric
        # The latest bucket is the last bar: this hour, today.
        assert list(hourly)[-1] in hours and list(daily)[-1] in days


async def test_charts_count_the_requests_made_through_the_proxy(
    admin: AdminPages, proxy: Proxy
) -> None:
    before = utcnow()
    busy = await admin.create_project("busy")
    other = await admin.create_project("other")
    used = await proxy.issue_token(busy)
    idle = await proxy.issue_token(busy)
    elsewhere = await proxy.issue_token(other)

    assert [await call(proxy, used["token"]) for _ in range(3)] == [200] * 3
    assert await call(proxy, used["token"], upstream_status=503) == 503
    assert await call(proxy, elsewhere["token"]) == 200
    token_usage = expected(await wait_for_usage(proxy, f"/tokens/{used['id']}", 4))
    other_usage = expected(await wait_for_usage(proxy, f"/tokens/{elsewhere['id']}", 1))
    after = utcnow()
    # A test that runs across the hour (or midnight) finds its requests in either bucket.
    hours = {key(hour_start(before)), key(hour_start(after))}
    days = {key(hour_start(before).replace(hour=0)), key(hour_start(after).replace(hour=0))}
    assert token_usage["requests"] == 4 and token_usage["errors"] == 1
    assert token_usage["tokens"] > 0 and token_usage["spend"] > 0

    token_page = (await admin.get(f"/admin/tokens/{used['id']}")).text
    assert_charts_show(token_page, token_usage, hours, days)
    project_page = (await admin.get(f"/admin/projects/{busy}")).text
    assert_charts_show(project_page, token_usage, hours, days)
    dashboard = (await admin.get("/admin/")).text
    everything = {m: token_usage[m] + other_usage[m] for m in METRICS}
    assert_charts_show(dashboard, everything, hours, days)

    # The figures under the charts say the same in words.
    this_hour = max(hours, key=lambda h: bars(dashboard, "chart-24h-requests")[h])
    row = dashboard.split(f'<tr data-bucket="{this_hour}">', 1)[1].split("</tr>", 1)[0]
    assert f'<td class="num">{everything["requests"]:,}</td>' in row
    tooltip = re.search(
        rf'data-bucket="{this_hour}" data-value="{everything["requests"]}"><title>([^<]+)</title>',
        dashboard,
    )
    assert tooltip and tooltip.group(1).endswith(f": {everything['requests']} requests")

    idle_page = (await admin.get(f"/admin/tokens/{idle['id']}")).text
    assert_charts_show(idle_page, dict.fromkeys(METRICS, 0), hours, days)
    assert "No requests in the last 24 hours." in idle_page  # the summary read out
    assert "No spend in the last 30 days." in idle_page


async def test_an_unused_installation_shows_empty_charts(admin: AdminPages) -> None:
    page = (await admin.get("/admin/")).text
    for metric, note in (
        ("requests", "No requests"),
        ("tokens", "No tokens used"),
        ("errors", "No errors"),
        ("spend", "No spend"),
    ):
        for period, chart in (("24 hours", "24h"), ("30 days", "30d")):
            assert set(bars(page, f"chart-{chart}-{metric}").values()) == {0}
            svg = re.search(rf'id="chart-{chart}-{metric}".*?</svg>', page, re.DOTALL)
            assert svg and 'class="empty-note"' in svg.group(0)
            assert f">{note}</text>" in svg.group(0)
            assert f">{note} in the last {period}.</desc>" in svg.group(0)
    assert page.count('role="img"') == 8
